"""``edgesqz run`` and ``edgesqz classify``: thin layers over :class:`Pipeline` and :class:`Classifier`.

``register(app)`` adds both commands to the main Typer app. Progress and facts (model, backend,
XNNPACK coverage, source, summary) go to stderr, so stdout carries only results (JSON lines with
``--json``). Errors a user can fix print one ``error: ...`` line and exit non-zero, with no
traceback, whichever app the commands are registered on.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from edgesqz.device.models import ModelChoice, choose_model
from edgesqz.errors import EdgesqzError

F = TypeVar("F", bound=Callable[..., Any])

METADATA_PANEL = "Models without metadata"
SERVE_PANEL = "Live web preview"
EVENTS_PANEL = "Events"
NOTIFY_PANEL = "MQTT and webhooks"
SITE_PANEL = "Cameras, zones and site file"
COLLECT_PANEL = "Collecting training images"


def _info(message: str) -> None:
    _say(message, None)


def _say(message: str, colour: str | None = typer.colors.RED) -> None:
    """A line on stderr; nothing when stderr is gone (the terminal of a dropped SSH session)."""
    with contextlib.suppress(OSError):
        typer.secho(message, err=True, fg=colour)


def _errors_as_one_line(func: F) -> F:
    """Turn EdgesqzError into ``error: ...`` on stderr and the error's exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EdgesqzError as exc:
            if exc.exit_code:  # 0: stdout's reader went away (`| head`), nothing to say
                _say(f"error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:  # a second Ctrl-C during a run
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def resolve_model(model: Path | None) -> Path:
    """``--model``, else ``EDGESQZ_MODEL``, else the model ``convert`` last wrote, else the installed default."""
    return choose_model(model).path


def _classifier(model: Path | ModelChoice | None, *, threads: int | None, delegate: str | None, top_k: int,
                threshold: float, labels: Path | None, crop_fraction: float | None, color_order: str | None,
                mean: str | None, std: str | None, output_kind: str | None) -> Any:
    from edgesqz.device.runner import make_classifier

    return make_classifier(model, threads=threads, delegate=delegate, top_k=top_k, threshold=threshold, labels=labels,
                           crop_fraction=crop_fraction, color_order=color_order, mean=mean, std=std,
                           output_kind=output_kind, info=_info)


# Options shared by run and classify for models without metadata.
LabelsOpt = Annotated[Path | None, typer.Option(
    "--labels", help="Labels file (one per line, or JSON); overrides the model's own.", rich_help_panel=METADATA_PANEL,
    readable=False)]  # readable=False: edgesqz's own readers say what is wrong, in one line
CropOpt = Annotated[float | None, typer.Option(
    "--crop-fraction", help="Centre crop as a fraction of the shorter side (default: metadata, else 0.875).",
    rich_help_panel=METADATA_PANEL)]
ColorOpt = Annotated[str | None, typer.Option(
    "--color-order", help="RGB or BGR model input (default: metadata, else RGB).", rich_help_panel=METADATA_PANEL)]
MeanOpt = Annotated[str | None, typer.Option(
    "--mean", help="Input normalisation (pixel - mean) / std: one value or R,G,B (default: metadata, else 0).",
    rich_help_panel=METADATA_PANEL)]
StdOpt = Annotated[str | None, typer.Option(
    "--std", help="See --mean (default: metadata, else 1).", rich_help_panel=METADATA_PANEL)]
KindOpt = Annotated[str | None, typer.Option(
    "--output-kind", help="logits, probabilities or class_map (default: metadata, else from the graph).",
    rich_help_panel=METADATA_PANEL)]
ModelOpt = Annotated[Path | None, typer.Option(
    "--model", "-m", help="The .tflite model (default: the one `edgesqz convert` wrote last).", readable=False)]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="Interpreter threads (default: one per CPU core).")]
DelegateOpt = Annotated[str | None, typer.Option(
    "--delegate", help="edgetpu, edgetpu:usb, edgetpu:usb:0, edgetpu:pci (Coral Edge TPU).")]
TopKOpt = Annotated[int, typer.Option("--top-k", "-k", help="How many classes to report per frame.")]


@_errors_as_one_line
def run(
    model: ModelOpt = None,
    camera: Annotated[list[str] | None, typer.Option(
        "--camera", metavar="[NAME=]N|picamera2:N|v4l2:N", rich_help_panel=SITE_PANEL,
        help="A camera (repeatable): N is the Raspberry Pi camera module N when Picamera2 sees one (libcamera), "
             "else the USB camera /dev/videoN; picamera2:N or v4l2:N force one. Camera 0 when there is no "
             "--source.")] = None,
    source: Annotated[list[str] | None, typer.Option(
        "--source", metavar="[NAME=]PATH_OR_URL", rich_help_panel=SITE_PANEL,
        help="Video file, RTSP/HTTP stream URL, image file or folder of images (repeatable: several cameras in "
             "one process).")] = None,
    zone: Annotated[list[str] | None, typer.Option(
        "--zone", metavar="[CAMERA/]NAME=X,Y,W,H", rich_help_panel=SITE_PANEL,
        help="Classify this rectangle of the frame on its own (repeatable): fractions of the frame (0..1), or "
             "pixels with px (64px,48px,224px,224px). Without --zone, the whole frame.")] = None,
    motion_gate: Annotated[float | None, typer.Option(
        "--motion-gate", metavar="SECONDS", rich_help_panel=SITE_PANEL,
        help="Classify a zone only when something moved in it, and at least every SECONDS (motion gating).")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", rich_help_panel=SITE_PANEL, readable=False,
        help="A site file (TOML, docs/site.md): cameras, zones, model, events, MQTT, ...; flags override it.")] = None,
    collect: Annotated[Path | None, typer.Option(
        "--collect", metavar="DIR", rich_help_panel=COLLECT_PANEL,
        help="Save frames (zone crops with zones) as a dataset for `edgesqz train --data DIR`: DIR/_unsorted/ for "
             "you to sort, DIR/LABEL/ from the page's 'save as' control, DIR/manifest.jsonl. Every 30 s unless "
             "another policy is given.")] = None,
    collect_every: Annotated[float | None, typer.Option(
        "--collect-every", metavar="SECONDS", rich_help_panel=COLLECT_PANEL,
        help="Save a frame of each camera/zone every SECONDS.")] = None,
    collect_unsure: Annotated[float | None, typer.Option(
        "--collect-unsure", metavar="SCORE", rich_help_panel=COLLECT_PANEL,
        help="Save frames whose top-1 score is below SCORE (the model is unsure).")] = None,
    collect_margin: Annotated[float | None, typer.Option(
        "--collect-margin", metavar="M", rich_help_panel=COLLECT_PANEL,
        help="Save frames whose top-1 and top-2 scores are less than M apart.")] = None,
    collect_events: Annotated[bool, typer.Option(
        "--collect-events", rich_help_panel=COLLECT_PANEL, help="Save a frame at each event start.")] = False,
    collect_max_files: Annotated[int | None, typer.Option(
        "--collect-max-files", rich_help_panel=COLLECT_PANEL,
        help="At most this many images (default 2000): the oldest unsorted go first.")] = None,
    collect_max_mb: Annotated[float | None, typer.Option(
        "--collect-max-mb", metavar="MB", rich_help_panel=COLLECT_PANEL,
        help="At most this many megabytes (default 500).")] = None,
    print_config: Annotated[bool, typer.Option(
        "--print-config", rich_help_panel=SITE_PANEL,
        help="Print the effective configuration (site file + flags) as TOML and exit.")] = False,
    width: Annotated[int | None, typer.Option("--width", help="Requested camera frame width.")] = None,
    height: Annotated[int | None, typer.Option("--height", help="Requested camera frame height.")] = None,
    fps: Annotated[float | None, typer.Option(
        "--fps", help="Requested camera frame rate; with a video file, play it live at this rate.")] = None,
    threads: ThreadsOpt = None,
    delegate: DelegateOpt = None,
    top_k: Annotated[int | None, typer.Option("--top-k", "-k", help="How many classes to report per frame "
                                                                       "(and zone; default 5).")] = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", help="Leave out classes scoring below this probability (per zone; default 0).")] = None,
    max_frames: Annotated[int | None, typer.Option("--max-frames", help="Stop after this many frames.")] = None,
    duration: Annotated[float | None, typer.Option("--duration", help="Stop after this many seconds.")] = None,
    json_lines: Annotated[bool, typer.Option(
        "--json", help="One JSON object per frame on stdout, then the run summary.")] = False,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the JSON lines (and the summary) to this .jsonl file, as they come.")] = None,
    record: Annotated[Path | None, typer.Option(
        "--record", help="Write the annotated frames to this video (.mp4 or .avi); it appears when the run "
                         "ends.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace existing --output / --record files.")] = False,
    reconnect: Annotated[str | None, typer.Option(
        "--reconnect", metavar="N|TIME|forever",
        help="When a camera or stream disappears, reopen it with back-off: N times (0: never), for a time "
             "(90s, 10m, 2h) or forever (default 5).")] = None,
    loop: Annotated[bool, typer.Option(
        "--loop", help="Play a video file again and again (with --fps: an endless camera rehearsal).")] = False,
    no_display: Annotated[bool, typer.Option(
        "--no-display", help="Never open a window (headless is automatic without a display).")] = False,
    serve: Annotated[str | None, typer.Option(
        "--serve", metavar="[HOST:]PORT", rich_help_panel=SERVE_PANEL,
        help="Serve a live page (annotated stream, top-k, FPS, latency) while running; listens on 127.0.0.1 "
             "unless HOST is given (0.0.0.0: every interface).")] = None,
    token: Annotated[str | None, typer.Option(
        "--token", rich_help_panel=SERVE_PANEL,
        help="With --serve: require this token on every request (?token=TOKEN, or Authorization: Bearer).")] = None,
    max_viewers: Annotated[int | None, typer.Option(
        "--max-viewers", rich_help_panel=SERVE_PANEL,
        help="With --serve: viewers allowed at once (default 4); more get HTTP 503.")] = None,
    labels: LabelsOpt = None,
    crop_fraction: CropOpt = None,
    color_order: ColorOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    output_kind: KindOpt = None,
    event: Annotated[list[str] | None, typer.Option(
        "--event", metavar="[NAME=]LABEL[,LABEL...][>=SCORE]", rich_help_panel=EVENTS_PANEL,
        help="Watch for a label (repeatable): an event starts when it is top-1 (or its score >= SCORE) for "
             "--event-start seconds and ends after --event-end seconds without it. Several labels form one group, "
             "e.g. 'cat=tabby,tiger cat,Egyptian cat>=0.5'.")] = None,
    event_start: Annotated[float | None, typer.Option(
        "--event-start", metavar="SECONDS", rich_help_panel=EVENTS_PANEL,
        help="How long a label must be there before its event starts (default 0.5).")] = None,
    event_end: Annotated[float | None, typer.Option(
        "--event-end", metavar="SECONDS", rich_help_panel=EVENTS_PANEL,
        help="How long it must be gone before its event ends (default 2.0).")] = None,
    snapshot_dir: Annotated[Path | None, typer.Option(
        "--snapshot-dir", rich_help_panel=EVENTS_PANEL,
        help="Save each event's best frame here: ID.jpg (annotated) and ID.raw.jpg.")] = None,
    clip_dir: Annotated[Path | None, typer.Option(
        "--clip-dir", rich_help_panel=EVENTS_PANEL,
        help="Save a video of each event here (ID.mp4), from --preroll seconds before it started.")] = None,
    preroll: Annotated[float | None, typer.Option(
        "--preroll", metavar="SECONDS", rich_help_panel=EVENTS_PANEL,
        help="Seconds of video before an event in its clip (default 3; kept in memory as JPEGs).")] = None,
    keep: Annotated[int | None, typer.Option(
        "--keep", rich_help_panel=EVENTS_PANEL,
        help="Keep the files of the newest N events, deleting the oldest (default 100).")] = None,
    max_disk: Annotated[float | None, typer.Option(
        "--max-disk", metavar="MB", rich_help_panel=EVENTS_PANEL,
        help="Also delete the oldest events' files while they take more than MB megabytes.")] = None,
    mqtt: Annotated[str | None, typer.Option(
        "--mqtt", metavar="mqtt[s]://[USER:PASS@]HOST[:PORT][/PREFIX]", rich_help_panel=NOTIFY_PANEL,
        help="Publish events, rule states, the current label and online/offline to this MQTT broker, under "
             "PREFIX/DEVICE/ (prefix default 'edgesqz'), with Home Assistant discovery.")] = None,
    mqtt_discovery: Annotated[str | None, typer.Option(
        "--mqtt-discovery", metavar="PREFIX|off", rich_help_panel=NOTIFY_PANEL,
        help="Home Assistant's discovery prefix (default homeassistant), or off.")] = None,
    mqtt_ca: Annotated[Path | None, typer.Option(
        "--mqtt-ca", rich_help_panel=NOTIFY_PANEL, readable=False,
        help="With mqtts://: the CA certificate (PEM) of a broker with its own certificate authority.")] = None,
    device_id: Annotated[str | None, typer.Option(
        "--device-id", rich_help_panel=NOTIFY_PANEL,
        help="This camera's id in MQTT topics and events (default: the host name).")] = None,
    trust: Annotated[Path | None, typer.Option(
        "--trust", metavar="KEY.pub", rich_help_panel=NOTIFY_PANEL, readable=False,
        help="With --mqtt: accept models deployed with `edgesqz deploy` and signed by this public key, and swap "
             "them in without stopping (without --trust, remote deployment is off).")] = None,
    webhook: Annotated[list[str] | None, typer.Option(
        "--webhook", metavar="URL", rich_help_panel=NOTIFY_PANEL,
        help="POST each event start and end as JSON to this URL (repeatable); retried with back-off, in the "
             "background.")] = None,
) -> None:
    """Classify frames from cameras, videos, streams or images in real time (whole frames or zones)."""
    from edgesqz.device.config import dumps_toml, from_flags, load_config
    from edgesqz.device.runner import run_site
    from edgesqz.device.sources import parse_reconnect

    flags: dict[str, Any] = {
        "model": model, "threads": threads, "delegate": delegate, "top_k": top_k, "threshold": threshold,
        "labels": labels, "crop_fraction": crop_fraction, "color_order": color_order, "mean": mean, "std": std,
        "output_kind": output_kind, "max_frames": max_frames, "duration": duration, "json": json_lines or None,
        "output": output, "record": record, "force": force or None, "reconnect": reconnect,
        "display": False if no_display else None, "motion_gate": motion_gate, "webhooks": webhook,
        "serve.address": serve, "serve.token": token, "serve.max_viewers": max_viewers,
        "events.rules": event, "events.start": event_start, "events.end": event_end,
        "events.snapshot_dir": snapshot_dir, "events.clip_dir": clip_dir, "events.preroll": preroll,
        "events.keep": keep, "events.max_disk": max_disk, "mqtt.url": mqtt, "mqtt.discovery": mqtt_discovery,
        "mqtt.ca": mqtt_ca, "mqtt.device_id": device_id, "mqtt.trust": trust,
        "camera.width": width, "camera.height": height, "camera.fps": fps, "camera.loop": loop or None,
        "collect.dir": collect, "collect.every": collect_every, "collect.unsure": collect_unsure,
        "collect.margin": collect_margin, "collect.events": collect_events or None,
        "collect.max_files": collect_max_files, "collect.max_mb": collect_max_mb,
    }
    site = load_config(config) if config is not None else None
    cfg = from_flags(site, flags, cameras=camera or (), sources=source or (), zones=zone or ())
    parse_reconnect(cfg.reconnect)
    if print_config:
        typer.echo(dumps_toml(cfg), nl=False)
        return
    run_site(cfg, info=_info)


@_errors_as_one_line
def classify(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.", show_default=False,
                                                                readable=False)],
    model: ModelOpt = None,
    top_k: TopKOpt = 5,
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout.")] = False,
    threads: ThreadsOpt = None,
    delegate: DelegateOpt = None,
    labels: LabelsOpt = None,
    crop_fraction: CropOpt = None,
    color_order: ColorOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    output_kind: KindOpt = None,
) -> None:
    """Print the top-k classes of each image (a table, or JSON lines with --json)."""
    import time

    from edgesqz.imaging import list_images, read_image
    from edgesqz.schema import dumps, record

    paths: list[Path] = []
    for item in images:
        if not item.exists():
            raise EdgesqzError(f"image {item} does not exist")
        found = list_images(item) if item.is_dir() else [item]
        if not found:
            raise EdgesqzError(f"no images in folder {item}")
        paths.extend(found)
    classifier = _classifier(model, threads=threads, delegate=delegate, top_k=top_k, threshold=0.0, labels=labels,
                             crop_fraction=crop_fraction, color_order=color_order, mean=mean, std=std,
                             output_kind=output_kind)
    rows: list[tuple[str, list[dict[str, Any]], float]] = []
    failed: list[str] = []
    for i, path in enumerate(paths):
        try:
            t0 = time.perf_counter()
            image = read_image(path)
            timestamp = time.time()
            out = classifier.scores(image)
            top = classifier.top(out.scores, top_k)
            end_to_end = (time.perf_counter() - t0) * 1e3
        except EdgesqzError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            failed.append(str(path))
            continue
        latency = {**out.timings, "end_to_end": end_to_end}
        if json_lines:
            typer.echo(dumps(record("classification", source=str(path), frame=i, image=str(path),
                                    timestamp=round(timestamp, 6), top_k=top,
                                    latency_ms={k: round(v, 3) for k, v in latency.items()},
                                    model=classifier.identity)))
        rows.append((str(path), top, latency["inference"]))
    if not json_lines and rows:
        _print_table(rows)
    if failed:
        raise typer.Exit(2)


def _print_table(rows: list[tuple[str, list[dict[str, Any]], float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("image", overflow="fold")
    table.add_column("#", justify="right")
    table.add_column("label")
    table.add_column("score", justify="right")
    table.add_column("ms", justify="right")
    for path, top, ms in rows:
        for rank, p in enumerate(top, 1):
            table.add_row(Path(path).name if rank == 1 else "", str(rank), p["label"], f"{p['score']:.4f}",
                          f"{ms:.1f}" if rank == 1 else "")
    Console(soft_wrap=False, width=max(100, Console().width)).print(table)


def register(app: typer.Typer) -> None:
    """Add ``run`` and ``classify`` to ``app`` (the main ``edgesqz`` app calls this)."""
    app.command("run")(run)
    app.command("classify")(classify)
