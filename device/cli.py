"""``edgesqz run`` and ``edgesqz classify``: thin layers over :class:`Pipeline` and :class:`Classifier`.

``register(app)`` adds both commands to the main Typer app. Progress and facts (model, backend,
XNNPACK coverage, source, summary) go to stderr, so stdout carries only results (JSON lines with
``--json``). Errors a user can fix print one ``error: ...`` line and exit non-zero, with no
traceback, whichever app the commands are registered on.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from edgesqz.device.models import ORIGINS, ModelChoice, choose_model
from edgesqz.errors import EdgesqzError

F = TypeVar("F", bound=Callable[..., Any])

METADATA_PANEL = "Models without metadata"
SERVE_PANEL = "Live web preview"
EVENTS_PANEL = "Events"
NOTIFY_PANEL = "MQTT and webhooks"


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


def _floats(value: str | None, name: str) -> list[float] | None:
    if value is None:
        return None
    try:
        values = [float(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise EdgesqzError(f"{name} takes one number or three separated by commas, not {value!r}")
    return values


def _classifier(model: Path | ModelChoice | None, *, threads: int | None, delegate: str | None, top_k: int,
                threshold: float, labels: Path | None, crop_fraction: float | None, color_order: str | None,
                mean: str | None, std: str | None, output_kind: str | None) -> Any:
    from edgesqz.device.classifier import Classifier

    choice = model if isinstance(model, ModelChoice) else choose_model(model)
    classifier = Classifier(choice.path, threads=threads, delegate=delegate, top_k=top_k, threshold=threshold,
                            labels=labels, crop_fraction=crop_fraction, color_order=color_order,
                            mean=_floats(mean, "--mean"), std=_floats(std, "--std"), output_kind=output_kind)
    _info(f"model: {classifier.describe_model()}" + ("" if choice.origin == "option" else
                                                      f"; {ORIGINS[choice.origin]}"))
    _info(f"runtime: {classifier.describe_runtime()}")
    return classifier


def _serve_sink(address: str | None, token: str | None, max_viewers: int | None) -> Any:
    """The ``--serve`` sink, its socket already bound (so a bad address or a busy port fails first), or None."""
    if address is None:
        for name, value in (("--token", token), ("--max-viewers", max_viewers)):
            if value is not None:
                raise EdgesqzError(f"{name} needs --serve [HOST:]PORT")
        return None
    from edgesqz.device.serve import DEFAULT_MAX_VIEWERS, ServeSink

    viewers = DEFAULT_MAX_VIEWERS if max_viewers is None else max_viewers
    sink = ServeSink(address, token=token, max_viewers=viewers)
    _info(f"serving: {sink.url} (stream /stream.mjpg, events /events, status /status; {viewers} viewers at most)")
    return sink


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
    camera: Annotated[str | None, typer.Option(
        "--camera", help="Camera index (OpenCV/V4L2 USB camera) or 'picamera2' (Raspberry Pi camera module); "
                         "camera 0 when there is no --source.")] = None,
    source: Annotated[str | None, typer.Option(
        "--source", help="Video file, RTSP/HTTP stream URL, image file or folder of images.")] = None,
    width: Annotated[int | None, typer.Option("--width", help="Requested camera frame width.")] = None,
    height: Annotated[int | None, typer.Option("--height", help="Requested camera frame height.")] = None,
    fps: Annotated[float | None, typer.Option(
        "--fps", help="Requested camera frame rate; with a video file, play it live at this rate.")] = None,
    threads: ThreadsOpt = None,
    delegate: DelegateOpt = None,
    top_k: TopKOpt = 5,
    threshold: Annotated[float, typer.Option(
        "--threshold", help="Leave out classes scoring below this probability.")] = 0.0,
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
    reconnect: Annotated[str, typer.Option(
        "--reconnect", metavar="N|TIME|forever",
        help="When a camera or stream disappears, reopen it with back-off: N times (0: never), for a time "
             "(90s, 10m, 2h) or forever.")] = "5",
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
    webhook: Annotated[list[str] | None, typer.Option(
        "--webhook", metavar="URL", rich_help_panel=NOTIFY_PANEL,
        help="POST each event start and end as JSON to this URL (repeatable); retried with back-off, in the "
             "background.")] = None,
) -> None:
    """Classify frames from a camera, a video, a stream or images in real time."""
    from edgesqz.device.options import check_run
    from edgesqz.device.pipeline import Pipeline
    from edgesqz.device.sinks import (
        ConsoleSink,
        JsonLinesSink,
        Sink,
        VideoRecordSink,
        WindowSink,
        display_status,
    )
    from edgesqz.device.sources import open_source, parse_reconnect
    from edgesqz.fileio import check_distinct, check_output

    check_run(events=event, event_start=event_start, event_end=event_end, preroll=preroll, keep=keep,
              max_disk=max_disk, mqtt=mqtt, mqtt_discovery_prefix=mqtt_discovery, device=device_id, webhooks=webhook)
    retry = parse_reconnect(reconnect)
    choice = choose_model(model)
    # Outputs are checked before anything is opened: never an input, never an existing file without --force.
    inputs = [("--model", choice.path), ("--source", source), ("--labels", labels)]
    check_distinct([("--output", output), ("--record", record)])
    sinks: list[Sink] = []
    if record is not None:
        sinks.append(VideoRecordSink(record, force=force, inputs=inputs))
    if output is not None:
        output = check_output(output, force=force, what="--output", option="--output", inputs=inputs,
                              create_parents=False)
    with contextlib.ExitStack() as undo:  # closes what was opened when setting up fails; then the pipeline does
        server = _serve_sink(serve, token, max_viewers)
        if server is not None:
            undo.callback(server.close)
        frame_source = open_source(camera=camera, source=source, width=width, height=height, fps=fps, retry=retry,
                                   loop=loop)
        frame_source.open()  # a missing camera or an unreadable video fails here, before the model loads
        undo.callback(frame_source.close)
        classifier = _classifier(choice, threads=threads, delegate=delegate, top_k=top_k, threshold=threshold,
                                 labels=labels, crop_fraction=crop_fraction, color_order=color_order, mean=mean,
                                 std=std, output_kind=output_kind)
        window = False
        if not no_display:
            window, why = display_status()
            _info(f"display: {why}" if window else f"display: none, running headless ({why})")
        if window:
            sinks.append(WindowSink())
        if json_lines:
            sinks.append(JsonLinesSink(sys.stdout))
        if output is not None:
            sinks.append(JsonLinesSink(output, force=force))
        if server is not None:
            sinks.append(server)
        elif not json_lines and not window:
            sinks.append(ConsoleSink())
        from edgesqz.device.eventsink import event_sink

        events = event_sink(event, start_s=event_start, end_s=event_end, snapshot_dir=snapshot_dir,
                            clip_dir=clip_dir, preroll_s=preroll, keep=keep, max_disk_mb=max_disk, mqtt=mqtt,
                            mqtt_discovery=mqtt_discovery, mqtt_ca=mqtt_ca, webhooks=webhook, device_id=device_id,
                            classifier=classifier, json_sinks=[s for s in sinks if isinstance(s, JsonLinesSink)],
                            server=server, info=_info)
        if events is not None:  # after the JSON sinks: a frame's line comes before the event it starts
            undo.callback(events.close)
            sinks.append(events)
        pipeline = Pipeline(frame_source, classifier, sinks, top_k=top_k, threshold=threshold,
                            max_frames=max_frames, duration=duration)
        undo.pop_all()
    size = frame_source.frame_size
    details = [f"{size[0]}x{size[1]}" if size else "", f"{frame_source.fps:g} fps" if frame_source.fps else "",
               "live: newest frame only" if frame_source.live else ""]
    _info(f"source: {frame_source.description}" + (f" ({', '.join(d for d in details if d)})" if any(details) else ""))
    if (width or height) and not frame_source.live:
        _info("note: --width/--height are requests to a camera; files are read at their own size")
    recorder = next((sink for sink in sinks if isinstance(sink, VideoRecordSink)), None)
    try:
        summary = pipeline.run()
    except EdgesqzError:
        if pipeline.summary.frames:  # e.g. the camera went away after a while: still say what was done
            _info(pipeline.summary.describe())
            if recorder is not None and recorder.saved:
                _info(f"recorded {record} ({recorder.frames} frames before the error)")
        raise
    _info(summary.describe())
    if recorder is not None:
        _info(f"recorded {record} ({recorder.frames} frames)" if recorder.saved else "nothing recorded (no frames)")


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
                                    latency_ms={k: round(v, 3) for k, v in latency.items()})))
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
