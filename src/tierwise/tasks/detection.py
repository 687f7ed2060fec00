"""Object detection: boxes with scores and classes, however the model lays them out.

A layout (`BoxLayout`) turns a batch of raw outputs into scored candidate boxes per sample;
`Detection` then keeps the confident ones with greedy per-class non-max suppression. Two
layouts are here: `DecodedBoxes` (the model already outputs boxes and scores, e.g. the TF
Object Detection API's postprocessed graphs) and `SsdAnchorBoxes` (MediaPipe's SSD-style
regressors and classificators, e.g. BlazeFace, decoded against an `SsdAnchors` set). A new
layout is one new `BoxLayout` class.

Boxes are always (x_min, y_min, x_max, y_max), normalised to 0..1 of the model input.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple, Self

import numpy as np

from tierwise.models.store import ModelInfo, TensorSpec
from tierwise.tasks.base import (
    LABELS,
    Outputs,
    Quality,
    Task,
    TaskError,
    against_reference,
    check_paired,
    pick_spec,
)

MAP_IOU = 0.5
BOX_ORDERS = ("xyxy", "yxyx", "cxcywh")


@dataclass(frozen=True, eq=False)
class DetectionResult:
    """One sample's detections, most confident first.

    boxes [K, 4] float32 (x_min, y_min, x_max, y_max) normalised 0..1 to the model input;
    scores [K] float32 in [0, 1]; classes [K] int64; keypoints [K, P, 2] float32 (x, y)
    normalised, or None when the model has none. `candidate_scores` are the scores of every
    box that survived suppression with a score in or above the uncertainty band — the
    reported ones and the near misses below the score threshold — for `Detection.confidence`;
    None reads `scores` instead."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    keypoints: np.ndarray | None = None
    candidate_scores: np.ndarray | None = None


class Candidates(NamedTuple):
    """One sample's scored boxes before suppression (same layout as DetectionResult)."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    keypoints: np.ndarray | None


def box_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Intersection over union [A, B] float64 of boxes [A, 4] and [B, 4] (x_min, y_min,
    x_max, y_max); 0 where both are empty."""
    a = np.asarray(boxes, dtype=np.float64)[:, None, :]
    b = np.asarray(others, dtype=np.float64)[None, :, :]
    width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    intersection = width * height
    area_a = np.clip(a[..., 2] - a[..., 0], 0, None) * np.clip(a[..., 3] - a[..., 1], 0, None)
    area_b = np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    union = area_a + area_b - intersection
    return np.divide(intersection, union, out=np.zeros_like(union), where=union > 0)


def non_max_suppression(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                        iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression per class (the standard detector post-processing; see
    Neubeck & Van Gool, "Efficient Non-Maximum Suppression", ICPR 2006): in descending score
    order, keep a box and drop every later box of its class whose IoU with it exceeds
    `iou_threshold`. Returns the kept indices [K] int64, highest score first (ties: lower
    index first)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    classes = np.asarray(classes)
    suppressed = np.zeros(len(order), dtype=bool)
    kept = []
    for index in order:
        if suppressed[index]:
            continue
        kept.append(index)
        # one row of IoUs per kept box, not the full matrix: thousands of anchors stay cheap
        rivals = np.flatnonzero(~suppressed & (classes == classes[index]))
        overlap = box_iou(boxes[index:index + 1], boxes[rivals])[0]
        suppressed[rivals[overlap > iou_threshold]] = True
    return np.array(kept, dtype=np.int64)


def weighted_non_max_suppression(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float,
    keypoints: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Blended suppression (BlazeFace's "blending" strategy, Bazarevsky et al. 2019, section
    2.4; MediaPipe's WEIGHTED non-max suppression): the same greedy clusters as
    `non_max_suppression`, but each kept box (and its keypoints) becomes the score-weighted
    mean of its cluster — the box and every not-yet-suppressed box of its class with IoU
    above `iou_threshold` — keeping its own score. Steadier boxes across video frames.

    Returns (kept indices [K] int64 highest score first, boxes [K, 4], keypoints [K, P, 2]
    or None)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    classes = np.asarray(classes)
    weights = np.asarray(scores, dtype=np.float64)
    suppressed = np.zeros(len(order), dtype=bool)
    kept, blended_boxes, blended_points = [], [], []
    for index in order:
        if suppressed[index]:
            continue
        kept.append(index)
        rivals = np.flatnonzero(~suppressed & (classes == classes[index]))
        overlap = box_iou(boxes[index:index + 1], boxes[rivals])[0]
        cluster = rivals[(overlap > iou_threshold) | (rivals == index)]
        suppressed[cluster] = True
        share = weights[cluster] / max(float(weights[cluster].sum()), 1e-12)
        blended_boxes.append((boxes[cluster] * share[:, None]).sum(axis=0))
        if keypoints is not None:
            blended_points.append((keypoints[cluster] * share[:, None, None]).sum(axis=0))
    out_boxes = np.array(blended_boxes, dtype=np.float32).reshape(-1, 4)
    out_points = None if keypoints is None else np.array(
        blended_points, dtype=np.float32).reshape(-1, *keypoints.shape[1:])
    return np.array(kept, dtype=np.int64), out_boxes, out_points


def average_precision(true_positive: np.ndarray, truths: int) -> float:
    """All-point interpolated AP (PASCAL VOC 2010+, Everingham et al., IJCV 2010): the area
    under the precision-recall curve after making precision non-increasing in recall.
    `true_positive` [D] bool marks each detection, in descending score order; `truths` is
    the number of ground-truth boxes (> 0)."""
    hits = np.cumsum(true_positive, dtype=np.float64)
    recall = np.concatenate([[0.0], hits / truths, [1.0]])
    precision = np.concatenate([[0.0], hits / np.arange(1, len(hits) + 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def mean_average_precision(
    results: Sequence[DetectionResult], truths: Sequence[tuple[np.ndarray, np.ndarray]],
    iou_threshold: float = MAP_IOU,
) -> tuple[float, dict[int, float]]:
    """mAP at one IoU threshold, and AP per class: averaged over the classes present in the
    ground truth (a class only detected, never true, is left out, as VOC and COCO do).

    `truths` holds per image (boxes [M, 4], classes [M]). Matching is COCO's: detections of a
    class, pooled over images in descending score order, each take the still-unmatched true
    box of their class and image with the highest IoU ≥ `iou_threshold`, else count as false
    positives. With no true box at all, mAP is 1.0 when nothing was detected either, else 0.0
    (our convention, so that agreeing on "nothing here" scores as agreement)."""
    true_classes = {int(c) for _, classes in truths for c in np.asarray(classes).reshape(-1)}
    if not true_classes:
        detected = any(len(result.scores) for result in results)
        return (0.0 if detected else 1.0), {}
    per_class = {}
    for cls in sorted(true_classes):
        pool = [(float(score), image, int(index)) for image, result in enumerate(results)
                for index, score in enumerate(result.scores) if result.classes[index] == cls]
        pool.sort(key=lambda entry: -entry[0])  # stable: ties keep image, then box order
        true_boxes = [np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[
            np.asarray(classes).reshape(-1) == cls] for boxes, classes in truths]
        matched = [np.zeros(len(boxes), dtype=bool) for boxes in true_boxes]
        hits = np.zeros(len(pool), dtype=bool)
        for rank, (_, image, index) in enumerate(pool):
            if not len(true_boxes[image]):
                continue
            overlap = box_iou(results[image].boxes[index:index + 1], true_boxes[image])[0]
            overlap[matched[image]] = -1.0
            best = int(np.argmax(overlap))
            if overlap[best] >= iou_threshold:
                matched[image][best] = hits[rank] = True
        per_class[cls] = average_precision(hits, sum(len(boxes) for boxes in true_boxes))
    return float(np.mean(list(per_class.values()))), per_class


class SsdAnchors:
    """The anchor set of MediaPipe's SsdAnchorsCalculator
    (mediapipe/calculators/tflite/ssd_anchors_calculator.cc), as SSD (Liu et al., ECCV 2016)
    lays anchors on feature maps.

    Layers with the same stride share one feature map of ceil(input / stride) cells; each
    cell carries, per layer, one anchor per aspect ratio plus one at the interpolated scale
    when `interpolated_scale_aspect_ratio` > 0. Scales run linearly from `min_scale` to
    `max_scale` over the layers. With `fixed_anchor_size` (BlazeFace) every anchor is 1 x 1
    and only its centre matters.

    Parameters: input_size_px (width, height); strides, one per layer; aspect_ratios;
    interpolated_scale_aspect_ratio; anchor_offset (x, y) of the centre within a cell, in
    cells; min_scale, max_scale; fixed_anchor_size; reduce_boxes_in_lowest_layer (the
    first layer takes the fixed ratios 1, 2, 0.5 at scales 0.1, s, s).
    """

    def __init__(self, input_size_px: tuple[int, int], strides: Sequence[int],
                 aspect_ratios: Sequence[float] = (1.0,),
                 interpolated_scale_aspect_ratio: float = 1.0,
                 anchor_offset: tuple[float, float] = (0.5, 0.5),
                 min_scale: float = 0.1484375, max_scale: float = 0.75,
                 fixed_anchor_size: bool = True,
                 reduce_boxes_in_lowest_layer: bool = False) -> None:
        self.input_size_px = input_size_px
        self.strides = tuple(strides)
        self.aspect_ratios = tuple(aspect_ratios)
        self.interpolated_scale_aspect_ratio = interpolated_scale_aspect_ratio
        self.anchor_offset = anchor_offset
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.fixed_anchor_size = fixed_anchor_size
        self.reduce_boxes_in_lowest_layer = reduce_boxes_in_lowest_layer

    @classmethod
    def blazeface_short_range(cls) -> SsdAnchors:
        """BlazeFace short range (MediaPipe face_detection_short_range): 128 x 128 input,
        strides 8, 16, 16, 16, two anchors per cell per layer: 16*16*2 + 8*8*6 = 896."""
        return cls((128, 128), (8, 16, 16, 16))

    @classmethod
    def blazeface_full_range(cls) -> SsdAnchors:
        """BlazeFace full range (MediaPipe face_detection_full_range): 192 x 192 input,
        stride 4, one anchor per cell (no interpolated scale): 48*48 = 2304."""
        return cls((192, 192), (4,), interpolated_scale_aspect_ratio=0.0)

    def _scale(self, layer: int) -> float:
        if len(self.strides) == 1:
            return (self.min_scale + self.max_scale) / 2
        return self.min_scale + (self.max_scale - self.min_scale) * layer / (len(self.strides) - 1)

    def generate(self) -> np.ndarray:
        """The anchors [A, 4] float32 (x_center, y_center, width, height), normalised, in
        MediaPipe's order: by feature map, then row, column and anchor."""
        width_px, height_px = self.input_size_px
        anchors = []
        layer = 0
        while layer < len(self.strides):
            ratios: list[float] = []
            scales: list[float] = []
            last = layer
            while last < len(self.strides) and self.strides[last] == self.strides[layer]:
                scale = self._scale(last)
                if last == 0 and self.reduce_boxes_in_lowest_layer:
                    ratios += [1.0, 2.0, 0.5]
                    scales += [0.1, scale, scale]
                else:
                    ratios += self.aspect_ratios
                    scales += [scale] * len(self.aspect_ratios)
                    if self.interpolated_scale_aspect_ratio > 0:
                        following = 1.0 if last == len(self.strides) - 1 else self._scale(last + 1)
                        ratios.append(self.interpolated_scale_aspect_ratio)
                        scales.append(math.sqrt(scale * following))
                last += 1
            stride = self.strides[layer]
            rows, columns = math.ceil(height_px / stride), math.ceil(width_px / stride)
            y, x, kind = np.meshgrid(np.arange(rows), np.arange(columns), np.arange(len(ratios)),
                                     indexing="ij")
            root = np.sqrt(np.array(ratios))[kind.ravel()]
            size = np.array(scales)[kind.ravel()]
            fixed = self.fixed_anchor_size
            anchors.append(np.stack([
                (x.ravel() + self.anchor_offset[0]) / columns,
                (y.ravel() + self.anchor_offset[1]) / rows,
                np.ones_like(size) if fixed else size * root,
                np.ones_like(size) if fixed else size / root], axis=1))
            layer = last
        return np.concatenate(anchors).astype(np.float32)


class BoxLayout(ABC):
    """How a detector lays out its raw outputs, and how they become candidate boxes."""

    @abstractmethod
    def check(self, outputs: list[TensorSpec]) -> None:
        """Raises TaskError naming the output and the shape expected when these outputs do
        not have this layout."""

    @abstractmethod
    def candidates(self, outputs: Mapping[str, np.ndarray]) -> list[Candidates]:
        """Per sample of the batch, every scored box the outputs hold."""


def _output(outputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in outputs:
        raise TaskError(f"detection: no output named {name!r}; got {sorted(outputs)}")
    return np.asarray(outputs[name])


def _fits(dim: int, expected: int) -> bool:
    """A dimension fits when it is dynamic or equals `expected`."""
    return dim < 0 or dim == expected


class DecodedBoxes(BoxLayout):
    """A model that outputs boxes already: `boxes` [batch, K, 4], `scores` [batch, K] (with
    `classes` [batch, K] when named, else class 0) or [batch, K, classes] (class = argmax).
    Scores are taken as given, in [0, 1].

    box_order: "xyxy" (x_min, y_min, x_max, y_max), "yxyx" (the TF Object Detection API's
    order) or "cxcywh" (centre and size). image_size_px (width, height): set when the boxes
    are in pixels of the model input, to normalise them; None when already 0..1."""

    def __init__(self, boxes: str = "boxes", scores: str = "scores", classes: str | None = None,
                 box_order: str = "xyxy", image_size_px: tuple[int, int] | None = None) -> None:
        if box_order not in BOX_ORDERS:
            raise TaskError(f"detection: box_order: {box_order!r}; expected one of "
                            f"{', '.join(BOX_ORDERS)}")
        self.boxes = boxes
        self.scores = scores
        self.classes = classes
        self.box_order = box_order
        self.image_size_px = image_size_px

    def check(self, outputs: list[TensorSpec]) -> None:
        boxes = pick_spec("detection", outputs, self.boxes)
        if len(boxes.shape) != 3 or not _fits(boxes.shape[2], 4):
            raise TaskError(f"detection: output {boxes.describe()}; expected boxes "
                            f"[batch, boxes, 4] (x_min, y_min, x_max, y_max), or for SSD "
                            f"regressors and classificators, layout=SsdAnchorBoxes(...)")
        scores = pick_spec("detection", outputs, self.scores)
        if len(scores.shape) not in (2, 3):
            raise TaskError(f"detection: output {scores.describe()}; expected scores "
                            f"[batch, boxes] or [batch, boxes, classes]")
        if self.classes is not None:
            classes = pick_spec("detection", outputs, self.classes)
            if len(classes.shape) != 2:
                raise TaskError(f"detection: output {classes.describe()}; expected classes "
                                f"[batch, boxes]")

    def _normalised(self, boxes: np.ndarray) -> np.ndarray:
        boxes = boxes.astype(np.float32)
        if self.box_order == "yxyx":
            boxes = boxes[..., [1, 0, 3, 2]]
        elif self.box_order == "cxcywh":
            centre, size = boxes[..., :2], boxes[..., 2:]
            boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=-1)
        if self.image_size_px is not None:
            width_px, height_px = self.image_size_px
            boxes = boxes / np.array([width_px, height_px, width_px, height_px], np.float32)
        return boxes

    def candidates(self, outputs: Mapping[str, np.ndarray]) -> list[Candidates]:
        boxes = self._normalised(_output(outputs, self.boxes))
        scores = _output(outputs, self.scores).astype(np.float32)
        if scores.ndim == 3:
            classes = scores.argmax(axis=2)
            scores = scores.max(axis=2)
        elif self.classes is not None:
            classes = _output(outputs, self.classes)
        else:
            classes = np.zeros(scores.shape, dtype=np.int64)
        if boxes.shape[:2] != scores.shape or classes.shape != scores.shape:
            raise TaskError(f"detection: boxes {list(boxes.shape)}, scores {list(scores.shape)}"
                            f" and classes {list(classes.shape)}; expected one score and class "
                            f"per box")
        return [Candidates(boxes[n], scores[n], classes[n].astype(np.int64), None)
                for n in range(len(boxes))]


class SsdAnchorBoxes(BoxLayout):
    """MediaPipe's SSD layout (TensorsToDetectionsCalculator, as BlazeFace configures it):
    `regressors` [batch, A, 4 + 2*keypoints] hold, per anchor, (x, y, w, h) then (x, y) per
    keypoint, in pixels of the model input relative to the anchor; `classificators`
    [batch, A, classes] hold score logits. With an anchor (ax, ay, aw, ah) and the input size
    (W, H) as scale:

        x_center = x / W * aw + ax        width  = w / W * aw   (exp(w / W) * aw if
        y_center = y / H * ah + ay        height = h / H * ah    exponential_box_size)
        keypoint = (kx / W * aw + ax, ky / H * ah + ay)
        score = sigmoid(clip(logit, -score_clip, score_clip)), class = argmax over classes
    """

    def __init__(self, anchors: SsdAnchors, regressors: str = "regressors",
                 classificators: str = "classificators", score_clip: float = 100.0,
                 exponential_box_size: bool = False) -> None:
        self.anchors = anchors
        self.regressors = regressors
        self.classificators = classificators
        self.score_clip = score_clip
        self.exponential_box_size = exponential_box_size

    @cached_property
    def anchor_boxes(self) -> np.ndarray:
        """The anchors [A, 4] (x_center, y_center, width, height), generated once."""
        return self.anchors.generate()

    def check(self, outputs: list[TensorSpec]) -> None:
        count = len(self.anchor_boxes)
        regressors = pick_spec("detection", outputs, self.regressors)
        shape = regressors.shape
        if (len(shape) != 3 or not _fits(shape[1], count) or
                (shape[2] >= 0 and (shape[2] < 4 or shape[2] % 2))):
            raise TaskError(f"detection: output {regressors.describe()}; expected SSD "
                            f"regressors [batch, {count}, 4 + 2*keypoints] for {count} anchors")
        classificators = pick_spec("detection", outputs, self.classificators)
        if len(classificators.shape) != 3 or not _fits(classificators.shape[1], count):
            raise TaskError(f"detection: output {classificators.describe()}; expected SSD "
                            f"classificators [batch, {count}, classes] for {count} anchors")

    def candidates(self, outputs: Mapping[str, np.ndarray]) -> list[Candidates]:
        raw = _output(outputs, self.regressors).astype(np.float32)
        logits = _output(outputs, self.classificators).astype(np.float32)
        anchors = self.anchor_boxes
        if raw.ndim != 3 or raw.shape[1] != len(anchors) or logits.shape[:2] != raw.shape[:2]:
            raise TaskError(f"detection: regressors {list(raw.shape)} and classificators "
                            f"{list(logits.shape)}; expected [batch, {len(anchors)}, ...] each")
        width_px, height_px = self.anchors.input_size_px
        scale = np.array([width_px, height_px], np.float32)
        position, size = anchors[:, :2], anchors[:, 2:]
        centre = raw[..., 0:2] / scale * size + position
        extent = raw[..., 2:4] / scale
        extent = (np.exp(extent) if self.exponential_box_size else extent) * size
        boxes = np.concatenate([centre - extent / 2, centre + extent / 2], axis=-1)
        keypoints = None
        if raw.shape[2] > 4:
            points = raw[..., 4:].reshape(*raw.shape[:2], -1, 2)
            keypoints = points / scale * size[:, None, :] + position[:, None, :]
        # float64: exp(100) overflows float32, and the clip exists to keep the sigmoid finite
        clipped = np.clip(logits.astype(np.float64), -self.score_clip, self.score_clip)
        scores = (1.0 / (1.0 + np.exp(-clipped))).astype(np.float32)
        return [Candidates(boxes[n], scores[n].max(axis=1), scores[n].argmax(axis=1),
                           None if keypoints is None else keypoints[n])
                for n in range(len(raw))]


def _layout_for(outputs: list[TensorSpec]) -> BoxLayout:
    """The layout these outputs have: SSD regressors + classificators when there are two
    rank-3 outputs over a BlazeFace anchor count, else decoded boxes (the first [.., .., 4]
    output as boxes, an output named like scores or the next one as scores, one named like
    classes or labels as classes). Outputs that fit neither fail `check` by name."""
    rank3 = [spec for spec in outputs if len(spec.shape) == 3]
    for anchors in (SsdAnchors.blazeface_short_range(), SsdAnchors.blazeface_full_range()):
        count = len(anchors.generate())
        over = [spec for spec in rank3 if spec.shape[1] == count]
        if len(over) == 2:
            regressors, classificators = sorted(over, key=lambda spec: -spec.shape[2])
            return SsdAnchorBoxes(anchors, regressors.name, classificators.name)
    box_like = [spec for spec in rank3 if spec.shape[2] == 4]
    boxes = (box_like or outputs)[0].name if outputs else "boxes"
    rest = [spec for spec in outputs if spec.name != boxes]
    scores = next((spec.name for spec in rest if "score" in spec.name.lower()),
                  rest[0].name if rest else "scores")
    classes = next((spec.name for spec in rest if spec.name != scores and
                    ("class" in spec.name.lower() or "label" in spec.name.lower())), None)
    return DecodedBoxes(boxes, scores, classes)


class Detection(Task[DetectionResult]):
    """Boxes, scores and classes per sample, via a `BoxLayout`, kept by greedy per-class NMS.

    Parameters:
        layout: how the outputs are laid out (default: DecodedBoxes named boxes/scores).
        labels: class names by index.
        score_threshold: a box is reported when its score ≥ this (0.5: MediaPipe's face
            detector).
        iou_threshold: NMS drops a box whose IoU with a kept box of its class exceeds this
            (0.3: MediaPipe's face detector).
        max_detections: at most this many boxes per sample are reported.
        uncertain_band: (low, high): a box with low ≤ score < high is uncertain (below).
        reference_score_threshold: the score a reference model's box needs to count as
            ground truth in `fidelity`; None uses score_threshold.
        suppression: "greedy" (`non_max_suppression`) or "weighted" (blended boxes,
            `weighted_non_max_suppression`; the default for SSD anchor layouts, as MediaPipe's
            face detectors do).

    Confidence is the image-box-thresholds (IBT) rule of KubeEdge Sedna's hard example
    mining for joint inference (sedna.algorithms.hard_example_mining.IBTFilter): among the
    boxes scoring ≥ low (after NMS, near misses below score_threshold included), the share
    with a score below high is uncertain, and confidence = 1 − that share. Sedna calls an
    image hard when the share ≥ 1 − threshold_img, i.e. confidence ≤ threshold_img; a
    tierwise cascade escalates when confidence < its threshold. With no box ≥ low the
    image is confidently empty: confidence 1.0, as Sedna does not call an image with no
    boxes hard. Counting the near misses is ours: a face the model nearly found (score
    0.4 at threshold 0.5) makes the image uncertain instead of silently empty.

    Quality is mAP@0.5 against ground-truth boxes; fidelity the same with a reference
    model's reported boxes as ground truth.
    """

    name = "detection"
    has_confidence = True
    LAYOUT_OPTIONS = ("boxes", "scores", "classes", "box_order", "image_size_px")

    def __init__(self, layout: BoxLayout | None = None, labels: Sequence[str] = (),
                 score_threshold: float = 0.5, iou_threshold: float = 0.3,
                 max_detections: int = 100, uncertain_band: tuple[float, float] = (0.3, 0.7),
                 reference_score_threshold: float | None = None,
                 suppression: str = "greedy") -> None:
        if suppression not in ("greedy", "weighted"):
            raise TaskError(f"detection: suppression: {suppression!r}; expected 'greedy' or "
                            "'weighted'")
        if not uncertain_band[0] <= uncertain_band[1]:
            raise TaskError(f"detection: uncertain_band: {uncertain_band}; expected "
                            f"(low, high) with low ≤ high")
        self.layout = layout if layout is not None else DecodedBoxes()
        self.labels = tuple(labels)
        self.score_threshold = score_threshold
        self.iou_threshold = iou_threshold
        self.max_detections = max_detections
        self.uncertain_band = uncertain_band
        self.reference_score_threshold = reference_score_threshold
        self.suppression = suppression

    @classmethod
    def from_info(cls, info: ModelInfo, **options: Any) -> Self:
        """Labels from the metadata; the layout read from the output shapes (`_layout_for`)
        unless `layout` is given. Options naming a decoded-boxes layout (`LAYOUT_OPTIONS`:
        output names, `box_order`, `image_size_px`, as in `ModelInfo.task_options`) override
        what the shapes suggest."""
        settings: dict[str, Any] = {"labels": info.labels}
        layout_options = {key: options.pop(key) for key in cls.LAYOUT_OPTIONS
                          if key in options}
        if "layout" not in options:
            settings["layout"] = _layout_for(info.outputs)
            if layout_options:
                guessed = settings["layout"]
                if not isinstance(guessed, DecodedBoxes):
                    raise TaskError(f"detection: {sorted(layout_options)} describe decoded "
                                    "boxes, but the outputs are SSD anchors")
                settings["layout"] = DecodedBoxes(**({
                    "boxes": guessed.boxes, "scores": guessed.scores,
                    "classes": guessed.classes} | layout_options))
        layout = options.get("layout", settings.get("layout"))
        if isinstance(layout, SsdAnchorBoxes):
            settings["suppression"] = "weighted"
        return cls(**(settings | options))

    def check_outputs(self, outputs: list[TensorSpec]) -> None:
        self.layout.check(outputs)

    def decode(self, outputs: Outputs) -> list[DetectionResult]:
        if isinstance(outputs, np.ndarray):
            raise TaskError("detection: outputs: one array; expected the outputs by name "
                            "(boxes and scores, or regressors and classificators)")
        floor = min(self.score_threshold, self.uncertain_band[0])
        results = []
        for found in self.layout.candidates(outputs):
            above = np.flatnonzero(found.scores >= floor)
            kept = above[non_max_suppression(found.boxes[above], found.scores[above],
                                             found.classes[above], self.iou_threshold)]
            candidates = kept[found.scores[kept] >= self.uncertain_band[0]]
            boxes, keypoints = found.boxes, found.keypoints
            if self.suppression == "weighted":
                # MediaPipe thresholds before it blends: clusters of reported boxes only
                sure = np.flatnonzero(found.scores >= self.score_threshold)
                picked, blended, points = weighted_non_max_suppression(
                    found.boxes[sure], found.scores[sure], found.classes[sure],
                    self.iou_threshold,
                    None if found.keypoints is None else found.keypoints[sure])
                reported = sure[picked][:self.max_detections]
                boxes = np.zeros_like(found.boxes)
                boxes[reported] = blended[:self.max_detections]
                if found.keypoints is not None and points is not None:
                    keypoints = np.zeros_like(found.keypoints)
                    keypoints[reported] = points[:self.max_detections]
            else:
                reported = kept[found.scores[kept] >= self.score_threshold][:self.max_detections]
            results.append(DetectionResult(
                boxes=boxes[reported].astype(np.float32),
                scores=found.scores[reported].astype(np.float32),
                classes=found.classes[reported].astype(np.int64),
                keypoints=None if keypoints is None else keypoints[reported].astype(np.float32),
                candidate_scores=found.scores[candidates].astype(np.float32)))
        return results

    def confidence(self, result: DetectionResult) -> float:
        """1 − the share of uncertain boxes (Sedna's IBT rule; see the class docstring)."""
        scores = result.scores if result.candidate_scores is None else result.candidate_scores
        low, high = self.uncertain_band
        considered = scores[scores >= low]
        if not len(considered):
            return 1.0
        return 1.0 - float(np.mean(considered < high))

    def _quality(self, results: Sequence[DetectionResult],
                 truths: Sequence[tuple[np.ndarray, np.ndarray]], metric: str,
                 against: str) -> Quality:
        value, per_class = mean_average_precision(results, truths)
        extra = {f"AP[{self.labels[c] if c < len(self.labels) else c}]": ap
                 for c, ap in per_class.items()}
        return Quality(metric, value, len(results), against, extra)

    def quality(self, results: Sequence[DetectionResult],
                targets: Sequence[tuple[np.ndarray, np.ndarray]]) -> Quality:
        """mAP@0.5 against per-image ground truth (boxes [M, 4] normalised x_min, y_min,
        x_max, y_max; classes [M]); extra holds AP per class."""
        check_paired(self.name, results, targets, "targets")
        return self._quality(results, targets, "mAP@0.5", LABELS)

    def _as_truth(self, results: Sequence[DetectionResult]) -> list[tuple[np.ndarray, np.ndarray]]:
        threshold = (self.score_threshold if self.reference_score_threshold is None
                     else self.reference_score_threshold)
        return [(result.boxes[result.scores >= threshold],
                 result.classes[result.scores >= threshold]) for result in results]

    def fidelity(self, results: Sequence[DetectionResult],
                 reference_results: Sequence[DetectionResult], reference_name: str) -> Quality:
        """mAP@0.5 with the reference's boxes scoring ≥ reference_score_threshold as
        ground truth."""
        check_paired(self.name, results, reference_results, "reference_results")
        return self._quality(results, self._as_truth(reference_results),
                             f"fidelity (mAP@0.5 against {reference_name})",
                             against_reference(reference_name))

    def changed(self, results: Sequence[DetectionResult],
                unchanged_results: Sequence[DetectionResult]) -> dict[str, float]:
        """map@0.5 against the unchanged results (as in `fidelity`), and
        mean_abs_count_change: how many boxes per image appeared or vanished, on average."""
        check_paired(self.name, results, unchanged_results, "unchanged_results")
        value, _ = mean_average_precision(results, self._as_truth(unchanged_results))
        counts = [abs(len(a.scores) - len(b.scores))
                  for a, b in zip(results, unchanged_results, strict=True)]
        return {"map@0.5": value, "mean_abs_count_change": float(np.mean(counts))}
