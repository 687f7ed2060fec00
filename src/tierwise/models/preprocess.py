"""Preprocessing inside the graph: a declared image preprocessing becomes ONNX operators in
front of the model, so every tier and every split head takes the same uint8 image bytes.

The graph's new input is `image`: UINT8, [batch, height, width, channels] (NHWC, RGB or
greyscale, as frames are decoded). In order, the prepended operators:

1. `resize=HxW`: bilinear Resize to H×W (half-pixel centres; antialiased when the model's
   opset is 18 or later, as Pillow's BILINEAR is). The input's height and width are then
   dynamic: any frame size is taken. The device resizes with Pillow before any codec runs
   (`resize_image`), so on that path the in-graph Resize is the identity.
2. `crop=HxW`: a centre crop (needs a known size: after `resize`, or a fixed input).
3. `order=rgb|bgr`: the channel order the model wants (frames are RGB).
4. `scale`, `mean`, `std`: y = (x·scale − mean) / std per channel, in float32.
5. `layout=nchw|nhwc`: the model's layout (a Transpose for NCHW).
6. A Cast to the model input's float type.

Checked against a numpy/Pillow reference (`reference`) within `Preprocessing.tolerance()`.
Needs `onnx`; `Preprocessing`, `parse_preprocessing` and `resize_image` need only numpy and
Pillow, so a device can resize.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError, field_validator

if TYPE_CHECKING:
    import onnx

INPUT_NAME = "image"
PREFIX = "preprocess/"


class PreprocessError(ValueError):
    """A preprocessing spec that cannot be parsed or does not fit the model's input."""


class Preprocessing(BaseModel):
    """A declared image preprocessing (see the module docstring)."""

    resize: tuple[int, int] | None = Field(None, description="(height, width) in pixels")
    crop: tuple[int, int] | None = Field(None, description="centre crop (height, width)")
    order: Literal["rgb", "bgr"] = "rgb"
    layout: Literal["nchw", "nhwc"] = "nchw"
    scale: float = Field(1.0, description="pixels are multiplied by this first (1/255: 0..1)")
    mean: list[float] = Field(default_factory=lambda: [0.0], description="per channel")
    std: list[float] = Field(default_factory=lambda: [1.0], description="per channel")

    @field_validator("std")
    @classmethod
    def _nonzero(cls, value: list[float]) -> list[float]:
        if any(item == 0 for item in value):
            raise ValueError("std: must not be 0")
        return value

    @field_validator("scale")
    @classmethod
    def _nonzero_scale(cls, value: float) -> float:
        if value == 0:
            raise ValueError("scale: must not be 0 (every pixel would be the same)")
        return value

    def tolerance(self) -> float:
        """|graph - numpy/Pillow reference| bound, in the model's input units, for frames
        at most about twice the target size: both round the resized pixels to uint8, but
        Pillow resamples in fixed point and ONNX Runtime in float, so a pixel may land one
        level apart; without a resize they agree to float rounding. Larger downscales differ
        more (the two filters' supports differ; before opset 18 there is no antialiasing at
        all), which only frames sent to a server at another size meet: the device resizes
        with Pillow, and then the in-graph resize is the identity."""
        if not self.resize:
            return 1e-5
        return abs(self.scale) / min(abs(value) for value in self.std) + 1e-5

    def image_size(self, model_input: list[int]) -> tuple[int, int]:
        """(height, width) of the uint8 image the device sends: the resize target, or the
        model's own input size (before any crop) when nothing is resized."""
        if self.resize:
            return self.resize
        height, width, _ = _spatial(model_input, self.layout)
        if height < 0 or width < 0:
            raise PreprocessError("resize: the model's input has a dynamic height or width, "
                                  "so the preprocessing must say resize=HxW")
        return height, width


PRESETS: dict[str, dict[str, object]] = {
    # torchvision's ImageNet models: resize 256, centre crop 224, 0..1, ImageNet mean/std
    "imagenet": {"resize": (256, 256), "crop": (224, 224), "scale": 1 / 255,
                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
}


def parse_preprocessing(spec: str) -> Preprocessing:
    """`resize=256x256,crop=224x224,order=bgr,layout=nhwc,scale=1/255,mean=0.485:0.456:0.406,
    std=0.229:0.224:0.225`, optionally starting from a preset (`imagenet`); raises
    PreprocessError naming the item that is wrong."""
    fields: dict[str, object] = {}
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        key, equals, value = item.partition("=")
        key = key.strip().lower()
        if not equals:
            if key in PRESETS:
                fields.update(PRESETS[key])
                continue
            if key in ("rgb", "bgr"):
                fields["order"] = key
                continue
            if key in ("nchw", "nhwc"):
                fields["layout"] = key
                continue
            raise PreprocessError(f"--preprocess: {item!r}: expected key=value, a preset "
                                  f"({', '.join(PRESETS)}), rgb|bgr or nchw|nhwc")
        try:
            if key in ("resize", "crop"):
                height, _, width = value.lower().partition("x")
                fields[key] = (int(height), int(width or height))
            elif key == "scale":
                numerator, _, denominator = value.partition("/")
                fields[key] = float(numerator) / float(denominator or 1)
            elif key in ("mean", "std"):
                fields[key] = [float(part) for part in value.split(":")]
            elif key in ("order", "layout"):
                fields[key] = value.lower()
            else:
                raise PreprocessError(f"--preprocess: unknown key {key!r}; expected resize, "
                                      "crop, order, layout, scale, mean, std")
        except ValueError as error:
            if isinstance(error, PreprocessError):
                raise
            raise PreprocessError(f"--preprocess: {item!r}: {error}") from None
    try:
        return Preprocessing.model_validate(fields)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise PreprocessError(f"--preprocess: {where}: {first['msg']}") from None


def _spatial(shape: list[int], layout: str) -> tuple[int, int, int]:
    """(height, width, channels) of a rank-4 model input in `layout`."""
    if len(shape) != 4:
        raise PreprocessError(f"an image preprocessing needs a rank-4 model input "
                              f"(batch, channels, height, width), got shape {shape}")
    if layout == "nchw":
        return shape[2], shape[3], shape[1]
    return shape[1], shape[2], shape[3]


def check_fits(pre: Preprocessing, model_input: list[int]) -> int:
    """The number of channels, after checking that `pre` produces what the model's input
    (its shape, batch first) takes; raises PreprocessError saying what does not fit."""
    height, width, channels = _spatial(model_input, pre.layout)
    if channels not in (1, 3):
        raise PreprocessError(f"layout={pre.layout}: the model input {model_input} has "
                              f"{channels} channels there; expected 1 or 3 (is it nhwc?)")
    made = pre.crop or pre.resize
    if pre.crop and pre.resize and (pre.crop[0] > pre.resize[0] or pre.crop[1] > pre.resize[1]):
        raise PreprocessError(f"crop={pre.crop[0]}x{pre.crop[1]} is larger than "
                              f"resize={pre.resize[0]}x{pre.resize[1]}")
    if made is not None:
        for want, got, what in ((height, made[0], "height"), (width, made[1], "width")):
            if want > 0 and want != got:
                raise PreprocessError(
                    f"the preprocessing makes {made[0]}x{made[1]} images but the model input "
                    f"{model_input} ({pre.layout}) has {what} {want}")
    if pre.order == "bgr" and channels != 3:
        raise PreprocessError(f"order=bgr: the model input {model_input} has {channels} "
                              "channel(s); a channel order needs 3")
    for key in ("mean", "std"):
        values = getattr(pre, key)
        if len(values) not in (1, channels):
            raise PreprocessError(f"{key}: {len(values)} values for {channels} channels")
    return channels


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`image` (uint8 [height, width] or [height, width, channels]) resized to
    size = (height, width) with Pillow's antialiased bilinear filter; unchanged if it is
    that size already."""
    if image.shape[:2] == tuple(size):
        return image
    from PIL import Image

    squeezed = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
    resized = np.asarray(Image.fromarray(squeezed).resize((size[1], size[0]),
                                                          Image.Resampling.BILINEAR))
    return resized.reshape(size[0], size[1], *image.shape[2:])


def reference(pre: Preprocessing, images: Iterable[np.ndarray]) -> np.ndarray:
    """What the prepended graph computes, with numpy and Pillow: uint8 NHWC -> float32."""
    out = []
    for image in images:
        if pre.resize:
            image = resize_image(image, pre.resize)
        if pre.crop:
            top = (image.shape[0] - pre.crop[0]) // 2
            left = (image.shape[1] - pre.crop[1]) // 2
            image = image[top:top + pre.crop[0], left:left + pre.crop[1]]
        if pre.order == "bgr":
            image = image[..., ::-1]
        pixels = (image.astype(np.float32) * np.float32(pre.scale)
                  - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
        out.append(pixels.transpose(2, 0, 1) if pre.layout == "nchw" else pixels)
    return np.stack(out).astype(np.float32)


def _opset(model: onnx.ModelProto) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")),
                0)


def prepend(model: onnx.ModelProto, pre: Preprocessing, input_name: str | None = None
            ) -> onnx.ModelProto:
    """`model` with `pre` in front of its (first, or `input_name`) input: the result takes
    `image`, UINT8 [batch, height, width, channels]. Raises PreprocessError when `pre` does
    not fit the input (rank, channels, size, dtype)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tierwise.models.graph import graph_inputs

    inputs = graph_inputs(model)
    target = next((value for value in inputs if value.name == (input_name or inputs[0].name)),
                  None)
    if target is None:
        raise PreprocessError(f"input {input_name!r}: not an input of the model; inputs: "
                              f"{[value.name for value in inputs]}")
    tensor_type = target.type.tensor_type
    if tensor_type.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
        raise PreprocessError(
            f"input {target.name!r} is {TensorProto.DataType.Name(tensor_type.elem_type)}; an "
            "image preprocessing produces floats (a uint8-input model takes images as they are)")
    shape = [dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor_type.shape.dim]
    channels = check_fits(pre, shape)
    opset = _opset(model)
    if opset < 11:
        raise PreprocessError(f"the model's opset is {opset}; preprocessing needs 11 or later")
    nodes: list[onnx.NodeProto] = []
    constants: list[onnx.TensorProto] = []

    def constant(name: str, array: np.ndarray) -> str:
        constants.append(numpy_helper.from_array(array, PREFIX + "const/" + name))
        return PREFIX + "const/" + name

    current = INPUT_NAME
    nodes.append(helper.make_node("Cast", [current], [PREFIX + "float"], to=TensorProto.FLOAT))
    current = PREFIX + "float"
    if pre.resize:
        height, width = pre.resize
        if opset >= 18:
            nodes.append(helper.make_node(
                "Resize", [current, "", "", constant("sizes", np.array([height, width], np.int64))],
                [PREFIX + "resized"], mode="linear", antialias=1, axes=[1, 2],
                coordinate_transformation_mode="half_pixel"))
        else:  # no axes or antialias before opset 18: sizes for all four dimensions
            nodes.append(helper.make_node("Shape", [current], [PREFIX + "shape"]))
            # Slice takes its bounds as inputs from opset 10 (Split only from 13)
            for name, start in (("n", 0), ("c", 3)):
                nodes.append(helper.make_node(
                    "Slice", [PREFIX + "shape",
                              constant(f"{name}_start", np.array([start], np.int64)),
                              constant(f"{name}_end", np.array([start + 1], np.int64))],
                    [PREFIX + name]))
            nodes.append(helper.make_node(
                "Concat", [PREFIX + "n", constant("hw", np.array([height, width], np.int64)),
                           PREFIX + "c"], [PREFIX + "sizes4"], axis=0))
            # before opset 13 roi and scales must be given, empty
            nodes.append(helper.make_node(
                "Resize", [current, constant("roi", np.zeros(0, np.float32)),
                           constant("scales", np.zeros(0, np.float32)), PREFIX + "sizes4"],
                [PREFIX + "resized"], mode="linear",
                coordinate_transformation_mode="half_pixel"))
        current = PREFIX + "resized"
        # Pillow rounds resized pixels to uint8; so does the graph, to match it bit for bit
        # on the device path (where the in-graph resize is the identity anyway)
        nodes.append(helper.make_node("Round", [current], [PREFIX + "rounded"]))
        nodes.append(helper.make_node("Clip", [PREFIX + "rounded",
                                               constant("lo", np.array(0, np.float32)),
                                               constant("hi", np.array(255, np.float32))],
                                      [PREFIX + "resized8"]))
        current = PREFIX + "resized8"
    image_height, image_width = pre.image_size(shape)
    if pre.crop:
        top, left = (image_height - pre.crop[0]) // 2, (image_width - pre.crop[1]) // 2
        nodes.append(helper.make_node(
            "Slice", [current, constant("starts", np.array([top, left], np.int64)),
                      constant("ends", np.array([top + pre.crop[0], left + pre.crop[1]],
                                                np.int64)),
                      constant("axes", np.array([1, 2], np.int64))], [PREFIX + "cropped"]))
        current = PREFIX + "cropped"
    if pre.order == "bgr":
        nodes.append(helper.make_node("Gather", [current, constant(
            "bgr", np.array([2, 1, 0], np.int64))], [PREFIX + "bgr"], axis=3))
        current = PREFIX + "bgr"
    mean = np.asarray(pre.mean, np.float32) / np.float32(pre.scale)
    std = np.asarray(pre.std, np.float32) / np.float32(pre.scale)
    nodes.append(helper.make_node("Sub", [current, constant("mean", mean)], [PREFIX + "centred"]))
    nodes.append(helper.make_node("Div", [PREFIX + "centred", constant("std", std)],
                                  [PREFIX + "normalised"]))
    current = PREFIX + "normalised"
    if pre.layout == "nchw":
        nodes.append(helper.make_node("Transpose", [current], [PREFIX + "nchw"],
                                      perm=[0, 3, 1, 2]))
        current = PREFIX + "nchw"
    nodes.append(helper.make_node("Cast", [current], [target.name], to=tensor_type.elem_type))
    batch = "batch" if not shape or shape[0] < 0 else shape[0]
    spatial: list[int | str] = (["height", "width"] if pre.resize
                                else [image_height, image_width])
    image = helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8,
                                          [batch, *spatial, channels])
    merged = onnx.ModelProto()
    merged.CopyFrom(model)
    if any(INPUT_NAME in (*node.input, *node.output) for node in merged.graph.node) or \
            any(value.name == INPUT_NAME for value in merged.graph.input):
        # the model's own tensor called `image` (often its input) gets another name
        from tierwise.models.graph import rename_tensor

        rename_tensor(merged, INPUT_NAME, INPUT_NAME + ".original")
        if target.name == INPUT_NAME:
            nodes[-1].output[0] = INPUT_NAME + ".original"
        target = next(value for value in merged.graph.input
                      if value.name in (target.name, INPUT_NAME + ".original"))
    graph = merged.graph
    kept_inputs = [value for value in graph.input if value.name != target.name]
    del graph.input[:]
    graph.input.extend([image, *kept_inputs])
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *existing])
    graph.initializer.extend(constants)
    return merged
