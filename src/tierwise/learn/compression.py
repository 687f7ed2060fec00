"""Update compressors for federated learning: what a client sends instead of its float32 update.

A client's update is its new weights minus the global weights it started from, a list of
float32 arrays. A compressor turns it into a payload — a dict of plain numpy arrays under plain
string keys, ready for any array wire format — and the server decodes the payload back to
float32 arrays of the original shapes before it aggregates. Pure numpy: clients and server
import no torch for this.

Every payload has the same frame, so the server has one path for all of them:

- ``compressor``: the spec that wrote it (``"topk:0.01+q8"``), UTF-8 bytes as uint8;
- ``ndims`` (int64 [tensors]) and ``dims`` (int64 [sum of ndims]): each tensor's shape;

plus the compressor's own arrays, all over the flattened concatenation of the tensors:

- ``none``: ``values``, float32 as is.
- ``q8`` / ``q4``: stochastic quantization (`StochasticQuantizer`, QSGD: Alistarh et al.,
  2017, "QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding").
- ``topk:F``: the ceil(F·n) largest magnitudes over the whole update, zeros elsewhere, with
  error feedback (`TopK`; Aji & Heafield, 2017, "Sparse Communication for Distributed Gradient
  Descent"; error feedback as in Stich et al., 2018, "Sparsified SGD with Memory").
- ``topk:F+q8`` / ``topk:F+q4``: top-k, then the kept values quantized (Deep Gradient
  Compression-style pipelines; Lin et al., 2018).

Error feedback: a compressor that drops information (top-k) keeps what it dropped — the
residual — on the client and adds it to the next update before compressing, so nothing is lost
for good, only delayed: over T rounds the decoded sum differs from the true sum by one
residual, not by T rounds of dropped mass. The quantizers are unbiased on their own and run
without it by default.

``decode`` needs nothing but the payload: any compressor decodes any payload, by the spec the
payload names.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

SPEC_KEY = "compressor"
NDIMS_KEY = "ndims"
DIMS_KEY = "dims"

# The default specs the federated benchmark compares.
COMPRESSORS: tuple[str, ...] = ("none", "q8", "q4", "topk:0.05", "topk:0.05+q8")

# Quantization chunk: 1024 consecutive values of the flattened update share one (low, scale).
# Small enough that an outlier widens the step of 1024 values only, not of a whole 400k layer;
# large enough that the 8 bytes of (low, scale) cost 0.8% at 8 bits and 1.6% at 4 bits.
QUANT_CHUNK = 1024


def payload_bytes(payload: dict[str, np.ndarray]) -> int:
    """What the payload costs on the wire before any framing: the sum of its arrays' bytes."""
    return sum(int(array.nbytes) for array in payload.values())


def payload_spec(payload: dict[str, np.ndarray]) -> str:
    """The spec of the compressor that wrote `payload`."""
    spec = payload.get(SPEC_KEY)
    if not isinstance(spec, np.ndarray) or spec.dtype != np.uint8 or spec.ndim != 1:
        raise ValueError(f"not a compressed update: no uint8 {SPEC_KEY!r} array naming its "
                         f"compressor (keys: {sorted(payload)})")
    try:
        return spec.tobytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"compressed update: {SPEC_KEY!r} is not UTF-8") from None


def is_compressed_payload(payload: object) -> bool:
    """Whether `payload` is a dict written by one of these compressors (by its frame)."""
    if not isinstance(payload, dict):
        return False
    try:
        make_compressor(payload_spec(payload))
    except ValueError:
        return False
    return isinstance(payload.get(NDIMS_KEY), np.ndarray) and \
        isinstance(payload.get(DIMS_KEY), np.ndarray)


def _field(payload: dict[str, np.ndarray], key: str, dtype: type[np.generic],
           count: int | None = None) -> np.ndarray:
    """payload[key], checked: a 1-D array of `dtype` (of `count` entries when given)."""
    array = payload.get(key)
    if not isinstance(array, np.ndarray):
        raise ValueError(f"compressed update ({payload_spec(payload)}) lacks {key!r}")
    if array.dtype != dtype or array.ndim != 1 or (count is not None and array.size != count):
        expected = f"{np.dtype(dtype)} [{'any' if count is None else count}]"
        raise ValueError(f"compressed update ({payload_spec(payload)}): {key!r} is "
                         f"{array.dtype} {list(array.shape)}, expected {expected}")
    return array


def _shapes(payload: dict[str, np.ndarray]) -> list[tuple[int, ...]]:
    ndims = _field(payload, NDIMS_KEY, np.int64)
    dims = _field(payload, DIMS_KEY, np.int64)
    if (ndims < 0).any() or int(ndims.sum()) != dims.size or (dims < 0).any():
        raise ValueError(f"compressed update ({payload_spec(payload)}): {NDIMS_KEY!r} "
                         f"{ndims.tolist()} does not describe {DIMS_KEY!r} {dims.tolist()}")
    bounds = np.cumsum(ndims)[:-1]
    return [tuple(int(dim) for dim in shape) for shape in np.split(dims, bounds)] \
        if ndims.size else []


def payload_shapes(payload: dict[str, np.ndarray]) -> list[tuple[int, ...]]:
    """The tensor shapes a payload claims, read before anything is allocated: a receiver
    checks them against what it expects, so a bad payload cannot make it allocate at will."""
    return _shapes(payload)


def _split(flat: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    sizes = [math.prod(shape) for shape in shapes]
    pieces = np.split(flat, np.cumsum(sizes)[:-1]) if shapes else []
    return [piece.reshape(shape) for piece, shape in zip(pieces, shapes, strict=True)]


def _flatten(tensors: Sequence[np.ndarray], what: str) -> np.ndarray:
    """The tensors as one float32 vector; refuses NaN and inf, which would poison the
    quantizer's range and, after aggregation, the global model."""
    # checked after the cast: a float64 beyond float32's range becomes inf there
    with np.errstate(over="ignore"):
        pieces = [np.asarray(tensor, np.float32).ravel() for tensor in tensors]
    for index, piece in enumerate(pieces):
        finite = np.isfinite(piece)
        if not finite.all():
            raise ValueError(f"{what} tensor {index} (shape {list(np.shape(tensors[index]))}) "
                             f"holds {piece.size - int(np.count_nonzero(finite))} NaN/inf "
                             f"value(s); a compressed update must be finite")
    return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


class StochasticQuantizer:
    """QSGD-style unbiased stochastic quantization of a float32 vector to `bits` bits.

    The vector is cut into chunks of `chunk` consecutive values (`QUANT_CHUNK`); each chunk is
    sent as float32 ``low`` = its minimum and ``scale`` = (max - min) / (2**bits - 1), and each
    value x as the code q = floor(t) + [u < t - floor(t)], t = (x - low) / scale, u ~ U[0, 1):
    rounded up with probability equal to its distance above the lower level, so
    E[low + q·scale] = x and |x - decoded| < scale (one level). Chunks, not tensors, because
    the same quantizer serves dense updates and top-k's kept values (one flat vector across
    tensors), and the range stays local to 1024 values whatever the layer sizes. A constant
    chunk has scale 0 and decodes exactly.

    Keys: ``q.low``, ``q.scale`` (float32 [chunks]), ``q.chunk`` (int64 [1]) and ``q.codes``
    (uint8: one code a byte at 8 bits; two a byte at 4 bits, first code in the low nibble).
    """

    def __init__(self, bits: int, chunk: int = QUANT_CHUNK) -> None:
        self.bits = bits
        self.chunk = chunk

    @property
    def top_code(self) -> int:
        return (1 << self.bits) - 1

    def quantize(self, values: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        count = values.size
        starts = np.arange(0, count, self.chunk)
        if count:
            low = np.minimum.reduceat(values, starts)
            high = np.maximum.reduceat(values, starts)
        else:
            low = high = np.zeros(0, np.float32)
        # float64 for the range: high - low of two float32s can overflow float32
        scale = ((high.astype(np.float64) - low) / self.top_code).astype(np.float32)
        # float32 rounding may leave the top level just short of the maximum: one ulp more
        short = low.astype(np.float64) + self.top_code * scale.astype(np.float64) < high
        scale = np.where(short, np.nextafter(scale, np.float32(np.inf)), scale)
        counts = np.diff(np.append(starts, count))
        safe_scale = np.repeat(np.where(scale > 0, scale, 1.0), counts)
        levels = np.clip((values - np.repeat(low, counts).astype(np.float64)) / safe_scale,
                         0, self.top_code)
        below = np.floor(levels)
        codes = (below + (rng.random(count) < levels - below)).astype(np.uint8)
        return {"q.low": low, "q.scale": scale, "q.chunk": np.array([self.chunk], np.int64),
                "q.codes": self._pack(codes)}

    def dequantize(self, payload: dict[str, np.ndarray], count: int) -> np.ndarray:
        chunk = int(_field(payload, "q.chunk", np.int64, 1)[0])
        if chunk <= 0:
            raise ValueError(f"compressed update ({payload_spec(payload)}): q.chunk is {chunk}")
        chunks = -(-count // chunk)
        low = _field(payload, "q.low", np.float32, chunks)
        scale = _field(payload, "q.scale", np.float32, chunks)
        packed = _field(payload, "q.codes", np.uint8, -(-count * self.bits // 8))
        codes = self._unpack(packed, count)
        counts = np.diff(np.append(np.arange(0, count, chunk), count))
        return np.repeat(low, counts) + codes.astype(np.float32) * np.repeat(scale, counts)

    def _pack(self, codes: np.ndarray) -> np.ndarray:
        if self.bits == 8:
            return codes
        if codes.size % 2:
            codes = np.append(codes, np.uint8(0))
        return codes[0::2] | (codes[1::2] << 4)

    def _unpack(self, packed: np.ndarray, count: int) -> np.ndarray:
        if self.bits == 8:
            return packed
        return np.stack([packed & 0x0F, packed >> 4], axis=1).ravel()[:count]


class UpdateCompressor(ABC):
    """Compresses a model update (a list of float32 arrays) into a payload, and back.

    A subclass packs and unpacks one flat float32 vector (`pack`, `unpack`); this class does
    the rest: validation, flattening, the payload's frame, error feedback and the shapes.
    To add one, write the class and list it in `_KINDS`.
    """

    spec: str               # what `make_compressor` takes and the payload records
    name: str               # the spec without ':', for labels and file names ("topk0.01+q8")
    error_feedback: bool
    forms: tuple[str, ...]  # the spec forms this class parses, for error messages

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: str) -> UpdateCompressor | None:
        """This class's compressor for `spec`, or None when the spec is not of its forms."""

    @abstractmethod
    def pack(self, flat: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The arrays that carry the float32 vector `flat`."""

    @abstractmethod
    def unpack(self, payload: dict[str, np.ndarray], size: int) -> np.ndarray:
        """The float32 vector of `size` values that `pack` wrote into `payload`."""

    def encode(self, update: Sequence[np.ndarray], residual: list[np.ndarray] | None,
               rng: np.random.Generator) -> tuple[dict[str, np.ndarray], list[np.ndarray] | None]:
        """(payload, new residual). With error feedback, `residual` (what compression dropped
        last time; None on the first round) is added to `update` before compressing, and the
        new residual is (update + residual) - decode(payload). Without error feedback the
        residual is ignored and None returned. Raises ValueError on NaN/inf, or on a residual
        whose shapes differ from the update's."""
        shapes = [tuple(np.shape(tensor)) for tensor in update]
        flat = _flatten(update, "update")
        if self.error_feedback and residual is not None:
            residual_shapes = [tuple(np.shape(tensor)) for tensor in residual]
            if residual_shapes != shapes:
                raise ValueError(f"{self.spec}: residual shapes {residual_shapes} differ from "
                                 f"the update's {shapes}")
            flat = flat + _flatten(residual, "residual")
        dims = [dim for shape in shapes for dim in shape]
        payload: dict[str, np.ndarray] = {
            SPEC_KEY: np.frombuffer(self.spec.encode("utf-8"), np.uint8).copy(),
            NDIMS_KEY: np.array([len(shape) for shape in shapes], np.int64),
            DIMS_KEY: np.array(dims, np.int64),
            **self.pack(flat, rng)}
        if not self.error_feedback:
            return payload, None
        return payload, _split(flat - self.unpack(payload, flat.size), shapes)

    def decode(self, payload: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The float32 arrays, of the original shapes, that `payload` carries. Needs nothing
        but the payload: one written by another compressor is decoded by the one it names."""
        spec = payload_spec(payload)
        coder = self if spec == self.spec else make_compressor(spec)
        shapes = _shapes(payload)
        flat = coder.unpack(payload, sum(math.prod(shape) for shape in shapes))
        return _split(flat.astype(np.float32, copy=False), shapes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, error_feedback={self.error_feedback})"


class NoCompression(UpdateCompressor):
    """The update as float32, in the same frame as the others (the baseline)."""

    forms = ("none",)

    def __init__(self, error_feedback: bool = False) -> None:
        self.spec = self.name = "none"
        self.error_feedback = error_feedback

    @classmethod
    def from_spec(cls, spec: str) -> NoCompression | None:
        return cls() if spec == "none" else None

    def pack(self, flat: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"values": flat}

    def unpack(self, payload: dict[str, np.ndarray], size: int) -> np.ndarray:
        # a copy: the caller may scale the decoded arrays in place, and wire arrays may be
        # read-only
        return _field(payload, "values", np.float32, size).copy()


class Quantized(UpdateCompressor):
    """Every value stochastically quantized to `bits` bits (`StochasticQuantizer`): ~4x
    smaller than float32 at 8 bits, ~8x at 4 bits. Unbiased, so no error feedback by default.

    bits: 8 or 4. error_feedback: default False.
    """

    forms = ("q8", "q4")

    def __init__(self, bits: int, error_feedback: bool = False) -> None:
        if bits not in (4, 8):
            raise ValueError(f"Quantized: bits must be 4 or 8, got {bits}")
        self.spec = self.name = f"q{bits}"
        self.error_feedback = error_feedback
        self.quantizer = StochasticQuantizer(bits)

    @classmethod
    def from_spec(cls, spec: str) -> Quantized | None:
        return cls(int(spec[1])) if spec in ("q8", "q4") else None

    def pack(self, flat: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.quantizer.quantize(flat, rng)

    def unpack(self, payload: dict[str, np.ndarray], size: int) -> np.ndarray:
        return self.quantizer.dequantize(payload, size)


_TOPK_SPEC = re.compile(r"topk:?(?P<fraction>\d*\.?\d+(?:[eE]-?\d+)?)(?:\+q(?P<bits>\d+))?")
_UINT16_MAX = np.iinfo(np.uint16).max
_UINT32_MAX = np.iinfo(np.uint32).max


class TopK(UpdateCompressor):
    """Global top-k sparsification: the k = ceil(fraction·n) largest-magnitude entries of the
    whole update (all tensors flattened together), zeros elsewhere; with error feedback.

    Which entries were kept is sent the cheapest of three ways, chosen per payload:
    ``topk.bitmap`` (np.packbits of the mask, n/8 bytes), ``topk.delta16`` (the gaps between
    sorted indices as uint16, 2k bytes, when every gap fits) or ``topk.index32`` (the sorted
    indices as uint32, 4k bytes). The kept values, in index order, go as float32 ``values``
    or, with `bits`, through `StochasticQuantizer` (``q.*``).

    fraction: share of entries kept, in (0, 1]. bits: None (float32 values), 8 or 4.
    error_feedback: default True — without it top-k drops the same small entries every round.
    """

    forms = ("topk:FRACTION", "topk:FRACTION+q8", "topk:FRACTION+q4")

    def __init__(self, fraction: float, bits: int | None = None,
                 error_feedback: bool = True) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"TopK: fraction must be in (0, 1], got {fraction}")
        if bits not in (None, 4, 8):
            raise ValueError(f"TopK: bits must be None, 4 or 8, got {bits}")
        self.fraction = fraction
        self.spec = f"topk:{float(fraction)!r}" + ("" if bits is None else f"+q{bits}")
        self.name = self.spec.replace(":", "")
        self.error_feedback = error_feedback
        self.quantizer = None if bits is None else StochasticQuantizer(bits)

    @classmethod
    def from_spec(cls, spec: str) -> TopK | None:
        match = _TOPK_SPEC.fullmatch(spec)
        if match is None:
            return None
        fraction = float(match["fraction"])
        bits = None if match["bits"] is None else int(match["bits"])
        if not 0 < fraction <= 1 or bits not in (None, 4, 8):
            return None
        return cls(fraction, bits)

    def kept(self, size: int) -> int:
        """How many of `size` entries are sent: ceil(fraction·size), at least one."""
        return min(size, max(1, math.ceil(self.fraction * size)))

    def pack(self, flat: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        size = flat.size
        keep = self.kept(size)
        if keep < size:
            indices = np.sort(np.argpartition(np.abs(flat), size - keep)[size - keep:])
        else:
            indices = np.arange(size)
        values = flat[indices]
        return {**self._pack_indices(indices, size),
                **({"values": values} if self.quantizer is None
                   else self.quantizer.quantize(values, rng))}

    def unpack(self, payload: dict[str, np.ndarray], size: int) -> np.ndarray:
        indices = self._unpack_indices(payload, size)
        values = (_field(payload, "values", np.float32, indices.size) if self.quantizer is None
                  else self.quantizer.dequantize(payload, indices.size))
        flat = np.zeros(size, np.float32)
        flat[indices] = values
        return flat

    @staticmethod
    def _pack_indices(indices: np.ndarray, size: int) -> dict[str, np.ndarray]:
        bitmap_bytes = -(-size // 8)
        gaps = np.diff(indices, prepend=0)
        fits16 = indices.size == 0 or int(gaps.max()) <= _UINT16_MAX
        if fits16 and 2 * indices.size < bitmap_bytes:
            return {"topk.delta16": gaps.astype(np.uint16)}
        if size - 1 <= _UINT32_MAX and 4 * indices.size < bitmap_bytes:
            return {"topk.index32": indices.astype(np.uint32)}
        mask = np.zeros(size, bool)
        mask[indices] = True
        return {"topk.bitmap": np.packbits(mask)}

    @staticmethod
    def _unpack_indices(payload: dict[str, np.ndarray], size: int) -> np.ndarray:
        if "topk.bitmap" in payload:
            bitmap = _field(payload, "topk.bitmap", np.uint8, -(-size // 8))
            return np.flatnonzero(np.unpackbits(bitmap, count=size))
        if "topk.delta16" in payload:
            gaps = _field(payload, "topk.delta16", np.uint16)
            indices = np.cumsum(gaps, dtype=np.int64)
            increasing = bool((gaps[1:] > 0).all())
        else:
            indices = _field(payload, "topk.index32", np.uint32).astype(np.int64)
            increasing = bool((np.diff(indices) > 0).all())
        if not increasing or (indices.size and int(indices[-1]) >= size):
            raise ValueError(f"compressed update ({payload_spec(payload)}): top-k indices are "
                             f"not increasing within [0, {size})")
        return indices


# A new compressor is one class and one entry here.
_KINDS: tuple[type[UpdateCompressor], ...] = (NoCompression, Quantized, TopK)


def make_compressor(spec: str) -> UpdateCompressor:
    """The compressor for `spec`: "none", "q8", "q4", "topk:F", "topk:F+q8" or "topk:F+q4"
    (F the fraction kept, in (0, 1]). A name ("topk0.01+q8") is accepted as well."""
    for kind in _KINDS:
        compressor = kind.from_spec(spec) if isinstance(spec, str) else None
        if compressor is not None:
            return compressor
    forms = ", ".join(form for kind in _KINDS for form in kind.forms)
    raise ValueError(f"unknown update compressor {spec!r}; expected one of: {forms} "
                     f"(FRACTION in (0, 1], e.g. 'topk:0.01+q8')")
