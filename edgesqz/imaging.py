"""Image decoding and the one preprocessing function used everywhere.

Calibration, accuracy checks and the device all call :func:`preprocess`, so the int8 model is
calibrated on exactly the pixels it will see. It depends on numpy and OpenCV only.

The policy is torchvision's evaluation transform (resize the shorter side to 256, centre-crop
224) done in one step: crop the centre square covering ``crop_fraction`` of the shorter side,
then resize it to ``size`` x ``size``. Output is RGB uint8, HWC; the model itself does the
ImageNet normalisation.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgesqz.errors import EdgesqzError
from edgesqz.fileio import read_capped

log = logging.getLogger("edgesqz")

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


# Images are decoded in full up to this many pixels (150 MB as BGR); larger JPEGs are decoded at 1/2,
# 1/4 or 1/8 scale (libjpeg scales while decoding), anything else larger is refused.
MAX_IMAGE_PIXELS = 50_000_000
MAX_IMAGE_BYTES = 256 << 20  # a file larger than this is not read at all
_JPEG_REDUCED = ((2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4), (8, cv2.IMREAD_REDUCED_COLOR_8))
_FORMATS = "JPEG, PNG, BMP, WebP, TIFF or PNM (PPM/PGM)"


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without decoding it."""

    format: str  # "jpeg", "png", "bmp", "webp", "tiff", "pnm"
    width: int
    height: int
    huffman: bool = False  # JPEG: Huffman-coded (every 8x8 block takes at least a bit)


def image_header(data: bytes) -> ImageHeader | None:
    """The format and the width and height an image's header claims (None: not a format edgesqz reads)."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return ImageHeader("png", w, h)
        if data[:2] == b"\xff\xd8":
            return _jpeg_header(data)
        if data[:2] == b"BM":
            if struct.unpack("<I", data[14:18])[0] == 12:  # BITMAPCOREHEADER
                w, h = struct.unpack("<HH", data[18:22])
            else:
                w, h = struct.unpack("<ii", data[18:26])
            return ImageHeader("bmp", abs(w), abs(h))
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_header(data)
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_header(data)
        if data[:1] == b"P" and data[1:2] in b"123456":
            return _pnm_header(data)
    except (struct.error, IndexError, ValueError):
        return None
    return None


def _jpeg_header(data: bytes) -> ImageHeader | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # no length
            pos += 2
            continue
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            h, w = struct.unpack(">HH", data[pos + 5:pos + 9])
            return ImageHeader("jpeg", w, h, huffman=marker < 0xC8)
        if marker in (0xD9, 0xDA) or length < 2:  # end of image / start of scan before any frame header
            return None
        pos += 2 + length
    return None


def _webp_header(data: bytes) -> ImageHeader | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return ImageHeader("webp", w & 0x3FFF, h & 0x3FFF)
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = struct.unpack("<I", data[21:25])[0]
        return ImageHeader("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return ImageHeader("webp", w, h)
    return None


def _tiff_header(data: bytes) -> ImageHeader | None:
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", data[4:8])[0]
    count = struct.unpack(order + "H", data[ifd:ifd + 2])[0]
    size: dict[int, int] = {}
    for i in range(min(count, 4096)):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack(order + "HH", data[entry:entry + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT or LONG
            size[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), data[entry + 8:entry + (10 if kind == 3
                                                                                                  else 12)])[0]
    return ImageHeader("tiff", size[256], size[257]) if len(size) == 2 else None


def _pnm_header(data: bytes) -> ImageHeader | None:
    tokens: list[int] = []
    for line in data[2:4096].split(b"\n"):
        for word in line.split(b"#", 1)[0].split():
            tokens.append(int(word))
            if len(tokens) == 2:
                return ImageHeader("pnm", tokens[0], tokens[1])
    return None


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to BGR uint8; raise :class:`EdgesqzError` when it cannot or should not be read.

    The one image reader (classify, run on image folders, calibration, accuracy checks): the header's
    width and height are read first, so a file claiming more than :data:`MAX_IMAGE_PIXELS` is refused
    (JPEGs are decoded at a reduced scale instead) before any memory is spent, and every OpenCV
    failure (its own pixel limit, allocation failures) is this one error.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = read_capped(f, MAX_IMAGE_BYTES)
    except IsADirectoryError:
        raise EdgesqzError(f"cannot decode image {path}: it is a folder") from None
    except OSError as exc:
        raise EdgesqzError(f"cannot read image {path}: {exc.strerror or exc}") from exc
    if data is None:
        raise EdgesqzError(f"image {path} is larger than {MAX_IMAGE_BYTES >> 20} MB; resize it first")
    header = image_header(data)
    if header is None:
        raise EdgesqzError(f"cannot decode image {path}: not a {_FORMATS} image, or corrupt")
    pixels = header.width * header.height
    if pixels == 0:
        raise EdgesqzError(f"cannot decode image {path}: its header says {header.width}x{header.height} pixels")
    flags = cv2.IMREAD_COLOR
    if pixels > MAX_IMAGE_PIXELS:
        reduced = [flag for f, flag in _JPEG_REDUCED if pixels <= MAX_IMAGE_PIXELS * f * f]
        if header.format != "jpeg" or not reduced:
            raise EdgesqzError(f"image {path} is {header.width}x{header.height} ({pixels / 1e6:.0f} megapixels); "
                               f"edgesqz reads images up to {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels (JPEGs up to "
                               f"{MAX_IMAGE_PIXELS * 64 / 1e6:.0f}): resize it first")
        flags = reduced[0]
    if header.format == "jpeg" and header.huffman and len(data) * 8 < _blocks(header):
        raise EdgesqzError(f"cannot decode image {path}: its header claims {header.width}x{header.height} pixels but "
                           f"it holds only {len(data)} bytes, too few for that (forged header or truncated file)")
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "OpenCV error"
        raise EdgesqzError(f"cannot decode image {path} ({header.width}x{header.height}): {reason}") from None
    except MemoryError:
        raise EdgesqzError(f"not enough memory to decode image {path} ({header.width}x{header.height})") from None
    if image is None:
        raise EdgesqzError(f"cannot decode image {path}: not an image or corrupt")
    return image


def _blocks(header: ImageHeader) -> int:
    """8x8 luma blocks of a JPEG: a Huffman-coded JPEG spends at least one bit on each."""
    return -(-header.width // 8) * -(-header.height // 8)


def list_images(root: str | Path) -> list[Path]:
    """Image files below ``root`` (recursively), sorted, hidden files skipped.

    A folder that cannot be read is an error (not "no images"); an unreadable sub-folder is left out
    with a warning.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    errors: list[OSError] = []
    found = []
    for folder, dirs, files in os.walk(root, onerror=errors.append):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [path for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES
                  and (path := Path(folder, f)).is_file()]
    for exc in errors:
        where = Path(exc.filename) if exc.filename else root
        if where == root:
            raise EdgesqzError(f"cannot read folder {root}: {exc.strerror or exc}; check its permissions") from exc
        log.warning("warning: cannot read folder %s (%s); its images are left out", where, exc.strerror or exc)
    return sorted(found)


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES
