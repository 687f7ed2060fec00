"""The lossy image codecs (JPEG, WebP) on real Fashion-MNIST, the 4-bit feature codec within
its bound, and the bit-packed codes of a learned bottleneck: exact, sized to the bit, and
refusing what is not a code."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import zstandard

from tierwise.codecs import CodecError, codec_names, decode_rows, encode_rows, get_codec
from tierwise.data import Splits

IMAGE = (1, 28, 28)
RAW_IMAGE_BYTES = 784
FEATURES = (64, 7, 7)  # the shape of a post-ReLU cut of the zoo's models
QUALITIES = (90, 75, 50)
WEBP = "webp-q75" in codec_names("input")
LOSSY_IMAGE_CODECS = [f"jpeg-q{quality}" for quality in QUALITIES] + (
    [f"webp-q{quality}" for quality in QUALITIES] if WEBP else [])
# mean |pixel error| on 500 validation images, measured with Pillow 13 / libjpeg-turbo /
# libwebp: jpeg 1.7, 3.7, 5.9 and webp 1.0, 2.3, 3.1 at q90, q75, q50; bounds leave ~40%
# for other library builds
MEAN_ABS_ERROR_BOUND = {"jpeg-q90": 2.5, "jpeg-q75": 5.0, "jpeg-q50": 8.0,
                        "webp-q90": 1.5, "webp-q75": 3.5, "webp-q50": 4.5}


@pytest.fixture(scope="module")
def images(splits: Splits) -> np.ndarray:
    images = splits.val_x[:500]
    assert images.dtype == np.uint8 and images.shape[1:] == IMAGE
    return images


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    """Post-ReLU-like activations: about half exact zeros, channels of different scales."""
    rng = np.random.default_rng(0)
    scales = rng.uniform(0.1, 10.0, size=(16, FEATURES[0], 1, 1))
    return np.maximum(rng.normal(size=(16, *FEATURES)) * scales, 0).astype(np.float32)


def _mean_abs_error(decoded: np.ndarray, images: np.ndarray) -> float:
    return float(np.abs(decoded.astype(np.int16) - images.astype(np.int16)).mean())


# -- the registry ----------------------------------------------------------------------------


def test_new_codecs_are_listed_under_their_kind_in_registry_order() -> None:
    assert codec_names("input") == ["raw", "zstd", "png", *LOSSY_IMAGE_CODECS, "half-jpeg-q75"]
    assert codec_names("feature") == ["raw", "fp16-zstd", "int8-zstd", "int4-zstd"]
    assert codec_names("code") == ["raw", "packed-4bit", "packed-8bit"]
    for name in LOSSY_IMAGE_CODECS:
        assert get_codec(name).kind == "input" and not get_codec(name).lossless
    assert get_codec("int4-zstd").kind == "feature" and not get_codec("int4-zstd").lossless
    for name in ("packed-4bit", "packed-8bit"):
        assert get_codec(name).kind == "code" and get_codec(name).lossless


# -- JPEG and WebP ---------------------------------------------------------------------------


def test_half_resolution_sends_a_quarter_of_the_pixels_and_scales_back(images: np.ndarray
                                                                      ) -> None:
    half = get_codec("half-jpeg-q75")
    rows = encode_rows("half-jpeg-q75", images)
    decoded = decode_rows("half-jpeg-q75", rows, IMAGE, np.dtype(np.uint8))
    assert decoded.shape == images.shape and decoded.dtype == np.uint8
    full = encode_rows("jpeg-q75", images)
    # fewer bytes than the full-size JPEG at the same quality, more error (detail is gone)
    assert np.mean([len(row) for row in rows]) < np.mean([len(row) for row in full])
    error = _mean_abs_error(decoded, images)
    assert _mean_abs_error(decode_rows("jpeg-q75", full, IMAGE, np.dtype(np.uint8)),
                           images) < error < 40, error
    colour = np.random.default_rng(0).integers(0, 256, (37, 45, 3), np.uint8)
    back = half.decode(half.encode(colour), (37, 45, 3), np.dtype(np.uint8))
    assert back.shape == (37, 45, 3)
    with pytest.raises(CodecError, match=r"half-jpeg-q75: image is \[19, 23\]"):
        half.decode(half.encode(colour), (20, 45, 3), np.dtype(np.uint8))


@pytest.mark.parametrize("codec", LOSSY_IMAGE_CODECS)
def test_lossy_image_codecs_round_trip_real_images_within_their_error(
        codec: str, images: np.ndarray) -> None:
    rows = encode_rows(codec, images)
    assert all(isinstance(row, bytes) for row in rows)
    decoded = decode_rows(codec, rows, IMAGE, np.dtype(np.uint8))
    assert decoded.dtype == np.uint8 and decoded.shape == images.shape
    error = _mean_abs_error(decoded, images)
    assert 0 < error < MEAN_ABS_ERROR_BOUND[codec], error
    assert np.mean([len(row) for row in rows]) < RAW_IMAGE_BYTES


@pytest.mark.parametrize("family", ["jpeg", "webp"])
def test_higher_quality_costs_more_bytes_for_less_error(family: str,
                                                        images: np.ndarray) -> None:
    if family == "webp" and not WEBP:
        pytest.skip("Pillow was built without WebP")
    sizes, errors = [], []
    for quality in QUALITIES:  # high to low
        codec = f"{family}-q{quality}"
        rows = encode_rows(codec, images)
        sizes.append(np.mean([len(row) for row in rows]))
        errors.append(_mean_abs_error(decode_rows(codec, rows, IMAGE, np.dtype(np.uint8)),
                                      images))
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), sizes
    assert errors == sorted(errors) and len(set(errors)) == len(errors), errors


@pytest.mark.parametrize("codec", LOSSY_IMAGE_CODECS)
def test_a_lossy_image_codec_refuses_what_is_not_its_image(codec: str,
                                                           images: np.ndarray) -> None:
    image_format = "JPEG" if codec.startswith("jpeg") else "WEBP"
    valid = get_codec(codec).encode(images[0])
    other_format = get_codec("png").encode(images[0])
    for payload in (b"", b"junk", valid[: len(valid) // 2], other_format):
        with pytest.raises(CodecError, match=f"^{re.escape(codec)}: .*{image_format}"):
            get_codec(codec).decode(payload, IMAGE, np.dtype(np.uint8))
    with pytest.raises(CodecError, match=rf"^{re.escape(codec)}: image is \[28, 28\], "
                                         r"the model expects \[1, 14, 14\]"):
        get_codec(codec).decode(valid, (1, 14, 14), np.dtype(np.uint8))
    with pytest.raises(CodecError, match=f"^{re.escape(codec)}: expects a uint8"):
        get_codec(codec).encode(images[0].astype(np.float32))


# -- int4-zstd -------------------------------------------------------------------------------


def _assert_within_half_a_step(original: np.ndarray, back: np.ndarray, levels: int) -> None:
    channels = original.reshape(len(original), -1)
    low, high = channels.min(axis=1), channels.max(axis=1)
    # half a quantisation step, plus the float16 rounding of each channel's low and step
    fp16 = 2.0 ** -10 * np.maximum(np.abs(low), np.abs(high)) + 1e-7
    error = np.abs(back.reshape(len(back), -1) - channels).max(axis=1)
    excess = error - (high - low) / levels / 2 - fp16
    assert np.all(excess <= 0), float(excess.max())


def test_int4_zstd_stays_within_half_a_step_per_channel(features: np.ndarray) -> None:
    rows = encode_rows("int4-zstd", features)
    decoded = decode_rows("int4-zstd", rows, FEATURES, np.dtype(np.float32))
    assert decoded.dtype == np.float32 and decoded.shape == features.shape
    for original, back in zip(features, decoded, strict=True):
        _assert_within_half_a_step(original, back, levels=15)
        # post-ReLU zeros come back exact: a channel's low is 0
        assert np.all(back[original == 0] == 0)
    int4 = np.mean([len(row) for row in rows])
    int8 = np.mean([len(row) for row in encode_rows("int8-zstd", features)])
    assert int4 < int8 < features[0].nbytes, (int4, int8)


def test_int4_zstd_pads_an_odd_count_of_codes(features: np.ndarray) -> None:
    odd = features[0, :3, :5, :3]  # 45 values
    payload = get_codec("int4-zstd").encode(odd)
    data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=1000)
    assert len(data) == 3 * 4 + math.ceil(45 / 2)
    _assert_within_half_a_step(odd, get_codec("int4-zstd").decode(payload, odd.shape,
                                                                  np.dtype(np.float32)), 15)


def test_int8_and_int4_payloads_are_float16_scales_then_packed_codes() -> None:
    # one channel from 0 to 15: steps of 1/17 (int8) and exactly 1 (int4)
    channel = np.arange(16, dtype=np.float32)[None]
    for codec, step, codes in (
            ("int8-zstd", 15 / 255, bytes(np.rint(np.arange(16) * 17).astype(np.uint8))),
            ("int4-zstd", 1.0, bytes([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]))):
        data = zstandard.ZstdDecompressor().decompress(get_codec(codec).encode(channel),
                                                       max_output_size=1000)
        scales = np.frombuffer(data[:4], "<f2")
        assert scales[0] == 0 and scales[1] == np.float16(step), (codec, scales)
        assert data[4:] == codes, codec


def test_a_corrupt_int4_payload_names_the_codec(features: np.ndarray) -> None:
    codec = get_codec("int4-zstd")
    valid = codec.encode(features[0])
    for payload in (b"", b"junk", valid[: len(valid) // 2]):
        with pytest.raises(CodecError, match=r"^int4-zstd: "):
            codec.decode(payload, FEATURES, np.dtype(np.float32))
    # a valid payload of another shape (a different cut) is not this tensor either
    with pytest.raises(CodecError, match=r"^int4-zstd: "):
        codec.decode(valid, (32, 7, 7), np.dtype(np.float32))


# -- packed bottleneck codes -----------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(2, 3, 3), (8, 3, 3), (1, 3, 3)])
def test_packed_codes_round_trip_exactly_in_bits_per_code(bits: int,
                                                          shape: tuple[int, ...]) -> None:
    codec = get_codec(f"packed-{bits}bit")
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, size=shape, dtype=np.uint8)
    payload = codec.encode(codes)
    assert len(payload) == math.ceil(math.prod(shape) * bits / 8)
    decoded = codec.decode(payload, shape, np.dtype(np.uint8))
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, codes)


def test_packed_4bit_puts_the_first_code_in_the_low_nibble() -> None:
    codes = np.array([1, 2, 15], dtype=np.uint8)
    assert get_codec("packed-4bit").encode(codes) == bytes([0x21, 0x0F])
    assert get_codec("packed-8bit").encode(codes) == bytes([1, 2, 15])


def test_packed_codes_refuse_a_code_out_of_range() -> None:
    codes = np.zeros((2, 3, 3), dtype=np.uint8)
    codes[1, 2, 0] = 16
    with pytest.raises(CodecError, match=r"^packed-4bit: code 16 does not fit in 4 bits"):
        get_codec("packed-4bit").encode(codes)


@pytest.mark.parametrize("dtype", [np.int64, np.float32, np.int8])
def test_packed_codes_refuse_an_array_that_is_not_uint8(dtype: type) -> None:
    for codec in ("packed-4bit", "packed-8bit"):
        with pytest.raises(CodecError, match=f"^{codec}: expects uint8 codes, got "):
            get_codec(codec).encode(np.zeros((2, 3, 3), dtype=dtype))


@pytest.mark.parametrize("bits", [4, 8])
def test_a_packed_payload_of_the_wrong_length_says_what_was_expected(bits: int) -> None:
    codec, shape = get_codec(f"packed-{bits}bit"), (2, 3, 3)
    payload = codec.encode(np.ones(shape, dtype=np.uint8))
    expected = 18 * bits // 8
    for wrong in (payload[:-1], b"", payload + b"\0"):
        with pytest.raises(CodecError, match=rf"^packed-{bits}bit: payload is {len(wrong)} "
                                             rf"bytes, \[2, 3, 3\] codes of {bits} bits "
                                             rf"need {expected}$"):
            codec.decode(wrong, shape, np.dtype(np.uint8))


def test_packed_codes_decode_to_any_type_that_holds_them_exactly() -> None:
    codes = np.arange(16, dtype=np.uint8).reshape(2, 2, 4)
    payload = get_codec("packed-4bit").encode(codes)
    as_float = get_codec("packed-4bit").decode(payload, codes.shape, np.dtype(np.float32))
    assert as_float.dtype == np.float32
    np.testing.assert_array_equal(as_float, codes)
    with pytest.raises(CodecError, match=r"^packed-4bit: .*the model expects int8"):
        get_codec("packed-4bit").decode(payload, codes.shape, np.dtype(np.int8))


def test_encode_rows_and_decode_rows_carry_packed_4bit_codes() -> None:
    batch = np.random.default_rng(1).integers(0, 16, size=(5, 2, 3, 3), dtype=np.uint8)
    rows = encode_rows("packed-4bit", batch)
    assert rows.dtype == object and [len(row) for row in rows] == [9] * 5
    decoded = decode_rows("packed-4bit", rows, (2, 3, 3), np.dtype(np.uint8))
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, batch)
    with pytest.raises(CodecError, match=r"^packed-4bit: payload is 8 bytes"):
        decode_rows("packed-4bit", np.array([rows[0], rows[1][:-1]], dtype=object), (2, 3, 3),
                    np.dtype(np.uint8))
