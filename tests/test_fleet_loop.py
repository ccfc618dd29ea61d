"""The loop around the device, end to end: two ``edgesqz run`` processes as two Pis, a real Mosquitto broker.

- A deploy mid-run switches both devices within seconds, between two frames (frame numbers continuous);
  a device started after the deploy gets the model from the retained messages; a model signed with
  another key is refused while the running model goes on classifying.
- The whole loop on small data: a device collects frames (``run --collect``), they are sorted into two
  classes, ``edgesqz train`` fine-tunes SqueezeNet 1.1 on them, ``convert --int8`` makes the model, and
  ``edgesqz deploy`` delivers it to the running device, which classifies with the new classes without
  stopping. (Host: needs TensorFlow and the shared weights.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from mqtt_broker import Broker, Subscriber, mosquitto_binary

from edgesqz.device.models import packaged_model


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    mosquitto_binary()
    b = Broker(tmp_path_factory.mktemp("loop-broker")).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def video(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Coffee, then the cat: 30 frames each, panning, 30 fps."""
    path = tmp_path_factory.mktemp("loop-video") / "two.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (640, 480))
    for name in ("coffee.png", "chelsea.png"):
        image = cv2.resize(cv2.imread(str(photos_dir / name)), (800, 600))
        for i in range(30):
            writer.write(np.ascontiguousarray(image[60:540, i * 4:i * 4 + 640]))
    writer.release()
    return path


def edgesqz(*args: object, home: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgesqz", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "EDGESQZ_HOME": str(home)})


class Device:
    """``edgesqz run --mqtt ... --trust KEY.pub`` on a looping video, its JSON lines in a file."""

    def __init__(self, name: str, folder: Path, model: Path, video: Path, broker: Broker, prefix: str, pub: Path,
                 *extra: object) -> None:
        self.name = name
        self.home = folder / name
        self.home.mkdir(parents=True)
        self.output = folder / f"{name}.jsonl"
        self.err = (folder / f"{name}.err").open("w")
        args = ["run", "--model", model, "--source", video, "--loop", "--fps", 30, "--threads", 1, "--no-display",
                "--mqtt", f"{broker.url}/{prefix}", "--device-id", name, "--trust", pub, "-o", self.output, *extra]
        self.proc = subprocess.Popen([sys.executable, "-m", "edgesqz", *map(str, args)], stdout=subprocess.DEVNULL,
                                     stderr=self.err, env={**os.environ, "EDGESQZ_HOME": str(self.home)})

    def rows(self) -> list[dict]:
        if not self.output.exists():
            return []
        lines = self.output.read_text().splitlines()
        out = []
        for line in lines:
            try:
                obj = json.loads(line)
            except ValueError:  # the line being written
                continue
            if obj["kind"] == "classification":
                out.append(obj)
        return out

    def wait_for(self, sha: str, timeout: float = 60) -> float:
        """Wait until the device classifies with the model whose sha256 starts with ``sha``; when it first did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.rows()
            if any(r["model"]["sha256"] == sha[:12] for r in rows):
                return time.time()
            assert self.proc.poll() is None, self.stderr()
            time.sleep(0.1)
        raise AssertionError(f"{self.name} did not take {sha[:12]}: {self.stderr()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(30)
        self.err.close()
        return code

    def stderr(self) -> str:
        self.err.flush()
        return Path(self.err.name).read_text()


def _continuous_switch(rows: list[dict], old: str, new: str) -> int:
    shas = [r["model"]["sha256"] for r in rows]
    assert set(shas) <= {old, new}, set(shas)
    switch = shas.index(new)
    assert shas[switch:] == [new] * (len(shas) - switch), "one switch, and no way back"
    frames = [r["frame"] for r in rows]
    assert frames[switch] == frames[switch - 1] + 1, (frames[switch - 3:switch + 3], "a frame was lost at the switch")
    return switch


def test_deploy_switches_running_and_late_devices_and_refuses_another_key(broker: Broker, video: Path,
                                                                          tmp_path: Path, int8_model: Path) -> None:
    model = packaged_model()
    assert model is not None
    keys, other = tmp_path / "keys", tmp_path / "other"
    for folder in (keys, other):
        assert edgesqz("keys", "new", folder, home=tmp_path).returncode == 0
    prefix = "loop1"
    sub = Subscriber(broker.port, (f"{prefix}/#",))
    devices = [Device(n, tmp_path, model, video, broker, prefix, keys / "edgesqz.pub") for n in ("pi_a", "pi_b")]
    try:
        for dev in devices:
            dev.wait_for(_sha(model))
        # another key: refused, the running model goes on
        p = edgesqz("deploy", int8_model, "--mqtt", f"{broker.url}/{prefix}", "--key", other / "edgesqz.key",
                    home=tmp_path / "deployer-other")
        assert p.returncode == 0, p.stderr
        sub.wait_for(lambda ms: all(any(m.topic == f"{prefix}/{d.name}/model" and b'"refused"' in m.payload
                                        for m in ms) for d in devices))
        time.sleep(0.5)
        for dev in devices:
            assert {r["model"]["sha256"] for r in dev.rows()} == {_sha(model)[:12]}
            assert "signature" in dev.stderr()
        # the right key: both devices switch within seconds, between two frames
        t0 = time.time()
        p = edgesqz("deploy", int8_model, "--mqtt", f"{broker.url}/{prefix}", "--key", keys / "edgesqz.key",
                    "--version", "v2", home=tmp_path / "deployer")
        assert p.returncode == 0, p.stderr
        took = [dev.wait_for(_sha(int8_model)) - t0 for dev in devices]
        assert max(took) < 20, took
        late = Device("pi_late", tmp_path, model, video, broker, prefix, keys / "edgesqz.pub")
        late.wait_for(_sha(int8_model))  # from the retained deploy
        time.sleep(1.0)
        for dev in [*devices, late]:
            assert dev.stop() == 0, dev.stderr()
        for dev in devices:
            rows = dev.rows()
            _continuous_switch(rows, _sha(model)[:12], _sha(int8_model)[:12])
            assert rows[-1]["model"]["version"] == "v2"
        reports = {d: json.loads(m.payload) for m in sub.messages for d in ("pi_a", "pi_b", "pi_late")
                   if m.topic == f"{prefix}/{d}/model"}
        assert all(r["state"] == "accepted" and r["version"] == "v2" for r in reports.values()), reports
        status = edgesqz("deploy", "--status", "--mqtt", f"{broker.url}/{prefix}", "--json", home=tmp_path)
        assert status.returncode == 0 and {"pi_a", "pi_b", "pi_late"} <= _devices(status.stdout), status.stdout
    finally:
        sub.close()
        for dev in devices:
            if dev.proc.poll() is None:
                dev.proc.kill()


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _devices(text: str) -> set[str]:
    data = json.loads(text)
    reports = data if isinstance(data, list) else data.get("devices", data.get("reports", []))
    return {r["device"] for r in reports}


@pytest.mark.slow
def test_collect_train_convert_deploy_the_whole_loop(broker: Broker, video: Path, tmp_path: Path,
                                                     real_weights: Path) -> None:
    pytest.importorskip("tensorflow")
    model = packaged_model()
    assert model is not None
    keys = tmp_path / "keys"
    assert edgesqz("keys", "new", keys, home=tmp_path).returncode == 0
    data = tmp_path / "data"
    # 1. the device collects what its camera sees (every 0.1 s; near-duplicates skipped)
    prefix = "loop2"
    dev = Device("pi", tmp_path, model, video, broker, prefix, keys / "edgesqz.pub", "--collect", data,
                 "--collect-every", 0.1)
    try:
        deadline = time.monotonic() + 60
        while len(list((data / "_unsorted").glob("*.jpg"))) < 24 and time.monotonic() < deadline:
            time.sleep(0.2)
        # 2. the user sorts _unsorted/ into classes (here by what the photo was: the model's top-1 family)
        lines = [json.loads(x) for x in (data / "manifest.jsonl").read_text().splitlines()]
        for line in lines:
            top = line["top_k"][0]["label"]
            label = "cat" if "cat" in top or top in ("tabby", "lynx") else "coffee"
            (data / label).mkdir(exist_ok=True)
            shutil.move(data / line["file"], data / label / Path(line["file"]).name)
        assert len(list((data / "cat").glob("*.jpg"))) >= 4 and len(list((data / "coffee").glob("*.jpg"))) >= 4
        # 3. train and convert on the host
        trained = tmp_path / "mine.keras"
        p = edgesqz("train", "--data", data, "--weights", real_weights, "--epochs", 1, "--batch-size", 8, "-o",
                    trained, home=tmp_path)
        assert p.returncode == 0, p.stderr
        mine = tmp_path / "mine.tflite"
        p = edgesqz("convert", "--weights", trained, "--int8", "--calib", data, "--calib-count", 16, "--ptq", "plain",
                    "-o", mine, home=tmp_path)
        assert p.returncode == 0, p.stderr
        # 4. deploy it back: the running device classifies with the two new classes, without stopping
        p = edgesqz("deploy", mine, "--mqtt", f"{broker.url}/{prefix}", "--key", keys / "edgesqz.key",
                    home=tmp_path / "deployer")
        assert p.returncode == 0, p.stderr
        dev.wait_for(_sha(mine), timeout=60)
        time.sleep(1.0)
        assert dev.stop() == 0, dev.stderr()
        rows = dev.rows()
        switch = _continuous_switch(rows, _sha(model)[:12], _sha(mine)[:12])
        assert {p["label"] for r in rows[switch:] for p in r["top_k"]} <= {"cat", "coffee"}
    finally:
        if dev.proc.poll() is None:
            dev.proc.kill()
