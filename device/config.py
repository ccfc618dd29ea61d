"""One configuration object for ``edgesqz run``: filled by a site file (TOML), by flags, or both.

``edgesqz run --config site.toml`` reads a :class:`RunConfig` from the file; flags given on the
command line then override it (:func:`merge`); the pipeline reads only the result. ``edgesqz
config check FILE`` runs the same checks without starting anything, and ``run --print-config``
prints the effective configuration as TOML (secrets replaced by ``***``).

The file (schema in docs/site.md, example in docs/site-example.toml)::

    model = "/home/pi/models/garage.tflite"    # every top-level option of `run` has a key
    threads = 3
    webhooks = ["http://homeassistant.local:8123/api/webhook/garage"]

    [events]
    rules = ["door_open=door:open", "car=space3:car>=0.6"]

    [mqtt]
    url = "mqtt://edgesqz@homeassistant.local/edgesqz"
    password = "${MQTT_PASSWORD}"               # ${NAME}: from the environment

    [cameras.garage]
    camera = "0"                                 # or source = "rtsp://..." / a video file
    [cameras.garage.zones.door]
    rect = [0.05, 0.10, 0.30, 0.60]              # x, y, width, height: fractions of the frame
    motion = true                                # classify only when something moved (max_interval s)

Every mistake is one line, with the file's line number where the file said it, and exit status 2.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesqz.errors import EdgesqzError

MAX_CONFIG_BYTES = 1 << 20  # a site file is a few kB; refuse anything that is not one
MAX_CAMERAS = 8
MAX_ZONES = 16  # per camera
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
NAME_RULE = "1-32 letters, digits, _ or -, starting with a letter or digit"
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
SECRET_KEYS = {("mqtt", "password"), ("serve", "token")}


class ConfigError(EdgesqzError):
    """A mistake in the configuration (exit 2)."""


# --------------------------------------------------------------------------- the object


@dataclass
class Rect:
    """A rectangle of the frame: x, y, width, height, each a fraction (0..1) or pixels (``px``)."""

    x: float
    y: float
    w: float
    h: float
    pixels: bool = False

    def to_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Integer pixels (x, y, w, h) inside a ``width`` x ``height`` frame, clipped to it (at least 1x1)."""
        if self.pixels:
            x, y, w, h = self.x, self.y, self.w, self.h
        else:
            x, y, w, h = self.x * width, self.y * height, self.w * width, self.h * height
        x0, y0 = min(max(0, round(x)), width - 1), min(max(0, round(y)), height - 1)
        x1, y1 = min(width, max(x0 + 1, round(x + w))), min(height, max(y0 + 1, round(y + h)))
        return x0, y0, x1 - x0, y1 - y0

    def describe(self) -> str:
        if self.pixels:
            return ",".join(f"{v:g}px" for v in (self.x, self.y, self.w, self.h))
        return ",".join(f"{v:g}" for v in (self.x, self.y, self.w, self.h))

    def to_toml(self) -> Any:
        return self.describe() if self.pixels else [self.x, self.y, self.w, self.h]


@dataclass
class ZoneConfig:
    name: str
    rect: Rect
    motion: bool = False  # classify only when something moved in the zone
    motion_threshold: float = 0.02  # fraction of the zone's (downscaled) pixels that changed
    max_interval: float = 10.0  # with motion: classify at least this often (seconds)


@dataclass
class CameraConfig:
    name: str
    camera: str | None = None  # index, picamera2[:N], v4l2:N
    source: str | None = None  # video file, stream URL, image file or folder
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    loop: bool = False
    zones: list[ZoneConfig] = field(default_factory=list)
    named: bool = True  # False: a name edgesqz made up (one camera given without a name)


@dataclass
class ServeConfig:
    address: str | None = None
    token: str | None = None
    max_viewers: int | None = None


@dataclass
class EventsConfig:
    rules: list[str] = field(default_factory=list)
    start: float | None = None
    end: float | None = None
    snapshot_dir: Path | None = None
    clip_dir: Path | None = None
    preroll: float | None = None
    keep: int | None = None
    max_disk: float | None = None


@dataclass
class MqttConfig:
    url: str | None = None
    password: str | None = None
    discovery: str | None = None
    ca: Path | None = None
    device_id: str | None = None
    trust: Path | None = None  # accept models deployed over MQTT, signed by this public key (edgesqz deploy)


@dataclass
class CollectConfig:
    dir: Path | None = None
    every: float | None = None  # seconds
    unsure: float | None = None  # top-1 below
    margin: float | None = None  # top-1 minus top-2 below
    events: bool = False  # on each event start
    max_files: int | None = None
    max_mb: float | None = None


@dataclass
class RunConfig:
    """Everything ``edgesqz run`` does, in one object (see the module docstring)."""

    model: Path | None = None
    threads: int | None = None
    delegate: str | None = None
    top_k: int = 5
    threshold: float = 0.0
    labels: Path | None = None
    crop_fraction: float | None = None
    color_order: str | None = None
    mean: str | None = None
    std: str | None = None
    output_kind: str | None = None
    max_frames: int | None = None
    duration: float | None = None
    json: bool = False
    output: Path | None = None
    record: Path | None = None
    force: bool = False
    reconnect: str = "5"
    display: bool = True
    motion_gate: float | None = None  # every zone: motion gating with this max interval (seconds)
    watch_model: bool = True  # a replaced model file (or a moved `latest`) is checked and swapped in
    webhooks: list[str] = field(default_factory=list)
    cameras: list[CameraConfig] = field(default_factory=list)
    serve: ServeConfig = field(default_factory=ServeConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    path: Path | None = None  # the site file it came from, if any

    @property
    def multi(self) -> bool:
        """Several cameras, zones or named cameras: results carry camera (and zone) names."""
        return len(self.cameras) > 1 or any(c.zones or c.named for c in self.cameras)

    def camera(self, name: str) -> CameraConfig:
        for cam in self.cameras:
            if cam.name == name:
                return cam
        raise ConfigError(f"no camera called {name!r} (cameras: {', '.join(c.name for c in self.cameras)})")


# --------------------------------------------------------------------------- parsing values


def parse_name(text: str, what: str) -> str:
    name = text.strip()
    if not NAME_RE.match(name):
        raise ConfigError(f"{what} {text!r}: a name is {NAME_RULE}")
    return name


def _number(text: str, whole: str) -> tuple[float, bool]:
    t = text.strip().lower()
    pixels = t.endswith("px")
    if pixels:
        t = t[:-2].strip()
    try:
        value = float(t)
    except ValueError:
        raise ConfigError(f"zone {whole!r}: {text.strip()!r} is not a number (fractions 0..1, or pixels with px)") \
            from None
    if not math.isfinite(value):
        raise ConfigError(f"zone {whole!r}: {text.strip()!r} is not a finite number")
    return value, pixels


def parse_rect(value: Any, whole: str) -> Rect:
    """``X,Y,W,H`` (a string or a list of 4): fractions of the frame, or all four in pixels with ``px``."""
    if isinstance(value, str):
        parts = [p for p in value.split(",")]
    elif isinstance(value, (list, tuple)):
        parts = [p if isinstance(p, str) else repr(p) for p in value]
        if any(isinstance(p, bool) or not isinstance(p, (int, float, str)) for p in value):
            raise ConfigError(f"zone {whole!r}: a rectangle is four numbers X,Y,W,H")
    else:
        raise ConfigError(f"zone {whole!r}: a rectangle is four numbers X,Y,W,H (fractions of the frame, or "
                          "pixels with px: 10px,20px,224px,224px)")
    if len(parts) != 4:
        raise ConfigError(f"zone {whole!r}: a rectangle is four numbers X,Y,W,H, got {len(parts)}")
    numbers = [_number(p, whole) for p in parts]
    kinds = {px for _, px in numbers}
    if len(kinds) != 1:
        raise ConfigError(f"zone {whole!r}: give all four numbers as fractions (0..1) or all four in pixels (px)")
    (x, _), (y, _), (w, _), (h, _) = numbers
    pixels = kinds.pop()
    if w <= 0 or h <= 0:
        raise ConfigError(f"zone {whole!r}: width and height must be > 0")
    if x < 0 or y < 0:
        raise ConfigError(f"zone {whole!r}: x and y must be >= 0 (the frame's top-left corner is 0,0)")
    if not pixels and (x + w > 1.0 + 1e-9 or y + h > 1.0 + 1e-9):
        raise ConfigError(f"zone {whole!r}: the rectangle leaves the frame (x + width and y + height must be at "
                          "most 1 in fractions of the frame)")
    if pixels and (w < 2 or h < 2 or any(v != int(v) for v in (x, y, w, h))):
        raise ConfigError(f"zone {whole!r}: pixel rectangles are whole pixels, at least 2x2")
    return Rect(x, y, w, h, pixels)


def parse_zone(text: str) -> tuple[str | None, ZoneConfig]:
    """``--zone [CAMERA/]NAME=X,Y,W,H`` -> (camera or None, zone)."""
    name, sep, rect = text.partition("=")
    if not sep:
        raise ConfigError(f"--zone {text!r}: write NAME=X,Y,W,H (fractions of the frame, e.g. door=0.1,0.2,0.3,0.5; "
                          "or pixels: door=64px,48px,224px,224px)")
    camera = None
    if "/" in name:
        camera, _, name = name.partition("/")
        camera = parse_name(camera, "--zone camera")
    return camera, ZoneConfig(name=parse_name(name, "--zone"), rect=parse_rect(rect, text))


def parse_source_spec(text: str, *, kind: str) -> tuple[str | None, str]:
    """``[NAME=]SPEC`` for ``--camera`` / ``--source``; a path or URL that merely contains ``=`` stays whole."""
    name, sep, rest = text.partition("=")
    if sep and NAME_RE.match(name) and rest and not ("://" in text and "://" not in rest) \
            and not (kind == "source" and Path(text).exists()):
        return name, rest
    return None, text


def _default_name(cam: CameraConfig, taken: set[str]) -> str:
    if cam.camera is not None:
        base = "camera" + re.sub(r"[^A-Za-z0-9]+", "", cam.camera.split(":")[-1]) or "camera"
    else:
        text = cam.source or "source"
        stem = Path(text.split("?", 1)[0].rstrip("/")).stem if "://" not in text else text.split("://", 1)[1]
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")[:24] or "source"
        if not base[0].isalnum():
            base = "s" + base
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


# --------------------------------------------------------------------------- the site file


class _Lines:
    """Where each key of a TOML text is (1-based line numbers), for messages; best effort, never fails."""

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?")
    _KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"'. ]+?)\s*=")

    def __init__(self, text: str) -> None:
        self.where: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for number, line in enumerate(text.splitlines(), 1):
            header = self._HEADER.match(line)
            if header:
                table = self._split(header.group(2))
                self.where.setdefault(table, number)
                continue
            key = self._KEY.match(line)
            if key:
                self.where.setdefault(table + self._split(key.group(1)), number)

    @staticmethod
    def _split(dotted: str) -> tuple[str, ...]:
        return tuple(p.strip().strip("\"'") for p in re.findall(r'"[^"]*"|\'[^\']*\'|[^.]+', dotted))

    def line(self, path: Sequence[str]) -> int | None:
        path = tuple(path)
        while path:
            if path in self.where:
                return self.where[path]
            path = path[:-1]
        return None


class _Reader:
    """Typed access to the parsed TOML with line numbers in every error."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = _Lines(text)

    def error(self, where: Sequence[str], message: str) -> ConfigError:
        line = self.lines.line(where)
        at = f"{self.path}:{line}" if line else str(self.path)
        return ConfigError(f"{at}: {message}")

    def table(self, data: Any, where: Sequence[str]) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise self.error(where, f"{'.'.join(where)} must be a table")
        return data

    def check_keys(self, data: Mapping[str, Any], allowed: Iterable[str], where: Sequence[str]) -> None:
        allowed = list(allowed)
        for key in data:
            if key not in allowed:
                import difflib

                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(allowed))})"
                raise self.error((*where, key), f"unknown key {'.'.join((*where, key))!r}{hint}")

    def value(self, data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: Sequence[str]) -> Any:
        if key not in data:
            return None
        value = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            names = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true or false",
                                 list: "a list"}[k] for k in kinds)
            raise self.error((*where, key), f"{'.'.join((*where, key))} must be {names}, not {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error((*where, key), f"{'.'.join((*where, key))} must be a finite number, not {value!r}")
        if isinstance(value, str):
            value = self.expand(value, (*where, key))
        return value

    def strings(self, data: Mapping[str, Any], key: str, where: Sequence[str]) -> list[str]:
        value = data.get(key)
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error((*where, key), f"{'.'.join((*where, key))} must be a list of strings")
        return [self.expand(v, (*where, key)) for v in value]

    def expand(self, text: str, where: Sequence[str]) -> str:
        """``${NAME}`` from the environment (a missing variable is an error); ``$$`` is a ``$``."""
        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise self.error(where, f"{'.'.join(where)} uses ${{{name}}}, which is not set in the environment")
            return os.environ[name]

        return _ENV_RE.sub(sub, text).replace("$$", "$")


_TOP = {"model": (str,), "threads": (int,), "delegate": (str,), "top_k": (int,), "threshold": (float,),
        "labels": (str,), "crop_fraction": (float,), "color_order": (str,), "mean": (str, float, list),
        "std": (str, float, list), "output_kind": (str,), "max_frames": (int,), "duration": (float,),
        "json": (bool,), "output": (str,), "record": (str,), "force": (bool,), "reconnect": (str, int),
        "display": (bool,), "motion_gate": (float,), "watch_model": (bool,), "webhooks": (list, str)}
_PATHS = {"model", "labels", "output", "record"}
_TABLES = ("serve", "events", "mqtt", "collect", "cameras")


def read_config_text(path: str | os.PathLike[str]) -> str:
    """The text of a site file: a regular file of at most 1 MiB, UTF-8 (one line for anything else)."""
    p = Path(path)
    try:
        info = os.stat(p)
    except OSError as exc:
        if getattr(exc, "errno", None) == 40:  # ELOOP: a link that points at itself
            raise ConfigError(f"config {p}: a symbolic link that points at itself (or a loop of links)") from None
        raise ConfigError(f"config {p}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"config {p} is not a regular file; give a .toml file")
    if info.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {p} is {info.st_size / 1e6:.1f} MB; a site file is a few kB (at most 1 MiB)")
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config {p}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {p} is larger than 1 MiB; a site file is a few kB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config {p} is not a UTF-8 text file (a TOML site file)") from None


def load_config(path: str | os.PathLike[str]) -> RunConfig:
    """Read and check a site file (see the module docstring); every mistake is a :class:`ConfigError`."""
    import tomllib

    p = Path(path)
    text = read_config_text(p)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {p} is not valid TOML: {exc}") from None
    r = _Reader(p, text)
    r.check_keys(data, [*_TOP, *_TABLES], ())
    cfg = RunConfig(path=p)
    base = p.parent
    for key, kinds in _TOP.items():
        if key == "webhooks":
            cfg.webhooks = r.strings(data, key, ())
            continue
        value = r.value(data, key, kinds, ())
        if value is None:
            continue
        if key in ("mean", "std") and not isinstance(value, str):
            value = ",".join(f"{float(v)!r}" for v in (value if isinstance(value, list) else [value]))
        if key in _PATHS:
            value = _path(value, base)
        if key == "reconnect":
            value = str(value)
        setattr(cfg, key, value)
    serve = r.table(data.get("serve", {}), ("serve",))
    r.check_keys(serve, ["address", "token", "max_viewers"], ("serve",))
    addr = r.value(serve, "address", (str, int), ("serve",))
    cfg.serve = ServeConfig(address=str(addr) if addr is not None else None,
                            token=r.value(serve, "token", str, ("serve",)),
                            max_viewers=r.value(serve, "max_viewers", int, ("serve",)))
    ev = r.table(data.get("events", {}), ("events",))
    r.check_keys(ev, [f.name for f in dataclasses.fields(EventsConfig)], ("events",))
    cfg.events = EventsConfig(
        rules=r.strings(ev, "rules", ("events",)), start=r.value(ev, "start", float, ("events",)),
        end=r.value(ev, "end", float, ("events",)),
        snapshot_dir=_path(r.value(ev, "snapshot_dir", str, ("events",)), base),
        clip_dir=_path(r.value(ev, "clip_dir", str, ("events",)), base),
        preroll=r.value(ev, "preroll", float, ("events",)), keep=r.value(ev, "keep", int, ("events",)),
        max_disk=r.value(ev, "max_disk", float, ("events",)))
    mq = r.table(data.get("mqtt", {}), ("mqtt",))
    r.check_keys(mq, [f.name for f in dataclasses.fields(MqttConfig)], ("mqtt",))
    cfg.mqtt = MqttConfig(url=r.value(mq, "url", str, ("mqtt",)), password=r.value(mq, "password", str, ("mqtt",)),
                          discovery=r.value(mq, "discovery", str, ("mqtt",)),
                          ca=_path(r.value(mq, "ca", str, ("mqtt",)), base),
                          device_id=r.value(mq, "device_id", str, ("mqtt",)),
                          trust=_path(r.value(mq, "trust", str, ("mqtt",)), base))
    co = r.table(data.get("collect", {}), ("collect",))
    r.check_keys(co, [f.name for f in dataclasses.fields(CollectConfig)], ("collect",))
    cfg.collect = CollectConfig(dir=_path(r.value(co, "dir", str, ("collect",)), base),
                                every=r.value(co, "every", float, ("collect",)),
                                unsure=r.value(co, "unsure", float, ("collect",)),
                                margin=r.value(co, "margin", float, ("collect",)),
                                events=bool(r.value(co, "events", bool, ("collect",))),
                                max_files=r.value(co, "max_files", int, ("collect",)),
                                max_mb=r.value(co, "max_mb", float, ("collect",)))
    cams = r.table(data.get("cameras", {}), ("cameras",))
    for name, spec in cams.items():
        where = ("cameras", name)
        if not NAME_RE.match(name):
            raise r.error(where, f"camera name {name!r}: a name is {NAME_RULE}")
        spec = r.table(spec, where)
        r.check_keys(spec, ["camera", "source", "width", "height", "fps", "loop", "zones"], where)
        cam_value = r.value(spec, "camera", (str, int), where)
        cam = CameraConfig(name=name, camera=str(cam_value) if cam_value is not None else None,
                           source=r.value(spec, "source", str, where), width=r.value(spec, "width", int, where),
                           height=r.value(spec, "height", int, where), fps=r.value(spec, "fps", float, where),
                           loop=bool(r.value(spec, "loop", bool, where)))
        if cam.source is not None and "://" not in cam.source:
            cam.source = str(_path(cam.source, base))
        if (cam.camera is None) == (cam.source is None):
            raise r.error(where, f"camera {name!r}: give exactly one of camera = \"0\" (a camera) or source = ... "
                                 "(a video file, stream URL, image or folder)")
        zones = r.table(spec.get("zones", {}), (*where, "zones"))
        for zname, zspec in zones.items():
            zwhere = (*where, "zones", zname)
            if not NAME_RE.match(zname):
                raise r.error(zwhere, f"zone name {zname!r}: a name is {NAME_RULE}")
            zspec = r.table(zspec, zwhere)
            r.check_keys(zspec, ["rect", "motion", "motion_threshold", "max_interval"], zwhere)
            if "rect" not in zspec:
                raise r.error(zwhere, f"zone {name}/{zname} needs rect = [x, y, width, height]")
            try:
                rect = parse_rect(zspec["rect"], f"{name}/{zname}")
            except ConfigError as exc:
                raise r.error((*zwhere, "rect"), str(exc)) from None
            zone = ZoneConfig(name=zname, rect=rect, motion=bool(r.value(zspec, "motion", bool, zwhere)))
            for key in ("motion_threshold", "max_interval"):
                value = r.value(zspec, key, float, zwhere)
                if value is not None:
                    setattr(zone, key, value)
            try:
                check_zone(zone, f"{name}/{zname}")
            except ConfigError as exc:
                raise r.error(zwhere, str(exc)) from None
            cam.zones.append(zone)
        cfg.cameras.append(cam)
    try:
        finish(cfg)
    except ConfigError as exc:
        raise r.error(getattr(exc, "where", ()), str(exc)) from None
    return cfg


def _path(value: str | None, base: Path) -> Path | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def check_zone(zone: ZoneConfig, whole: str) -> None:
    if not 0 < zone.motion_threshold <= 1:
        raise ConfigError(f"zone {whole}: motion_threshold must be a fraction in (0, 1], got {zone.motion_threshold}")
    if not 0 < zone.max_interval <= 86400:
        raise ConfigError(f"zone {whole}: max_interval must be seconds in (0, 86400], got {zone.max_interval}")


def _error_at(where: tuple[str, ...], message: str) -> ConfigError:
    exc = ConfigError(message)
    exc.where = where  # type: ignore[attr-defined]
    return exc


def finish(cfg: RunConfig) -> RunConfig:
    """Checks that need the whole configuration; a camera 0 when none was given."""
    if not cfg.cameras:
        cfg.cameras = [CameraConfig(name="camera0", camera="0", named=False)]
    if len(cfg.cameras) > MAX_CAMERAS:
        raise _error_at(("cameras",), f"{len(cfg.cameras)} cameras; edgesqz runs at most {MAX_CAMERAS} in one process")
    seen: dict[str, str] = {}
    for cam in cfg.cameras:
        where = ("cameras", cam.name)
        if (cam.camera is None) == (cam.source is None):
            raise _error_at(where, f"camera {cam.name!r}: give exactly one of a camera or a source")
        key = f"camera {cam.camera.strip().lower()}" if cam.camera is not None else f"source {cam.source}"
        if cam.source is not None and "://" not in cam.source:
            with_path = Path(cam.source)
            key = f"source {with_path.resolve() if with_path.exists() else with_path}"
        if key in seen:
            raise _error_at(where, f"cameras {seen[key]!r} and {cam.name!r} are the same {key.split()[0]} "
                                   f"({key.split(' ', 1)[1]}); list each camera once")
        seen[key] = cam.name
        if len(cam.zones) > MAX_ZONES:
            raise _error_at((*where, "zones"), f"camera {cam.name!r} has {len(cam.zones)} zones; at most {MAX_ZONES} "
                                               "(each costs one model invocation per frame)")
        names = [z.name for z in cam.zones]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise _error_at((*where, "zones", n), f"camera {cam.name!r} has two zones called {n!r}")
        for value, what in ((cam.width, "width"), (cam.height, "height")):
            if value is not None and not 0 < value <= 10000:
                raise _error_at((*where, what), f"--{what} must be > 0 and at most 10000 pixels (camera "
                                                f"{cam.name!r}), got {value}")
        if cam.fps is not None and not (math.isfinite(cam.fps) and 0 < cam.fps <= 1000):
            raise _error_at((*where, "fps"), f"--fps must be > 0 and at most 1000 (camera {cam.name!r}), got "
                                             f"{cam.fps:g}")
    names = [c.name for c in cfg.cameras]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise _error_at(("cameras", n), f"two cameras are called {n!r}")
    if cfg.motion_gate is not None and not 0 < cfg.motion_gate <= 86400:
        raise _error_at(("motion_gate",), f"--motion-gate must be seconds in (0, 86400], got {cfg.motion_gate}")
    if cfg.top_k < 1:
        raise _error_at(("top_k",), f"--top-k must be >= 1, got {cfg.top_k}")
    if not 0.0 <= cfg.threshold <= 1.0:
        raise _error_at(("threshold",), f"--threshold must be between 0 and 1, got {cfg.threshold}")
    if cfg.threads is not None and not 1 <= cfg.threads <= 64:
        raise _error_at(("threads",), f"--threads must be 1..64, got {cfg.threads}")
    return cfg


# --------------------------------------------------------------------------- flags over the file


def from_flags(cfg: RunConfig | None, flags: Mapping[str, Any], *, cameras: Sequence[str] = (),
               sources: Sequence[str] = (), zones: Sequence[str] = ()) -> RunConfig:
    """The configuration the flags describe, over ``cfg`` (a site file's) when given.

    ``flags``: option name -> value, None for "not given". Lists (``events.rules``, ``webhooks``)
    given on the command line replace the file's. ``--camera``/``--source`` replace the file's
    cameras; ``--zone [CAMERA/]NAME=...`` adds (or replaces) a zone of a camera.
    """
    cfg = dataclasses.replace(cfg) if cfg is not None else RunConfig()
    cfg.serve = dataclasses.replace(cfg.serve)
    cfg.events = dataclasses.replace(cfg.events)
    cfg.mqtt = dataclasses.replace(cfg.mqtt)
    cfg.collect = dataclasses.replace(cfg.collect)
    cfg.cameras = [dataclasses.replace(c, zones=list(c.zones)) for c in cfg.cameras]
    for key, value in flags.items():
        if value is None or key.startswith("camera."):  # camera.*: for every camera, below
            continue
        obj: Any = cfg
        attr = key
        if "." in key:
            part, attr = key.split(".", 1)
            obj = getattr(cfg, part)
        setattr(obj, attr, list(value) if isinstance(value, (list, tuple)) else value)
    given = [("camera", c) for c in cameras] + [("source", s) for s in sources]
    if given:
        new: list[CameraConfig] = []
        taken: set[str] = set()
        for kind, text in given:
            name, spec = parse_source_spec(text, kind=kind)
            cam = CameraConfig(name=name or "", named=name is not None, **{kind: spec})
            if name is not None:
                cam.name = parse_name(name, f"--{kind}")
            new.append(cam)
            taken.add(cam.name)
        for cam in new:
            if not cam.name:
                cam.name = _default_name(cam, taken)
                taken.add(cam.name)
        cfg.cameras = new
    elif not cfg.cameras:
        cfg.cameras = [CameraConfig(name="camera0", camera="0", named=False)]
    for key in ("width", "height", "fps", "loop"):
        value = flags.get(f"camera.{key}")
        if value is not None:
            for cam in cfg.cameras:
                if key == "loop" and len(cfg.cameras) > 1 and (cam.source is None or "://" in cam.source):
                    continue  # several cameras: --loop is for the video files among them
                setattr(cam, key, value)
    given_zones: set[tuple[str | None, str]] = set()
    for text in zones:
        cam_name, zone = parse_zone(text)
        if (cam_name, zone.name) in given_zones:
            raise ConfigError(f"--zone {zone.name} is given twice; each zone of a camera has its own name")
        given_zones.add((cam_name, zone.name))
        if cam_name is None:
            if len(cfg.cameras) > 1:
                raise ConfigError(f"--zone {text!r}: there are {len(cfg.cameras)} cameras; say which: "
                                  f"--zone CAMERA/{zone.name}=... (cameras: {', '.join(c.name for c in cfg.cameras)})")
            cam = cfg.cameras[0]
        else:
            cam = cfg.camera(cam_name)
        cam.zones = [z for z in cam.zones if z.name != zone.name] + [zone]
    if cfg.motion_gate is not None:
        for cam in cfg.cameras:
            for zone in cam.zones:
                zone.motion, zone.max_interval = True, cfg.motion_gate
    return finish(cfg)


# --------------------------------------------------------------------------- printing


def to_toml_dict(cfg: RunConfig, *, redact: bool = True) -> dict[str, Any]:
    """The configuration as the site file's TOML structure (None values left out; secrets as ``***``)."""
    out: dict[str, Any] = {}
    for key in _TOP:
        value = getattr(cfg, key)
        if value is None or value == []:
            continue
        out[key] = os.path.abspath(value) if isinstance(value, Path) else value  # the file may be saved elsewhere
    for table, obj in (("serve", cfg.serve), ("events", cfg.events), ("mqtt", cfg.mqtt), ("collect", cfg.collect)):
        values = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None or value == [] or value is False:
                continue
            if redact and (table, f.name) in SECRET_KEYS:
                value = "***"
            values[f.name] = os.path.abspath(value) if isinstance(value, Path) else value
        if values:
            out[table] = values
    cams: dict[str, Any] = {}
    for cam in cfg.cameras:
        c: dict[str, Any] = {}
        for key in ("camera", "source", "width", "height", "fps"):
            if getattr(cam, key) is not None:
                c[key] = getattr(cam, key)
        if cam.source is not None and "://" not in cam.source:
            c["source"] = os.path.abspath(cam.source)
        if cam.loop:
            c["loop"] = True
        if cam.zones:
            c["zones"] = {z.name: {"rect": z.rect.to_toml(), **({"motion": True, "motion_threshold": z.motion_threshold,
                                                                  "max_interval": z.max_interval} if z.motion else {})}
                          for z in cam.zones}
        cams[cam.name] = c
    out["cameras"] = cams
    if redact and out.get("mqtt", {}).get("url"):
        out["mqtt"]["url"] = _redact_url(out["mqtt"]["url"])
    return out


def _redact_url(url: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return url.replace(parts.netloc, f"{user}:***@{netloc[1]}", 1)


def dumps_toml(cfg: RunConfig, *, redact: bool = True) -> str:
    import tomli_w

    return tomli_w.dumps(to_toml_dict(cfg, redact=redact))
