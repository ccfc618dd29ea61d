"""Issue 26: hostile values and situations, one test per mechanism (in-process, fast), plus a few real runs.

- option values that pass a first check (``#²``, NaN/inf, IDNA-invalid hosts, port 0, MQTT topics):
  :mod:`edgesqz.device.options`, called at the top of ``run``;
- event time from a video file's own clock (:class:`OpenCVCapture` media timestamps, ``FrameSource.clock``),
  a paced file's clock starting with its first frame;
- webhooks: Basic auth from the URL (redacted), 307/308 only, one shared drain deadline, counts at the end;
- files: a clip without its MP4 index is never published; bounded, collision-free slugs of rule names;
- a second Ctrl-C while closing hurries instead of raising KeyboardInterrupt;
- model paths that are not regular files (FIFO, /dev/zero) refused before reading; doctor's fixes;
- SSE ids carry the run, so a stale ``Last-Event-ID`` is ignored.

The whole-CLI cases of each class are in ``benchmarks/fault_sweep.py`` (step ``hostile``).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_device_run import edgesqz, one_error_line

from edgesqz.device import options
from edgesqz.device.events import EventDetector, EventRule, resolve_indices
from edgesqz.device.shutdown import HURRY, Drain
from edgesqz.errors import EdgesqzError

pytestmark = pytest.mark.device

# --------------------------------------------------------------------------- 1. one validated parse


def test_numbers_must_be_finite_and_in_range() -> None:
    assert options.finite("2.5", "--x", 0, 10) == 2.5
    for bad in ("nan", "inf", "-inf", float("nan"), float("inf"), "x", None, -1, 11):
        with pytest.raises(EdgesqzError, match="--x must be"):
            options.finite(bad, "--x", 0, 10)
    with pytest.raises(EdgesqzError, match="--max-disk"):
        options.finite(0, "--max-disk", 0, None, lo_open=True)
    assert options.positive_int("3", "--keep") == 3
    for bad in (0, -5, True, 2.5, "²", "٣", "1e3"):
        with pytest.raises(EdgesqzError, match="--keep"):
            options.positive_int(bad, "--keep", 1, 1000)


def test_class_indices_take_ascii_digits_only() -> None:
    assert options.class_index("#12") == 12 and options.class_index(" #0 ") == 0
    for text in ("#²", "#٣", "#1²", "#", "#-1", "12", "#" + "9" * 30):
        assert options.class_index(text) is None, text
    rule = EventRule.parse("#²")
    with pytest.raises(EdgesqzError, match="no label '#²'"):  # a label nobody has, not an int() crash
        resolve_indices(rule, None, 10)


def test_names_are_printable_and_bounded() -> None:
    assert options.name(" Küche 猫 ", "--event") == "Küche 猫"
    for bad, needle in (("", "empty"), ("a\x01b", "control character"), ("a\x00", "control character"),
                        ("x" * 201, "at most 200"), ("a\ud800", "control character|not valid")):
        with pytest.raises(EdgesqzError, match=needle):
            options.name(bad, "--event")
    with pytest.raises(EdgesqzError, match="control character"):
        EventRule.parse("cup\x1b=espresso")


def test_slugs_are_bounded_readable_and_do_not_collide() -> None:
    assert options.slug("Egyptian cat, tabby!") == "egyptian_cat_tabby"  # ASCII names as before
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    slugs = [options.slug(t) for t in ("猫", "犬", "café", "cafe", long_a, long_b, "Küche", "Kuche")]
    assert len(set(slugs)) == len(slugs), slugs
    assert all(len(s) <= 64 and s.isascii() and s.replace("_", "").isalnum() for s in slugs), slugs
    assert slugs[2].startswith("cafe_") and slugs[6].startswith("kuche_")  # accents dropped, still readable
    assert options.slug("猫") == options.slug("猫")  # stable: the same rule, the same topics and files
    detector = EventDetector([EventRule.parse("猫=#1"), EventRule.parse("犬=#1"),
                              EventRule.parse(f"{'n' * 300}=#1")], None, 5, start_s=0)
    events = detector.update(1.8e9, np.eye(5, dtype=np.float32)[1], 0)
    assert len({e.id for e in events}) == 3 and all(len(e.id) < 120 for e in events)


def test_hosts_ports_and_urls() -> None:
    schemes = {"mqtt": 1883}
    assert options.parse_url("mqtt://bücher.example:1884/p", "--mqtt", schemes, "usage").port == 1884
    assert options.parse_url("mqtt://[::1]/p", "--mqtt", schemes, "usage").host == "::1"
    for bad, needle in (("mqtt://a..b", "empty label"), (f"mqtt://{'a' * 64}.example", "longer than 63"),
                        ("mqtt://host:0", "1 to 65535"), ("mqtt://host:65536", "1 to 65535"),
                        ("mqtt://host:x", "1 to 65535"), ("mqtt://a b", "usage"), ("http://host", "usage"),
                        ("mqtt://" + "h" * 300, "at most 253")):
        with pytest.raises(EdgesqzError, match=needle):
            options.parse_url(bad, "--mqtt", schemes, "usage")
    assert options.redact_url("http://cam:s3cret@host:8/x?y") == "http://cam:***@host:8/x?y"
    assert options.redact_url("http://cam@host/") == "http://cam@host/"


def test_mqtt_topics_follow_mqtts_rules() -> None:
    assert options.mqtt_topic("home/cams/Küche", "p") == "home/cams/Küche"
    for bad, needle in (("a/+/b", "wildcard"), ("a#", "wildcard"), ("$SYS/x", "'\\$'"), ("a\x01b", "control"),
                        ("a\x00b", "control"), ("a\x7fb", "control"), ("a//b", "empty topic level"),
                        ("p" * 70000, "at most 200"), ("", "empty")):
        with pytest.raises(EdgesqzError, match=needle):
            options.mqtt_topic(bad, "p")
    with pytest.raises(EdgesqzError, match="one topic level"):
        options.mqtt_topic_level("a/b", "--device-id")
    for bad in ("d" * 70000, "Kitchen Pi", "küche"):
        with pytest.raises(EdgesqzError, match="--device-id"):
            options.device_id(bad)
    from edgesqz.device.mqtt import parse_mqtt_url

    with pytest.raises(EdgesqzError, match="control character"):
        parse_mqtt_url("mqtt://127.0.0.1/a%01b")


def test_check_run_refuses_before_anything_starts() -> None:
    options.check_run(events=["espresso", "cat=tabby>=0.5"], event_start=0, max_disk=5, mqtt="mqtt://h/p",
                      mqtt_discovery_prefix="off", device="cam_1", webhooks=["http://u:p@h:8/x"])
    for kwargs, needle in (({"max_disk": float("nan")}, "--max-disk"), ({"max_disk": float("inf")}, "--max-disk"),
                           ({"preroll": float("nan")}, "--preroll"), ({"keep": 0}, "--keep must be >= 1"),
                           ({"mqtt": "mqtt://a..b"}, "host name"), ({"webhooks": ["http://h:0/"]}, "65535"),
                           ({"mqtt_discovery_prefix": "$SYS"}, "'\\$'"), ({"events": ["x\x07=espresso"]}, "control")):
        with pytest.raises(EdgesqzError, match=needle):
            options.check_run(**kwargs)


@pytest.mark.parametrize(("args", "needle"), [
    (["--event", "#²"], None),
    (["--event", "espresso", "--snapshot-dir", "s", "--max-disk", "nan"], "--max-disk"),
    (["--mqtt", "mqtt://a..b"], "not a valid host name"),
])
def test_run_refuses_hostile_values_in_one_line(int8_model: Path, tmp_path: Path, args: list[str],
                                                needle: str | None) -> None:
    video = tmp_path / "v.mp4"
    _video(video, 3)
    p = edgesqz("run", "--model", int8_model, "--source", video, "--max-frames", 3, *args)
    if needle is None:  # '#²': a label the model does not have (exit 2), not exit 70
        one_error_line(p, "#²")
    else:
        one_error_line(p, needle)
    assert p.returncode == 2 and "internal error" not in p.stderr


# --------------------------------------------------------------------------- 2. the source's own clock


def _video(path: Path, frames: int, fps: float = 30) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (64, 48))
    for i in range(frames):
        writer.write(np.full((48, 64, 3), i * 8 % 256, np.uint8))
    writer.release()
    return path


def test_a_video_file_is_timed_by_its_own_clock(tmp_path: Path) -> None:
    from edgesqz.device.sources import open_source

    video = _video(tmp_path / "v.mp4", 10, fps=10)
    with open_source(source=str(video), loop=True) as source:  # read as fast as it decodes, twice round
        assert source.clock == "media"
        stamps = []
        while len(stamps) < 20:
            frame = source.read(timeout=5)
            assert frame is not None
            stamps.append(frame.timestamp)
    steps = np.diff(stamps)
    assert np.allclose(steps, 0.1, atol=1e-3), steps  # 10 fps in media time, across the loop too
    assert open_source(source=str(video), fps=10).clock == "wall"  # played live: the wall clock


def test_a_paced_file_starts_its_clock_with_the_first_frame(tmp_path: Path) -> None:
    from edgesqz.device.sources import OpenCVCapture, PacedCapture

    paced = PacedCapture(OpenCVCapture(str(_video(tmp_path / "v.mp4", 5))), fps=20)
    paced.open()
    time.sleep(0.3)  # e.g. waiting for an MQTT broker: frames must not then come in a burst
    t0 = time.perf_counter()
    for _ in range(3):
        assert paced.read() is not None
    assert time.perf_counter() - t0 >= 0.09  # 3 frames at 20 fps: 0.1 s, not at once
    paced.close()


# --------------------------------------------------------------------------- 3. webhooks


class _Hooks(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.got: list[tuple[str, str, str | None, bytes]] = []
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)

    def url(self, path: str, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.server_address[1]}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: _Hooks

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/hang"):
            self.server.release.wait(30)
            return
        if self.path in ("/r307", "/r308", "/r302", "/r301", "/r303"):
            self.send_response(int(self.path[2:]))
            self.send_header("Location", "/ok")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.got.append((self.command, self.path, self.headers.get("Authorization"), body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def hooks() -> Iterator[_Hooks]:
    server = _Hooks()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def _post(url: str, n: int = 1, **kwargs: object) -> object:
    from edgesqz.device.webhook import WebhookOutput

    said: list[str] = []
    hook = WebhookOutput(url, backoff=(0.01, 0.02), say=said.append, **kwargs)  # type: ignore[arg-type]
    hook.open()
    for i in range(n):
        hook.event({"kind": "event", "id": f"e{i}"})
    hook.close()
    hook.said = said  # type: ignore[attr-defined]
    return hook


def test_webhook_userinfo_is_basic_auth_and_never_printed(hooks: _Hooks, caplog: pytest.LogCaptureFixture) -> None:
    hook = _post(hooks.url("/ok", "cam:s%40cret@"))
    assert hooks.got and hooks.got[0][2] == "Basic " + base64.b64encode(b"cam:s@cret").decode()
    shown = hook.describe() + hook.report() + " ".join(hook.said) + caplog.text  # type: ignore[attr-defined]
    assert "cam:***@" in shown and "cret" not in shown


def test_webhook_follows_307_and_308_only(hooks: _Hooks) -> None:
    for code in (307, 308):
        hook = _post(hooks.url(f"/r{code}"))
        assert hook.delivered == 1  # type: ignore[attr-defined]
    assert [(m, p, json.loads(b)["id"]) for m, p, _, b in hooks.got] == [("POST", "/ok", "e0")] * 2  # body kept
    hooks.got.clear()
    for code in (301, 302, 303):
        hook = _post(hooks.url(f"/r{code}"))
        assert (hook.delivered, hook.failed) == (0, 1)  # type: ignore[attr-defined]
        assert f"HTTP {code}" in hook.last_reason and "not followed" in hook.last_reason  # type: ignore[attr-defined]
        assert "0 delivered, 1 not delivered (last: HTTP" in hook.said[-1]  # type: ignore[attr-defined]
    assert hooks.got == []  # never turned into a GET without the event
    refused = _post("http://127.0.0.1:9/x", retries=1)
    assert refused.last_reason == "connection refused"  # type: ignore[attr-defined]


def test_hanging_webhooks_share_one_drain_deadline(hooks: _Hooks) -> None:
    from edgesqz.device.webhook import WebhookOutput

    drain = Drain(1.0)
    outs = [WebhookOutput(hooks.url(f"/hang{i}"), timeout=5, drain=drain) for i in range(4)]
    for out in outs:
        out.open()
        out.event({"kind": "event", "id": "e"})
    time.sleep(0.1)
    t0 = time.perf_counter()
    for out in outs:  # closed one after the other, as EventSink does: still one deadline for all
        out.close()
    assert time.perf_counter() - t0 < 1.8
    assert all(o.failed == 1 and o.last_reason for o in outs)
    HURRY.set()
    try:  # after a second Ctrl-C: no waiting at all
        out = WebhookOutput(hooks.url("/hang9"), timeout=5, drain=Drain(10))
        out.open()
        out.event({"kind": "event", "id": "e"})
        t0 = time.perf_counter()
        out.close()
        assert time.perf_counter() - t0 < 0.5
    finally:
        HURRY.clear()


# --------------------------------------------------------------------------- 4. files


def test_a_clip_the_encoder_could_not_finish_is_never_published(tmp_path: Path) -> None:
    from edgesqz.device.clips import _Clip, mp4_incomplete

    good = _Clip(tmp_path / "good.mp4", 10, (64, 48), 100)
    for _ in range(3):
        good.write(np.zeros((48, 64, 3), np.uint8))
    good.finish()
    assert mp4_incomplete(tmp_path / "good.mp4") is None
    clip = _Clip(tmp_path / "full.mp4", 10, (64, 48), 100)
    clip.write(np.zeros((48, 64, 3), np.uint8))
    real = clip.writer

    class DiskFull:  # what the encoder leaves on a full disk: an mdat whose size it never wrote, no moov
        def release(self) -> None:
            real.release()
            clip._tmp.write_bytes(b"\0\0\0\x1cftypisom" + b"\0" * 16 + b"\0\0\0\0mdat" + b"\1" * 500)

        def write(self, image: object) -> None:
            pass

    clip.writer = DiskFull()  # type: ignore[assignment]
    with pytest.raises(EdgesqzError, match="could not finish it: its 'mdat' box was never closed"):
        clip.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.mp4"]  # no full.mp4, no .part
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes((tmp_path / "good.mp4").read_bytes()[:-100])
    assert mp4_incomplete(truncated)


# --------------------------------------------------------------------------- 5. a second Ctrl-C


def test_a_second_sigint_while_closing_hurries_instead_of_raising() -> None:
    from edgesqz.device.pipeline import Pipeline

    class Stub:
        description = "stub"

        def runtime_info(self) -> dict:
            return {}

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are installed from the main thread only")
    pipeline = Pipeline(Stub(), Stub(), [])  # type: ignore[arg-type]

    def interrupt() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.02)  # the Python-level handler runs between bytecodes, right after

    with pipeline._signals():
        assert not HURRY.is_set()
        interrupt()
        assert pipeline.stopping and not HURRY.is_set()  # the first: stop after this frame
        interrupt()  # the second (e.g. during a clip's finalisation): no KeyboardInterrupt
        interrupt()
        assert HURRY.is_set()
    HURRY.clear()
    previous = signal.getsignal(signal.SIGINT)
    pipeline = Pipeline(Stub(), Stub(), [])  # type: ignore[arg-type]
    with pipeline._signals():  # a close so quick that the second Ctrl-C comes after it
        interrupt()
    interrupt()  # absorbed once, just after the run
    assert HURRY.is_set() and signal.getsignal(signal.SIGINT) is previous
    HURRY.clear()


# --------------------------------------------------------------------------- 6./7. model paths, doctor


def test_model_paths_that_are_not_files_are_refused_before_reading(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from edgesqz.device.models import choose_model
    from edgesqz.device.runtime import check_model_file
    from edgesqz.fileio import read_regular

    fifo = tmp_path / "m.fifo"
    os.mkfifo(fifo)  # nobody writes: opening it for reading would block forever
    link = tmp_path / "link.tflite"
    link.symlink_to("/dev/zero")  # endless
    for path, kind in ((fifo, "FIFO"), (link, "character device"), (Path("/dev/zero"), "character device"),
                       (tmp_path, "folder")):
        with pytest.raises(EdgesqzError, match=kind):
            read_regular(path, 1 << 30, "model")
    with pytest.raises(EdgesqzError, match="FIFO"):
        check_model_file(fifo)
    real = tmp_path / "small.bin"
    real.write_bytes(b"x" * 100)
    assert read_regular(real, 100) == b"x" * 100 and read_regular(real, 99) is None
    monkeypatch.setenv("EDGESQZ_MODEL", str(fifo))
    with pytest.raises(EdgesqzError, match=r"EDGESQZ_MODEL=.*FIFO.*unset EDGESQZ_MODEL"):
        choose_model(None)
    monkeypatch.delenv("EDGESQZ_MODEL")
    monkeypatch.setenv("EDGESQZ_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "models").mkdir(parents=True)
    os.mkfifo(tmp_path / "home" / "models" / "latest.tflite")
    with pytest.raises(EdgesqzError, match=r"latest\.tflite is a FIFO.*rm "):
        choose_model(None)


def test_doctor_names_the_bad_model_and_a_fix_for_a_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgesqz import doctor, sysinfo

    monkeypatch.setattr(sysinfo, "importable", lambda name: False)  # a device: no TensorFlow
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(os.urandom(2048))
    monkeypatch.setenv("EDGESQZ_HOME", str(tmp_path / "home"))
    for env, judged, fix in ((str(garbage), "EDGESQZ_MODEL=", "unset EDGESQZ_MODEL"),
                             ("/dev/zero", "EDGESQZ_MODEL=/dev/zero", "unset EDGESQZ_MODEL")):
        monkeypatch.setenv("EDGESQZ_MODEL", env)
        findings: list[doctor.Finding] = []
        assert not doctor._model(findings)
        assert judged in findings[0].detail and fix in findings[0].fix and "convert" not in findings[0].fix
    monkeypatch.delenv("EDGESQZ_MODEL")
    latest = tmp_path / "home" / "models" / "latest.tflite"
    latest.parent.mkdir(parents=True)
    latest.write_bytes(os.urandom(2048))
    findings = []
    assert not doctor._model(findings)
    assert str(latest) in findings[0].detail and f"rm {latest}" in findings[0].fix
    assert "convert" not in findings[0].fix


# --------------------------------------------------------------------------- 8. SSE ids


def test_sse_ids_carry_the_run_and_stale_ones_are_ignored() -> None:
    from edgesqz.device.serve import _Hub

    hub = _Hub(4)
    for i in range(5):
        hub.publish_event(json.dumps({"i": i}))
    run = hub.run_id
    assert hub.events_after(3, 0)[0][1].startswith(f"id: {run}-4\n".encode())
    assert hub.resume_after(f"{run}-2") == 2  # this run's: resume after it
    for stale in ("999999999999", "2", f"{run}-9", "deadbeef-2", "9" * 40, f"{run}-{'9' * 40}", "", None, "²"):
        assert hub.resume_after(stale) == 4, stale  # another run's, or nonsense: from the newest event
    assert _Hub(4).run_id != run


# --------------------------------------------------------------------------- 9. MQTT reasons


def test_a_broker_refusal_is_reported_with_its_reason(tmp_path: Path) -> None:
    from mqtt_broker import Broker

    from edgesqz.device.mqtt import MqttOutput

    pw = tmp_path / "passwords"
    pw.write_text("")
    broker = Broker(tmp_path, extra=f"password_file {pw}\n")
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true", "allow_anonymous false"))
    broker.start()
    said: list[str] = []
    try:
        out = MqttOutput(broker.url + "/p", device="cam")
        with pytest.raises(EdgesqzError, match="refused the connection: Not authorized"):
            out.connect(said.append)
    finally:
        broker.stop()
    assert not any("cannot reach" in s for s in said)


def test_the_cli_never_hangs_on_a_fifo_model(tmp_path: Path) -> None:
    fifo = tmp_path / "m.tflite"
    os.mkfifo(fifo)
    try:
        p = edgesqz("info", fifo, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("edgesqz info hung on a FIFO")
    one_error_line(p, "FIFO")
