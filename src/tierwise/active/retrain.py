"""Retrain and ship: the device model fine-tuned on the field's labels, pushed as a canary,
promoted or rolled back by a rule.

`retrain` fine-tunes the device model's torch weights on the labels in the label queue plus
a replay sample of its old training data (experience replay, so it keeps what it knew; Rolnick
et al., "Experience Replay for Continual Learning", NeurIPS 2019), each field label weighted
`field_weight` times. A share of the field labels is held out (chosen by the sample's content
address, so the same sample is always held out) and never trained on. Stable and candidate
are measured side by side on it and on the dataset's validation split; the candidate is
exported the zoo's way (calibrated, ONNX, cut points) into a staging directory, never over
the stable model, and pushed to the registry as a canary on the device tier.

`decide` is the promotion rule: the canary is promoted when it is at least as good as stable
on the held-out field labels (less `margin`), forgets little of what it knew (on the
validation split, less `forgetting_margin`) and, once `min_feedback` verdicts on its answers came
in from its cohort (`client.feedback`), its share of answers users called wrong is no
higher than stable's over the same time (plus `margin`); it is rolled back as soon as either
says it is worse. Either way the numbers go into the registry's history. A promoted
candidate's files replace the stable model's in the models directory, so the next retrain
starts from it.

Which models can be retrained: those that keep their torch weights beside their ONNX file,
i.e. the zoo's (`tierwise zoo train`) and the federated model (`tierwise fl run`). Not an
imported ONNX model (`tierwise models add`), nor a quantized, pruned or distilled variant:
they have no weights to fine-tune here, and a retrain of one is a RetrainError that says so
(an imported classifier's path would be onnx2torch, as learned bottlenecks take; it is not
built).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tierwise.active.labels import LabelStore
from tierwise.config import DEVICE_TIER, Config
from tierwise.models.inputs import as_batch
from tierwise.models.store import ModelInfo, load_info, model_dir, sha256_file

EVALUATION_FILE = "evaluation.json"


class RetrainError(ValueError):
    """A retrain that cannot be done as asked (too few labels, a model without weights);
    nothing was trained or pushed. The message says why and what to change."""


@dataclass(frozen=True)
class Evaluation:
    """Accuracy on the held-out field labels and on the dataset's validation split."""

    field_accuracy: float | None  # None: no field label held out
    field_samples: int
    validation_accuracy: float
    validation_samples: int


@dataclass
class RetrainResult:
    model: str
    base_version: str          # the stable version it started from
    labels: int                # field labels in the queue
    trained_on: int            # of them, trained on
    held_out: int              # of them, held out
    replay: int                # old training samples mixed in
    stable: Evaluation
    candidate: Evaluation
    candidate_dir: str
    seconds: float
    version: int | None = None  # the registry version it was pushed as (None: not pushed)
    decision: dict[str, Any] = field(default_factory=dict)  # the promotion rule's first look

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_held_out(sample_id: str, share: float) -> bool:
    """Whether the sample `sample_id` (its sha256) is held out at `share`: a stable choice by
    content, so a sample is held out in every retrain or in none."""
    return int(sample_id[:8], 16) / 2**32 < share


def device_model_name(config: Config, models_dir: Path) -> str:
    """The model the device tier runs (`tiers.device.models`, else one imported for it)."""
    from tierwise.client.modelset import ModelSet

    return ModelSet.read(models_dir).device_model(config)


def candidates_dir(config: Config, model: str) -> Path:
    """Where retrained candidates of `model` are kept, one directory per registry version."""
    return config.active.label_root(config.data_dir) / "candidates" / model


def retrain(config: Config, store: LabelStore, *, model: str | None = None,
            push: bool = True, seed: int = 0, progress: Any = None) -> RetrainResult:
    """Fine-tune `model` (default the device model) on the label queue's labels, measure it
    beside stable, stage it, and push it as a canary (`push`, where the registry has its
    signing key). RetrainError when it has fewer than `active.retrain.min_labels` labels to
    train on, or no torch weights."""
    from tierwise.data import load_splits
    from tierwise.zoo.build import load_trained, register_trained

    started = time.perf_counter()
    settings = config.active.retrain
    models_dir = config.models_dir
    model = model or device_model_name(config, models_dir)
    try:
        stable, info = load_trained(models_dir, model)
    except (FileNotFoundError, ValueError) as error:
        raise RetrainError(f"retrain {model}: {error}. Only models with torch weights can be "
                           "fine-tuned: the zoo's and the federated model") from None
    assert info.trained is not None  # load_trained checked
    items, arrays = store.labelled(model)
    held = [i for i, item in enumerate(items) if is_held_out(item.id, settings.holdout_share)]
    train = [i for i in range(len(items)) if i not in set(held)]
    if len(train) < settings.min_labels:
        raise RetrainError(
            f"retrain {model}: {len(train)} labels to train on ({len(items)} labelled, "
            f"{len(held)} held out), fewer than active.retrain.min_labels "
            f"({settings.min_labels}); nothing trained, nothing pushed. Label more "
            "(`tierwise labels select`, `label`, `import`) or lower the minimum")
    field_x = _inputs(info, [arrays[i] for i in range(len(items))])
    field_y = np.array([item.label for item in items], dtype=np.int64)
    splits = load_splits(config.data.path, config.data.validation_size, config.data.seed)
    replay = np.random.default_rng(seed).choice(
        len(splits.train_x), min(settings.replay, len(splits.train_x)), replace=False)
    candidate, train_s = fine_tune(stable, info.trained.architecture, field_x[train],
                                   field_y[train], splits.train_x[replay],
                                   splits.train_y[replay], config, seed, progress,
                                   f"retrain {model}")
    stable_eval = _evaluate(stable, field_x[held], field_y[held], splits)
    candidate_eval = _evaluate(candidate, field_x[held], field_y[held], splits)

    staging = candidates_dir(config, model) / f"staging-{time.time_ns()}"
    register_trained(candidate, model, info.trained.architecture, splits, staging,
                     {"epochs": float(settings.train.epochs), "seconds": train_s,
                      "field_labels": float(len(train)), "replay": float(len(replay)),
                      "base_version": float(info.version) if info.version.isdigit() else 0.0},
                     runs_on=info.runs_on or [DEVICE_TIER])
    _carry_profile(models_dir, staging, model, candidate_eval.validation_accuracy)
    outcome = RetrainResult(
        model=model, base_version=info.version, labels=len(items), trained_on=len(train),
        held_out=len(held), replay=len(replay), stable=stable_eval, candidate=candidate_eval,
        candidate_dir=str(staging), seconds=time.perf_counter() - started)
    # the measurements are beside the candidate before it is pushed: a canary the rule
    # finds is always one it can decide on
    (staging / EVALUATION_FILE).write_text(json.dumps({**outcome.to_dict(),
                                                       "pushed_at": time.time()}, indent=2))
    if push:
        outcome.version = _push_canary(config, staging, model)
        if outcome.version is not None:
            final = candidates_dir(config, model) / str(outcome.version)
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            outcome.candidate_dir = str(final)
    return outcome


def fine_tune(stable: Any, architecture: str, field_x: np.ndarray, field_y: np.ndarray,
              replay_x: np.ndarray, replay_y: np.ndarray, config: Config, seed: int = 0,
              progress: Any = None, description: str = "fine-tune") -> tuple[Any, float]:
    """(a copy of the torch module `stable` fine-tuned on the field's samples `field_x`
    (its input dtype, [n, ...]) and labels `field_y` (int64 [n]), each repeated
    `active.retrain.field_weight` times, mixed with the replay sample; the seconds it took).
    The zoo's training loop (`tierwise.zoo.train.train_model`) with `active.retrain.train`'s
    epochs, batch size and learning rate."""
    from tierwise.zoo.train import train_model

    settings = config.active.retrain
    train_x = np.concatenate([np.repeat(field_x, settings.field_weight, axis=0), replay_x])
    train_y = np.concatenate([np.repeat(field_y, settings.field_weight), replay_y])
    result = train_model(architecture, train_x, train_y, settings.train, seed, progress,
                         model=copy.deepcopy(stable), description=description)
    return result.model, result.seconds


def _inputs(info: ModelInfo, arrays: list[np.ndarray]) -> np.ndarray:
    """The samples as the model takes them: one batch, [n, ...] of its input dtype."""
    if not arrays:
        spec = info.inputs[0]
        return np.zeros([0, *(max(d, 1) for d in spec.shape[1:])], dtype=np.uint8)
    return np.concatenate([as_batch(info, array) for array in arrays])


def _evaluate(module: Any, field_x: np.ndarray, field_y: np.ndarray, splits: Any) -> Evaluation:
    from tierwise.zoo.train import predict_logits

    field_accuracy = float((predict_logits(module, field_x).argmax(1) == field_y).mean()) \
        if len(field_x) else None
    validation = float((predict_logits(module, splits.val_x).argmax(1) == splits.val_y).mean())
    return Evaluation(field_accuracy, len(field_x), validation, len(splits.val_x))


def _carry_profile(models_dir: Path, staging: Path, model: str, accuracy: float) -> None:
    """The stable model's profile for the candidate: the same architecture, so the same
    compute; its accuracy re-measured (validation split); its file hash the candidate's."""
    from tierwise.profile.model_profile import load_profile, save_profile

    try:
        profile = load_profile(models_dir, model)
    except FileNotFoundError:
        return  # stable had none: neither has the candidate
    onnx_file = model_dir(staging, model) / "model.onnx"
    save_profile(staging, profile.model_copy(update={
        "sha256": sha256_file(onnx_file), "accuracy": accuracy,
        "version": load_info(model_dir(staging, model)).version,
        "measured_at": profile.measured_at + " (compute); accuracy after retraining"}))


def _push_canary(config: Config, staging: Path, model: str) -> int | None:
    """Push the staged candidate as a canary on the device tier; None without a registry."""
    from tierwise.registry.signing import PRIVATE_KEY_FILE, load_private_key
    from tierwise.registry.store import registry_of

    key_file = config.registry_dir / "keys" / PRIVATE_KEY_FILE
    if not key_file.is_file():
        return None
    pushed = registry_of(config).push(
        config, staging, model, load_private_key(key_file), channel="canary",
        canary_share=config.active.retrain.canary_share, tiers=[DEVICE_TIER])
    return pushed.version


@dataclass(frozen=True)
class Decision:
    """The promotion rule's verdict: "promote", "rollback" or "wait", and why."""

    action: str
    reason: str
    canary: int | None = None
    feedback: dict[str, dict[str, int]] = field(default_factory=dict)


def decide(config: Config, store: LabelStore, model: str | None = None) -> Decision:
    """The promotion rule on `model`'s current canary (see the module's doc)."""
    from tierwise.registry.store import registry_of

    model = model or device_model_name(config, config.models_dir)
    settings = config.active.retrain
    rollout = registry_of(config).rollout(model)
    if rollout is None or rollout.canary is None:
        return Decision("none", f"{model}: no canary to decide on")
    evaluation_file = candidates_dir(config, model) / str(rollout.canary) / EVALUATION_FILE
    if not evaluation_file.is_file():
        return Decision("wait", f"{model} {rollout.canary}: not a retrained canary (no "
                        f"{evaluation_file}); promote or roll it back by hand",
                        rollout.canary)
    evaluation = json.loads(evaluation_file.read_text())
    if str(evaluation["base_version"]) != str(rollout.stable):
        return Decision("rollback", f"measured against version {evaluation['base_version']}, "
                        f"but stable is {rollout.stable} now: retrain against it",
                        rollout.canary)
    numbers, worse = _held_out(evaluation, settings.margin, settings.forgetting_margin)
    if worse:
        return Decision("rollback", f"worse on {worse}: {numbers}", rollout.canary)
    verdicts = store.feedback(model, since=evaluation["pushed_at"])
    if sum(verdicts.get(str(rollout.stable), {}).values()) < settings.min_feedback:
        # too few on stable meanwhile (a large canary share): stable's earlier ones too
        verdicts[str(rollout.stable)] = store.feedback(model).get(
            str(rollout.stable), {"correct": 0, "wrong": 0})
    action, said = _cohort(verdicts, str(rollout.canary), str(rollout.stable),
                           settings.min_feedback, settings.margin)
    return Decision(action, f"{numbers}; {said}", rollout.canary, verdicts)


def _held_out(evaluation: dict[str, Any], margin: float, forgetting_margin: float
              ) -> tuple[str, str | None]:
    """(the held-out numbers, the first held-out set the candidate is worse on, or None)."""
    stable, candidate = evaluation["stable"], evaluation["candidate"]
    checks = [("validation", stable["validation_accuracy"], candidate["validation_accuracy"],
               forgetting_margin)]
    if candidate["field_accuracy"] is not None:
        checks.insert(0, ("held-out field labels", stable["field_accuracy"],
                          candidate["field_accuracy"], margin))
    numbers = "; ".join(f"{name} {new:.2%} vs stable {old:.2%}"
                        for name, old, new, _ in checks)
    worse = next((name for name, old, new, allowed in checks if new < old - allowed), None)
    return numbers, worse


def _cohort(verdicts: dict[str, dict[str, int]], canary: str, stable: str, min_feedback: int,
            margin: float) -> tuple[str, str]:
    """(promote | rollback | wait, why) from the users' verdicts on each version's answers."""
    if not min_feedback:
        return "promote", "no cohort feedback asked for (min_feedback 0)"
    mine = verdicts.get(canary, {"correct": 0, "wrong": 0})
    theirs = verdicts.get(stable, {"correct": 0, "wrong": 0})
    heard, stable_heard = sum(mine.values()), sum(theirs.values())
    if heard < min_feedback or stable_heard < min_feedback:
        return "wait", (f"{heard} verdicts on the canary's answers and {stable_heard} on "
                        f"stable's; the rule waits for {min_feedback} on each")
    wrong, stable_wrong = mine["wrong"] / heard, theirs["wrong"] / stable_heard
    said = (f"users called {wrong:.1%} of {heard} canary answers wrong, {stable_wrong:.1%} "
            f"of {stable_heard} stable ones")
    return ("rollback" if wrong > stable_wrong + margin else "promote"), said


def apply(config: Config, decision: Decision, model: str | None = None) -> Decision:
    """Carry out `decision` in the registry, on the canary it was taken on (RegistryError if
    that is no longer the canary), its reason into the history. A promoted candidate's files
    become the stable model's in the models directory: copied beside them first, renamed into
    place once the registry has promoted it."""
    from tierwise.registry.store import registry_of

    model = model or device_model_name(config, config.models_dir)
    registry = registry_of(config)
    if decision.action == "promote":
        assert decision.canary is not None
        staged = _stage(candidates_dir(config, model) / str(decision.canary),
                        config.models_dir, model, str(decision.canary))
        try:
            registry.promote(model, reason=decision.reason, canary=decision.canary)
        except BaseException:
            for scratch, _ in staged:
                scratch.unlink(missing_ok=True)
            raise
        for scratch, target in staged:
            scratch.replace(target)
    elif decision.action == "rollback":
        registry.rollback(model, reason=decision.reason, canary=decision.canary)
    return decision


def _stage(candidate: Path, models_dir: Path, model: str, version: str
           ) -> list[tuple[Path, Path]]:
    """The candidate's files copied beside the stable model's (its metadata saying the
    registry version it is): [(the copy, the file it replaces)]."""
    from tierwise.models.store import METADATA_FILE

    source, target = model_dir(candidate, model), model_dir(models_dir, model)
    info = load_info(source).model_copy(update={"version": version})
    staged = []
    for path in source.iterdir():
        if path.is_file():
            scratch = target / f".{path.name}.new"
            if path.name == METADATA_FILE:
                scratch.write_text(info.model_dump_json(indent=2) + "\n")
            else:
                shutil.copyfile(path, scratch)
            staged.append((scratch, target / path.name))
    return staged
