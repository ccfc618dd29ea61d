"""Image decoding and the one preprocessing function used everywhere.

Calibration, accuracy checks and the device all call :func:`preprocess`, so the int8 model is
calibrated on exactly the pixels it will see. It depends on numpy and OpenCV only.

The policy is torchvision's evaluation transform (resize the shorter side to 256, centre-crop
224) done in one step: crop the centre square covering ``crop_fraction`` of the shorter side,
then resize it to ``size`` x ``size``. Output is RGB uint8, HWC; the model itself does the
ImageNet normalisation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgesqz.errors import EdgesqzError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".h264"})

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How raw frames become model input. Stored in every exported model's metadata."""

    size: int = 224
    crop_fraction: float = 224 / 256
    resize: str = "shorter_side_then_center_crop"
    interpolation: str = "area"  # cv2.INTER_AREA when shrinking, INTER_LINEAR_EXACT when enlarging
    color_order: str = "RGB"
    input_range: tuple[float, float] = (0.0, 255.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # applied inside the model, on pixels / 255
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_range"] = list(self.input_range)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for key in ("input_range", "mean", "std"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
        return cls(**known)


def center_crop_box(height: int, width: int, crop_fraction: float) -> tuple[int, int, int, int]:
    """(top, left, side, side) of the centred square that covers ``crop_fraction`` of the shorter side."""
    side = max(1, round(min(height, width) * crop_fraction))
    top = (height - side) // 2
    left = (width - side) // 2
    return top, left, side, side


def preprocess(image: np.ndarray, size: int = 224, crop_fraction: float = 224 / 256, *,
               bgr: bool = True) -> np.ndarray:
    """Centre-crop and resize one image to ``size`` x ``size`` RGB uint8.

    ``image`` is HxWx3 (BGR as OpenCV returns it, or RGB with ``bgr=False``), HxW grey, or HxWx4.
    """
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR if bgr else cv2.COLOR_GRAY2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR if bgr else cv2.COLOR_RGBA2RGB)
    elif image.ndim != 3 or image.shape[2] != 3:
        raise EdgesqzError(f"expected an HxWx3 image, got an array of shape {image.shape}")
    if image.dtype != np.uint8:
        raise EdgesqzError(
            f"expected uint8 pixels, got {image.dtype}; convert with np.clip(x, 0, 255).astype(np.uint8)"
        )
    h, w = image.shape[:2]
    top, left, side, _ = center_crop_box(h, w, crop_fraction)
    crop = image[top:top + side, left:left + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR_EXACT
    out = cv2.resize(crop, (size, size), interpolation=interp) if side != size else crop
    if bgr:
        out = cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(out)


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to BGR uint8; raise :class:`EdgesqzError` when it cannot be read."""
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise EdgesqzError(f"cannot decode image {path}: not an image or corrupt")
    return image


def list_images(root: str | Path) -> list[Path]:
    """Image files below ``root`` (recursively), sorted, hidden files skipped."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES
