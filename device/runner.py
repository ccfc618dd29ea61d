"""``edgesqz run`` as a library call: :func:`run_site` reads a :class:`RunConfig` and runs it.

The command line and a site file both fill the one :class:`~edgesqz.device.config.RunConfig`;
this module is the only reader: it opens the cameras (each with its own reader thread), loads the
model once (one interpreter for every camera and zone), builds the sinks (window, JSON lines,
recording, web page, events with MQTT and webhooks) and runs the :class:`Pipeline`::

    from edgesqz.device.config import load_config
    from edgesqz.device.runner import run_site

    summary = run_site(load_config("site.toml"))
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgesqz.device.config import RunConfig
from edgesqz.device.models import ORIGINS, ModelChoice, choose_model
from edgesqz.device.results import Summary
from edgesqz.errors import EdgesqzError


def _say(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(message, file=sys.stderr, flush=True)


def floats(value: str | None, name: str) -> list[float] | None:
    """``--mean``/``--std``: one number or R,G,B."""
    if value is None:
        return None
    try:
        values = [float(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise EdgesqzError(f"{name} takes one number or three separated by commas, not {value!r}")
    return values


def make_classifier(model: Path | ModelChoice | None, *, threads: int | None, delegate: str | None, top_k: int,
                    threshold: float, labels: Path | None, crop_fraction: float | None, color_order: str | None,
                    mean: str | None, std: str | None, output_kind: str | None,
                    info: Callable[[str], None] = _say) -> Any:
    """The one :class:`Classifier` of a run (model chosen as ``--model``, EDGESQZ_MODEL, latest, default)."""
    from edgesqz.device.classifier import Classifier

    choice = model if isinstance(model, ModelChoice) else choose_model(model)
    classifier = Classifier(choice.path, threads=threads, delegate=delegate, top_k=top_k, threshold=threshold,
                            labels=labels, crop_fraction=crop_fraction, color_order=color_order,
                            mean=floats(mean, "--mean"), std=floats(std, "--std"), output_kind=output_kind)
    info(f"model: {classifier.describe_model()}" + ("" if choice.origin == "option" else
                                                     f"; {ORIGINS[choice.origin]}"))
    info(f"runtime: {classifier.describe_runtime()}")
    return classifier


def serve_sink(cfg: RunConfig, info: Callable[[str], None] = _say) -> Any:
    """The ``--serve`` sink, its socket already bound (so a bad address or a busy port fails first), or None."""
    s = cfg.serve
    if s.address is None:
        for name, value in (("--token", s.token), ("--max-viewers", s.max_viewers)):
            if value is not None:
                raise EdgesqzError(f"{name} needs --serve [HOST:]PORT")
        return None
    from edgesqz.device.serve import DEFAULT_MAX_VIEWERS, ServeSink

    viewers = DEFAULT_MAX_VIEWERS if s.max_viewers is None else s.max_viewers
    sink = ServeSink(s.address, token=s.token, max_viewers=viewers)
    info(f"serving: {sink.url} (stream /stream.mjpg, events /events, status /status; {viewers} viewers at most)")
    return sink


def check_values(cfg: RunConfig) -> None:
    """Every event, MQTT and webhook value, checked before anything opens (device/options.py)."""
    from edgesqz.device.options import check_run

    ev, mq = cfg.events, cfg.mqtt
    check_run(events=ev.rules, event_start=ev.start, event_end=ev.end, preroll=ev.preroll, keep=ev.keep,
              max_disk=ev.max_disk, mqtt=mq.url, mqtt_discovery_prefix=mq.discovery, device=mq.device_id,
              webhooks=cfg.webhooks)


def open_cameras(cfg: RunConfig) -> list[Any]:
    """One :class:`CameraRun` per camera of the configuration, not started. With one camera, it is opened here
    (a missing camera or an unreadable video is an error now); with several, each opens in its own thread and
    one that does not open is retried with back-off while the others run."""
    from edgesqz.device.site import CameraRun
    from edgesqz.device.sources import open_source, parse_reconnect

    retry = parse_reconnect(cfg.reconnect)
    cams = []
    for cam in cfg.cameras:
        source = open_source(camera=cam.camera, source=cam.source, width=cam.width, height=cam.height, fps=cam.fps,
                             retry=retry, loop=cam.loop)
        cams.append(CameraRun(cam, source))
    return cams


def run_site(cfg: RunConfig, *, info: Callable[[str], None] = _say) -> Summary:
    """Run the configuration to its end (a limit, the sources' end, a signal); returns the run summary."""
    from edgesqz.device.eventsink import event_sink
    from edgesqz.device.pipeline import Pipeline
    from edgesqz.device.sinks import ConsoleSink, JsonLinesSink, Sink, VideoRecordSink, WindowSink, display_status
    from edgesqz.fileio import check_distinct, check_output

    check_values(cfg)
    choice = choose_model(cfg.model)
    receiver, swap_to = _receiver(cfg, info)  # with --trust: the model last deployed here runs from the start
    if receiver is not None and receiver.current_path is not None:
        choice = ModelChoice(receiver.current_path, "deployed")
    # Outputs are checked before anything is opened: never an input, never an existing file without --force.
    inputs: list[tuple[str, Any]] = [("--model", choice.path), ("--labels", cfg.labels)]
    inputs += [("--source", cam.source) for cam in cfg.cameras if cam.source is not None and "://" not in cam.source]
    if cfg.path is not None:
        inputs.append(("--config", cfg.path))
    check_distinct([("--output", cfg.output), ("--record", cfg.record)])
    sinks: list[Sink] = []
    if cfg.record is not None:
        if len(cfg.cameras) > 1:  # one video per camera: NAME.CAMERA.mp4
            for cam in cfg.cameras:
                path = cfg.record.with_name(f"{cfg.record.stem}.{cam.name}{cfg.record.suffix}")
                sinks.append(VideoRecordSink(path, force=cfg.force, inputs=inputs, camera=cam.name))
        else:
            sinks.append(VideoRecordSink(cfg.record, force=cfg.force, inputs=inputs))
    output = cfg.output
    if output is not None:
        output = check_output(output, force=cfg.force, what="--output", option="--output", inputs=inputs,
                              create_parents=False)
    cameras = open_cameras(cfg)
    with contextlib.ExitStack() as undo:  # closes what was opened when setting up fails; then the pipeline does
        server = serve_sink(cfg, info)
        if server is not None:
            undo.callback(server.close)
        if len(cameras) == 1:
            cameras[0].source.open()  # a missing camera or an unreadable video fails here, before the model loads
        for cam in cameras:
            undo.callback(cam.source.close)
        classifier = make_classifier(choice, threads=cfg.threads, delegate=cfg.delegate, top_k=cfg.top_k,
                                     threshold=cfg.threshold, labels=cfg.labels, crop_fraction=cfg.crop_fraction,
                                     color_order=cfg.color_order, mean=cfg.mean, std=cfg.std,
                                     output_kind=cfg.output_kind, info=info)
        if choice.origin == "deployed":
            classifier.version = (receiver.current or {}).get("version")
        window = False
        if cfg.display:
            window, why = display_status()
            info(f"display: {why}" if window else f"display: none, running headless ({why})")
        if window:
            sinks.append(WindowSink())
        if cfg.json:
            sinks.append(JsonLinesSink(sys.stdout))
        if output is not None:
            sinks.append(JsonLinesSink(output, force=cfg.force))
        if server is not None:
            sinks.append(server)
        elif not cfg.json and not window:
            sinks.append(ConsoleSink())
        collector = _collector(cfg, classifier, info)
        if collector is not None:
            sinks.append(collector)
            if server is not None:
                server.collector = collector
        ev, mq = cfg.events, cfg.mqtt
        events = event_sink(ev.rules or None, start_s=ev.start, end_s=ev.end, snapshot_dir=ev.snapshot_dir,
                            clip_dir=ev.clip_dir, preroll_s=ev.preroll, keep=ev.keep, max_disk_mb=ev.max_disk,
                            mqtt=mq.url, mqtt_discovery=mq.discovery, mqtt_ca=mq.ca, mqtt_password=mq.password,
                            webhooks=cfg.webhooks or None, device_id=mq.device_id, classifier=classifier,
                            json_sinks=[s for s in sinks if isinstance(s, JsonLinesSink)], server=server, info=info,
                            cameras=[c.name for c in cameras] if len(cameras) > 1 else None)
        if events is not None:  # after the JSON sinks: a frame's line comes before the event it starts
            undo.callback(events.close)
            sinks.append(events)
            if collector is not None and cfg.collect.events:
                events.outputs.append(collector.event_output())
        elif collector is not None and cfg.collect.events:
            raise EdgesqzError("--collect-events needs at least one --event LABEL")
        pipeline = Pipeline(cameras, classifier, sinks, top_k=cfg.top_k, threshold=cfg.threshold,
                            max_frames=cfg.max_frames, duration=cfg.duration)
        if events is not None:
            events.bind_pipeline(pipeline)  # zones and cameras: a rule naming no zone of this run fails now
        swapper = _swapper(cfg, pipeline, events, info)
        if receiver is not None:
            swap_to.append(swapper)
            for output in events.outputs if events is not None else ():
                if hasattr(output, "publish_model"):
                    output.publish_model = False  # the receiver reports on PREFIX/DEVICE/model
            swapper.on_result = functools.partial(_report_local_swap, receiver)
            receiver.start()
            undo.callback(receiver.close)
        if cfg.watch_model:
            from edgesqz.device.hotswap import ModelWatcher

            watcher = ModelWatcher(choice.path, swapper.offer).start()
            undo.callback(watcher.close)
        undo.pop_all()
    for cam in cameras:
        source = cam.source
        size = source.frame_size
        details = [f"{size[0]}x{size[1]}" if size else "", f"{source.fps:g} fps" if source.fps else "",
                   "live: newest frame only" if source.live else "",
                   f"zones {', '.join(f'{z.name}={z.rect_config.describe()}' for z in cam.zones)}" if cam.zones else ""]
        name = f"camera {cam.name}: " if pipeline.multi else ""
        info(f"source: {name}{source.description}" + (f" ({', '.join(d for d in details if d)})"
                                                      if any(details) else ""))
    if any((c.width or c.height) for c in cfg.cameras) and not any(c.source.live for c in cameras):
        info("note: --width/--height are requests to a camera; files are read at their own size")
    recorders = [sink for sink in sinks if isinstance(sink, VideoRecordSink)]
    try:
        with contextlib.ExitStack() as background:
            if cfg.watch_model:
                background.callback(watcher.close)
            if receiver is not None:
                background.callback(receiver.close)
            summary = pipeline.run()
    except EdgesqzError:
        if pipeline.summary.frames:  # e.g. the camera went away after a while: still say what was done
            info(pipeline.summary.describe())
            for recorder in recorders:
                if recorder.saved:
                    info(f"recorded {recorder.path} ({recorder.frames} frames before the error)")
        raise
    info(summary.describe())
    for recorder in recorders:
        info(f"recorded {recorder.path} ({recorder.frames} frames)" if recorder.saved
             else f"nothing recorded in {recorder.path} (no frames)")
    return summary


def _collector(cfg: RunConfig, classifier: Any, info: Callable[[str], None]) -> Any:
    c = cfg.collect
    given = {"--collect-every": c.every, "--collect-unsure": c.unsure, "--collect-margin": c.margin,
             "--collect-events": c.events or None, "--collect-max-files": c.max_files, "--collect-max-mb": c.max_mb}
    if c.dir is None:
        for option, value in given.items():
            if value is not None:
                raise EdgesqzError(f"{option} needs --collect DIR (where the images go)")
        return None
    from edgesqz.device.collect import Collector, CollectPolicy

    no_policy = c.every is None and c.unsure is None and c.margin is None and not c.events
    policy = CollectPolicy(every_s=30.0 if no_policy else c.every, unsure_below=c.unsure, margin_below=c.margin,
                           on_event=c.events, max_files=2000 if c.max_files is None else c.max_files,
                           max_mb=500.0 if c.max_mb is None else c.max_mb)
    collector = Collector(c.dir, policy, say=info)
    collector.labels = classifier.labels
    what = [f"every {policy.every_s:g} s" if policy.every_s else "", f"top-1 < {c.unsure:g}" if c.unsure else "",
            f"top-1/top-2 margin < {c.margin:g}" if c.margin else "", "at each event start" if c.events else ""]
    info(f"collect: saving frames to {collector.folder} ({', '.join(w for w in what if w)}; near-duplicates skipped; "
         f"at most {policy.max_files} images, {policy.max_mb:g} MB)")
    return collector


def _report_local_swap(receiver: Any, path: Path, identity: dict[str, Any] | None, reason: str | None) -> None:
    """A model swapped in (or refused) on this device: the receiver's report says so on PREFIX/DEVICE/model."""
    if identity is not None:
        receiver.report("running", {"name": identity["name"], "version": identity["version"]}, None)
    else:
        receiver.report("refused", {"name": Path(path).name}, reason)


def _receiver(cfg: RunConfig, info: Callable[[str], None]) -> tuple[Any, list[Any]]:
    """``--mqtt URL --trust KEY.pub``: models deployed to this device, verified, stored, swapped in (not started)."""
    mq = cfg.mqtt
    if mq.trust is None:
        return None, []
    if mq.url is None:
        raise EdgesqzError("--trust needs --mqtt URL (the broker the models are deployed through)")
    from edgesqz.device.events import slug
    from edgesqz.device.eventsink import default_device_id
    from edgesqz.device.fleet import ModelReceiver
    from edgesqz.paths import default_model_path

    swap_to: list[Any] = []  # the run's ModelSwapper, once the pipeline exists

    def accept(path: Path, manifest: dict[str, Any]) -> str | None:
        if not swap_to:
            return "the run is starting; deploy again in a moment"
        return swap_to[0].offer(path, version=manifest.get("version"))

    device = slug(mq.device_id) if mq.device_id else default_device_id()
    receiver = ModelReceiver(mq.url, device=device, trust=mq.trust, models_dir=default_model_path().parent,
                             accept=accept, password=mq.password, ca_file=mq.ca, say=info)
    return receiver, swap_to


class _FrameTap:
    """A sink that keeps the newest frame for the hot swap's smoke test."""

    stop_requested = False
    stop_reason = "sink"

    def __init__(self, swapper: Any) -> None:
        self.swapper = swapper

    def open(self, pipeline: Any) -> None:
        pass

    def write(self, result: Any) -> None:
        self.swapper.note_frame(result.frame.image)

    def close(self, summary: Any) -> None:
        pass


def _swapper(cfg: RunConfig, pipeline: Any, events: Any, info: Callable[[str], None]) -> Any:
    """The run's :class:`ModelSwapper`: new models with the run's options, checked, swapped between frames."""
    from edgesqz.device.hotswap import ModelSwapper

    def make(path: Path) -> Any:
        return make_classifier(ModelChoice(Path(path), "option"), threads=cfg.threads, delegate=cfg.delegate,
                               top_k=cfg.top_k, threshold=cfg.threshold, labels=None, crop_fraction=cfg.crop_fraction,
                               color_order=cfg.color_order, mean=cfg.mean, std=cfg.std, output_kind=cfg.output_kind,
                               info=lambda _message: None)

    swapper = ModelSwapper(pipeline, make, events=events, say=info)
    pipeline.sinks.insert(0, _FrameTap(swapper))
    pipeline.swapper = swapper
    return swapper


def check_site(cfg: RunConfig, *, info: Callable[[str], None] = _say) -> list[str]:
    """Everything :func:`run_site` checks before it starts, without opening a camera or the network: the model
    (its labels), event rules against its labels and the zones, the MQTT URL, the serve address, the reconnect
    policy. Returns a line per camera for the user; raises the first mistake (line numbers from a site file)."""
    from edgesqz.device.config import ConfigError
    from edgesqz.device.events import EventRule
    from edgesqz.device.eventsink import EventSink
    from edgesqz.device.sources import parse_camera, parse_reconnect

    def located(key: tuple[str, ...], exc: EdgesqzError) -> ConfigError:
        if cfg.path is None:
            return ConfigError(str(exc))
        from edgesqz.device.config import _Lines, read_config_text

        line = _Lines(read_config_text(cfg.path)).line(key)
        return ConfigError(f"{cfg.path}:{line}: {exc}" if line else f"{cfg.path}: {exc}")

    try:
        parse_reconnect(cfg.reconnect)
    except EdgesqzError as exc:
        raise located(("reconnect",), exc) from None
    try:
        check_values(cfg)
    except EdgesqzError as exc:
        raise located(("events",), exc) from None
    for cam in cfg.cameras:
        if cam.camera is not None:
            try:
                parse_camera(cam.camera)
            except EdgesqzError as exc:
                raise located(("cameras", cam.name, "camera"), exc) from None
    if cfg.serve.address is not None:
        from edgesqz.device.serve import parse_address

        try:
            parse_address(cfg.serve.address)
        except EdgesqzError as exc:
            raise located(("serve", "address"), exc) from None
    if cfg.mqtt.url is not None:
        from edgesqz.device.mqtt import parse_mqtt_url

        try:
            parse_mqtt_url(cfg.mqtt.url)
        except EdgesqzError as exc:
            raise located(("mqtt", "url"), exc) from None
    try:
        rules = [EventRule.parse(r) for r in cfg.events.rules]
    except EdgesqzError as exc:
        raise located(("events", "rules"), exc) from None
    try:
        classifier = make_classifier(cfg.model, threads=1, delegate=None, top_k=cfg.top_k, threshold=cfg.threshold,
                                     labels=cfg.labels, crop_fraction=cfg.crop_fraction, color_order=cfg.color_order,
                                     mean=cfg.mean, std=cfg.std, output_kind=cfg.output_kind, info=lambda _m: None)
    except EdgesqzError as exc:
        raise located(("model",), exc) from None
    if rules:
        multi = cfg.multi
        scopes = ([(c.name, z.name) for c in cfg.cameras for z in c.zones]
                  + [(c.name, None) for c in cfg.cameras if not c.zones]) if multi else None
        try:
            EventSink(rules).bind(classifier.labels, classifier.num_classes, scopes)
        except EdgesqzError as exc:
            raise located(("events", "rules"), exc) from None
    lines = [f"model: {classifier.describe_model()}"]
    for cam in cfg.cameras:
        what = f"camera {cam.camera}" if cam.camera is not None else cam.source
        zones = ", ".join(f"{z.name}={z.rect.describe()}" + (" (motion)" if z.motion else "") for z in cam.zones)
        lines.append(f"camera {cam.name}: {what}" + (f"; zones {zones}" if zones else "; whole frame"))
    for rule in rules:
        lines.append(f"event: {rule.describe()}")
    return lines
