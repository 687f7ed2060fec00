"""Evaluation data from files: a labelled image folder (one subfolder per class, the
ImageFolder convention of torchvision), COCO-style JSON for detection (boxes per image), a
folder of unlabelled images, or video files.

Images are decoded with Pillow to uint8 RGB [height, width, 3]; video frames with OpenCV
(`opencv-python-headless`, the `media` extra), BGR converted to RGB. Frames keep their own
size: each model resizes them to its input (`tierwise.models.preprocess.resize_image`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".mov", ".webm", ".mpg", ".mpeg")


class EvalDataError(ValueError):
    """Evaluation data that cannot be read: the message names the path and what was expected."""


@dataclass
class Frames:
    """Images or frames to evaluate on: `images[i]` uint8 [height, width, 3] (sizes may differ),
    `labels[i]` its class index where the data is labelled (`classes[labels[i]]` its name)."""

    images: list[np.ndarray]
    source: str
    labels: np.ndarray | None = None  # int64 [N]
    classes: list[str] = field(default_factory=list)
    # detection ground truth per image: (boxes [M, 4] float32 x_min, y_min, x_max, y_max
    # normalised 0..1 to the image, category indices [M] int64 into `classes`)
    boxes: list[tuple[np.ndarray, np.ndarray]] | None = None
    # files that did not decode (corrupt or truncated), left out: "path: reason"
    skipped: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return self.labels is not None or self.boxes is not None

    def __len__(self) -> int:
        return len(self.images)


def read_image(path: Path) -> np.ndarray:
    """uint8 RGB [height, width, 3]; EvalDataError naming the file when it does not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise EvalDataError(f"{path}: not a readable image ({error})") from None


def _images_in(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir()
                  if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(root: str | Path, limit: int | None = None) -> Frames:
    """A labelled folder: `root/<class>/<image>`, classes in sorted order (ImageFolder);
    at most `limit` images, taken round-robin over the classes so that a small limit still
    covers them all."""
    root = Path(root)
    classes = sorted(path.name for path in root.iterdir() if path.is_dir())
    per_class = [_images_in(root / name) for name in classes]
    if not classes or not any(per_class):
        raise EvalDataError(f"{root}: no images in class subfolders (expected "
                            f"{root}/<class>/<image>.jpg, the ImageFolder layout)")
    picked: list[tuple[Path, int]] = []
    for rank in range(max(len(files) for files in per_class)):
        for label, files in enumerate(per_class):
            if rank < len(files):
                picked.append((files[rank], label))
    picked = picked[:limit] if limit else picked
    images, labels, skipped = [], [], []
    for path, label in picked:
        try:
            images.append(read_image(path))
            labels.append(label)
        except EvalDataError as error:
            skipped.append(str(error))
    if not images:
        raise EvalDataError(f"{root}: no readable images ({len(skipped)} did not decode)")
    return Frames(images=images, source=f"image folder {root}", skipped=skipped,
                  labels=np.array(labels, np.int64), classes=classes)


def load_coco(path: str | Path, limit: int | None = None) -> Frames:
    """COCO-style detection annotations (Lin et al., ECCV 2014, the `instances_*.json`
    layout): `images` (`id`, `file_name` relative to the JSON's folder, `width`, `height`),
    `annotations` (`image_id`, `bbox` [x, y, width, height] in pixels, `category_id`),
    `categories` (`id`, `name`). Categories become indices 0..K-1 in the order listed;
    `classes` are their names. Images without annotations are kept (no boxes)."""
    import json

    path = Path(path)
    try:
        document = json.loads(path.read_text())
        images = sorted(document["images"], key=lambda image: image["id"])
        categories = document["categories"]
        annotations = document.get("annotations", [])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise EvalDataError(f"{path}: not COCO-style annotations (expected images, "
                            f"annotations and categories): {error}") from None
    index_of = {category["id"]: index for index, category in enumerate(categories)}
    images = images[:limit] if limit else images
    per_image: dict[object, list[dict[str, object]]] = {image["id"]: [] for image in images}
    for annotation in annotations:
        if annotation.get("image_id") in per_image:
            if annotation.get("category_id") not in index_of:
                raise EvalDataError(f"{path}: annotation {annotation.get('id')} has "
                                    f"category_id {annotation.get('category_id')!r}, not one "
                                    f"of the categories {sorted(index_of)}")
            per_image[annotation["image_id"]].append(annotation)
    loaded, boxes = [], []
    for image in images:
        pixels = read_image(path.parent / image["file_name"])
        height, width = pixels.shape[:2]
        found = per_image[image["id"]]
        xywh = np.array([annotation["bbox"] for annotation in found], np.float32).reshape(-1, 4)
        corners = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        corners /= np.array([width, height, width, height], np.float32)
        boxes.append((corners, np.array([index_of[annotation["category_id"]]
                                         for annotation in found], np.int64)))
        loaded.append(pixels)
    if not loaded:
        raise EvalDataError(f"{path}: no images listed")
    return Frames(images=loaded, source=f"COCO annotations {path}", boxes=boxes,
                  classes=[str(category["name"]) for category in categories])


MAX_UNDECODABLE_FRAMES = 25  # in a row: past this, the rest of the stream is taken as lost


def iter_video(path: str | Path, every: int = 1, start: int = 0, stop: int | None = None,
               skipped: list[str] | None = None) -> Iterator[np.ndarray]:
    """Every `every`-th frame of a video from frame `start` until before `stop`, uint8 RGB
    [height, width, 3] (OpenCV). Frame sizes may change within a stream; each frame keeps
    its own. A frame that does not decode is skipped (and, with `skipped`, listed there as
    "path: frame i ..."); after MAX_UNDECODABLE_FRAMES in a row, or at a truncated end, the
    stream ends, with the frames the container still claimed counted as skipped."""
    try:
        import cv2
    except ImportError:
        raise EvalDataError(f"{path}: reading video needs OpenCV (pip install "
                            "'tierwise[media]')") from None
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise EvalDataError(f"{path}: OpenCV cannot open it as a video")
    claimed = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    end = min(stop, claimed) if stop is not None and claimed else (stop or claimed)
    def lost(first: int, last: int, why: str = "") -> None:
        if skipped is not None and last >= first:
            skipped.append(f"{path}: frames {first}..{last} ({last - first + 1}) did not "
                           f"decode{why}")

    try:
        index = failures = 0
        while not (stop is not None and index >= stop):
            ok, frame = capture.read()
            if not ok or frame is None or frame.size == 0:
                failures += 1
                index += 1
                if index > max(claimed, 1) or failures > MAX_UNDECODABLE_FRAMES:
                    break
                continue
            lost(index - failures, index - 1)
            failures = 0
            if index >= start and (index - start) % every == 0:
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            index += 1
        if end and index - failures < end:
            lost(index - failures, end - 1, f" (the stream ends early; the container claims "
                 f"{claimed} frames)")
    finally:
        capture.release()


def _readable(files: list[Path]) -> tuple[list[np.ndarray], list[str]]:
    """The images of `files` that decode, and "file: reason" for each that does not."""
    images, skipped = [], []
    for file in files:
        try:
            images.append(read_image(file))
        except EvalDataError as error:
            skipped.append(str(error))
    return images, skipped


def load_frames(source: str | Path, limit: int | None = None, every: int = 1,
                recursive: bool = True) -> Frames:
    """Unlabelled images: a folder of images, one image, or a video (every `every`-th frame);
    at most `limit`. A folder with class subfolders is read as labelled (`load_image_folder`;
    with `recursive=False` the subfolders are ignored instead), a `.json` file as COCO-style
    detection annotations (`load_coco`). In a folder, files that do not decode are left out
    and listed in `Frames.skipped`; a single image that does not decode is an error."""
    path = Path(source)
    if not path.exists():
        raise EvalDataError(f"{path}: no such file or folder (expected an image folder, "
                            "images or a video)")
    if path.is_dir():
        if recursive and any(child.is_dir() for child in path.iterdir()):
            return load_image_folder(path, limit)
        files = _images_in(path)[:limit] if limit else _images_in(path)
        if not files:
            raise EvalDataError(f"{path}: no images in it (expected "
                                f"{', '.join(IMAGE_SUFFIXES)})")
        images, skipped = _readable(files)
        if not images:
            raise EvalDataError(f"{path}: none of its {len(files)} images decode "
                                f"({skipped[0]})")
        return Frames(images=images, source=f"images in {path}", skipped=skipped)
    if path.suffix.lower() == ".json":
        return load_coco(path, limit)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        frames: list[np.ndarray] = []
        skipped = []  # typed by `_readable` above: list[str]
        for frame in iter_video(path, every, skipped=skipped):
            frames.append(frame)
            if limit and len(frames) >= limit:
                break
        if not frames:
            raise EvalDataError(f"{path}: no frames could be read")
        return Frames(images=frames, source=f"frames of {path.name} (every {every})",
                      skipped=skipped)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return Frames(images=[read_image(path)], source=f"image {path}")
    raise EvalDataError(f"{path}: expected an image folder, an image "
                        f"({', '.join(IMAGE_SUFFIXES)}) or a video ({', '.join(VIDEO_SUFFIXES)})")
