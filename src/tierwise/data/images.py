"""Evaluation data from files: a labelled image folder (one subfolder per class, the
ImageFolder convention of torchvision), a folder of unlabelled images, or video files.

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
    return Frames(images=[read_image(path) for path, _ in picked], source=f"image folder {root}",
                  labels=np.array([label for _, label in picked], np.int64), classes=classes)


def iter_video(path: str | Path, every: int = 1) -> Iterator[np.ndarray]:
    """Every `every`-th frame of a video, uint8 RGB [height, width, 3] (OpenCV)."""
    try:
        import cv2
    except ImportError:
        raise EvalDataError(f"{path}: reading video needs OpenCV (pip install "
                            "'tierwise[media]')") from None
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise EvalDataError(f"{path}: OpenCV cannot open it as a video")
    try:
        index = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if index % every == 0:
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()


def load_frames(source: str | Path, limit: int | None = None, every: int = 1) -> Frames:
    """Unlabelled images: a folder of images, one image, or a video (every `every`-th frame);
    at most `limit`. A folder with class subfolders is read as labelled (`load_image_folder`)."""
    path = Path(source)
    if not path.exists():
        raise EvalDataError(f"{path}: no such file or folder (expected an image folder, "
                            "images or a video)")
    if path.is_dir():
        if any(child.is_dir() for child in path.iterdir()):
            return load_image_folder(path, limit)
        files = _images_in(path)[:limit] if limit else _images_in(path)
        if not files:
            raise EvalDataError(f"{path}: no images in it (expected "
                                f"{', '.join(IMAGE_SUFFIXES)})")
        return Frames(images=[read_image(file) for file in files], source=f"images in {path}")
    if path.suffix.lower() in VIDEO_SUFFIXES:
        frames = []
        for frame in iter_video(path, every):
            frames.append(frame)
            if limit and len(frames) >= limit:
                break
        if not frames:
            raise EvalDataError(f"{path}: no frames could be read")
        return Frames(images=frames, source=f"frames of {path.name} (every {every})")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return Frames(images=[read_image(path)], source=f"image {path}")
    raise EvalDataError(f"{path}: expected an image folder, an image "
                        f"({', '.join(IMAGE_SUFFIXES)}) or a video ({', '.join(VIDEO_SUFFIXES)})")
