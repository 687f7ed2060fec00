"""Codecs: how a tensor is packed for the link. numpy + zstandard + Pillow, no torch.

Input codecs pack a uint8 image before a `Remote` plan sends it; feature codecs pack the
float32 activations a `Split` plan sends from its cut; code codecs pack the uint8 codes a
learned bottleneck's device half emits. A codec is one small class behind
`Codec`; the registry below is the only list of them, and a model's profile records which
ones were measured for it (bytes and accuracy), so the planner takes whatever that lists.

On the wire (OIP v2): an encoded tensor travels as a BYTES input, one element per batch row,
with the codec named in the input's `parameters.content_type` — the way MLServer names the
codec of an input. The receiver knows the model input's shape and datatype from its metadata,
so payloads carry no header of their own: at 1 KB/s every byte is a millisecond.

`raw` is the identity: the plain tensor, sent as an ordinary OIP tensor.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import zstandard

RAW = "raw"

# zstd level 3 is zstd's default: near its best ratio on these small payloads at ~0.02 ms.
_ZSTD_LEVEL = 3


class CodecError(ValueError):
    """A payload that does not decode to the expected tensor."""


class Codec(Protocol):
    """Packs one tensor of a known shape and dtype into bytes, and back."""

    name: str
    kind: str       # "input" (uint8 images), "feature" (float32 activations) or "code"
    lossless: bool

    def encode(self, array: np.ndarray) -> bytes: ...

    def decode(self, payload: bytes, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        ...


def _compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=False).compress(data)


def _decompress(payload: bytes, size: int, codec: str) -> bytes:
    try:
        data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=size)
    except zstandard.ZstdError as error:
        raise CodecError(f"{codec}: payload does not decompress: {error}") from None
    if len(data) != size:
        raise CodecError(f"{codec}: payload holds {len(data)} bytes, the tensor needs {size}")
    return data


class Zstd:
    """The tensor's bytes, zstd-compressed. Lossless; any dtype."""

    name = "zstd"
    kind = "input"
    lossless = True

    def encode(self, array: np.ndarray) -> bytes:
        return _compress(np.ascontiguousarray(array).tobytes())

    def decode(self, payload: bytes, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        return np.frombuffer(_decompress(payload, size, self.name), dtype).reshape(shape)


def _channels_first(shape: tuple[int, ...]) -> bool:
    return shape[0] in (1, 3) and shape[2] not in (1, 3)


def _height_width(shape: tuple[int, ...]) -> list[int]:
    return list(shape[1:]) if _channels_first(shape) else list(shape[:2])


def image_mode(shape: tuple[int, ...]) -> str | None:
    """How a uint8 tensor of `shape` is an image: "L" for greyscale [1, H, W] (channels first)
    or [H, W, 1], "RGB" for [H, W, 3] (NHWC, as frames are decoded) or [3, H, W]; None when it
    is not an image."""
    if len(shape) != 3:
        return None
    if _channels_first(shape):
        return "L" if shape[0] == 1 else "RGB"
    if shape[2] in (1, 3):
        return "L" if shape[2] == 1 else "RGB"
    return None


def _as_pixels(array: np.ndarray) -> np.ndarray:
    """[H, W] or [H, W, 3] for Pillow, from any layout `image_mode` accepts."""
    if _channels_first(array.shape):
        array = np.moveaxis(array, 0, 2)
    return np.ascontiguousarray(array[..., 0] if array.shape[2] == 1 else array)


def _from_pixels(pixels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `_as_pixels`, back to `shape`."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if _channels_first(shape):
        pixels = np.moveaxis(pixels, 2, 0)
    return np.ascontiguousarray(pixels.reshape(shape))


def codec_fits(name: str, row: np.ndarray) -> bool:
    """Whether codec `name` can pack one row like `row`: image codecs take uint8 images,
    feature codecs float tensors; raw and zstd take anything."""
    if name in (RAW, "zstd"):
        return True
    codec = get_codec(name)
    if isinstance(codec, _PillowImage):
        return row.dtype == np.uint8 and image_mode(row.shape) is not None
    if codec.kind == "feature":
        return row.dtype.kind == "f"
    return True


class _PillowImage:
    """A uint8 image — greyscale [1, H, W] or [H, W, 1], colour [H, W, 3] or [3, H, W] — as
    one image file written by Pillow; subclasses pick the format and its save options."""

    name: str
    kind = "input"
    lossless: bool
    image_format: str           # Pillow's format name, e.g. "PNG"
    save_options: dict[str, Any]

    def encode(self, array: np.ndarray) -> bytes:
        from PIL import Image

        mode = image_mode(array.shape)
        if array.dtype != np.uint8 or mode is None:
            raise CodecError(f"{self.name}: expects a uint8 image ([1, H, W], [H, W, 1], "
                             f"[H, W, 3] or [3, H, W]), got {array.dtype} {list(array.shape)}")
        out = io.BytesIO()
        Image.fromarray(_as_pixels(array), mode=mode).save(
            out, self.image_format, **self.save_options)
        return out.getvalue()

    def decode(self, payload: bytes, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            # only this codec's format: a payload is not a licence to run every Pillow decoder
            with Image.open(io.BytesIO(payload), formats=(self.image_format,)) as image:
                size = [image.height, image.width]
                mode = image_mode(tuple(shape))
                # the header is checked before the pixels are decoded: a huge one costs nothing
                fits = mode is not None and size == _height_width(tuple(shape)) and \
                    np.dtype(dtype) == np.uint8
                # WebP has no grayscale mode: Pillow writes and reads it as RGB
                pixels = np.asarray(image.convert(mode), dtype=np.uint8) if fits else None
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError,
                ValueError) as error:  # a bomb's header is refused as it is opened
            raise CodecError(f"{self.name}: payload is not a {self.image_format} image: "
                             f"{error}") from None
        if pixels is None:
            raise CodecError(f"{self.name}: image is {size}, the model expects {list(shape)} "
                             f"{np.dtype(dtype)}")
        return _from_pixels(pixels, tuple(shape))


class Png(_PillowImage):
    """A uint8 image as an 8-bit grayscale PNG (Pillow): lossless, and the format a camera
    pipeline already has. Shape [1, H, W] (channels first, one channel)."""

    name = "png"
    lossless = True
    image_format = "PNG"

    def __init__(self) -> None:
        self.save_options = {"optimize": True}


class Jpeg(_PillowImage):
    """A uint8 image as a grayscale baseline JPEG (ITU-T T.81) at `quality` (1-95, Pillow's
    scale; 75 is its default): lossy, and the format most cameras already emit.

    `optimize=True` builds Huffman tables per image: a quarter fewer bytes on Fashion-MNIST.
    Its markers and tables still cost ~165 bytes (an all-black 28x28 image), so on images
    this small q90 is larger than lossless zstd; the profile shows which quality pays."""

    lossless = False
    image_format = "JPEG"

    def __init__(self, quality: int) -> None:
        self.quality = quality
        self.name = f"jpeg-q{quality}"
        self.save_options = {"quality": quality, "optimize": True}


class Webp(_PillowImage):
    """A uint8 image as lossy WebP (VP8 intra-frame coding) at `quality` (0-100).

    Its container costs ~58 bytes (an all-black 28x28 image) against JPEG's ~165, and on
    Fashion-MNIST it is both smaller and closer than JPEG at each quality. `method=6` is libwebp's
    slowest, smallest setting: a 28x28 image still encodes in ~0.5 ms."""

    lossless = False
    image_format = "WEBP"

    def __init__(self, quality: int) -> None:
        self.quality = quality
        self.name = f"webp-q{quality}"
        self.save_options = {"quality": quality, "method": 6}


class HalfResolutionJpeg(Jpeg):
    """The image at half its height and width (Pillow's antialiased bilinear), as JPEG at
    `quality`; the receiver scales it back up to the model's input size. A quarter of the
    pixels before JPEG even starts: the lever for camera frames on a slow link, at the cost
    of fine detail (the profile measures how much quality that costs per model)."""

    def __init__(self, quality: int) -> None:
        super().__init__(quality)
        self.name = f"half-jpeg-q{quality}"

    def encode(self, array: np.ndarray) -> bytes:
        from PIL import Image

        mode = image_mode(array.shape)
        if array.dtype != np.uint8 or mode is None:
            raise CodecError(f"{self.name}: expects a uint8 image ([1, H, W], [H, W, 1], "
                             f"[H, W, 3] or [3, H, W]), got {array.dtype} {list(array.shape)}")
        height, width = _height_width(array.shape)
        image = Image.fromarray(_as_pixels(array), mode=mode).resize(
            (max(1, -(-width // 2)), max(1, -(-height // 2))), Image.Resampling.BILINEAR)
        out = io.BytesIO()
        image.save(out, self.image_format, **self.save_options)
        return out.getvalue()

    def decode(self, payload: bytes, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        from PIL import Image

        mode = image_mode(tuple(shape))
        if mode is None or np.dtype(dtype) != np.uint8:
            raise CodecError(f"{self.name}: the model expects {list(shape)} {np.dtype(dtype)}, "
                             "not a uint8 image")
        height, width = _height_width(tuple(shape))
        small_shape = (-(-height // 2), -(-width // 2), 1 if mode == "L" else 3)
        pixels = super().decode(payload, small_shape, dtype)
        image = Image.fromarray(_as_pixels(pixels), mode=mode).resize(
            (width, height), Image.Resampling.BILINEAR)
        return _from_pixels(np.asarray(image), tuple(shape))


class Float16Zstd:
    """Features cast to float16, then zstd (post-ReLU maps are mostly exact zeros, which
    zstd removes). Error ≤ 2^-11 relative: invisible in accuracy (see the profile)."""

    name = "fp16-zstd"
    kind = "feature"
    lossless = False

    def encode(self, array: np.ndarray) -> bytes:
        return _compress(np.ascontiguousarray(array, dtype="<f2").tobytes())

    def decode(self, payload: bytes, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        size = math.prod(shape) * 2
        half = np.frombuffer(_decompress(payload, size, self.name), "<f2")
        return half.astype(dtype).reshape(shape)


def _pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Unsigned codes below 2**bits, `bits` bits each, first code in the lowest bits of the
    first byte; the last byte is padded with zero bits."""
    if bits == 8:  # already one code a byte: skip the 8x bit expansion
        return np.ascontiguousarray(codes, dtype=np.uint8).tobytes()
    planes = np.unpackbits(codes.reshape(-1, 1).astype(np.uint8), axis=1, bitorder="little")
    return np.packbits(planes[:, :bits], bitorder="little").tobytes()


def _unpack_codes(data: bytes, count: int, bits: int) -> np.ndarray:
    """The inverse of `_pack_codes`: `count` uint8 codes from at least count*bits bits."""
    if bits == 8:
        return np.frombuffer(data, np.uint8, count)
    planes = np.unpackbits(np.frombuffer(data, np.uint8), count=count * bits,
                           bitorder="little").reshape(count, bits)
    return np.packbits(planes, axis=1, bitorder="little").reshape(count)


def _packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


class _AffineZstd:
    """Per-channel affine `bits`-bit quantisation, then zstd (the uniform quantiser of
    BottleNet++ / Neurosurgeon-style split computing, without a learned bottleneck).

    Each channel c is sent as its float16 (low, step) and codes
    q = round((x - low) / step), step = (high - low) / (2**bits - 1), packed `bits` bits each;
    so |x - decoded| ≤ step / 2, plus the float16 rounding of low and step. Zero maps to a
    code exactly when low = 0, which is the common post-ReLU case, so zstd still finds long
    zero runs. Payload before zstd: [C, 2] float16 scales, then the packed codes.
    """

    kind = "feature"
    lossless = False
    name: str
    bits: int

    def encode(self, array: np.ndarray) -> bytes:
        levels = (1 << self.bits) - 1
        channels = array.reshape(array.shape[0], -1) if array.ndim > 1 else array[None]
        low = channels.min(axis=1).astype(np.float16).astype(np.float32)
        high = channels.max(axis=1)
        step = ((high - low) / levels).astype(np.float16).astype(np.float32)
        safe = np.where(step > 0, step, 1.0)[:, None]
        codes = np.clip(np.rint((channels - low[:, None]) / safe), 0, levels).astype(np.uint8)
        scales = np.stack([low, step], axis=1).astype("<f2")
        return _compress(scales.tobytes() + _pack_codes(codes, self.bits))

    def decode(self, payload: bytes, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        n_channels = shape[0] if len(shape) > 1 else 1
        count = math.prod(shape)
        data = _decompress(payload, n_channels * 4 + _packed_size(count, self.bits), self.name)
        scales = np.frombuffer(data, "<f2", n_channels * 2).astype(np.float32).reshape(-1, 2)
        codes = _unpack_codes(data[n_channels * 4:], count, self.bits).reshape(n_channels, -1)
        values = scales[:, :1] + codes.astype(np.float32) * scales[:, 1:]
        return values.astype(dtype).reshape(shape)


class Int8Zstd(_AffineZstd):
    """`_AffineZstd` at 8 bits: 256 levels, one code a byte."""

    name = "int8-zstd"
    bits = 8


class Int4Zstd(_AffineZstd):
    """`_AffineZstd` at 4 bits: 16 levels, two codes a byte (an odd count pads the last
    byte). Half the bytes of int8 before zstd, at 17x the error bound."""

    name = "int4-zstd"
    bits = 4


class PackedBits:
    """The uint8 codes of a learned bottleneck's device half (the split computing of
    BottleNet, Eshratifar et al. 2019), each in [0, 2**bits), packed `bits` bits a code.

    Lossless, with no header and no zstd: a code tensor is ~10 bytes, and a zstd frame
    adds ~9 (10 bytes compress to 19); the receiver knows the shape, hence the length.
    """

    kind = "code"
    lossless = True

    def __init__(self, bits: int) -> None:
        if not 1 <= bits <= 8:
            raise ValueError(f"PackedBits: bits must be 1 to 8, got {bits}")
        self.bits = bits
        self.name = packed_codec_name(bits)

    def encode(self, array: np.ndarray) -> bytes:
        if array.dtype != np.uint8:
            raise CodecError(f"{self.name}: expects uint8 codes, got {array.dtype}")
        if array.size and int(array.max()) >= 1 << self.bits:
            raise CodecError(f"{self.name}: code {int(array.max())} does not fit in "
                             f"{self.bits} bits (expected codes in [0, {1 << self.bits}))")
        return _pack_codes(array, self.bits)

    def decode(self, payload: bytes, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        count = math.prod(shape)
        expected = _packed_size(count, self.bits)
        if len(payload) != expected:
            raise CodecError(f"{self.name}: payload is {len(payload)} bytes, {list(shape)} "
                             f"codes of {self.bits} bits need {expected}")
        # any dtype that holds every uint8 exactly (a float tail takes codes as floats)
        if not np.can_cast(np.uint8, dtype, "safe"):
            raise CodecError(f"{self.name}: codes decode to uint8 or a wider type, the model "
                             f"expects {np.dtype(dtype)}")
        return _unpack_codes(payload, count, self.bits).astype(dtype).reshape(shape)


class LearnedBottleneck:
    """A learned feature codec (BottleNet++, Shao & Zhang 2020): a trained encoder squeezes
    the features at a cut into a few channels of `bits`-bit codes, packed on the wire; a
    trained decoder expands them back into features the tail can use.

    What it claims: the codes round-trip exactly, and the decoded features keep the task's
    accuracy (measured by `tierwise optimize bottleneck`) — not that they equal the input.
    Made by `tierwise.optimize.bottleneck`; runs on ONNX Runtime alone. In a served split the
    encoder is fused into the device head and the decoder into the tail, so only the packed
    codes travel (`packed-<bits>bit`).
    """

    kind = "feature"
    lossless = False

    def __init__(self, encoder: Path, decoder: Path, bits: int) -> None:
        import onnxruntime as ort

        def session(path: Path) -> ort.InferenceSession:
            return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        self.encoder, self.decoder = session(encoder), session(decoder)
        self.packing = PackedBits(bits)
        self.name = f"learned-{Path(encoder).parent.name}"
        self.codes_shape = tuple(self.encoder.get_outputs()[0].shape[1:])
        self.codes_per_image = math.prod(self.codes_shape)

    def encode_batch(self, features: np.ndarray) -> list[bytes]:
        codes = self.encoder.run(None, {self.encoder.get_inputs()[0].name: features})[0]
        return [self.packing.encode(row) for row in codes]

    def decode_batch(self, payloads: list[bytes]) -> np.ndarray:
        codes = np.stack([self.packing.decode(payload, self.codes_shape, np.dtype(np.uint8))
                          for payload in payloads])
        return self.decoder.run(None, {self.decoder.get_inputs()[0].name: codes})[0]

    def encode(self, array: np.ndarray) -> bytes:
        return self.encode_batch(np.ascontiguousarray(array, np.float32)[None])[0]

    def decode(self, payload: bytes, shape: tuple[int, ...] | None = None,
               dtype: np.dtype[Any] | None = None) -> np.ndarray:
        features = self.decode_batch([payload])[0]
        if shape is not None and tuple(features.shape) != tuple(shape):
            raise CodecError(f"{self.name}: decodes to {list(features.shape)}, expected "
                             f"{list(shape)}")
        return features


def bottleneck_dir(models_dir: Path, model: str, split_point: int, name: str) -> Path:
    """Where `tierwise optimize bottleneck` keeps one learned codec (encoder.onnx,
    decoder.onnx): beside the models, but not itself a model."""
    return Path(models_dir) / f"{model}.bottleneck@{split_point}-{name}"


def load_bottleneck(models_dir: Path, model: str, split_point: int, name: str,
                    bits: int) -> LearnedBottleneck:
    directory = bottleneck_dir(models_dir, model, split_point, name)
    if not (directory / "encoder.onnx").is_file():
        raise FileNotFoundError(f"{directory}: no learned bottleneck; run "
                                f"`tierwise optimize bottleneck`")
    return LearnedBottleneck(directory / "encoder.onnx", directory / "decoder.onnx", bits)


def packed_codec_name(bits: int) -> str:
    return f"packed-{bits}bit"


def _webp_available() -> bool:
    from PIL import features

    return bool(features.check("webp"))


# A new codec is one class and one entry here. The order is the profile's order.
_QUALITIES = (90, 75, 50)
# a Pillow built without libwebp still serves every other codec
_WEBP = [Webp(quality) for quality in _QUALITIES] if _webp_available() else []
_ALL: tuple[Codec, ...] = (
    Zstd(), Png(), *(Jpeg(quality) for quality in _QUALITIES), *_WEBP, HalfResolutionJpeg(75),
    Float16Zstd(), Int8Zstd(), Int4Zstd(), PackedBits(4), PackedBits(8))
CODECS: dict[str, Codec] = {codec.name: codec for codec in _ALL}


def get_codec(name: str) -> Codec:
    codec = CODECS.get(name)
    if codec is None:
        raise CodecError(f"unknown codec {name!r}; known: {[RAW, *CODECS]}")
    return codec


def codec_names(kind: str) -> list[str]:
    """`raw` plus every codec of `kind` ("input", "feature" or "code"), in registry order."""
    return [RAW, *(name for name, codec in CODECS.items() if codec.kind == kind)]


def encode_rows(codec_name: str, batch: np.ndarray) -> np.ndarray:
    """A batch as a BYTES tensor: one encoded payload per row (object array of bytes)."""
    codec = get_codec(codec_name)
    rows = np.empty(len(batch), dtype=object)
    for index, row in enumerate(batch):
        rows[index] = codec.encode(row)
    return rows


def max_payload_bytes(row_shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
    """The most bytes any codec may take for one row of `row_shape` and `dtype`: the raw
    tensor plus a container's worth (PNG, WebP and zstd frames of incompressible data run a
    little over the raw size). Anything longer is refused before it is decoded."""
    raw = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return raw + raw // 8 + PAYLOAD_SLACK_BYTES


# A codec container's own bytes beyond the pixels or values: headers, chunks, frames.
PAYLOAD_SLACK_BYTES = 4096


def decode_rows(codec_name: str, rows: np.ndarray, row_shape: tuple[int, ...],
                dtype: np.dtype[Any]) -> np.ndarray:
    """The inverse of `encode_rows`: a [len(rows), *row_shape] array of `dtype`.

    Raises CodecError naming the row for a payload longer than `max_payload_bytes` (before
    any decoding) or one that does not decode to exactly `row_shape` and `dtype`."""
    codec = get_codec(codec_name)
    if len(rows) == 0:
        return np.empty((0, *row_shape), dtype)
    limit = max_payload_bytes(row_shape, dtype)
    decoded = []
    for index, row in enumerate(rows):
        payload = bytes(row)
        if len(payload) > limit:
            raise CodecError(f"{codec_name}: row {index}: payload of {len(payload):,} bytes, "
                             f"more than any encoding of a {list(row_shape)} "
                             f"{np.dtype(dtype)} tensor takes (at most {limit:,})")
        decoded.append(codec.decode(payload, row_shape, dtype))
    return np.stack(decoded)
