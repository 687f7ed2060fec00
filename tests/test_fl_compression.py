"""Update compressors for federated learning: round trips, the quantizer's error bound and
unbiasedness, top-k's choice of entries and of index encoding, error feedback over many rounds,
the bytes saved on a 400k-parameter update, and errors that explain."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from tierwise.learn.compression import (
    COMPRESSORS,
    QUANT_CHUNK,
    TopK,
    UpdateCompressor,
    is_compressed_payload,
    make_compressor,
    payload_bytes,
)

# a numpy warning (0/0 on a constant chunk, an overflowing cast) is a bug here, not noise
pytestmark = pytest.mark.filterwarnings("error")

SPECS = (*COMPRESSORS, "topk:0.01", "topk:0.01+q8", "topk:0.05+q4")
# a small CNN's worth of tensors, including a scalar and a one-element tensor
SHAPES = [(8, 1, 3, 3), (8,), (200, 8), (200,), (10, 200), (10,), (1,), ()]
# ~400k parameters: a 800x500 dense layer, its bias, a 500x10 classifier and its bias
SHAPES_400K = [(800, 500), (500,), (500, 10), (10,)]


def _update(shapes: list[tuple[int, ...]], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.01, shape).astype(np.float32) for shape in shapes]


def _flat(tensors: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(tensor) for tensor in tensors])


def _round_trip(spec: str, update: list[np.ndarray], seed: int = 1) -> tuple[
        dict[str, np.ndarray], list[np.ndarray]]:
    compressor = make_compressor(spec)
    payload, _ = compressor.encode(update, None, np.random.default_rng(seed))
    return payload, compressor.decode(payload)


def _element_scale(payload: dict[str, np.ndarray], count: int) -> np.ndarray:
    """Each quantized value's step, from its chunk's scale in the payload."""
    return payload["q.scale"][np.arange(count) // int(payload["q.chunk"][0])]


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_every_spec_restores_shapes_and_float32(spec: str) -> None:
    update = _update(SHAPES)
    payload, decoded = _round_trip(spec, update)
    assert [tensor.shape for tensor in decoded] == SHAPES
    assert all(tensor.dtype == np.float32 for tensor in decoded)
    assert all(isinstance(key, str) and type(value) is np.ndarray
               for key, value in payload.items())


def test_none_is_exact() -> None:
    update = _update(SHAPES)
    payload, decoded = _round_trip("none", update)
    assert all(np.array_equal(got, sent) for got, sent in zip(decoded, update, strict=True))
    assert payload_bytes(payload) >= 4 * sum(math.prod(shape) for shape in SHAPES)


@pytest.mark.parametrize("spec", ["q8", "q4"])
def test_quantizer_error_is_within_one_level(spec: str) -> None:
    update = _update(SHAPES)
    payload, decoded = _round_trip(spec, update)
    sent, got = _flat(update), _flat(decoded)
    scale = _element_scale(payload, sent.size)
    assert (scale > 0).all()
    assert (np.abs(got - sent) <= scale * (1 + 1e-5)).all()
    # one level is a 255th (q8) or a 15th (q4) of the chunk's range
    levels = 255 if spec == "q8" else 15
    chunk_range = np.ptp(sent[:QUANT_CHUNK])
    assert payload["q.scale"][0] == pytest.approx(chunk_range / levels, rel=1e-5)
    assert payload["q.codes"].size == (sent.size if spec == "q8" else -(-sent.size // 2))


@pytest.mark.parametrize("spec", ["q8", "q4"])
def test_stochastic_quantizer_is_unbiased(spec: str) -> None:
    update = _update([(1500,)], seed=3)
    compressor = make_compressor(spec)
    rng = np.random.default_rng(4)
    rounds = 1500
    total = np.zeros(1500)
    for _ in range(rounds):
        payload, _ = compressor.encode(update, None, rng)
        total += compressor.decode(payload)[0]
    # stochastic rounding between levels a scale apart has variance at most scale²/4
    sigma = _element_scale(payload, 1500) / (2 * math.sqrt(rounds))
    error = np.abs(total / rounds - update[0])
    assert (error <= 6 * sigma + 1e-7).all()
    # rounding to the nearest level would be biased by up to half a level: far outside that
    assert (sigma * 6 < _element_scale(payload, 1500) / 10).all()


@pytest.mark.parametrize("spec", ["topk:0.01", "topk:0.05", "topk:0.05+q8", "topk:0.01+q4"])
def test_topk_keeps_exactly_the_k_largest_magnitudes(spec: str) -> None:
    update = _update(SHAPES)
    payload, decoded = _round_trip(spec, update)
    sent, got = _flat(update), _flat(decoded)
    fraction = float(spec.removeprefix("topk:").partition("+")[0])
    keep = math.ceil(fraction * sent.size)
    largest = np.sort(np.argsort(-np.abs(sent))[:keep])
    dropped = np.setdiff1d(np.arange(sent.size), largest)
    assert (got[dropped] == 0).all()
    if "+q" in spec:
        # the kept values, in index order, quantized: within one level of their chunk
        scale = _element_scale(payload, keep)
        assert (np.abs(got[largest] - sent[largest]) <= scale * (1 + 1e-5)).all()
    else:
        assert np.count_nonzero(got) == keep
        assert np.array_equal(got[largest], sent[largest])


def test_topk_sends_indices_the_cheapest_way() -> None:
    update = _update(SHAPES_400K)
    # 1% of 405,510: 4,056 gaps, all small -> uint16 gaps (8 KB) beat a bitmap (51 KB)
    payload, _ = _round_trip("topk:0.01", update)
    assert "topk.delta16" in payload and payload["topk.delta16"].dtype == np.uint16
    # half of them: a bitmap (51 KB) beats 2 bytes an index (405 KB)
    payload, decoded = _round_trip("topk:0.5", update)
    assert "topk.bitmap" in payload and payload["topk.bitmap"].size == -(-405_510 // 8)
    assert np.count_nonzero(_flat(decoded)) == math.ceil(0.5 * 405_510)
    # a few entries 80,000 apart: gaps overflow uint16, uint32 indices beat a bitmap
    size = 350_000
    compressor = TopK(1e-5)
    spikes = np.arange(compressor.kept(size)) * 80_000
    sparse = np.zeros(size, np.float32)
    sparse[spikes] = np.arange(1, spikes.size + 1, dtype=np.float32)
    payload, _ = compressor.encode([sparse], None, np.random.default_rng(0))
    assert set(payload) & {"topk.bitmap", "topk.delta16", "topk.index32"} == {"topk.index32"}
    assert np.array_equal(compressor.decode(payload)[0], sparse)


@pytest.mark.parametrize("spec", SPECS)
def test_one_element_and_scalar_tensors_round_trip_exactly(spec: str) -> None:
    update = [np.array([0.25], np.float32), np.array(-1.5, np.float32)]
    _, decoded = _round_trip(spec, update[:1])
    assert decoded[0].shape == (1,) and decoded[0][0] == np.float32(0.25)
    _, decoded = _round_trip(spec, update[1:])
    assert decoded[0].shape == () and decoded[0] == np.float32(-1.5)


@pytest.mark.parametrize("spec", ["q8", "q4"])
@pytest.mark.parametrize("value", [0.0, 0.37, -3e-8])
def test_constant_tensor_round_trips_exactly(spec: str, value: float) -> None:
    update = [np.full((3, 1000), value, np.float32), np.full((5,), value, np.float32)]
    payload, decoded = _round_trip(spec, update)
    assert (payload["q.scale"] == 0).all()
    assert all(np.array_equal(got, sent) for got, sent in zip(decoded, update, strict=True))


def test_any_compressor_decodes_any_payload_after_a_real_serialisation() -> None:
    update = _update(SHAPES)
    for spec in SPECS:
        payload, decoded = _round_trip(spec, update)
        assert is_compressed_payload(payload)
        wire = io.BytesIO()
        np.savez(wire, **payload)
        wire.seek(0)
        with np.load(wire) as archive:
            received = {key: archive[key] for key in archive.files}
        for decoder in ("none", "q4", "topk:0.3+q8"):
            again = make_compressor(decoder).decode(received)
            assert all(np.array_equal(a, b) for a, b in zip(again, decoded, strict=True))
    assert not is_compressed_payload({"values": np.zeros(3, np.float32)})
    assert not is_compressed_payload(update)


# -- error feedback ---------------------------------------------------------------------------


def _feed(compressor: UpdateCompressor, update: list[np.ndarray], rounds: int,
          checkpoints: tuple[int, ...]) -> dict[int, tuple[float, float]]:
    """Encode the same update `rounds` times; at each checkpoint, ||Σ decoded - T·u|| and the
    residual's norm."""
    rng = np.random.default_rng(5)
    target = _flat(update).astype(np.float64)
    total = np.zeros_like(target)
    residual = None
    seen = {}
    for round_index in range(1, rounds + 1):
        payload, residual = compressor.encode(update, residual, rng)
        total += _flat(compressor.decode(payload))
        if round_index in checkpoints:
            residual_norm = 0.0 if residual is None else float(np.linalg.norm(_flat(residual)))
            seen[round_index] = (float(np.linalg.norm(total - round_index * target)),
                                 residual_norm)
    return seen


@pytest.mark.parametrize("bits", [None, 8])
def test_error_feedback_delivers_the_dropped_mass_later(bits: int | None) -> None:
    update = _update([(40, 50), (100,)], seed=6)
    norm = float(np.linalg.norm(_flat(update)))
    with_feedback = _feed(TopK(0.05, bits), update, 400, (100, 400))
    without = _feed(TopK(0.05, bits, error_feedback=False), update, 400, (100, 400))
    for gap, residual_norm in with_feedback.values():
        # Σ decoded = T·u - residual: the gap is exactly what the client still holds
        assert gap == pytest.approx(residual_norm, rel=1e-3)
        assert gap < norm / 0.05     # bounded: each entry waits at most ~1/fraction rounds
    assert with_feedback[400][0] < 1.5 * with_feedback[100][0]
    # without feedback the same small entries are dropped every round: the gap grows linearly
    assert without[400][0] == pytest.approx(4 * without[100][0], rel=0.01)
    assert without[400][0] > 20 * with_feedback[400][0]
    assert without[400][1] == 0.0


def test_residual_is_what_the_payload_did_not_carry() -> None:
    update = _update(SHAPES, seed=7)
    old_residual = _update(SHAPES, seed=8)
    compressor = make_compressor("topk:0.01+q8")
    assert compressor.error_feedback
    payload, residual = compressor.encode(update, old_residual, np.random.default_rng(9))
    assert residual is not None
    decoded = compressor.decode(payload)
    for new, sent, old, got in zip(residual, update, old_residual, decoded, strict=True):
        assert new.dtype == np.float32 and new.shape == sent.shape
        assert np.array_equal(new, (sent + old) - got)
    # the first round has no residual yet
    _, first = compressor.encode(update, None, np.random.default_rng(9))
    assert first is not None and np.count_nonzero(_flat(first)) > 0


@pytest.mark.parametrize("spec", ["none", "q8", "q4"])
def test_unbiased_compressors_keep_no_residual(spec: str) -> None:
    compressor = make_compressor(spec)
    assert not compressor.error_feedback
    _, residual = compressor.encode(_update(SHAPES), None, np.random.default_rng(0))
    assert residual is None


# -- bytes ------------------------------------------------------------------------------------


def test_compression_ratios_on_a_400k_parameter_update() -> None:
    update = _update(SHAPES_400K)
    assert sum(math.prod(shape) for shape in SHAPES_400K) == 405_510
    sizes = {spec: payload_bytes(_round_trip(spec, update)[0])
             for spec in ("none", "q8", "q4", "topk:0.01", "topk:0.01+q8")}
    ratio = {spec: sizes["none"] / size for spec, size in sizes.items()}
    assert 3.9 <= ratio["q8"] <= 4.0
    assert 7.7 <= ratio["q4"] <= 8.0
    assert ratio["topk:0.01"] >= 10
    assert ratio["topk:0.01+q8"] >= 10
    assert sizes["topk:0.01+q8"] < sizes["topk:0.01"]


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["", "gzip", "q3", "q16", "topk", "topk:0", "topk:1.5",
                                  "topk:abc", "topk:0.01+q3", "topk:0.01+zstd", "NONE"])
def test_bad_spec_names_itself_and_the_valid_forms(spec: str) -> None:
    with pytest.raises(ValueError, match="unknown update compressor") as raised:
        make_compressor(spec)
    message = str(raised.value)
    assert repr(spec) in message
    assert all(form in message for form in ("none", "q8", "q4", "topk:FRACTION+q8"))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_update_is_refused(spec: str, bad: float) -> None:
    update = _update(SHAPES)
    update[2][5, 3] = bad
    with pytest.raises(ValueError, match=r"update tensor 2 \(shape \[200, 8\]\) holds 1 NaN/inf"):
        make_compressor(spec).encode(update, None, np.random.default_rng(0))


def test_residual_must_match_the_update() -> None:
    compressor = make_compressor("topk:0.01")
    update = _update(SHAPES)
    with pytest.raises(ValueError, match="residual shapes"):
        compressor.encode(update, update[:-1], np.random.default_rng(0))
    poisoned = [tensor.copy() for tensor in update]
    poisoned[0][0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="residual tensor 0"):
        compressor.encode(update, poisoned, np.random.default_rng(0))


def test_malformed_payloads_raise_value_errors() -> None:
    payload, _ = _round_trip("topk:0.01+q4", _update(SHAPES))
    compressor = make_compressor("none")
    with pytest.raises(ValueError, match=r"lacks 'q\.codes'"):
        compressor.decode({key: value for key, value in payload.items() if key != "q.codes"})
    with pytest.raises(ValueError, match=r"'q\.codes' is uint8"):
        compressor.decode({**payload, "q.codes": payload["q.codes"][:-1]})
    with pytest.raises(ValueError, match="not a compressed update"):
        compressor.decode({"values": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="unknown update compressor 'gzip'"):
        compressor.decode({**payload, "compressor": np.frombuffer(b"gzip", np.uint8)})
