"""Real images for calibration and accuracy checks: folders, videos and labelled folders.

Everything here decodes with OpenCV and preprocesses with :func:`edgesqz.imaging.preprocess`,
the function the device uses, so calibration sees exactly what inference sees.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edgesqz.errors import EdgesqzError
from edgesqz.imaging import Preprocessing, is_video, list_images, preprocess, read_image
from edgesqz.labels import Labels

_WNID = re.compile(r"^(n\d{8})[_.]")

Progress = Callable[[int], None]


@dataclass
class ImageSet:
    """Preprocessed images (N, S, S, 3) uint8 RGB plus where they came from."""

    images: np.ndarray
    sources: list[str]
    skipped: list[str] = field(default_factory=list)
    kind: str = "folder"  # "folder" | "video"

    def summary(self) -> dict[str, object]:
        return {"kind": self.kind, "count": len(self.sources), "skipped": len(self.skipped)}


def sample_files(files: Sequence[Path], count: int | None, seed: int = 0) -> list[Path]:
    """A reproducible random sample of ``count`` files (all of them when count is None or larger)."""
    files = list(files)
    if count is None or count >= len(files):
        return files
    return sorted(random.Random(seed).sample(files, count))


def load_images(files: Sequence[Path], pre: Preprocessing, progress: Progress | None = None) -> ImageSet:
    """Decode and preprocess ``files``; unreadable ones are skipped and listed."""
    images, sources, skipped = [], [], []
    for path in files:
        try:
            images.append(preprocess(read_image(path), pre.size, pre.crop_fraction))
            sources.append(str(path))
        except EdgesqzError:
            skipped.append(str(path))
        if progress:
            progress(1)
    stack = np.stack(images) if images else np.zeros((0, pre.size, pre.size, 3), np.uint8)
    return ImageSet(stack, sources, skipped)


def video_frames(path: Path, count: int, pre: Preprocessing, progress: Progress | None = None) -> ImageSet:
    """``count`` frames spread evenly over a video file."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise EdgesqzError(f"cannot open video {path}: not a video OpenCV can decode")
    try:
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        wanted = set(np.linspace(0, max(total - 1, 0), num=min(count, max(total, 1))).astype(int).tolist()) \
            if total > 0 else None
        images, sources, index = [], [], 0
        while len(images) < count:
            ok, frame = cap.read()
            if not ok:
                break
            if wanted is None or index in wanted:
                images.append(preprocess(frame, pre.size, pre.crop_fraction))
                sources.append(f"{path}#{index}")
                if progress:
                    progress(1)
            index += 1
    finally:
        cap.release()
    if not images:
        raise EdgesqzError(f"video {path} has no readable frames")
    return ImageSet(np.stack(images), sources, [], kind="video")


def calibration_files(source: str | Path) -> list[Path]:
    source = Path(source)
    if not source.exists():
        raise EdgesqzError(f"calibration source {source} does not exist; pass a folder of images or a video file")
    files = list_images(source)
    if not files:
        raise EdgesqzError(f"no images in {source}; pass a folder of .jpg/.png photos like the ones the model will see")
    return files


def calibration_set(source: str | Path, count: int, pre: Preprocessing, *, seed: int = 0,
                    progress: Progress | None = None) -> ImageSet:
    """``count`` real images from a folder (recursive, reproducible sample) or a video file."""
    source = Path(source)
    if source.is_file() and is_video(source):
        return video_frames(source, count, pre, progress)
    files = sample_files(calibration_files(source), count, seed)
    result = load_images(files, pre, progress)
    if len(result.sources) == 0:
        raise EdgesqzError(f"none of the {len(files)} images in {source} could be decoded; they are corrupt")
    return result


@dataclass
class LabelledFiles:
    files: list[Path]
    targets: list[int]
    scheme: str  # "wnid" | "folders"


def labelled_files(root: str | Path, labels: Labels, option: str = "--check") -> LabelledFiles:
    """Files and class indices from ``<wnid>_*.JPEG`` names or one sub-folder per class (``option`` names the
    command-line option in messages)."""
    root = Path(root)
    if not root.is_dir():
        raise EdgesqzError(f"{root} is not a folder; {option} needs a labelled folder of images")
    files = list_images(root)
    if not files:
        raise EdgesqzError(f"no images in {root}")
    table = labels.index()

    def label_of(folder: str) -> int | None:
        return table.get(folder, table.get(folder.lower()))

    nested = [f for f in files if f.parent != root]
    folders = sorted({f.relative_to(root).parts[0] for f in nested})
    if len(nested) == len(files) and all(label_of(d) is not None for d in folders):
        targets = [label_of(f.relative_to(root).parts[0]) for f in files]
        return LabelledFiles(files, [int(t) for t in targets if t is not None], "folders")
    by_wnid = [(f, _WNID.match(f.name)) for f in files]
    if all(m for _, m in by_wnid):
        if labels.ids is None:
            raise EdgesqzError(
                f"{root} is labelled by ImageNet wnids but the labels carry no wnids; pass --labels "
                "imagenet_class_index.json (the {\"0\": [wnid, name]} form)"
            )
        unknown = sorted({m.group(1) for _, m in by_wnid if m and m.group(1) not in table})
        if unknown:
            raise EdgesqzError(f"{len(unknown)} wnids in {root} are not in the labels, e.g. {unknown[0]}")
        return LabelledFiles(files, [table[m.group(1)] for _, m in by_wnid if m], "wnid")
    if len(nested) == len(files):
        unknown = [d for d in folders if label_of(d) is None]
        raise EdgesqzError(
            f"sub-folders of {root} must be named like the labels; {len(unknown)} are not, e.g. {unknown[0]!r}"
        )
    raise EdgesqzError(
        f"{root} is not labelled: name files <wnid>_*.JPEG (ImageNet) or put each class in a sub-folder named "
        "after its label"
    )
