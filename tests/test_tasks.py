"""tierwise.tasks: reading model outputs into results, confidence and quality, per task.
Every expected number is worked out by hand in the test or its comment."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tierwise.models.store import TASKS as STORED_TASKS
from tierwise.models.store import Calibration, ModelInfo, TensorSpec
from tierwise.tasks import (
    TASKS,
    Classification,
    DecodedBoxes,
    Detection,
    DetectionResult,
    Embedding,
    Generic,
    SsdAnchorBoxes,
    SsdAnchors,
    TaskError,
    average_precision,
    box_iou,
    classification_strings,
    cosine_similarity,
    mean_average_precision,
    non_max_suppression,
    task_for,
)


def _info(task: str, outputs: list[TensorSpec], **fields: object) -> ModelInfo:
    return ModelInfo.model_validate({
        "name": "m", "task": task, "bytes": 1, "sha256": "0" * 64,
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 128, 128]}],
        "outputs": [spec.model_dump() for spec in outputs], **fields})


def _spec(name: str, *shape: int) -> TensorSpec:
    return TensorSpec(name=name, datatype="FP32", shape=list(shape))


# --- registry ---------------------------------------------------------------------------

def test_registry_holds_every_task_the_model_store_accepts() -> None:
    assert set(TASKS) == set(STORED_TASKS)


def test_unknown_task_names_the_known_ones() -> None:
    info = _info("segmentation", [_spec("mask", -1, 1, 64, 64)])
    with pytest.raises(TaskError) as error:
        task_for(info)
    for name in ("'segmentation'", "classification", "detection", "embedding", "generic"):
        assert name in str(error.value)


def test_task_for_reads_labels_and_temperature_from_the_metadata() -> None:
    info = _info("classification", [_spec("logits", -1, 3)], labels=["cat", "dog", "eel"],
                 calibration=Calibration(temperature=2.0).model_dump())
    task = task_for(info)
    assert isinstance(task, Classification)
    assert (task.labels, task.temperature, task.output) == (("cat", "dog", "eel"), 2.0, "logits")
    assert isinstance(task_for(info, temperature=1.0), Classification)


# --- classification ---------------------------------------------------------------------

def test_temperature_flattens_the_calibrated_probabilities() -> None:
    logits = np.array([[2.0, 0.0]], dtype=np.float32)
    # T=1: e^2 / (e^2 + 1) = 0.880797; T=2: e / (e + 1) = 0.731059
    sharp = Classification().decode(logits)[0]
    flat = Classification(temperature=2.0).decode(logits)[0]
    assert sharp.label == flat.label == 0
    assert sharp.confidence == pytest.approx(0.880797, abs=1e-6)
    assert flat.confidence == pytest.approx(0.731059, abs=1e-6)
    assert flat.probabilities.dtype == np.float64
    assert flat.probabilities.sum() == pytest.approx(1.0)


def test_probability_outputs_are_recognised_and_recalibrated_on_their_logarithm() -> None:
    probabilities = np.array([[0.7, 0.2, 0.1]], dtype=np.float32)
    as_given = Classification().decode(probabilities)[0]
    assert as_given.probabilities == pytest.approx([0.7, 0.2, 0.1], abs=1e-6)
    # T=2 on probabilities: p^(1/2) renormalised: sqrt(.7) / (sqrt(.7)+sqrt(.2)+sqrt(.1))
    root = np.sqrt([0.7, 0.2, 0.1])
    softened = Classification(temperature=2.0).decode(probabilities)[0]
    assert softened.probabilities == pytest.approx(root / root.sum(), abs=1e-6)
    assert softened.confidence == pytest.approx(0.52287, abs=1e-5)
    # forced logits: softmax(.7, .2, .1): e^.7 / (e^.7 + e^.2 + e^.1) = 0.46396
    as_logits = Classification(outputs_are="logits").decode(probabilities)[0]
    assert as_logits.confidence == pytest.approx(0.46396, abs=1e-5)


def test_top_k_names_the_classes_most_probable_first() -> None:
    task = Classification(labels=["cat", "dog", "eel", "fox"], outputs_are="probabilities")
    result = task.decode({"probs": np.array([[0.1, 0.4, 0.1, 0.4]])})[0]
    assert (result.label, result.label_name) == (1, "dog")
    # ties keep the lower index first: dog (1) before fox (3), cat (0) before eel (2)
    assert result.top_k(3) == [(1, "dog", pytest.approx(0.4)), (3, "fox", pytest.approx(0.4)),
                               (0, "cat", pytest.approx(0.1))]
    assert len(result.top_k(10)) == 4
    assert Classification().decode(np.array([[0.0, 3.0]]))[0].top_k(1)[0][1] is None


def test_classification_strings_follow_tritons_value_index_label_format() -> None:
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32)
    assert classification_strings(probabilities, 2, ["cat", "dog", "eel"]) == [
        ["0.700000:1:dog", "0.200000:2:eel"], ["0.500000:0:cat", "0.250000:1:dog"]]
    assert classification_strings(probabilities[:1], 1) == [["0.700000:1"]]
    # Triton's own example: output [1, 5, 10, 4] -> top-2 by index [2, 1]; integers stay integral
    assert classification_strings(np.array([[1, 5, 10, 4]], dtype=np.int32), 2) == [
        ["10:2", "5:1"]]
    assert len(classification_strings(probabilities, 9)[0]) == 3
    with pytest.raises(TaskError, match="k: 0"):
        classification_strings(probabilities, 0)


def test_accuracy_and_fidelity_count_agreement_with_labels_and_reference() -> None:
    task = Classification(outputs_are="logits")
    ours = task.decode(np.array([
        [9.0, 8.0, 7.0, 6.0, 5.0, 4.0],     # top-1 0; top-5 0..4
        [4.0, 9.0, 0.0, 0.0, 0.0, 0.0],     # top-1 1
        [0.0, 1.0, 2.0, 3.0, 4.0, 9.0]]))   # top-1 5; top-5 5,4,3,2,1 (not 0)
    reference = task.decode(np.eye(6)[[0, 0, 0]] * 5.0)  # the reference says 0, 0, 0
    accuracy = task.quality(ours, [0, 1, 2])
    assert (accuracy.metric, accuracy.value, accuracy.samples, accuracy.against) == (
        "accuracy", pytest.approx(2 / 3), 3, "labels")
    fidelity = task.fidelity(ours, reference, "big")
    assert fidelity.value == pytest.approx(1 / 3)             # only sample 0 agrees on top-1
    assert fidelity.extra["top5_containment"] == pytest.approx(2 / 3)  # 0 is in 0's and 1's top 5
    assert fidelity.against == "reference:big" and "big" in fidelity.metric
    with pytest.raises(TaskError, match="targets: 2 entries for 3 results"):
        task.quality(ours, [0, 1])


def test_classification_changed_reports_agreement_and_largest_probability_move() -> None:
    task = Classification(outputs_are="probabilities")
    before = task.decode(np.array([[0.6, 0.4], [0.9, 0.1]]))
    after = task.decode(np.array([[0.45, 0.55], [0.8, 0.2]]))
    assert task.changed(after, before) == {
        "top1_agreement": pytest.approx(0.5), "max_abs_probability_error": pytest.approx(0.15)}


def test_classification_rejects_outputs_it_cannot_read_naming_them() -> None:
    with pytest.raises(TaskError, match=r"features: FP32 \[\?, 64, 7, 7\].*\[batch, classes\]"):
        task_for(_info("classification", [_spec("features", -1, 64, 7, 7)]))
    with pytest.raises(TaskError, match="one score per sample"):
        Classification().check_outputs([_spec("p", -1, 1)])
    with pytest.raises(TaskError, match="labels: 2 names for the 3 classes"):
        Classification(labels=["a", "b"]).check_outputs([_spec("p", -1, 3)])
    with pytest.raises(TaskError, match="outputs_are"):
        Classification(outputs_are="odds")


# --- detection: geometry, suppression, mAP ---------------------------------------------------

def test_iou_of_two_offset_squares() -> None:
    # 10x10 squares offset by 1: intersection 9*9 = 81, union 100 + 100 - 81 = 119
    iou = box_iou(np.array([[0, 0, 10, 10]]), np.array([[1, 1, 11, 11], [20, 20, 30, 30]]))
    assert iou[0] == pytest.approx([81 / 119, 0.0])


def test_nms_drops_overlaps_within_a_class_only() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [1, 1, 11, 11]],
                     dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    classes = np.array([0, 0, 0, 1])
    # box 1 overlaps box 0 at IoU 0.68 in class 0; box 3 is the same box but class 1
    assert non_max_suppression(boxes, scores, classes, 0.5).tolist() == [0, 2, 3]
    assert non_max_suppression(boxes, scores, classes, 0.7).tolist() == [0, 1, 2, 3]
    assert non_max_suppression(boxes[:0], scores[:0], classes[:0], 0.5).tolist() == []


def test_average_precision_interpolates_every_recall_point() -> None:
    # 2 true boxes; hits in score order T, F, T: recall .5 at precision 1, recall 1 at 2/3
    # AP = .5 * 1 + .5 * 2/3 = 0.8333
    assert average_precision(np.array([True, False, True]), 2) == pytest.approx(5 / 6)
    # F, T, T: precision at recall .5 is 1/2, raised to the later 2/3 -> AP = 2/3
    assert average_precision(np.array([False, True, True]), 2) == pytest.approx(2 / 3)
    assert average_precision(np.array([], dtype=bool), 2) == 0.0


def _result(boxes: list[list[float]], scores: list[float], classes: list[int]) -> DetectionResult:
    return DetectionResult(np.array(boxes, np.float32).reshape(-1, 4),
                           np.array(scores, np.float32), np.array(classes, np.int64))


def test_map_at_half_iou_by_hand() -> None:
    g1, g2 = [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]
    results = [
        # image 0: a hit on g1 (.9), a duplicate of it (.8: g1 is taken, so false), a miss (.7),
        # and a class-5 box that no truth has (left out of the mean)
        _result([g1, [0.01, 0.01, 0.5, 0.5], [0.0, 0.5, 0.5, 1.0], g2], [0.9, 0.8, 0.7, 0.95],
                [0, 0, 0, 5]),
        # image 1: a hit on its g2 (.6)
        _result([[0.5, 0.5, 0.99, 1.0]], [0.6], [0]),
    ]
    truths = [(np.array([g1, [0.0, 0.6, 0.3, 0.9]]), np.array([0, 1])),
              (np.array([g2]), np.array([0]))]
    # class 0, pooled in score order: T(.9) F(.8) F(.7) T(.6) over 2 truths:
    #   recall .5 at precision 1, recall 1 at precision 2/4 -> AP = .5 * 1 + .5 * .5 = 0.75
    # class 1: one truth, never detected -> AP 0; mAP = (0.75 + 0) / 2 = 0.375
    value, per_class = mean_average_precision(results, truths)
    assert per_class == {0: pytest.approx(0.75), 1: 0.0}
    assert value == pytest.approx(0.375)
    quality = Detection(labels=["face", "hand"]).quality(results, truths)
    assert (quality.metric, quality.value, quality.samples) == ("mAP@0.5", 0.375, 2)
    assert quality.extra == {"AP[face]": pytest.approx(0.75), "AP[hand]": 0.0}


def test_map_with_no_truth_rewards_finding_nothing() -> None:
    empty = (np.zeros((0, 4)), np.zeros(0, np.int64))
    nothing = _result([], [], [])
    something = _result([[0, 0, 0.2, 0.2]], [0.9], [0])
    assert mean_average_precision([nothing, nothing], [empty, empty])[0] == 1.0
    assert mean_average_precision([nothing, something], [empty, empty])[0] == 0.0


def test_detection_fidelity_takes_the_reference_boxes_above_threshold_as_truth() -> None:
    task = Detection(score_threshold=0.5)
    reference = [_result([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], [0.9, 0.3], [0, 0])]
    ours = [_result([[0.0, 0.0, 0.5, 0.45]], [0.8], [0])]  # IoU .9 with the kept box
    fidelity = task.fidelity(ours, reference, "full-range")
    assert (fidelity.value, fidelity.against) == (1.0, "reference:full-range")
    assert task.changed([_result([], [], [])], reference) == {
        "map@0.5": 0.0, "mean_abs_count_change": 2.0}


# --- detection: layouts ----------------------------------------------------------------------

def test_decoded_boxes_in_pixels_and_yxyx_are_normalised_to_xyxy() -> None:
    layout = DecodedBoxes("detection_boxes", "detection_scores", box_order="yxyx",
                          image_size_px=(100, 200))
    task = Detection(layout=layout, score_threshold=0.5)
    outputs = {
        # (y_min, x_min, y_max, x_max) in pixels of a 100 wide, 200 high input
        "detection_boxes": np.array([[[10, 20, 30, 60], [100, 0, 200, 50]]], np.float32),
        # per-class scores: the class is the argmax, the score its value
        "detection_scores": np.array([[[0.1, 0.8], [0.2, 0.1]]], np.float32)}
    [result] = task.decode(outputs)
    np.testing.assert_allclose(result.boxes, [[0.2, 0.05, 0.6, 0.15]], atol=1e-6)
    assert (result.scores.tolist(), result.classes.tolist()) == ([pytest.approx(0.8)], [1])
    with pytest.raises(TaskError, match="outputs by name"):
        task.decode(outputs["detection_boxes"])


def test_blazeface_anchor_sets_have_mediapipes_counts() -> None:
    short = SsdAnchors.blazeface_short_range().generate()
    full = SsdAnchors.blazeface_full_range().generate()
    assert (short.shape, full.shape) == ((896, 4), (2304, 4))
    # short range: 16x16 cells x 2 anchors, then 8x8 cells x 6 (three stride-16 layers x 2)
    assert short[0].tolist() == short[1].tolist() == [0.5 / 16, 0.5 / 16, 1.0, 1.0]
    assert short[2].tolist() == [1.5 / 16, 0.5 / 16, 1.0, 1.0]
    assert short[512].tolist() == short[517].tolist() == [0.5 / 8, 0.5 / 8, 1.0, 1.0]
    assert short[518][0] == pytest.approx(1.5 / 8)
    assert full[-1].tolist() == pytest.approx([47.5 / 48, 47.5 / 48, 1.0, 1.0])


def test_anchor_sizes_follow_the_scale_ladder_when_not_fixed() -> None:
    # 2 layers of different strides: scales .2 and .8; ratio 1 plus interpolated
    # sqrt(.2*.8) = .4 on layer 0 and sqrt(.8*1) on the last layer
    anchors = SsdAnchors((8, 8), (4, 8), min_scale=0.2, max_scale=0.8,
                         fixed_anchor_size=False).generate()
    assert len(anchors) == 2 * 2 * 2 + 1 * 1 * 2
    assert anchors[0, 2:].tolist() == pytest.approx([0.2, 0.2])
    assert anchors[1, 2:].tolist() == pytest.approx([0.4, 0.4])
    assert anchors[9, 2:].tolist() == pytest.approx([math.sqrt(0.8), math.sqrt(0.8)])


def test_ssd_regressor_row_decodes_as_mediapipe_does() -> None:
    regressors = np.zeros((1, 896, 16), np.float32)
    # anchor 0: centre (1/32, 1/32), size 1 x 1; scale 128 (the input size)
    regressors[0, 0, :6] = [12.8, -6.4, 25.6, 38.4, 6.4, 12.8]
    classificators = np.full((1, 896, 1), -500.0, np.float32)  # clipped to -100: score ~0
    classificators[0, 0, 0] = 2.0
    task = Detection(layout=SsdAnchorBoxes(SsdAnchors.blazeface_short_range()))
    [result] = task.decode({"regressors": regressors, "classificators": classificators})
    # x_center = 12.8/128 + 1/32 = .13125, y_center = -6.4/128 + 1/32 = -.01875,
    # width = 25.6/128 = .2, height = 38.4/128 = .3
    np.testing.assert_allclose(
        result.boxes, [[0.13125 - 0.1, -0.01875 - 0.15, 0.13125 + 0.1, -0.01875 + 0.15]],
        atol=1e-6)
    assert result.scores.tolist() == pytest.approx([1 / (1 + math.exp(-2.0))])  # 0.880797
    assert result.keypoints is not None and result.keypoints.shape == (1, 6, 2)
    # keypoint 0: (6.4/128 + 1/32, 12.8/128 + 1/32); the zero keypoints sit on the anchor
    assert result.keypoints[0, 0].tolist() == pytest.approx([0.08125, 0.13125])
    assert result.keypoints[0, 1].tolist() == pytest.approx([0.03125, 0.03125])


def test_detection_layout_is_read_from_the_output_shapes() -> None:
    short = _info("detection", [_spec("regressors", 1, 896, 16),
                                _spec("classificators", 1, 896, 1)])
    layout = task_for(short).layout
    assert isinstance(layout, SsdAnchorBoxes)
    assert (layout.regressors, layout.anchors.input_size_px) == ("regressors", (128, 128))
    full = _info("detection", [_spec("scores", 1, 2304, 1), _spec("boxes", 1, 2304, 16)])
    layout = task_for(full).layout
    assert isinstance(layout, SsdAnchorBoxes)
    assert (layout.regressors, layout.anchors.input_size_px) == ("boxes", (192, 192))
    decoded = _info("detection", [_spec("num", -1), _spec("det_scores", -1, 100),
                                  _spec("det_boxes", -1, 100, 4), _spec("det_classes", -1, 100)])
    layout = task_for(decoded).layout
    assert isinstance(layout, DecodedBoxes)
    assert (layout.boxes, layout.scores, layout.classes) == (
        "det_boxes", "det_scores", "det_classes")


def test_detection_on_a_classifier_output_names_it_and_the_shape_expected() -> None:
    with pytest.raises(TaskError, match=r"logits: FP32 \[\?, 10\]; expected boxes "
                                        r"\[batch, boxes, 4\]"):
        task_for(_info("detection", [_spec("logits", -1, 10)]))
    layout = SsdAnchorBoxes(SsdAnchors.blazeface_short_range())
    with pytest.raises(TaskError, match=r"regressors: FP32 \[1, 2304, 16\].*896 anchors"):
        layout.check([_spec("regressors", 1, 2304, 16), _spec("classificators", 1, 2304, 1)])


# --- detection: confidence (Sedna IBT) ---------------------------------------------------------

def test_ibt_confidence_is_one_minus_the_uncertain_share() -> None:
    task = Detection(uncertain_band=(0.3, 0.7))
    boxes = [[0, 0, 0.1, 0.1]] * 4
    # .95 certain; .6 and .4 uncertain; .1 below the band (background, not counted): 1 - 2/3
    reported = _result(boxes[:1], [0.95], [0])
    mixed = DetectionResult(reported.boxes, reported.scores, reported.classes,
                            candidate_scores=np.array([0.95, 0.6, 0.4, 0.1], np.float32))
    assert task.confidence(mixed) == pytest.approx(1 / 3)
    assert task.confidence(_result(boxes[:2], [0.95, 0.8], [0, 0])) == 1.0
    assert task.confidence(_result(boxes[:1], [0.5], [0])) == 0.0
    assert task.confidence(_result([], [], [])) == 1.0      # nothing near a detection


def test_near_misses_below_the_score_threshold_lower_confidence() -> None:
    task = Detection(score_threshold=0.5, uncertain_band=(0.3, 0.7))
    outputs = {"boxes": np.array([[[0, 0, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9], [0.6, 0, 1, 0.3]]],
                                 np.float32),
               "scores": np.array([[0.9, 0.4, 0.1]], np.float32)}
    [result] = task.decode(outputs)
    assert result.scores.tolist() == [pytest.approx(0.9)]      # only .9 is reported
    assert result.candidate_scores is not None
    assert result.candidate_scores.tolist() == pytest.approx([0.9, 0.4])
    assert task.confidence(result) == pytest.approx(0.5)       # .4 is a near miss: 1 - 1/2


# --- embedding and generic ---------------------------------------------------------------------

def test_cosine_similarity_by_hand() -> None:
    similarity = cosine_similarity(np.array([[1.0, 0.0], [1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]),
                                   np.array([[1.0, 1.0], [-1.0, -2.0], [0.0, 0.0], [1.0, 0.0]]))
    assert similarity.tolist() == pytest.approx([1 / math.sqrt(2), -1.0, 1.0, 0.0])


def test_embedding_compares_vectors_by_cosine_and_largest_error() -> None:
    task = task_for(_info("embedding", [_spec("embedding", -1, 2)]))
    assert isinstance(task, Embedding) and not task.has_confidence
    before = task.decode(np.array([[1.0, 0.0], [3.0, 4.0]]))
    after = task.decode({"embedding": np.array([[1.0, 1.0], [3.0, 4.5]])})
    assert task.confidence(after[0]) is None
    changed = task.changed(after, before)
    assert changed["cosine_min"] == pytest.approx(1 / math.sqrt(2))
    assert changed["max_abs_error"] == pytest.approx(1.0)
    fidelity = task.fidelity(before, before, "teacher")
    assert (fidelity.value, fidelity.against) == (pytest.approx(1.0), "reference:teacher")
    with pytest.raises(TaskError, match=r"tokens: FP32 \[\?, 16, 8\]"):
        task_for(_info("embedding", [_spec("tokens", -1, 16, 8)]))


def test_generic_splits_the_batch_and_compares_flattened_outputs() -> None:
    task = Generic()
    outputs = {"a": np.array([[1.0, 0.0], [0.0, 2.0]]), "b": np.array([[0.0], [0.0]])}
    results = task.decode(outputs)
    assert len(results) == 2 and results[1]["a"].tolist() == [0.0, 2.0]
    moved = task.decode({"a": outputs["a"], "b": np.array([[1.0], [0.0]])})
    changed = task.changed(moved, results)
    # sample 0: (1, 0, 0) against (1, 0, 1): cosine 1/sqrt(2); sample 1 unchanged
    assert changed["cosine_min"] == pytest.approx(1 / math.sqrt(2))
    assert changed["cosine_mean"] == pytest.approx((1 / math.sqrt(2) + 1) / 2)
    assert changed["max_abs_error"] == 1.0
    with pytest.raises(TaskError, match="no output named 'c'"):
        Generic(outputs=["c"]).check_outputs([_spec("a", -1, 2)])


def test_weighted_suppression_blends_a_cluster_by_score() -> None:
    from tierwise.tasks.detection import weighted_non_max_suppression

    boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.1, 0.0, 1.1, 1.0], [3.0, 3.0, 4.0, 4.0]])
    scores = np.array([0.9, 0.1, 0.5])
    kept, blended, _ = weighted_non_max_suppression(boxes, scores, np.zeros(3), 0.5)
    assert kept.tolist() == [0, 2]
    # 0.9 of the first box and 0.1 of the second: x moves by 0.01
    np.testing.assert_allclose(blended[0], [0.01, 0.0, 1.01, 1.0], atol=1e-6)
    np.testing.assert_allclose(blended[1], boxes[2], atol=1e-6)
