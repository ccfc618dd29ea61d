"""``edgesqz train``: fine-tune SqueezeNet on a folder of the user's own images (Keras + tf.data).

The data folder has one sub-folder per class. The model trains on RGB pixels (0..255) with the
ImageNet normalisation as its first layer, and is saved as the plain SqueezeNet (normalised
input, logits out, torchvision layer names) so ``edgesqz convert --weights OUT.keras`` treats it
like any other weights. The class names go into the ``.keras`` archive (``edgesqz.json``) and
from there into the converted model's labels.

Runs elsewhere: the model-building code is plain Keras, so on several GPUs build and compile it
inside ``tf.distribute.MirroredStrategy().scope()`` (or set a ``keras.distribution`` data-parallel
distribution); :func:`train_model` takes the strategy's global batch size unchanged.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgesqz.errors import EdgesqzError
from edgesqz.imaging import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD

LABELS_MEMBER = "edgesqz.json"


@dataclass
class TrainOptions:
    data: str
    output: str = "model.keras"
    val: str | None = None
    val_split: float = 0.2
    version: str = "1_1"
    init: str = "imagenet"  # "imagenet": fine-tune torchvision's weights; "none": from scratch (BN Fire)
    weights: str = "torchvision"  # where the ImageNet weights come from (a .pth path works offline)
    epochs: int = 10
    batch_size: int = 32
    input_size: int = 224
    learning_rate: float | None = None
    patience: int = 3
    freeze_epochs: int = 2  # --from imagenet: first train only the new classifier, then everything
    seed: int = 0
    force: bool = False
    resume: bool = False


@dataclass
class Split:
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    skipped: list[str] = field(default_factory=list)


def _class_files(root: Path) -> tuple[list[str], dict[str, list[Path]]]:
    if not root.is_dir():
        raise EdgesqzError(f"{root} is not a folder; --data needs one sub-folder of images per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {c: sorted(p for p in (root / c).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
             for c in classes}
    return classes, files


def _readable(path: Path) -> bool:
    data = np.fromfile(str(path), dtype=np.uint8)
    return data.size > 0 and cv2.imdecode(data, cv2.IMREAD_REDUCED_COLOR_8) is not None


def scan(opts: TrainOptions) -> Split:
    """Classes and the train/validation split; unreadable images are skipped and counted."""
    root = Path(opts.data)
    classes, files = _class_files(root)
    if len(classes) < 2:
        raise EdgesqzError(f"{root} has {len(classes)} class folder(s); training needs at least 2 sub-folders "
                           "(one per class) with images in each")
    empty = [c for c in classes if not files[c]]
    if empty:
        raise EdgesqzError(f"class folder {root / empty[0]} has no images; add images or remove the folder")
    skipped: list[str] = []

    def keep(paths: list[Path]) -> list[Path]:
        good = [p for p in paths if _readable(p)]
        skipped.extend(str(p) for p in paths if p not in set(good))
        return good

    rng = random.Random(opts.seed)
    train: list[tuple[str, int]] = []
    val: list[tuple[str, int]] = []
    if opts.val:
        val_classes, val_files = _class_files(Path(opts.val))
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise EdgesqzError(f"--val has class folders the training data lacks: {', '.join(unknown[:5])}")
        for i, c in enumerate(classes):
            train += [(str(p), i) for p in keep(files[c])]
            val += [(str(p), i) for p in keep(val_files.get(c, []))]
    else:
        if not 0 < opts.val_split < 1:
            raise EdgesqzError(f"--val-split must be between 0 and 1, got {opts.val_split}")
        for i, c in enumerate(classes):
            good = keep(files[c])
            if not good:
                raise EdgesqzError(f"no readable images in class folder {root / c}")
            rng.shuffle(good)
            n_val = max(1, round(len(good) * opts.val_split)) if len(good) > 1 else 0
            val += [(str(p), i) for p in good[:n_val]]
            train += [(str(p), i) for p in good[n_val:]]
    if not val:
        raise EdgesqzError("no validation images; add images or pass --val DIR")
    rng.shuffle(train)
    return Split(classes, train, val, skipped)


def dataset(items: list[tuple[str, int]], *, size: int, batch_size: int, training: bool, seed: int) -> Any:
    """tf.data pipeline: parallel decode, augmentation (training) or the device's centre crop, prefetch."""
    import tensorflow as tf

    paths = tf.constant([p for p, _ in items])
    labels = tf.constant([t for _, t in items], tf.int32)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    if training:
        ds = ds.shuffle(len(items), seed=seed, reshuffle_each_iteration=True)

    def load(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        if training:
            # Inception-style random crop (8 %..100 % of the area is too harsh for small data sets)
            begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
                tf.shape(image), tf.zeros([0, 0, 4], tf.float32), min_object_covered=0.0,
                aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.25, 1.0), max_attempts=10,
                use_image_if_no_bounding_boxes=True)
            image = tf.slice(image, begin, crop_size)
            image = tf.image.resize(image, (size, size), antialias=True)
            image = tf.image.random_flip_left_right(image)
            image = tf.image.random_brightness(image, 0.15 * 255)
            image = tf.image.random_contrast(image, 0.8, 1.2)
            image = tf.clip_by_value(image, 0.0, 255.0)
        else:
            shape = tf.shape(image)
            side = tf.cast(tf.round(tf.cast(tf.minimum(shape[0], shape[1]), tf.float32) * 0.875), tf.int32)
            image = tf.image.crop_to_bounding_box(image, (shape[0] - side) // 2, (shape[1] - side) // 2, side, side)
            image = tf.image.resize(image, (size, size), antialias=True)
        return tf.cast(image, tf.float32), label

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def build_model(opts: TrainOptions, classes: int) -> tuple[Any, Any]:
    """(training model on pixels, the SqueezeNet inside it). Fine-tuning replaces the classifier."""
    import keras

    from edgesqz.squeezenet import SqueezeNet

    if opts.init == "imagenet":
        if opts.version not in ("1_0", "1_1"):
            raise EdgesqzError(f"--from imagenet needs SqueezeNet 1_0 or 1_1, not {opts.version}")
        base = SqueezeNet(opts.version, classes=classes, classifier_activation=None,
                          input_shape=(opts.input_size, opts.input_size, 3))
        source = SqueezeNet(opts.version, weights=opts.weights, classifier_activation=None,
                            input_shape=(opts.input_size, opts.input_size, 3))
        for layer in base.layers:
            if layer.weights and layer.name != "classifier.1":
                layer.set_weights(source.get_layer(layer.name).get_weights())
    elif opts.init == "none":
        base = SqueezeNet(opts.version, classes=classes, classifier_activation=None, batch_norm=True,
                          input_shape=(opts.input_size, opts.input_size, 3))
    else:
        raise EdgesqzError(f"--from must be imagenet or none, not {opts.init!r}")
    pixels = keras.Input((opts.input_size, opts.input_size, 3), name="pixels")
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    x = keras.layers.Rescaling(1.0 / (255.0 * std), offset=-mean / std, name="normalize")(pixels)
    return keras.Model(pixels, base(x), name="trainer"), base


def save_with_labels(base: Any, path: Path, classes: list[str], extra: dict[str, Any]) -> None:
    """Save the SqueezeNet as .keras with the class names inside; atomic."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.keras")
    try:
        base.save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(LABELS_MEMBER, json.dumps({"labels": classes, **extra}, indent=2))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_labels(path: str | os.PathLike[str]) -> list[str] | None:
    """Class names saved by :func:`save_with_labels` (None for other .keras files)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return list(json.loads(archive.read(LABELS_MEMBER))["labels"])
    except (KeyError, zipfile.BadZipFile, ValueError, OSError):
        return None


@dataclass
class TrainResult:
    output: Path
    classes: list[str]
    best_val_accuracy: float
    epochs_run: int
    images_per_second: float
    history: dict[str, list[float]]
    skipped: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output"] = str(self.output)
        return d


def train(opts: TrainOptions, on_epoch: Callable[[int, dict[str, float]], None] | None = None,
          verbose: int = 1) -> TrainResult:
    """Fine-tune (or train from scratch) and save the best validation model to ``opts.output``."""
    out = Path(opts.output)
    if out.suffix != ".keras":
        raise EdgesqzError(f"output {out} must end in .keras")
    state_dir = out.with_name(out.name + ".state")
    if out.exists() and not (opts.force or opts.resume):
        raise EdgesqzError(f"{out} already exists; pass --force to replace it, --resume to continue, or choose -o")
    if opts.resume and not (state_dir / "last.keras").exists():
        raise EdgesqzError(f"nothing to resume: {state_dir / 'last.keras'} does not exist")
    if opts.epochs < 1 or opts.batch_size < 1:
        raise EdgesqzError("--epochs and --batch-size must be >= 1")
    from edgesqz.squeezenet import min_input_size

    if opts.input_size < min_input_size(opts.version):
        raise EdgesqzError(f"--input-size must be >= {min_input_size(opts.version)} for SqueezeNet {opts.version}")
    split = scan(opts)
    if opts.init == "imagenet" and opts.version not in ("1_0", "1_1"):
        raise EdgesqzError(f"--from imagenet needs SqueezeNet 1_0 or 1_1, not {opts.version}")
    out.parent.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)

    from edgesqz.quiet import captured_output, quiet_tensorflow_env

    quiet_tensorflow_env()
    with captured_output([]):
        import keras
    keras.utils.set_random_seed(opts.seed)
    train_ds = dataset(split.train, size=opts.input_size, batch_size=opts.batch_size, training=True, seed=opts.seed)
    val_ds = dataset(split.val, size=opts.input_size, batch_size=opts.batch_size, training=False, seed=opts.seed)

    initial_epoch = 0
    best = -1.0
    progress_file = state_dir / "progress.json"
    if opts.resume:
        trainer = keras.saving.load_model(state_dir / "last.keras")
        base = trainer.layers[-1]
        saved = json.loads(progress_file.read_text())
        if saved["classes"] != split.classes:
            raise EdgesqzError("the data folder's classes differ from the run being resumed")
        initial_epoch = int(saved["epoch"])
        best = float(saved["best_val_accuracy"])
    else:
        trainer, base = build_model(opts, len(split.classes))

    history: dict[str, list[float]] = {}
    seen = {"images": 0, "seconds": 0.0}
    extra = {"version": opts.version, "init": opts.init, "input_size": opts.input_size}

    class Keep(keras.callbacks.Callback):
        """Best-validation checkpoint, resumable state, throughput, early stopping."""

        def __init__(self) -> None:
            super().__init__()
            self.best = best
            self.wait = 0
            self.stopped = False

        def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = dict(logs or {})
            seen["images"] += len(split.train)
            seen["seconds"] += time.perf_counter() - self.t0
            for k, v in logs.items():
                history.setdefault(k, []).append(float(v))
            acc = float(logs.get("val_accuracy", 0.0))
            if acc > self.best:
                self.best = acc
                self.wait = 0
                save_with_labels(base, out, split.classes, {**extra, "val_accuracy": acc, "epoch": epoch + 1})
            else:
                self.wait += 1
                if self.wait >= opts.patience:
                    self.model.stop_training = self.stopped = True
            trainer.save(state_dir / "last.keras")
            progress_file.write_text(json.dumps({"epoch": epoch + 1, "best_val_accuracy": self.best,
                                                 "classes": split.classes}))
            if on_epoch:
                on_epoch(epoch, logs)

    keep = Keep()
    lr = opts.learning_rate or (1e-3 if opts.init == "imagenet" else 3e-3)
    steps_per_epoch = max(1, math.ceil(len(split.train) / opts.batch_size))
    freeze = min(opts.freeze_epochs, opts.epochs) if opts.init == "imagenet" else 0
    # (first epoch, end epoch, backbone trainable, peak learning rate)
    phases = [(0, freeze, False, lr), (freeze, opts.epochs, True, lr / 10 if freeze else lr)]
    for start, end, backbone, peak in phases:
        if end <= max(start, initial_epoch) or keep.stopped:
            continue
        for layer in base.layers:
            layer.trainable = backbone or layer.name == "classifier.1"
        schedule = keras.optimizers.schedules.CosineDecay(peak, decay_steps=steps_per_epoch * (end - start),
                                                          alpha=0.05)
        trainer.compile(optimizer=keras.optimizers.Adam(schedule),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        trainer.fit(train_ds, validation_data=val_ds, epochs=end, initial_epoch=max(start, initial_epoch),
                    callbacks=[keep], verbose=verbose)
    return TrainResult(out, split.classes, keep.best, len(history.get("loss", [])),
                       seen["images"] / seen["seconds"] if seen["seconds"] else 0.0, history, len(split.skipped))
