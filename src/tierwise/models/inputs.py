"""One sample as a model's input batch, checked before anything runs.

A model with a declared image preprocessing (`tierwise models add --preprocess`) takes uint8
images of its image size, NHWC: a frame of any size is resized on the device (Pillow) before
any codec runs, so the bytes sent are the model's, not the camera's. Any other model takes
exactly its input spec. numpy and Pillow only: devices run this.
"""

from __future__ import annotations

import numpy as np

from tierwise.models.store import ModelInfo


class InputError(ValueError, TypeError):
    """An input the model cannot take (its dtype, rank or size): names the input, the
    expected shape and dtype, and what was given. Both a ValueError and a TypeError, so
    either `except` catches it."""


def image_size(info: ModelInfo) -> tuple[int, int] | None:
    """(height, width) of the uint8 images `info`'s model takes, or None when it declares no
    image preprocessing or is a split's tail (which takes features, whatever its parent
    takes; tails written before this rule still carry their parent's preprocessing)."""
    if not info.preprocessing or info.role == "tail":
        return None
    from tierwise.models.preprocess import Preprocessing

    pre = Preprocessing.model_validate(info.preprocessing)
    if pre.resize:
        return pre.resize
    shape = info.inputs[0].shape  # the graph's uint8 NHWC input
    return shape[1], shape[2]


def input_key(info: ModelInfo) -> tuple[object, ...]:
    """Models with equal keys take one sample as the same batch (`as_batch`): a head and
    its model, or two models of one image size."""
    spec = info.inputs[0]
    return (image_size(info), spec.datatype, tuple(spec.shape))


def as_batch(info: ModelInfo, sample: np.ndarray) -> np.ndarray:
    """`sample` as a batch of one for `info`'s first input, C-contiguous.

    With an image preprocessing: `sample` is uint8 [height, width] or [height, width,
    channels] (or with a leading batch of 1), of any size; it is resized to the model's image
    size, and a greyscale frame is repeated to 3 channels where the model takes 3. Otherwise
    `sample` has the input's shape, with or without the batch dimension (leading 1s may be
    left out: a [28, 28] image for a [-1, 1, 28, 28] input).

    Raises:
        InputError: wrong dtype, rank or size, naming the expected shape and dtype.
    """
    from tierwise.protocol.oip import numpy_dtype

    if len(info.inputs) != 1:
        raise InputError(f"{info.name} takes {len(info.inputs)} inputs "
                         f"({', '.join(spec.name for spec in info.inputs)}); the client sends "
                         "one per request: call the server over OIP for it")
    spec = info.inputs[0]
    dtype = numpy_dtype(spec.datatype)
    array = np.asarray(sample)
    if array.dtype != dtype:
        raise InputError(f"input {spec.name!r} of {info.name}: expected dtype {dtype} "
                         f"({spec.describe()}), got {array.dtype}")
    size = image_size(info)
    if size is not None:
        channels = spec.shape[-1]
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[2] not in (1, 3) or min(array.shape[:2]) < 1:
            raise InputError(f"input {spec.name!r} of {info.name}: expected an image "
                             f"[height, width, {channels}] of any size (uint8), got shape "
                             f"{list(np.shape(sample))}")
        if array.shape[2] == 3 and channels == 1:  # luma, as Pillow's convert("L") (BT.601)
            array = np.rint(array.astype(np.float32) @ np.array(
                [0.299, 0.587, 0.114], np.float32)).astype(np.uint8)[..., None]
        elif array.shape[2] != channels:
            array = np.repeat(array, channels, axis=2)
        from tierwise.models.preprocess import resize_image

        return np.ascontiguousarray(resize_image(array, size)[None])
    want = spec.shape[1:]
    while array.ndim < len(want) + 1:
        array = array[None]
    got = list(array.shape)
    if got[0] != 1 or len(got) != len(spec.shape) or any(
            expected >= 0 and expected != actual for expected, actual in zip(want, got[1:],
                                                                            strict=True)):
        raise InputError(f"input {spec.name!r} of {info.name}: expected one sample of "
                         f"{spec.describe()} (the batch dimension may be left out), got shape "
                         f"{list(np.shape(sample))}")
    return np.ascontiguousarray(array)
