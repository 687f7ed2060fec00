# `make demo` and `make test` do all set-up themselves on a fresh Debian machine:
# a virtualenv in .venv, the package with its extras, and Fashion-MNIST from Debian.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test dataset browser lint bench-serve clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[train,fl,media,dev]'
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

demo: dataset
	$(BIN)/tierwise demo

test: dataset browser
	$(BIN)/ruff check src tests
	$(BIN)/pytest -q

bench-serve: dataset
	$(BIN)/tierwise bench serve

clean:
	rm -rf $(VENV) reports
