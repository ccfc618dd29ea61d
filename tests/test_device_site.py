"""Zones, several cameras, the Picamera2 camera selection and the site file (``edgesqz run --config``).

Real parts: videos the tests build from real photos placed in different parts of the frame, the
installed default model (real SqueezeNet 1.1 ImageNet weights, int8), the real command line in
subprocesses, a real Mosquitto broker and Chromium for the per-zone outputs. Picamera2 needs a Pi:
a stand-in module (tests/picamera2_standin) plays libcamera's part for the selection logic.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from event_helpers import jsonl
from mqtt_broker import Broker, Subscriber, mosquitto_binary
from test_device_run import edgesqz, one_error_line

from edgesqz.device.config import ConfigError, Rect, from_flags, load_config, parse_rect, parse_zone
from edgesqz.device.models import packaged_model

STANDIN = Path(__file__).parent / "picamera2_standin"
CATS = {"tabby", "tiger cat", "Egyptian cat", "lynx", "Persian cat"}
COFFEE = {"espresso", "consomme", "cup", "coffee mug", "eggnog", "soup bowl", "chocolate sauce"}


@pytest.fixture(scope="module")
def model() -> Path:
    path = packaged_model()
    if path is None:
        pytest.skip("no installed default model")
    return path


def _side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[:, :320] = cv2.resize(left, (320, 480), interpolation=cv2.INTER_AREA)
    frame[:, 320:] = cv2.resize(right, (320, 480), interpolation=cv2.INTER_AREA)
    return frame


def _video(path: Path, frames: list[np.ndarray], fps: float = 30) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (640, 480))
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


@pytest.fixture(scope="module")
def videos(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("site")
    coffee, cat, rocket = (cv2.imread(str(photos_dir / n)) for n in ("coffee.png", "chelsea.png", "rocket.jpg"))
    pair = _side_by_side(coffee, cat)
    swapped = _side_by_side(cat, coffee)
    return {
        "pair": _video(tmp / "pair.mp4", [pair] * 24),  # coffee left, cat right, still
        "swap": _video(tmp / "swap.mp4", [pair] * 30 + [swapped] * 30),  # the photos trade places at frame 30
        "rocket": _video(tmp / "rocket.mp4", [_side_by_side(rocket, rocket)] * 24),
    }


def _classifications(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] == "classification"]


def _stable(objs: list[dict]) -> list[dict]:
    """The records without what differs between two runs (clock times, latencies, FPS)."""
    out = []
    for o in objs:
        o = {k: v for k, v in o.items() if k not in ("timestamp", "latency_ms", "duration_s", "fps_mean")}
        if o["kind"] == "event":  # when it starts depends on the wall clock of a file played at full speed
            o = {k: o[k] for k in ("kind", "state", "name", "camera", "zone", "labels")}
        if o["kind"] == "run_summary":
            o = {k: o[k] for k in ("kind", "frames", "captured", "dropped", "stopped_by", "cameras") if k in o}
        out.append(o)
    return out


# --------------------------------------------------------------------------- zones


def test_each_zone_sees_its_own_photo_and_the_whole_frame_is_unchanged(model: Path, videos: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "zones.jsonl"
    p = edgesqz("run", "--model", model, "--source", videos["swap"], "--zone", "left=0,0,0.5,1",
                "--zone", "right=320px,0px,320px,480px", "-k", "3", "--threads", "1", "-o", out)
    assert p.returncode == 0, p.stderr
    assert "zones left=0,0,0.5,1, right=320px,0px,320px,480px" in p.stderr
    rows = _classifications(jsonl(out))
    assert len(rows) == 60
    for row in rows:
        assert set(row["zones"]) == {"left", "right"} and "top_k" not in row and row["camera"] == "swap"
        left, right = (row["zones"][z]["top_k"][0]["label"] for z in ("left", "right"))
        first_half = row["frame"] < 30
        assert (left in COFFEE and right in CATS) if first_half else (left in CATS and right in COFFEE), row
        assert row["zones"]["left"]["rect"] == [0, 0, 320, 480] and row["zones"]["right"]["rect"] == [320, 0, 320, 480]
        assert len(row["zones"]["left"]["top_k"]) == 3 and all(z["classified"] for z in row["zones"].values())
    # Without --zone: the whole frame, exactly the record a run always wrote (no camera, no zones).
    whole = tmp_path / "whole.jsonl"
    assert edgesqz("run", "--model", model, "--source", videos["pair"], "--threads", "1", "-o", whole).returncode == 0
    first = _classifications(jsonl(whole))[0]
    assert set(first) == {"schema", "kind", "source", "frame", "timestamp", "top_k", "latency_ms", "model"}


def test_motion_gating_reuses_results_of_a_still_zone_until_it_changes(model: Path, videos: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "gated.jsonl"
    p = edgesqz("run", "--model", model, "--source", videos["swap"], "--zone", "left=0,0,0.5,1",
                "--zone", "right=0.5,0,0.5,1", "--motion-gate", "60", "--threads", "1", "-o", out)
    assert p.returncode == 0, p.stderr
    rows = _classifications(jsonl(out))
    classified = [r["frame"] for r in rows if r["zones"]["left"]["classified"]]
    # the first frame, then only when the photos trade places (mp4 compression may add a neighbour or two)
    assert classified[0] == 0 and 30 in classified and len(classified) <= 6, classified
    assert rows[40]["zones"]["left"]["top_k"][0]["label"] in CATS  # the reused result is the new one
    assert all(r["zones"]["left"]["motion"] >= 0 for r in rows)


def test_zone_values_are_checked() -> None:
    assert parse_rect("0.1,0.2,0.3,0.4", "z") == Rect(0.1, 0.2, 0.3, 0.4)
    assert Rect(10, 20, 100, 50, pixels=True).to_pixels(64, 48) == (10, 20, 54, 28)  # clipped to the frame
    for bad, why in (("0.8,0,0.5,1", "leaves the frame"), ("0,0,0,0.5", "must be > 0"), ("0,0,1", "four numbers"),
                     ("0,0,10px,0.5", "all four"), ("a,0,1,1", "not a number"), ("nan,0,1,1", "finite"),
                     ("-0.1,0,0.5,0.5", ">= 0")):
        with pytest.raises(ConfigError, match=why):
            parse_rect(bad, bad)
    with pytest.raises(ConfigError, match="NAME=X,Y,W,H"):
        parse_zone("0,0,1,1")
    with pytest.raises(ConfigError, match="a name is"):
        parse_zone("bad name=0,0,1,1")
    too_many = [f"z{i}=0,0,0.5,0.5" for i in range(17)]
    with pytest.raises(ConfigError, match="at most 16"):
        from_flags(None, {}, sources=["a.mp4"], zones=too_many)
    with pytest.raises(ConfigError, match="--zone z is given twice"):
        from_flags(None, {}, sources=["a.mp4"], zones=["z=0,0,1,1", "z=0,0,0.5,0.5"])
    with pytest.raises(ConfigError, match="same camera"):
        from_flags(None, {}, cameras=["a=0", "b=0"])
    with pytest.raises(ConfigError, match="say which"):
        from_flags(None, {}, sources=["a.mp4", "b.mp4"], zones=["z=0,0,1,1"])


def test_bad_zones_and_cameras_on_the_command_line_are_one_line(model: Path, videos: dict[str, Path]) -> None:
    v = videos["pair"]
    for args, needle in (
        (["--source", v, "--zone", "door=0.8,0,0.5,1"], "leaves the frame"),
        (["--source", v, "--zone", "door=0,0,0,0"], "must be > 0"),
        (["--source", v, "--zone", "door=0,0,1,1", "--zone", "door=0,0,0.5,0.5"], "door"),
        (["--source", f"a={v}", "--source", f"b={v}"], "same source"),
        (["--camera", "usb"], "--camera takes N"),
        (["--source", v, "--event", "hall:espresso"], "no zone or camera called 'hall'"),
    ):
        one_error_line(edgesqz("run", "--model", model, "--max-frames", 1, *args), needle)


# --------------------------------------------------------------------------- several cameras


def test_two_sources_in_one_process_and_one_that_never_opens(model: Path, videos: dict[str, Path],
                                                             tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    out = tmp_path / "two.jsonl"
    p = edgesqz("run", "--model", model, "--source", f"desk={videos['pair']}", "--source",
                f"shed={videos['rocket']}", "--source", f"gate=rtsp://127.0.0.1:{dead}/live", "--reconnect", "1",
                "--fps", 30, "--threads", 1, "-o", out, "--record", tmp_path / "rec.mp4", timeout=120)
    assert p.returncode == 0, p.stderr
    # one recording per camera that delivered frames
    assert (tmp_path / "rec.desk.mp4").stat().st_size > 0 and (tmp_path / "rec.shed.mp4").stat().st_size > 0
    assert not (tmp_path / "rec.gate.mp4").exists() and not (tmp_path / "rec.mp4").exists()
    objs = jsonl(out)
    rows = _classifications(objs)
    by_camera = {name: [r for r in rows if r["camera"] == name] for name in ("desk", "shed", "gate")}
    assert len(by_camera["desk"]) >= 20 and len(by_camera["shed"]) >= 20 and not by_camera["gate"]
    assert all(r["top_k"][0]["label"] in COFFEE | CATS for r in by_camera["desk"])
    assert all(r["top_k"][0]["label"] not in COFFEE | CATS for r in by_camera["shed"])
    summary = objs[-1]
    assert summary["kind"] == "run_summary" and summary["cameras"]["gate"]["state"] == "unavailable"
    assert "did not open" in summary["cameras"]["gate"]["error"]
    assert "camera gate is unavailable" in p.stderr and "the other cameras go on" in p.stderr


def test_the_site_file_and_the_flags_give_the_same_json(model: Path, videos: dict[str, Path], tmp_path: Path) -> None:
    flags = tmp_path / "flags.jsonl"
    p = edgesqz("run", "--model", model, "--source", f"desk={videos['swap']}", "--source", f"shed={videos['rocket']}",
                "--zone", "desk/left=0,0,0.5,1", "--zone", "desk/right=0.5,0,0.5,1", "-k", 2, "--threads", 1,
                "--event", "cup_left=left:espresso,cup,consomme", "--event-start", 0.1, "-o", flags)
    assert p.returncode == 0, p.stderr
    site = tmp_path / "site.toml"
    site.write_text(f"""# the same run as a site file
model = "{model}"
top_k = 2
threads = 1
output = "file.jsonl"

[events]
rules = ["cup_left=left:espresso,cup,consomme"]
start = 0.1

[cameras.desk]
source = "{videos['swap']}"
[cameras.desk.zones.left]
rect = [0, 0, 0.5, 1]
[cameras.desk.zones.right]
rect = [0.5, 0, 0.5, 1]

[cameras.shed]
source = "{videos['rocket']}"
""")
    assert edgesqz("config", "check", site).returncode == 0
    p = edgesqz("run", "--config", site)
    assert p.returncode == 0, p.stderr
    a, b = jsonl(flags), jsonl(tmp_path / "file.jsonl")
    # the two cameras' frames interleave as their reader threads deliver them: compare camera by camera
    for camera in ("desk", "shed"):  # frames in order; events apart (where they fall depends on the wall clock)
        assert [o for o in _stable(a) if o.get("camera") == camera and o["kind"] == "classification"] == \
            [o for o in _stable(b) if o.get("camera") == camera and o["kind"] == "classification"]
    assert [o for o in _stable(a) if o["kind"] == "event"] == [o for o in _stable(b) if o["kind"] == "event"]
    assert _stable(a)[-1] == _stable(b)[-1] and len(a) == len(b)
    events = [o for o in a if o["kind"] == "event"]
    assert events and {e["camera"] for e in events} == {"desk"} and {e["zone"] for e in events} == {"left"}
    # a flag overrides the file; --print-config shows the result and hides secrets
    p = edgesqz("run", "--config", site, "-k", 4, "--mqtt", "mqtt://me:secret@127.0.0.1/x", "--print-config")
    assert p.returncode == 0 and "top_k = 4" in p.stdout and "secret" not in p.stdout and "me:***@" in p.stdout


def test_site_file_mistakes_name_their_line(tmp_path: Path, model: Path) -> None:
    cases = {
        "typo": ("top_k = 3\n\n[cameras.a]\nsource = 'x.mp4'\nfsp = 30\n", ":5:", "did you mean 'fps'"),
        "type": ("threads = 'two'\n", ":1:", "threads must be an integer"),
        "rect": ("[cameras.a]\nsource = 'x.mp4'\n[cameras.a.zones.z]\nrect = [0.5, 0, 0.6, 1]\n", ":4:",
                 "leaves the frame"),
        "label": (f"model = '{model}'\n[events]\nrules = ['espreso']\n", ":3:", "did you mean 'espresso'"),
        "twice": ("[cameras.a]\ncamera = '0'\n[cameras.b]\ncamera = '0'\n", ":3:", "same camera"),
        "env": ("[mqtt]\nurl = 'mqtt://u@h/p'\npassword = '${EDGESQZ_TEST_UNSET}'\n", ":3:", "not set"),
        "toml": ("a = [\n", "", "not valid TOML"),
        "none": ("[cameras.a]\nwidth = 3\n", ":1:", "exactly one of"),
    }
    for name, (text, line, needle) in cases.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        error = one_error_line(edgesqz("config", "check", path), needle)
        assert f"{path}{line}" in error, error
        one_error_line(edgesqz("run", "--config", path), *([needle] if name != "label" else []))
    (tmp_path / "loop.toml").symlink_to(tmp_path / "loop.toml")
    one_error_line(edgesqz("config", "check", tmp_path / "loop.toml"), "points at itself")
    huge = tmp_path / "huge.toml"
    huge.write_text("# " + "x" * (2 << 20))
    one_error_line(edgesqz("run", "--config", huge), "at most 1 MiB")
    one_error_line(edgesqz("run", "--config", tmp_path), "not a regular file")
    site = tmp_path / "site.toml"
    site.write_text("output = 'site.toml'\n[cameras.a]\nsource = 'x.mp4'\n")
    assert "site.toml" in one_error_line(edgesqz("run", "--config", site))  # its own output: refused, kept
    assert site.read_text().startswith("output")


def test_the_example_site_file_is_valid(model: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "docs" / "site-example.toml"
    p = edgesqz("config", "check", example, env={"EDGESQZ_TOKEN": "t", "MQTT_PASSWORD": "p"})
    assert p.returncode == 0, p.stderr
    assert "camera front: camera 0; zones drive" in p.stdout and "camera garden" in p.stdout
    cfg = load_config_env(example)
    assert [c.name for c in cfg.cameras] == ["front", "garden"] and sum(len(c.zones) for c in cfg.cameras) == 3


def load_config_env(path: Path):  # type: ignore[no-untyped-def]
    old = {k: os.environ.get(k) for k in ("EDGESQZ_TOKEN", "MQTT_PASSWORD")}
    os.environ.update({"EDGESQZ_TOKEN": "t", "MQTT_PASSWORD": "p"})
    try:
        return load_config(path)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------- the Pi camera module


def test_camera_0_is_the_camera_module_when_libcamera_lists_one(model: Path, photos_dir: Path,
                                                                tmp_path: Path) -> None:
    env = {"PYTHONPATH": os.pathsep.join([str(STANDIN), os.environ.get("PYTHONPATH", "")]),
           "EDGESQZ_STANDIN_IMAGE": str(photos_dir / "coffee.png")}
    p = edgesqz("run", "--model", model, "--camera", "0", "--max-frames", 3, "--json", "--threads", 1, env=env)
    assert p.returncode == 0, p.stderr
    assert "source: picamera2:0" in p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert rows[0]["source"] == "picamera2:0" and rows[0]["top_k"][0]["label"] in COFFEE
    # libcamera's camera 1 does not exist: camera 1 is V4L2's /dev/video1 (absent here)
    one_error_line(edgesqz("run", "--model", model, "--camera", "1", "--max-frames", 1, env=env), "/dev/video1")
    # forcing a stack
    one_error_line(edgesqz("run", "--model", model, "--camera", "v4l2:0", "--max-frames", 1, env=env), "/dev/video0")
    p = edgesqz("run", "--model", model, "--camera", "picamera2:0", "--max-frames", 1, "--json", env=env)
    assert p.returncode == 0, p.stderr
    doctor = edgesqz("doctor", "--json", env=env)
    cams = [c for c in json.loads(doctor.stdout)["checks"] if c["check"] == "camera"]
    assert any("libcamera (Picamera2): imx708_wide" in c["detail"] and "--camera 0" in c["detail"] for c in cams), cams
    # without Picamera2: camera 0 is V4L2's, as before
    one_error_line(edgesqz("run", "--model", model, "--camera", "0", "--max-frames", 1), "/dev/video0")


# --------------------------------------------------------------------------- MQTT per zone


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    mosquitto_binary()
    b = Broker(tmp_path_factory.mktemp("site-broker")).start()
    yield b
    b.stop()


def test_mqtt_topics_and_home_assistant_entities_per_zone(model: Path, videos: dict[str, Path],
                                                          broker: Broker) -> None:
    sub = Subscriber(broker.port, ("site/#", "homeassistant/#"))
    try:
        p = edgesqz("run", "--model", model, "--source", f"desk={videos['swap']}", "--zone", "left=0,0,0.5,1",
                    "--zone", "right=0.5,0,0.5,1", "--event", "cat_left=left:tabby,tiger cat,Egyptian cat",
                    "--event-start", 0.2, "--event-end", 0.3, "--fps", 30, "--threads", 1,
                    "--mqtt", f"{broker.url}/site", "--device-id", "pi1")
        assert p.returncode == 0, p.stderr
        base = "site/pi1/desk"
        sub.wait_for(lambda ms: any(m.topic == "site/pi1/status" and m.payload == b"offline" for m in ms))
        labels = {z: [m.json()["label"] for m in sub.on(f"{base}/{z}/label")] for z in ("left", "right")}
        assert labels["left"][0] in COFFEE and labels["left"][-1] in CATS and labels["right"][0] in CATS
        states = [m.payload for m in sub.on(f"{base}/left/rule/cat_left/state")]
        assert b"ON" in states and states[-1] == b"OFF"
        assert not sub.on(f"{base}/right/rule/cat_left/state")  # the rule watches the left zone only
        events = [m.json() for m in sub.on("site/pi1/event")]
        assert [e["state"] for e in events] == ["start", "end"] and events[0]["zone"] == "left"
        assert [m.payload for m in sub.on("site/pi1/desk/status")][-1] == b"unavailable"
        model_status = sub.on("site/pi1/model")[-1].json()  # which model runs (Home Assistant's Model sensor)
        assert model_status["kind"] == "model_status" and model_status["state"] == "running"
        assert model_status["name"] == model.name and len(model_status["sha256"]) == 12
        configs = {m.topic: m.json() for m in sub.messages if m.topic.startswith("homeassistant/") and m.payload}
        sensor = configs["homeassistant/sensor/edgesqz_pi1/desk_left_label/config"]
        assert sensor["state_topic"] == f"{base}/left/label" and sensor["availability_mode"] == "all"
        assert {a["topic"] for a in sensor["availability"]} == {"site/pi1/status", "site/pi1/desk/status"}
        binary = configs["homeassistant/binary_sensor/edgesqz_pi1/desk_left_cat_left/config"]
        assert binary["state_topic"] == f"{base}/left/rule/cat_left/state"
        assert "homeassistant/sensor/edgesqz_pi1/desk_right_label/config" in configs
        assert not any("right_cat_left" in t for t in configs)
    finally:
        sub.close()
