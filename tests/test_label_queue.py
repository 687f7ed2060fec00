"""The label queue at the cloud (content-addressed samples, core-set selection, labelling,
Label Studio's JSON, the oracle, the CLI) and retrain-and-ship (fine-tuning on the labels,
the canary, the promotion rule in the registry's history)."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import orjson
import pytest
from PIL import Image

from tierwise.active.cloud import dataset_oracle, model_embeddings
from tierwise.active.labels import LabelError, LabelStore
from tierwise.active.retrain import RetrainError, apply, decide, retrain
from tierwise.cli import main
from tierwise.config import Config, write_config
from tierwise.data import CLASS_NAMES, Splits
from tierwise.protocol.samples import encode_sample, parse_samples
from tierwise.registry.signing import PRIVATE_KEY_FILE, load_private_key
from tierwise.registry.store import registry_of

DEVICE = "fmnist-device"


def _upload(store: LabelStore, images: np.ndarray, device: str = "d1", *,
            scores: list[float] | None = None, first: int = 0, version: str = "1",
            feedback: list[dict] | None = None) -> tuple[int, int]:
    """Send `images` to `store` as a device's upload would arrive."""
    samples = []
    for i, image in enumerate(images):
        digest, data = encode_sample(np.asarray(image))
        samples.append({"trace_id": f"{device}-{first + i}", "sampler": "margin",
                        "score": scores[i] if scores else 0.5, "model": DEVICE,
                        "model_version": version, "device_label": 0, "classes": 10,
                        "sha256": digest, "data": data})
    batch, decoded = parse_samples(orjson.dumps({"device": device, "samples": samples,
                                                 "feedback": feedback or []}))
    return store.add(batch, [raw for raw, _ in decoded])


@pytest.fixture
def store(tmp_path: Path) -> LabelStore:
    return LabelStore(tmp_path / "labels")


def test_samples_are_stored_once_by_content_and_picked_by_score(
        store: LabelStore, splits: Splits) -> None:
    assert _upload(store, splits.test_x[:5], scores=[0.1, 0.9, 0.5, 0.7, 0.3]) == (5, 0)
    assert _upload(store, splits.test_x[:2], device="d2") == (0, 2)  # same content
    assert store.counts() == {"candidate": 5, "queued": 0, "labelled": 0}
    assert store.uploads() == {"d1": {"samples": 5, "bytes": 5 * 912},
                               "d2": {"samples": 2, "bytes": 2 * 912}}
    chosen = store.select(2, DEVICE, "score")
    scores = {item.id: item.score for item in store.items()}
    assert [scores[sample_id] for sample_id in chosen] == [0.9, 0.7]
    assert {item.id for item in store.items("queued")} == set(chosen)
    # the blob is the sample as sent, under its sha256
    item = store.items("queued")[0]
    path = store.blob_path(item.id)
    assert path.name == item.id and path.read_bytes()[:6] == b"\x93NUMPY"
    with pytest.raises(LabelError, match="budget"):
        store.select(-1)
    with pytest.raises(LabelError, match="method"):
        store.select(1, method="badge")


def test_core_set_covers_the_candidates_rather_than_their_densest_part(
        store: LabelStore, splits: Splits, models_dir: Path) -> None:
    trousers = splits.test_x[splits.test_y == 1][:20]
    bags = splits.test_x[splits.test_y == 8][:2]
    _upload(store, np.concatenate([trousers, bags]))
    embed = model_embeddings(models_dir, DEVICE)
    vectors = embed([image for image in trousers[:3]])
    assert vectors.dtype == np.float32 and vectors.ndim == 2 and vectors.shape[0] == 3
    chosen = store.select(3, DEVICE, "core-set", embed)
    picked = [store.array(sample_id) for sample_id in chosen]
    assert len(picked) == 3
    assert any(any(np.array_equal(p, bag) for bag in bags) for p in picked)  # 2 of 22 are bags
    # what is queued or labelled is covered already: the next batch goes elsewhere
    again = store.select(3, DEVICE, "core-set", embed)
    assert not set(again) & set(chosen)


def test_labelling_checks_the_id_and_the_label(store: LabelStore, splits: Splits) -> None:
    _upload(store, splits.test_x[:3])
    sample_id = store.items()[0].id
    assert store.label(sample_id[:10], 4).label == 4
    assert store.item(sample_id).state == "labelled"
    for bad, message in ((("deadbeefdead", 1), "no sample"), (("dead", 1), "8 or more"),
                         ((sample_id, 10), r"0\.\.\.9"), ((sample_id, True), "class index")):
        with pytest.raises(LabelError, match=message):
            store.label(*bad)
    with pytest.raises(LabelError, match="no sample"):  # nothing of a bad batch is labelled
        store.label_many([(store.items("candidate")[0].id, 2), ("f" * 64, 1)], "cli")
    assert store.counts()["labelled"] == 1


def test_label_studio_round_trip_labels_what_it_can_and_counts_what_it_skipped(
        store: LabelStore, splits: Splits) -> None:
    _upload(store, splits.test_x[:6])
    store.select(6, DEVICE, "score")
    tasks = store.export_label_studio(store.items("queued"), CLASS_NAMES)
    assert len(tasks) == 6
    first = tasks[0]
    png = base64.b64decode(first["data"]["image"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (28, 28)
    assert first["predictions"][0]["result"][0]["value"]["choices"] == [CLASS_NAMES[0]]
    assert first["predictions"][0]["result"][0]["type"] == "choices"

    def annotated(task: dict, choice: str, cancelled: bool = False) -> dict:
        return {**task, "annotations": [{"result": [{
            "from_name": "label", "to_name": "image", "type": "choices",
            "value": {"choices": [choice]}}], "was_cancelled": cancelled}]}

    exported = [annotated(tasks[0], CLASS_NAMES[3]), annotated(tasks[1], CLASS_NAMES[5]),
                annotated(tasks[2], "Spaceship"), tasks[3],
                annotated(tasks[4], CLASS_NAMES[1], cancelled=True),
                annotated({"data": {"tierwise_id": "a" * 64}}, CLASS_NAMES[2]),
                annotated({"data": {"image": "x.png"}}, CLASS_NAMES[2])]
    # odd shapes a hand-edited or other tool's file has: counted, never a traceback
    odd = [{**tasks[5], "annotations": [{"result": [{"type": "choices", "value": "Bag"}]}]},
           {**tasks[5], "annotations": [{"result": 5}]},
           {**tasks[5], "annotations": [{"result": [{"type": "choices",
                                                     "value": {"choices": "Bag"}}]}]},
           {**tasks[5], "annotations": "none"}]
    result = store.import_label_studio(json.loads(json.dumps(exported + odd)), CLASS_NAMES)
    assert result.labelled == 2
    assert result.skipped == {"unknown label": 1, "unannotated": 2, "missing": 2,
                              "malformed": 4}
    assert "labelled 2; skipped" in result.describe()
    labels = {item.id: item.label for item in store.items("labelled")}
    assert labels == {tasks[0]["data"]["tierwise_id"]: 3, tasks[1]["data"]["tierwise_id"]: 5}
    for bad in ({"tasks": []}, [1, 2], [{"no data": 1}]):
        with pytest.raises(LabelError, match="label file"):
            store.import_label_studio(bad, CLASS_NAMES)
    assert store.counts()["labelled"] == 2  # a bad file labels nothing


def test_the_oracle_labels_from_ground_truth_and_leaves_what_it_does_not_know(
        store: LabelStore, splits: Splits) -> None:
    shifted = (255 - splits.test_x[:3]).astype(np.uint8)
    _upload(store, np.concatenate([splits.test_x[:5], shifted]))
    store.select(8, DEVICE, "score")
    oracle = dataset_oracle(splits.test_x[:100], splits.test_y[:100])
    assert store.oracle(oracle) == (5, 3)
    for item in store.items("labelled"):
        index = next(i for i in range(5) if np.array_equal(store.array(item.id),
                                                           splits.test_x[i]))
        assert item.label == splits.test_y[index] and item.labelled_by == "oracle"


# -- the CLI, and retrain and ship ---------------------------------------------------------

@pytest.fixture
def cloud(cloud_config: Config, models_dir: Path, tmp_path: Path) -> tuple[Config, str]:
    """A cloud with the device model (and its weights) in its models directory, pushed as
    stable version 1, and a config file for the CLI."""
    config = cloud_config.model_copy(deep=True)
    shutil.copytree(models_dir / DEVICE, config.models_dir / DEVICE)
    config.active.retrain.min_labels = 40
    config.active.retrain.replay = 400
    config.active.retrain.train.epochs = 2
    config.active.retrain.min_feedback = 0
    key = load_private_key(config.registry_dir / "keys" / PRIVATE_KEY_FILE)
    assert registry_of(config).push(config, config.models_dir, DEVICE, key,
                                    tiers=["device"]).version == 1
    return config, str(write_config(config, tmp_path / "tierwise.toml"))


def test_the_labels_cli_lists_labels_exports_and_imports(
        cloud: tuple[Config, str], splits: Splits, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    config, path = cloud
    from tierwise.cloud import label_store

    store = label_store(config)
    _upload(store, splits.test_x[:12])
    assert main(["--config", path, "labels", "select", "--budget", "4"]) == 0
    assert "queued 4" in capsys.readouterr().out
    assert main(["--config", path, "labels", "list", "--state", "queued"]) == 0
    assert "queued" in capsys.readouterr().out
    sample_id = store.items("queued")[0].id
    assert main(["--config", path, "labels", "label", sample_id[:12], "Sneaker"]) == 0
    assert store.item(sample_id).label == CLASS_NAMES.index("Sneaker")
    assert main(["--config", path, "labels", "label", sample_id[:12], "Spaceship"]) == 2
    assert "not one of" in capsys.readouterr().err
    assert main(["--config", path, "labels", "label", "0123456789ab", "3"]) == 2
    assert "no sample" in capsys.readouterr().err
    out = tmp_path / "ls" / "tasks.json"
    assert main(["--config", path, "labels", "export", "--out", str(out)]) == 0
    tasks = json.loads(out.read_text())
    assert len(tasks) == 3  # queued, not yet labelled
    assert "<Choice value=\"Sneaker\"/>" in (tmp_path / "ls" / "tasks.label_config.xml"
                                             ).read_text()
    for task in tasks:
        task["annotations"] = [{"result": [{"type": "choices", "from_name": "label",
                                            "to_name": "image",
                                            "value": {"choices": ["Bag"]}}]}]
    out.write_text(json.dumps(tasks))
    assert main(["--config", path, "labels", "import", str(out)]) == 0
    assert "labelled 3" in capsys.readouterr().out
    (tmp_path / "broken.json").write_text("{not json")
    assert main(["--config", path, "labels", "import", str(tmp_path / "broken.json")]) == 2
    assert "not a Label Studio JSON export" in capsys.readouterr().err
    assert main(["--config", path, "labels", "summary"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == {"candidate": 8, "queued": 0, "labelled": 4}


def test_a_retrain_with_too_few_labels_trains_and_pushes_nothing(
        cloud: tuple[Config, str], splits: Splits, capsys: pytest.CaptureFixture[str]) -> None:
    config, path = cloud
    from tierwise.cloud import label_store

    store = label_store(config)
    _upload(store, splits.test_x[:30])
    store.oracle(dataset_oracle(splits.test_x[:30], splits.test_y[:30]),
                 states=("candidate",))
    assert main(["--config", path, "learn", "retrain"]) == 2
    error = capsys.readouterr().err
    assert "fewer than active.retrain.min_labels (40)" in error and "nothing pushed" in error
    assert [v["version"] for v in registry_of(config).versions(DEVICE)] == ["1"]
    # a model imported as ONNX alone has no weights to fine-tune: said, not attempted
    plain = config.models_dir / "imported-plain"
    shutil.copytree(config.models_dir / DEVICE, plain)
    (plain / "weights.pt").unlink()
    metadata = json.loads((plain / "metadata.json").read_text())
    (plain / "metadata.json").write_text(json.dumps({**metadata, "name": "imported-plain"}))
    with pytest.raises(RetrainError, match=r"no trained torch weights.*Only models with torch"):
        retrain(config, store, model="imported-plain")


def test_retrain_pushes_a_better_canary_and_the_rule_promotes_it(
        cloud: tuple[Config, str], splits: Splits, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    config, path = cloud
    from tierwise.bench.drift import SHIFTS
    from tierwise.cloud import label_store

    # the field's rendering changed: rotated images, which the stable model gets wrong
    field_x = SHIFTS["rotation (30 deg)"](splits.train_x[:160], np.random.default_rng(0))
    field_y = splits.train_y[:160]
    config.active.retrain.replay = 1500
    config.active.retrain.min_feedback = 3
    write_config(config, Path(path))
    store = label_store(config)
    _upload(store, field_x)
    assert store.oracle(dataset_oracle(field_x, field_y), states=("candidate",)) == (160, 0)
    before = (config.models_dir / DEVICE / "model.onnx").read_bytes()
    out = tmp_path / "retrain.json"
    assert main(["--config", path, "learn", "retrain", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    print(printed, result["stable"], result["candidate"])
    assert result["version"] == 2 and result["held_out"] > 10
    assert result["trained_on"] + result["held_out"] == 160
    assert result["candidate"]["field_accuracy"] > result["stable"]["field_accuracy"] + 0.1
    assert result["decision"]["action"] == "wait"  # the cohort has not spoken yet
    assert registry_of(config).require(DEVICE).canary == 2
    verdicts = [{"trace_id": f"c{i}", "model": DEVICE, "model_version": "2",
                 "correct": i > 0, "at": 2e9} for i in range(3)]
    verdicts += [{"trace_id": f"s{i}", "model": DEVICE, "model_version": "1",
                  "correct": i > 1, "at": 2e9} for i in range(3)]
    _upload(store, field_x[:0], device="cohort", feedback=verdicts)
    assert main(["--config", path, "learn", "promote"]) == 0
    assert "promote" in capsys.readouterr().out
    registry = registry_of(config)
    rollout = registry.require(DEVICE)
    assert rollout.stable == 2 and rollout.canary is None
    history = registry.events(DEVICE)
    assert [e["action"] for e in history][-3:] == ["push", "canary", "stable"]
    assert "promoted from canary: held-out field labels" in history[-1]["detail"]
    assert "users called 33.3% of 3 canary answers wrong, 66.7% of 3 stable ones" in \
        history[-1]["detail"]
    assert (config.models_dir / DEVICE / "model.onnx").read_bytes() != before  # new stable
    assert json.loads((config.models_dir / DEVICE / "metadata.json").read_text()
                      )["version"] == "2"


def test_the_rule_waits_for_the_cohort_then_rolls_back_a_canary_users_call_worse(
        cloud: tuple[Config, str], splits: Splits) -> None:
    config, _ = cloud
    from tierwise.cloud import label_store

    config.active.retrain.min_feedback = 5
    config.active.retrain.margin = config.active.retrain.forgetting_margin = 0.05
    store = label_store(config)
    _upload(store, splits.train_x[:80])
    store.oracle(dataset_oracle(splits.train_x[:80], splits.train_y[:80]),
                 states=("candidate",))
    result = retrain(config, store)
    assert result.version == 2
    assert decide(config, store).action == "wait"  # no verdicts yet
    verdicts = [{"trace_id": f"c{i}", "model": DEVICE, "model_version": "2",
                 "correct": i < 1, "at": 2e9 - i} for i in range(5)]
    verdicts += [{"trace_id": f"s{i}", "model": DEVICE, "model_version": "1",
                  "correct": i < 4, "at": 2e9 - i} for i in range(5)]
    _upload(store, splits.train_x[:0], device="cohort", feedback=verdicts)
    decision = apply(config, decide(config, store))
    assert decision.action == "rollback", decision.reason
    assert "users called 80.0% of 5 canary answers wrong, 20.0% of 5 stable ones" in \
        decision.reason
    registry = registry_of(config)
    assert registry.require(DEVICE).canary is None and registry.require(DEVICE).stable == 1
    assert registry.events(DEVICE)[-1]["action"] == "rollback"
    assert "canary dropped: " in registry.events(DEVICE)[-1]["detail"]


def test_a_decision_is_carried_out_only_on_the_canary_it_was_taken_on(
        cloud: tuple[Config, str], splits: Splits) -> None:
    from tierwise.active.retrain import Decision
    from tierwise.cloud import label_store
    from tierwise.registry import RegistryError

    config, _ = cloud
    store = label_store(config)
    _upload(store, splits.train_x[:80])
    store.oracle(dataset_oracle(splits.train_x[:80], splits.train_y[:80]),
                 states=("candidate",))
    assert retrain(config, store).version == 2
    registry = registry_of(config)
    before = (config.models_dir / DEVICE / "model.onnx").read_bytes()
    registry.rollback(DEVICE)  # someone dropped it meanwhile
    for action in ("promote", "rollback"):
        with pytest.raises(RegistryError, match="no canary"):
            apply(config, Decision(action, "stale", canary=2))
    assert registry.require(DEVICE).stable == 1  # stable never rolled back instead
    assert (config.models_dir / DEVICE / "model.onnx").read_bytes() == before
    assert not list((config.models_dir / DEVICE).glob(".*.new"))  # nothing left staged
    # a canary measured against another stable than today's is rolled back, not promoted
    assert retrain(config, store).version == 3
    evaluation = config.active.label_root(config.data_dir) / "candidates" / DEVICE / "3" / \
        "evaluation.json"
    record = json.loads(evaluation.read_text())
    evaluation.write_text(json.dumps({**record, "base_version": "7"}))
    decision = decide(config, store)
    assert decision.action == "rollback" and "measured against version 7" in decision.reason
