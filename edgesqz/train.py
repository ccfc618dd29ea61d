"""``edgesqz train``: train SqueezeNet on a folder of the user's own images (Keras + tf.data).

The data folder has one sub-folder per class. The model trains on RGB pixels (0..255) with the
architecture's normalisation as its first layer, and is saved as the plain SqueezeNet (normalised
input, logits out, PyTorch layer names) so ``edgesqz convert --weights OUT.keras`` treats it
like any other weights. The class names, the architecture description and the preprocessing go
into the ``.keras`` archive (``edgesqz.json``) and from there into the converted model.

One training loop, two recipes (:class:`Recipe`):

- ``--arch 1_0|1_1`` (torchvision): fine-tune torchvision's ImageNet weights (``--from imagenet``:
  two epochs train only the new classifier, then everything at a tenth of the rate) or train the
  batch-norm variant from scratch (``--from none``); Adam with cosine decay; Inception-style crops.
- ``--arch cifar`` (pytorch-cifar100's network, from scratch): its recipe — SGD with momentum 0.9,
  L2 weight decay 5e-4 on every parameter (PyTorch's coupled form), learning rate 0.1 with a
  one-epoch linear warm-up and x0.2 steps at 30/60/80 % of the epochs (its 60/120/160 of 200),
  batches of 128, random crops of the image padded by 4 pixels, horizontal flips.

``--weight-bits 4`` (quantisation-aware fine-tuning): the last epochs (``--qat-epochs``, default a
quarter) run every convolution but the first on fake-quantised weights — per output channel, a
symmetric 4-bit grid (levels -7..7, scale max|w| / 7), rounded in the forward pass and passed
straight through in the backward pass (STE) — and the best of those epochs is saved with its weights
snapped onto that grid and ``"weight_bits": 4`` in ``edgesqz.json``. ``edgesqz convert`` then reads
the grid from the weights and stores them as 4-bit without any rounding search of its own.

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

import numpy as np

from edgesqz.architecture import Architecture, architecture
from edgesqz.errors import EdgesqzError
from edgesqz.imaging import IMAGE_SUFFIXES, Preprocessing, read_image

LABELS_MEMBER = "edgesqz.json"


@dataclass
class TrainOptions:
    data: str
    output: str = "model.keras"
    val: str | None = None
    val_split: float = 0.2
    arch: str = "1_1"  # "1_0", "1_1" (torchvision) or "cifar" (pytorch-cifar100's network)
    init: str | None = None  # "imagenet": fine-tune torchvision's weights; "none": from scratch (batch-norm Fire)
    weights: str = "torchvision"  # where the ImageNet weights come from (a .pth path works offline)
    epochs: int = 10
    batch_size: int | None = None  # None: the recipe's (32; 128 for cifar)
    input_size: int | None = None  # None: the architecture's (224; 32 for cifar)
    learning_rate: float | None = None
    patience: int | None = None  # None: the recipe's (3; no early stopping for cifar's step schedule)
    freeze_epochs: int = 2  # --from imagenet: first train only the new classifier, then everything
    seed: int = 0
    force: bool = False
    resume: bool = False
    weight_bits: int | None = None  # 4: the last qat_epochs train on fake-quantised 4-bit weights (QAT)
    qat_epochs: int | None = None  # None: a quarter of the epochs (at least 1)


@dataclass(frozen=True)
class Recipe:
    """How one kind of network is trained."""

    optimizer: str  # "adam" (cosine decay) | "sgd" (momentum, warm-up, step decay)
    learning_rate: float
    batch_size: int
    augment: str  # "inception" (random resized crop) | "pad_crop" (pad 4, random crop)
    patience: int | None  # None: no early stopping
    weight_decay: float = 0.0  # coupled L2, as PyTorch's SGD weight_decay
    momentum: float = 0.9
    warmup_epochs: int = 0
    milestones: tuple[float, ...] = ()  # fractions of the epochs where the rate is multiplied by gamma
    gamma: float = 0.2


FINE_TUNE = Recipe("adam", 1e-3, 32, "inception", 3)
FROM_SCRATCH = Recipe("adam", 3e-3, 32, "inception", 3)
CIFAR = Recipe("sgd", 0.1, 128, "pad_crop", None, weight_decay=5e-4, warmup_epochs=1, milestones=(0.3, 0.6, 0.8))


def resolve_options(opts: TrainOptions) -> tuple[Architecture, Recipe, str]:
    """(architecture, recipe, init) for the options, or a clear error."""
    try:
        arch = architecture(opts.arch)
    except EdgesqzError as exc:
        raise EdgesqzError(f"--arch: {exc}") from None
    init = opts.init or ("none" if arch.layout == "cifar" else "imagenet")
    if init not in ("imagenet", "none"):
        raise EdgesqzError(f"--from must be imagenet or none, not {opts.init!r}")
    if init == "imagenet" and (arch.layout != "torchvision" or arch.batch_norm):
        raise EdgesqzError(f"--from imagenet: there are no ImageNet weights for the {arch.label}; "
                           "train it from scratch with --from none")
    recipe = CIFAR if arch.layout == "cifar" else FINE_TUNE if init == "imagenet" else FROM_SCRATCH
    return arch, recipe, init


@dataclass
class Split:
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    skipped: list[str] = field(default_factory=list)


def _class_files(root: Path) -> tuple[list[str], dict[str, list[Path]]]:
    if not root.is_dir():
        raise EdgesqzError(f"{root} is not a folder; --data needs one sub-folder of images per class")
    # "_unsorted" (run --collect's frames waiting for a label) and hidden folders are not classes
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))
    files = {c: sorted(p for p in (root / c).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
             for c in classes}
    return classes, files


def _readable(path: Path) -> bool:
    """Whether the one image reader accepts it (so tf.data never meets a forged or oversized image)."""
    try:
        read_image(path)
    except EdgesqzError:
        return False
    return True


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


def dataset(items: list[tuple[str, int]], *, pre: Preprocessing, batch_size: int, training: bool, seed: int,
            augment: str = "inception") -> Any:
    """tf.data pipeline: parallel decode, augmentation (training) or the device's centre crop, prefetch."""
    import tensorflow as tf

    size = pre.size
    paths = tf.constant([p for p, _ in items])
    labels = tf.constant([t for _, t in items], tf.int32)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    if training:
        ds = ds.shuffle(len(items), seed=seed, reshuffle_each_iteration=True)

    def centre(image: tf.Tensor, fraction: float) -> tf.Tensor:
        shape = tf.shape(image)
        side = tf.cast(tf.round(tf.cast(tf.minimum(shape[0], shape[1]), tf.float32) * fraction), tf.int32)
        image = tf.image.crop_to_bounding_box(image, (shape[0] - side) // 2, (shape[1] - side) // 2, side, side)
        return tf.image.resize(image, (size, size), antialias=True)

    def load(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        if training and augment == "pad_crop":
            # pytorch-cifar100: RandomCrop(size, padding=4) and RandomHorizontalFlip on the whole image
            image = centre(image, pre.crop_fraction)
            image = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
            image = tf.image.random_crop(image, (size, size, 3))
            image = tf.image.random_flip_left_right(image)
        elif training:
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
            image = centre(image, pre.crop_fraction)
        return tf.cast(image, tf.float32), label

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def build_model(opts: TrainOptions, classes: int) -> tuple[Any, Any]:
    """(training model on pixels, the SqueezeNet inside it). Fine-tuning replaces the classifier."""
    import keras

    from edgesqz.squeezenet import SqueezeNet

    arch, _, init = resolve_options(opts)
    pre = training_preprocessing(opts, arch)
    shape = (pre.size, pre.size, 3)
    if init == "imagenet":
        base = SqueezeNet(arch, classes=classes, classifier_activation=None, input_shape=shape)
        source = SqueezeNet(arch, weights=opts.weights, classifier_activation=None, input_shape=shape)
        head = arch.naming.head("conv")
        for layer in base.layers:
            if layer.weights and layer.name != head:
                layer.set_weights(source.get_layer(layer.name).get_weights())
    else:  # from scratch: with batch norm (the CIFAR network has it already)
        base = SqueezeNet(arch, classes=classes, classifier_activation=None, batch_norm=True, input_shape=shape)
    pixels = keras.Input(shape, name="pixels")
    mean = np.asarray(pre.mean, np.float32)
    std = np.asarray(pre.std, np.float32)
    x = keras.layers.Rescaling(1.0 / (255.0 * std), offset=-mean / std, name="normalize")(pixels)
    return keras.Model(pixels, base(x), name="trainer"), base


def training_preprocessing(opts: TrainOptions, arch: Architecture) -> Preprocessing:
    """The architecture's preprocessing at the training size (what the converted model will apply)."""
    size = arch.preprocessing.size if opts.input_size is None else int(opts.input_size)
    return Preprocessing(size=size, crop_fraction=arch.preprocessing.crop_fraction, mean=arch.preprocessing.mean,
                         std=arch.preprocessing.std)


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


def read_training_info(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What :func:`save_with_labels` stored (labels, architecture, preprocessing); None for other .keras files."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(LABELS_MEMBER)
            if info.file_size > 1 << 22:  # a few kB in practice; never inflate a bomb
                return None
            data = json.loads(archive.read(LABELS_MEMBER))
    except (KeyError, zipfile.BadZipFile, ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


def read_labels(path: str | os.PathLike[str]) -> list[str] | None:
    """Class names saved by :func:`save_with_labels` (None for other .keras files)."""
    labels = (read_training_info(path) or {}).get("labels")
    return [str(x) for x in labels] if isinstance(labels, list) else None


QAT_LEVELS = 7  # the 4-bit grid convert uses (edgesqz.converters.quantize.INT4_LEVELS)


def qat_layers(base: Any) -> list[Any]:
    """The convolutions trained on 4-bit weights: all but the first (the stem stays 8-bit)."""
    convs = [layer for layer in base.layers if type(layer).__name__ == "Conv2D"]
    return convs[1:]


def _fake_quant(kernel: Any) -> Any:
    """Per-output-channel symmetric 4-bit fake quantisation with a straight-through gradient."""
    from keras import ops

    top = ops.max(ops.abs(kernel), axis=(0, 1, 2), keepdims=True)
    scale = ops.maximum(top, 1e-12) / QAT_LEVELS
    q = ops.clip(ops.round(kernel / scale), -QAT_LEVELS, QAT_LEVELS) * scale
    return kernel + ops.stop_gradient(q - kernel)


def set_fake_quant(base: Any, on: bool) -> None:
    """Switch the 4-bit fake quantisation of :func:`qat_layers` on or off (recompile afterwards)."""
    for layer in qat_layers(base):
        if on:
            plain = type(layer).convolution_op.__get__(layer)
            layer.convolution_op = lambda inputs, kernel, _plain=plain: _plain(inputs, _fake_quant(kernel))
        elif "convolution_op" in vars(layer):
            del layer.convolution_op


def snap_to_grid(base: Any) -> list[tuple[Any, list[np.ndarray]]]:
    """Put the :func:`qat_layers` kernels exactly on their 4-bit grids; returns what to restore."""
    saved = []
    for layer in qat_layers(base):
        weights = layer.get_weights()
        kernel = weights[0].astype(np.float64)
        top = np.abs(kernel).reshape(-1, kernel.shape[-1]).max(axis=0)
        scale = np.maximum(top, 1e-12) / QAT_LEVELS
        snapped = np.clip(np.round(kernel / scale), -QAT_LEVELS, QAT_LEVELS) * scale
        saved.append((layer, weights))
        layer.set_weights([snapped.astype(weights[0].dtype), *weights[1:]])
    return saved


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
    """Train with the architecture's recipe and save the best validation model to ``opts.output``."""
    out = Path(opts.output)
    if out.suffix != ".keras":
        raise EdgesqzError(f"output {out} must end in .keras")
    state_dir = out.with_name(out.name + ".state")
    if out.exists() and not (opts.force or opts.resume):
        raise EdgesqzError(f"{out} already exists; pass --force to replace it, --resume to continue, or choose -o")
    if opts.resume and not (state_dir / "last.keras").exists():
        raise EdgesqzError(f"nothing to resume: {state_dir / 'last.keras'} does not exist")
    arch, recipe, init = resolve_options(opts)
    batch_size = recipe.batch_size if opts.batch_size is None else opts.batch_size
    patience = recipe.patience if opts.patience is None else opts.patience
    if opts.epochs < 1 or batch_size < 1:
        raise EdgesqzError("--epochs and --batch-size must be >= 1")
    if patience is not None and patience < 1:
        raise EdgesqzError(f"--patience must be >= 1, got {patience}")
    if opts.weight_bits not in (None, 4, 8):
        raise EdgesqzError(f"--weight-bits must be 4 or 8, not {opts.weight_bits}")
    qat = opts.weight_bits == 4
    if opts.qat_epochs is not None and not qat:
        raise EdgesqzError("--qat-epochs needs --weight-bits 4")
    qat_epochs = (max(1, round(opts.epochs / 4)) if opts.qat_epochs is None else opts.qat_epochs) if qat else 0
    if qat and not 1 <= qat_epochs <= opts.epochs:
        raise EdgesqzError(f"--qat-epochs must be between 1 and --epochs ({opts.epochs}), got {qat_epochs}")
    qat_start = opts.epochs - qat_epochs if qat else opts.epochs
    pre = training_preprocessing(opts, arch)
    if pre.size < arch.min_input_size():
        raise EdgesqzError(f"--input-size must be >= {arch.min_input_size()} for {arch.label}")
    split = scan(opts)
    out.parent.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)

    from edgesqz.quiet import captured_output, quiet_tensorflow_env

    quiet_tensorflow_env()
    with captured_output([]):
        import keras
    from edgesqz import schedules  # also registers the warm-up/step schedule, for --resume

    keras.utils.set_random_seed(opts.seed)
    train_ds = dataset(split.train, pre=pre, batch_size=batch_size, training=True, seed=opts.seed,
                       augment=recipe.augment)
    val_ds = dataset(split.val, pre=pre, batch_size=batch_size, training=False, seed=opts.seed)

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
    if recipe.weight_decay:
        # PyTorch's SGD weight_decay adds wd * w to every gradient: an L2 term of wd / 2 * |w|^2 in the loss
        for variable in base.trainable_variables:
            variable.regularizer = keras.regularizers.L2(recipe.weight_decay / 2)

    history: dict[str, list[float]] = {}
    seen = {"images": 0, "seconds": 0.0}
    extra = {"version": arch.name, "init": init, "input_size": pre.size, "architecture": arch.to_dict(),
             "preprocessing": pre.to_dict(), "recipe": asdict(recipe)}
    if qat:
        extra.update({"weight_bits": 4, "qat": {"epochs": qat_epochs, "levels": QAT_LEVELS,
                                                "layers": [layer.name for layer in qat_layers(base)],
                                                "grid": "per output channel, symmetric, scale max|w| / 7"}})

    class Keep(keras.callbacks.Callback):
        """Best-validation checkpoint, resumable state, throughput, early stopping."""

        def __init__(self) -> None:
            super().__init__()
            self.best = best
            self.wait = 0
            self.stopped = False
            self.qat = False  # in the fake-quantised epochs: only those may become the saved model

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
                restore = snap_to_grid(base) if self.qat else []
                try:
                    save_with_labels(base, out, split.classes, {**extra, "val_accuracy": acc, "epoch": epoch + 1})
                finally:
                    for layer, weights in restore:
                        layer.set_weights(weights)
            elif not (qat and epoch + 1 < qat_start):  # early stopping must not skip the 4-bit epochs
                self.wait += 1
                if patience is not None and self.wait >= patience and not (qat and not self.qat):
                    self.model.stop_training = self.stopped = True
            trainer.save(state_dir / "last.keras")
            progress_file.write_text(json.dumps({"epoch": epoch + 1, "best_val_accuracy": self.best,
                                                 "classes": split.classes}))
            if on_epoch:
                on_epoch(epoch, logs)

    keep = Keep()
    lr = opts.learning_rate or recipe.learning_rate
    steps_per_epoch = max(1, math.ceil(len(split.train) / batch_size))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    if recipe.optimizer == "sgd":
        schedule = schedules.WarmupStepDecay(
            lr, warmup_steps=steps_per_epoch * recipe.warmup_epochs,
            boundaries=[round(steps_per_epoch * opts.epochs * m) for m in recipe.milestones], gamma=recipe.gamma)
        phases = [(0, opts.epochs, True, keras.optimizers.SGD(schedule, momentum=recipe.momentum))]
    else:
        freeze = min(opts.freeze_epochs, opts.epochs) if init == "imagenet" else 0
        phases = []  # (first epoch, end epoch, backbone trainable, optimizer)
        for start, end, backbone, peak in ((0, freeze, False, lr), (freeze, opts.epochs, True,
                                                                       lr / 10 if freeze else lr)):
            decay = keras.optimizers.schedules.CosineDecay(peak, decay_steps=steps_per_epoch * max(1, end - start),
                                                           alpha=0.05)
            phases.append((start, end, backbone, keras.optimizers.Adam(decay)))
    head = arch.naming.head("conv")
    segments = []  # phases, split where the 4-bit (QAT) epochs begin
    for start, end, backbone, optimizer in phases:
        for a, b, fq in ((start, min(end, qat_start), False), (max(start, qat_start), end, True)):
            if b > a:
                segments.append((a, b, backbone, optimizer, fq))
    for start, end, backbone, optimizer, fq in segments:
        if end <= max(start, initial_epoch) or (keep.stopped and not fq):
            continue
        if fq and not keep.qat:  # the float model so far is not on the grid: it cannot be the result
            keep.qat, keep.best, keep.wait, keep.stopped = True, -1.0, 0, False
        set_fake_quant(base, fq)
        for layer in base.layers:
            layer.trainable = backbone or layer.name == head
        if opts.resume and recipe.optimizer == "sgd":
            optimizer = trainer.optimizer  # keeps momentum and the step count of the interrupted run
        trainer.compile(optimizer=optimizer, loss=loss, metrics=metrics)
        trainer.fit(train_ds, validation_data=val_ds, epochs=end, initial_epoch=max(start, initial_epoch),
                    callbacks=[keep], verbose=verbose, shuffle=False)  # tf.data shuffles already
    return TrainResult(out, split.classes, keep.best, len(history.get("loss", [])),
                       seen["images"] / seen["seconds"] if seen["seconds"] else 0.0, history, len(split.skipped))
