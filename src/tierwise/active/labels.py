"""The label queue at the cloud: the samples devices sent, content-addressed, and their labels.

A sample is stored once per content: its `.npy` bytes under `blobs/sha256/<digest>` (written
before its row, renamed into place, so a crash never leaves a row without its bytes), its row
keyed by that digest with the trace it came with (device, model and version, sampler and
score, confidence, the device's and a server's answers, the user's feedback). Every upload is
also counted per device and trace id (`received`): the bytes a device sent, duplicates too.

A sample moves through three states:

  candidate   sent by a device
  queued      picked for labelling (`select`: the highest-scored, or a batch-diverse
              core-set over the candidates, Sener & Savarese 2018)
  labelled    a label from a person (`label`, a Label Studio import) or the oracle

`export_label_studio` and `import_label_studio` speak Label Studio's JSON task format (a list
of tasks, each with `data` and `annotations[].result[]` of type `choices`;
https://labelstud.io/guide/task_format), the tool labelling teams use. An import labels what
it can in one transaction and counts what it skipped, and why; it never half-applies a file.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tierwise.database import Database
from tierwise.protocol.samples import SampleBatch

STATES = ("candidate", "queued", "labelled")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id TEXT PRIMARY KEY, trace_id TEXT NOT NULL, device TEXT NOT NULL, model TEXT NOT NULL,
    model_version TEXT NOT NULL, sampler TEXT NOT NULL, score DOUBLE PRECISION NOT NULL,
    confidence DOUBLE PRECISION, device_label BIGINT, server_label BIGINT,
    feedback_correct INTEGER, feedback_label BIGINT, classes BIGINT NOT NULL,
    bytes BIGINT NOT NULL, received_at DOUBLE PRECISION NOT NULL,
    state TEXT NOT NULL DEFAULT 'candidate', label BIGINT, labelled_by TEXT,
    labelled_at DOUBLE PRECISION);
CREATE INDEX IF NOT EXISTS samples_state ON samples (state, model);
CREATE TABLE IF NOT EXISTS feedback (
    device TEXT NOT NULL, trace_id TEXT NOT NULL, model TEXT NOT NULL,
    model_version TEXT NOT NULL, correct INTEGER NOT NULL, at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (device, trace_id));
CREATE TABLE IF NOT EXISTS received (
    device TEXT NOT NULL, trace_id TEXT NOT NULL, id TEXT NOT NULL, bytes BIGINT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (device, trace_id));
"""
_COLUMNS = ("id, trace_id, device, model, model_version, sampler, score, confidence, "
            "device_label, server_label, feedback_correct, feedback_label, classes, bytes, "
            "received_at, state, label, labelled_by")
LABEL_STUDIO_FROM = "label"  # the <Choices> control of the exported labelling config
LABEL_STUDIO_TO = "image"


class LabelError(ValueError):
    """A label, a sample id or a label file the queue cannot take; the message names it."""


@dataclass(frozen=True)
class LabelItem:
    """One sample in the label queue (its bytes: `LabelStore.array(id)`)."""

    id: str  # sha256 of the sample's .npy bytes
    trace_id: str
    device: str
    model: str
    model_version: str
    sampler: str
    score: float
    confidence: float | None
    device_label: int | None
    server_label: int | None
    feedback_correct: bool | None
    feedback_label: int | None
    classes: int
    bytes: int
    received_at: float
    state: str
    label: int | None
    labelled_by: str | None

    @property
    def predicted(self) -> int | None:
        """The answer the device was given: the server's where one answered, else its own."""
        return self.server_label if self.server_label is not None else self.device_label


def _item(row: Sequence[Any]) -> LabelItem:
    values = list(row)
    values[10] = None if values[10] is None else bool(values[10])
    return LabelItem(*values)


@dataclass
class ImportResult:
    """What an import did: `labelled` samples, and the tasks skipped, by why."""

    labelled: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return f"labelled {self.labelled}" + (f"; skipped {skipped}" if skipped else "")


class LabelStore:
    """The label queue under `root` (blobs/sha256/), its index in `database` (an SQLite path
    or a postgresql:// URL; default `root`/labels.db)."""

    def __init__(self, root: Path, database: str | Path | None = None) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.database = Database(database or self.root / "labels.db", _SCHEMA, "labels")
        with self.database.transaction():
            pass  # made now: a bad location fails here

    # -- what devices send --------------------------------------------------------------

    def add(self, batch: SampleBatch, raw: Sequence[bytes]) -> tuple[int, int]:
        """Store a checked upload (`tierwise.protocol.samples.parse_samples`): each sample's
        bytes `raw[i]`, and the users' verdicts. (stored, duplicates): a content already
        stored, or a trace this device sent before, is not stored again."""
        now = time.time()
        for record, data in zip(batch.samples, raw, strict=True):
            self._put_blob(record.sha256, data)  # before the rows that point at them
        stored = 0
        with self.database.transaction() as db:
            for verdict in batch.feedback:  # the last verdict on a trace counts
                db.execute("INSERT INTO feedback VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT "
                           "(device, trace_id) DO UPDATE SET correct = excluded.correct, "
                           "at = excluded.at",
                           (batch.device, verdict.trace_id, verdict.model,
                            verdict.model_version, int(verdict.correct), verdict.at))
            for record, data in zip(batch.samples, raw, strict=True):
                taken = db.execute(
                    "INSERT INTO received VALUES (?, ?, ?, ?, ?) ON CONFLICT (device, "
                    "trace_id) DO NOTHING",
                    (batch.device, record.trace_id, record.sha256, len(data), now)).rowcount
                if not taken:
                    continue  # sent again (its answer was lost): counted once
                stored += db.execute(
                    f"INSERT INTO samples ({_COLUMNS.rsplit(', state', 1)[0]}) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                    (record.sha256, record.trace_id, batch.device, record.model,
                     record.model_version, record.sampler, record.score, record.confidence,
                     record.device_label, record.server_label,
                     None if record.feedback_correct is None else int(record.feedback_correct),
                     record.feedback_label, record.classes, len(data), now)).rowcount
        return stored, len(batch.samples) - stored

    def _put_blob(self, digest: str, data: bytes) -> None:
        path = self.blob_path(digest)
        if path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as scratch:
            scratch.write(data)
            scratch.flush()
            os.fsync(scratch.fileno())
        os.replace(scratch.name, path)

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / digest

    # -- reading ------------------------------------------------------------------------

    def items(self, state: str | None = None, model: str | None = None,
              limit: int | None = None) -> list[LabelItem]:
        """Samples in `state` (default all) of `model` (default any), highest score first,
        then oldest first."""
        if state is not None and state not in STATES:
            raise LabelError(f"state: expected one of {STATES}, got {state!r}")
        where, parameters = _where(state=state, model=model)
        sql = f"SELECT {_COLUMNS} FROM samples{where} ORDER BY score DESC, received_at, id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self.database.transaction(write=False) as db:
            return [_item(row) for row in db.execute(sql, parameters).fetchall()]

    def item(self, sample_id: str) -> LabelItem:
        """The sample `sample_id`, or the one sample whose id starts with it (at least 8
        characters, as `labels list` prints them); LabelError otherwise."""
        sample_id = sample_id.strip().lower()
        if len(sample_id) < 8:
            raise LabelError(f"id: expected a sample id (8 or more of its hex digits), got "
                             f"{sample_id!r}")
        with self.database.transaction(write=False) as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM samples WHERE id LIKE ? LIMIT 2",
                              (sample_id.replace("%", "") + "%",)).fetchall()
        if not rows:
            raise LabelError(f"id: no sample {sample_id!r} in the label queue")
        if len(rows) > 1:
            raise LabelError(f"id: {sample_id!r} is the start of several samples' ids; give "
                             "more of it")
        return _item(rows[0])

    def array(self, sample_id: str) -> np.ndarray:
        """The sample as the device sent it (the input its model was given)."""
        return np.load(self.blob_path(sample_id), allow_pickle=False)

    def counts(self, model: str | None = None) -> dict[str, int]:
        """Samples per state."""
        where, parameters = _where(model=model)
        with self.database.transaction(write=False) as db:
            rows = db.execute(f"SELECT state, COUNT(*) FROM samples{where} GROUP BY state",
                              parameters).fetchall()
        return {state: 0 for state in STATES} | {state: int(n) for state, n in rows}

    def uploads(self, since: float = 0.0) -> dict[str, dict[str, int]]:
        """Per device: samples and bytes it sent after `since` (epoch s; duplicates of content
        included, a trace sent twice once)."""
        with self.database.transaction(write=False) as db:
            rows = db.execute("SELECT device, COUNT(*), COALESCE(SUM(bytes), 0) FROM received "
                              "WHERE received_at > ? GROUP BY device ORDER BY device",
                              (since,)).fetchall()
        return {device: {"samples": int(n), "bytes": int(size)} for device, n, size in rows}

    def feedback(self, model: str, since: float = 0.0) -> dict[str, dict[str, int]]:
        """Per version of `model`: the users' verdicts on its answers after `since` (epoch
        s), {"correct": n, "wrong": m}."""
        with self.database.transaction(write=False) as db:
            rows = db.execute("SELECT model_version, correct, COUNT(*) FROM feedback WHERE "
                              "model = ? AND at > ? GROUP BY model_version, correct",
                              (model, since)).fetchall()
        out: dict[str, dict[str, int]] = {}
        for version, correct, n in rows:
            out.setdefault(version, {"correct": 0, "wrong": 0})[
                "correct" if correct else "wrong"] += int(n)
        return out

    def labelled(self, model: str | None = None) -> tuple[list[LabelItem], list[np.ndarray]]:
        """The labelled samples (of `model`) and their arrays, oldest first."""
        items = sorted(self.items("labelled", model), key=lambda item: (item.received_at,
                                                                         item.id))
        return items, [self.array(item.id) for item in items]

    # -- picking and labelling --------------------------------------------------------------

    def select(self, budget: int, model: str | None = None, method: str = "score",
               embed: Callable[[list[np.ndarray]], np.ndarray] | None = None) -> list[str]:
        """Queue at most `budget` candidates for labelling; their ids. `method`: "score" (the
        devices' sampler scores, highest first) or "core-set" (greedy k-center over `embed`'s
        embeddings, float [n, d], of the candidates and of what is labelled already: a batch
        that covers the candidates, not near-duplicates of each other)."""
        from tierwise.active.samplers import CoreSet

        if budget < 0:
            raise LabelError(f"budget: expected a count ≥ 0, got {budget}")
        candidates = self.items("candidate", model)
        if method == "score":
            chosen = [item.id for item in candidates[:budget]]
        elif method == "core-set":
            if embed is None:
                raise LabelError("method core-set: needs embeddings of the samples")
            if not candidates:
                return []
            done = self.items("labelled", model) + self.items("queued", model)
            vectors = embed([self.array(item.id) for item in candidates + done])
            picked = CoreSet().select(vectors[:len(candidates)], budget,
                                      vectors[len(candidates):] if done else None)
            chosen = [candidates[i].id for i in picked]
        else:
            raise LabelError(f"method: expected 'score' or 'core-set', got {method!r}")
        with self.database.transaction() as db:
            for sample_id in chosen:
                db.execute("UPDATE samples SET state = 'queued' WHERE id = ? AND state = "
                           "'candidate'", (sample_id,))
        return chosen

    def label(self, sample_id: str, label: int, by: str = "cli") -> LabelItem:
        """Label one sample (its id, or the start of it); LabelError for an unknown id or a
        label outside its model's classes."""
        item = self.item(sample_id)
        self._check_label(item, label)
        with self.database.transaction() as db:
            self._set_label(db, item.id, label, by)
        return self.item(item.id)

    def label_many(self, labels: Iterable[tuple[str, int]], by: str) -> int:
        """Label each (full sample id, label), in one transaction; how many. LabelError
        (and nothing labelled) for an unknown id or a label outside the classes."""
        labels = list(labels)
        with self.database.transaction() as db:
            for sample_id, label in labels:
                row = db.execute(f"SELECT {_COLUMNS} FROM samples WHERE id = ?",
                                 (sample_id,)).fetchone()
                if row is None:
                    raise LabelError(f"id: no sample {sample_id!r} in the label queue")
                self._check_label(_item(row), label)
                self._set_label(db, sample_id, label, by)
        return len(labels)

    def oracle(self, truth: Callable[[str, np.ndarray], int | None], *,
               states: Sequence[str] = ("queued",), model: str | None = None) -> tuple[int, int]:
        """Benchmarks' labeller: label every sample in `states` with `truth(id, array)`, the
        ground truth (None: unknown to it). (labelled, unknown)."""
        items = [item for state in states for item in self.items(state, model)]
        answers = [(item.id, truth(item.id, self.array(item.id))) for item in items]
        known = [(sample_id, label) for sample_id, label in answers if label is not None]
        return self.label_many(known, "oracle"), len(answers) - len(known)

    @staticmethod
    def _check_label(item: LabelItem, label: int) -> None:
        if isinstance(label, bool) or not isinstance(label, int | np.integer):
            raise LabelError(f"label: expected a class index, got {label!r}")
        if item.classes and not 0 <= label < item.classes:
            raise LabelError(f"label: expected a class index 0...{item.classes - 1} of "
                             f"{item.model}, got {label}")
        if not item.classes:
            raise LabelError(f"label: {item.model}'s answers have no classes; this queue "
                             "labels classes")

    @staticmethod
    def _set_label(db: Any, sample_id: str, label: int, by: str) -> None:
        db.execute("UPDATE samples SET state = 'labelled', label = ?, labelled_by = ?, "
                   "labelled_at = ? WHERE id = ?", (int(label), by, time.time(), sample_id))

    # -- Label Studio ---------------------------------------------------------------------

    def export_label_studio(self, items: Sequence[LabelItem], class_names: Sequence[str]
                            ) -> list[dict[str, Any]]:
        """Label Studio tasks for `items`: `data.image` the sample as a PNG data URI,
        `data.tierwise_id` its id (an import finds it by that), the device's answer as a
        prediction to accept or correct, and the label as an annotation where it has one."""
        tasks = []
        for item in items:
            task: dict[str, Any] = {
                "data": {"image": _png_data_uri(self.array(item.id)), "tierwise_id": item.id,
                         "model": item.model, "model_version": item.model_version,
                         "sampler": item.sampler, "score": item.score, "device": item.device,
                         "trace_id": item.trace_id},
                "predictions": [], "annotations": []}
            predicted = item.predicted
            if predicted is not None and predicted < len(class_names):
                task["predictions"].append({
                    "model_version": f"{item.model}:{item.model_version}",
                    "score": item.confidence,
                    "result": [_choice(class_names[predicted])]})
            if item.label is not None and item.label < len(class_names):
                task["annotations"].append({"result": [_choice(class_names[item.label])],
                                            "was_cancelled": False})
            tasks.append(task)
        return tasks

    def import_label_studio(self, tasks: Any, class_names: Sequence[str],
                            by: str = "label-studio") -> ImportResult:
        """Take the labels in Label Studio's JSON export `tasks` (a list of tasks): the last
        annotation that is not cancelled, its `choices` a class name. Skipped and counted:
        a task without `data.tierwise_id` or whose sample is not here ("missing"), without
        an annotation ("unannotated"), whose choice is not a class ("unknown label") or not
        one of its sample's model's ("label outside the model's classes"), whose annotation
        is not Label Studio's shape ("malformed"). All that can be labelled is, in one
        transaction. LabelError when `tasks` is not a list of tasks at all."""
        if not isinstance(tasks, list):
            raise LabelError("label file: expected Label Studio's JSON export, a list of tasks; "
                             f"got {type(tasks).__name__}")
        index = {name: i for i, name in enumerate(class_names)}
        result = ImportResult()
        wanted: dict[str, int] = {}
        for position, task in enumerate(tasks):
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                raise LabelError(f"label file: task [{position}] is not a task with `data`")
            sample_id = task["data"].get("tierwise_id")
            if not isinstance(sample_id, str):
                result.skipped["missing"] += 1
                continue
            try:
                choice = _annotated_choice(task)
            except ValueError:
                result.skipped["malformed"] += 1
                continue
            if choice is None:
                result.skipped["unannotated"] += 1
            elif choice not in index:
                result.skipped["unknown label"] += 1
            else:
                wanted[sample_id] = index[choice]
        with self.database.transaction(write=False) as db:
            known = dict(db.execute("SELECT id, classes FROM samples").fetchall())
        found = {}
        for sample_id, label in wanted.items():
            if sample_id not in known:
                result.skipped["missing"] += 1
            elif not label < (known[sample_id] or 0):
                result.skipped["label outside the model's classes"] += 1
            else:
                found[sample_id] = label
        result.labelled = self.label_many(found.items(), by)
        result.skipped = Counter({why: n for why, n in result.skipped.items() if n})
        return result


def label_studio_config(class_names: Sequence[str]) -> str:
    """The labelling interface for exported tasks (Label Studio's XML config): the image and
    one choice per class."""
    from xml.sax.saxutils import quoteattr

    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in class_names)
    return (f'<View>\n  <Image name="{LABEL_STUDIO_TO}" value="$image"/>\n'
            f'  <Choices name="{LABEL_STUDIO_FROM}" toName="{LABEL_STUDIO_TO}" '
            f'choice="single" showInline="true">\n{choices}\n  </Choices>\n</View>\n')


def _choice(name: str) -> dict[str, Any]:
    return {"from_name": LABEL_STUDIO_FROM, "to_name": LABEL_STUDIO_TO, "type": "choices",
            "value": {"choices": [name]}}


def _annotated_choice(task: dict[str, Any]) -> str | None:
    """The class chosen in the last annotation of `task` that was not cancelled; None when
    there is none. ValueError when the annotations are not Label Studio's shape."""
    annotations = task.get("annotations", task.get("completions")) or []
    if not isinstance(annotations, list):
        raise ValueError("annotations is not a list")
    for annotation in reversed(annotations):
        if not isinstance(annotation, dict):
            raise ValueError("an annotation is not an object")
        if annotation.get("was_cancelled"):
            continue
        regions = annotation.get("result") or []
        if not isinstance(regions, list):
            raise ValueError("an annotation's result is not a list")
        for region in regions:
            if not isinstance(region, dict) or region.get("type") != "choices":
                continue
            value = region.get("value")
            choices = value.get("choices") if isinstance(value, dict) else None
            if not isinstance(choices, list) or not choices or \
                    not all(isinstance(choice, str) for choice in choices):
                raise ValueError("value.choices is not a list of class names")
            return str(choices[0])
    return None


def _png_data_uri(array: np.ndarray) -> str:
    """A sample as a PNG data URI: a grey or colour image of any size (float data scaled to
    0..255; the first item of a batch of one)."""
    from PIL import Image

    image = np.asarray(array)
    while image.ndim > 3 or (image.ndim == 3 and image.shape[0] == 1 and image.shape[-1] > 4):
        image = image[0]
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = np.moveaxis(image, 0, -1)  # channels first
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.dtype != np.uint8:
        low, high = float(np.min(image)), float(np.max(image))
        image = ((image - low) / (high - low or 1.0) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _where(**filters: str | None) -> tuple[str, tuple[Any, ...]]:
    used = {name: value for name, value in filters.items() if value is not None}
    if not used:
        return "", ()
    return " WHERE " + " AND ".join(f"{name} = ?" for name in used), tuple(used.values())
