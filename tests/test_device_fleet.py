"""Signed models over MQTT: ``edgesqz keys new``, ``edgesqz deploy`` (--status, --rollback) and ``ModelReceiver``.

A real Mosquitto broker on a loopback port, real Ed25519 keys, the installed default model, a variant of
it with other metadata (same input contract) and a tiny float classifier built with the runtime's schema
module (another input contract). keys/deploy run as the real CLI in subprocesses; receivers run in
process with an ``accept`` callback that records. Every test uses its own topic prefix (retained
messages of one test never reach another). Device-only: needs no TensorFlow.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mqtt_broker import Broker, Subscriber, mosquitto_binary

from edgesqz.device import fleet
from edgesqz.device.fleet import ModelReceiver
from edgesqz.device.models import packaged_model
from edgesqz.errors import EdgesqzError

pytestmark = pytest.mark.device
_prefixes = itertools.count()


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    mosquitto_binary()
    b = Broker(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")  # EDGESQZ_HOME of the deploy subprocesses (their history)


def cli(*args: object, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGESQZ_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "edgesqz", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Path:
    folder = tmp_path_factory.mktemp("keys") / "fleet"
    cli("keys", "new", folder, home=home)
    return folder


@pytest.fixture(scope="module")
def other_key() -> object:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def private_key(keys: Path) -> object:
    from edgesqz.keys import load_private_key

    return load_private_key(keys / "edgesqz.key")


@pytest.fixture(scope="module")
def model_a() -> Path:
    path = packaged_model()
    if path is None:
        pytest.skip("needs the installed default model")
    return path


@pytest.fixture(scope="module")
def model_b(model_a: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model with other metadata: another sha256, the same input contract."""
    from edgesqz.tflite_metadata import embed_metadata, read_metadata

    data = model_a.read_bytes()
    meta = read_metadata(data)
    out = tmp_path_factory.mktemp("models") / "squeezenet-b.tflite"
    out.write_bytes(embed_metadata(data, labels=meta.labels, info=meta.info, name="SqueezeNet 1.1 B",
                                   description="variant for the deploy tests", version="0.2.0"))
    return out


def tiny_classifier(side: int = 4) -> bytes:
    """A float32 [1, side, side, 3] -> RESHAPE -> [1, side*side*3] classifier (another input contract)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    classes = side * side * 3
    model = s.ModelT()
    model.version = 3
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.RESHAPE
    model.operatorCodes = [code]
    shape_buf = s.BufferT()
    shape_buf.data = np.array([1, classes], "<i4").tobytes()
    model.buffers = [s.BufferT(), s.BufferT(), shape_buf, s.BufferT()]
    tensors = []
    for name, shape, ttype, buf in (("image", [1, side, side, 3], s.TensorType.FLOAT32, 1),
                                    ("shape", [2], s.TensorType.INT32, 2),
                                    ("scores", [1, classes], s.TensorType.FLOAT32, 3)):
        t = s.TensorT()
        t.shape, t.type, t.buffer, t.name = shape, ttype, buf, name
        tensors.append(t)
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1], [2]
    sub = s.SubGraphT()
    sub.tensors, sub.inputs, sub.outputs, sub.operators = tensors, [0], [2], [op]
    model.subgraphs = [sub]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


class Device:
    """An in-process ModelReceiver whose accept records (path, manifest, bytes) and says yes (or ``verdict``)."""

    def __init__(self, broker: Broker, prefix: str, name: str, keys: Path, folder: Path, *,
                 max_bytes: int = 32 << 20, verdict: str | None = None, timeout: float = 10.0) -> None:
        self.accepted: list[tuple[Path, dict, bytes]] = []
        self.said: list[str] = []
        self.verdict = verdict
        self.folder = folder / name
        self.receiver = ModelReceiver(f"{broker.url}/{prefix}", device=name, trust=keys / "edgesqz.pub",
                                      models_dir=self.folder, accept=self._accept, max_bytes=max_bytes,
                                      say=self.said.append)
        self.receiver.assemble_timeout = timeout

    def _accept(self, path: Path, manifest: dict) -> str | None:
        assert threading.current_thread() is not threading.main_thread()
        self.accepted.append((path, manifest, path.read_bytes()))
        return self.verdict

    def __enter__(self) -> Device:
        self.receiver.start()
        assert self.receiver.connected.is_set()
        return self

    def __exit__(self, *exc: object) -> None:
        self.receiver.close()

    def wait(self, predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return
            time.sleep(0.05)
        raise AssertionError(f"not within {timeout} s; accepted {[m for _, m, _ in self.accepted]}, said {self.said}")

    def wait_taken(self, n: int, timeout: float = 15.0) -> None:
        """Until accept was called n times and the n-th deploy is saved as the one in use (it is reported then)."""
        self.wait(lambda d: len(d.accepted) >= n and d.receiver.current is not None
                  and d.receiver.current["seq"] == d.accepted[n - 1][1]["seq"], timeout)

    def stored(self) -> list[Path]:
        return sorted((self.folder / fleet.DEPLOYED_DIR).glob("*.tflite"))


def new_prefix() -> str:
    return f"fleet{next(_prefixes)}-{os.getpid()}"


def status_of(sub: Subscriber, prefix: str, device: str, timeout: float = 15.0) -> dict:
    topic = fleet.status_topic(prefix, device)
    sub.wait_for(lambda ms: any(m.topic == topic for m in ms), timeout)
    return sub.on(topic)[-1].json()


def publish_raw(broker: Broker, messages: list[tuple[str, bytes]]) -> None:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{time.monotonic_ns()}")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def deploy_messages(prefix: str, target: str, data: bytes, key: object, *, seq: int, contract: dict | None = None,
                    chunk_size: int = fleet.CHUNK_SIZE, size: int | None = None, signed: bool = True,
                    version: str = "v") -> tuple[dict, list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """(manifest, chunk messages, manifest message), as ``edgesqz deploy`` makes them, with knobs to lie."""
    sha = hashlib.sha256(data).hexdigest()
    n = math.ceil(len(data) / chunk_size)
    manifest = {"schema": "edgesqz/1", "kind": "model_deploy", "seq": seq, "version": version, "name": "test",
                "sha256": sha, "size": size or len(data), "chunks": math.ceil((size or len(data)) / chunk_size),
                "chunk_size": chunk_size, "contract": contract or fleet.model_contract(data),
                "created": fleet.now_iso()}
    if signed:
        manifest = fleet.sign(manifest, key)
    digest = bytes.fromhex(sha)
    chunks = [(fleet.chunk_topic(prefix, target, i), digest + data[i * chunk_size:(i + 1) * chunk_size])
              for i in range(n)]
    return manifest, chunks, [(fleet.deploy_topic(prefix, target), json.dumps(manifest).encode())]


def assert_refused(dev: Device, sub: Subscriber, prefix: str, reason: str) -> dict:
    report = status_of(sub, prefix, dev.receiver.device)
    assert report["kind"] == "model_status" and report["state"] == "refused", report
    assert reason in report["reason"], report
    assert not dev.accepted and not dev.stored()
    assert any(reason in line and line.startswith("warning: deploy: refused") for line in dev.said), dev.said
    return report


# --------------------------------------------------------------------------- keys


def test_keys_new_modes_force_and_refusals(tmp_path: Path, home: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from edgesqz.keys import load_private_key, load_public_key, new_keys

    folder = tmp_path / "k"
    old = os.umask(0)  # even with umask 0 the private key is 0600 from its creation
    try:
        private, public = new_keys(folder)
    finally:
        os.umask(old)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert b"BEGIN PRIVATE KEY" in private.read_bytes() and b"BEGIN PUBLIC KEY" in public.read_bytes()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left
    before = private.read_bytes()
    proc = cli("keys", "new", folder, home=home, check=False)
    assert proc.returncode == 2 and "--force" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert private.read_bytes() == before
    cli("keys", "new", folder, "--force", home=home)
    assert private.read_bytes() != before and stat.S_IMODE(private.stat().st_mode) == 0o600
    load_private_key(private)
    load_public_key(public)

    private.chmod(0o640)
    with pytest.raises(EdgesqzError, match=f"chmod 600 {private}"):
        load_private_key(private)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = {
        "rsa": (rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()), "not Ed25519"),
        "garbage": (b"hello, not a key\n", "not a PEM private key"),
        "empty": (b"", "is empty"),
        "huge": (b"A" * (1 << 20), "larger than"),
    }
    for name, (content, message) in bad.items():
        path = tmp_path / f"{name}.key"
        path.write_bytes(content)
        path.chmod(0o600)
        with pytest.raises(EdgesqzError, match=message):
            load_private_key(path)
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(EdgesqzError, match="not Ed25519"):
        load_public_key(rsa_pub)
    with pytest.raises(EdgesqzError, match="private key"):
        load_public_key(folder / "edgesqz.key")
    # the CLI: one line, exit 2
    proc = cli("deploy", packaged_model(), "--mqtt", "mqtt://127.0.0.1:1/x", "--key", tmp_path / "rsa.key",
               home=home, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "not Ed25519" in proc.stderr
    # the device: a bad --trust file is one EdgesqzError at construction
    with pytest.raises(EdgesqzError, match="--trust"):
        ModelReceiver("mqtt://127.0.0.1:1/x", device="cam", trust=tmp_path / "garbage.key", models_dir=tmp_path,
                      accept=lambda p, m: None)


# --------------------------------------------------------------------------- deploy


def test_deploy_reaches_running_and_later_devices_not_others(broker: Broker, keys: Path, home: Path,
                                                             model_a: Path, tmp_path: Path) -> None:
    prefix = new_prefix()
    sub = Subscriber(broker.port, (f"{prefix}/#",))
    url = f"{broker.url}/{prefix}"
    try:
        with Device(broker, prefix, "cam_1", keys, tmp_path) as cam1, Device(broker, prefix, "cam_2", keys,
                                                                              tmp_path) as cam2:
            proc = cli("deploy", model_a, "--mqtt", url, "--key", keys / "edgesqz.key", "--device", "cam_1",
                       "--json", home=home)
            sent = json.loads(proc.stdout)
            assert [m["topic"] for m in sent] == [f"{prefix}/cam_1/deploy"]
            cam1.wait(lambda d: d.accepted)
            path, manifest, data = cam1.accepted[0]
            assert data == model_a.read_bytes() and path.read_bytes() == data
            assert path == cam1.folder / "deployed" / f"SqueezeNet-1.1-int8-{manifest['sha256'][:12]}.tflite"
            assert manifest["sha256"] == hashlib.sha256(data).hexdigest() == sent[0]["sha256"]
            assert manifest["contract"] == {"input_shape": [1, 224, 224, 3], "input_dtype": "uint8",
                                            "input_scale": 1.0, "input_zero_point": 0, "classes": 1000}
            assert manifest["version"].endswith("+" + manifest["sha256"][:8])
            report = status_of(sub, prefix, "cam_1")
            assert report["state"] == "accepted" and report["seq"] == manifest["seq"] and report["reason"] is None
            assert report["current"]["sha256"] == manifest["sha256"]
            assert cam1.receiver.current["seq"] == manifest["seq"]
            state = json.loads((cam1.folder / "deploy-state.json").read_text())
            assert state["seq"] == manifest["seq"]
            # the messages on the broker: retained chunks before the manifest, all QoS 1
            got = [m.topic for m in sub.messages if m.topic.startswith(f"{prefix}/cam_1/deploy")]
            assert got[-1] == f"{prefix}/cam_1/deploy" and len(got) == manifest["chunks"] + 1
            time.sleep(1.0)  # a deploy to one --device does not reach another
            assert not cam2.accepted and not cam2.stored()
            assert not sub.on(fleet.status_topic(prefix, "cam_2"))
        # a device started after the deploy gets it from the retained messages
        with Device(broker, prefix, "cam_1", keys, tmp_path / "later") as late:
            late.wait(lambda d: d.accepted)
            assert late.accepted[0][2] == model_a.read_bytes()
            sub.wait_for(lambda ms: sum(m.topic == fleet.status_topic(prefix, "cam_1") for m in ms) == 2)
        # a restarted device does not take (nor report) the deploy it already has
        sub.clear()
        with Device(broker, prefix, "cam_1", keys, tmp_path) as again:
            time.sleep(1.0)
            assert not again.accepted and not again.said
            assert not sub.on(fleet.status_topic(prefix, "cam_1"))
    finally:
        sub.close()


def test_rollback_and_status(broker: Broker, keys: Path, home: Path, model_a: Path, model_b: Path,
                             tmp_path: Path) -> None:
    prefix = new_prefix()
    url = f"{broker.url}/{prefix}"
    key = keys / "edgesqz.key"
    with Device(broker, prefix, "pi_a", keys, tmp_path) as a, Device(broker, prefix, "pi_b", keys, tmp_path) as b:
        cli("deploy", model_a, "--mqtt", url, "--key", key, "--version", "first", home=home)
        for d in (a, b):
            d.wait_taken(1)
        cli("deploy", model_b, "--mqtt", url, "--key", key, home=home)
        for d in (a, b):
            d.wait_taken(2)
        proc = cli("deploy", "--rollback", "--mqtt", url, "--key", key, home=home)
        assert "first" in proc.stdout
        for d in (a, b):
            d.wait_taken(3)
            (_, m1, d1), (_, m2, d2), (_, m3, d3) = d.accepted
            assert d3 == d1 == model_a.read_bytes() and d2 == model_b.read_bytes()
            assert m3["version"] == "first" and m1["seq"] < m2["seq"] < m3["seq"]
            assert d.receiver.current["seq"] == m3["seq"]
        proc = cli("deploy", "--status", "--mqtt", url, "--json", "--wait", "1", home=home)
        reports = json.loads(proc.stdout)
        assert [r["device"] for r in reports] == ["pi_a", "pi_b"]
        assert all(r["state"] == "accepted" and r["version"] == "first" and r["seq"] == m3["seq"] for r in reports)
        text = cli("deploy", "--status", "--mqtt", url, "--wait", "1", home=home).stdout
        assert "pi_a: model first" in text and "last: accepted first" in text
    history = json.loads((home / "deploy" / "history.json").read_text())
    entries = history["targets"][f"127.0.0.1:{broker.port}/{prefix}/_all"]
    assert entries[0]["version"] == "first" and entries[-1]["rollback_of"] == entries[1]["version"]
    assert all(Path(e["file"]).exists() for e in entries)


def test_concurrent_deploys_higher_seq_wins(broker: Broker, keys: Path, model_a: Path, model_b: Path,
                                            tmp_path: Path) -> None:
    key = private_key(keys)
    for order in ("newer manifest first", "older manifest first"):
        prefix = new_prefix()
        with Device(broker, prefix, "cam", keys, tmp_path / order) as dev:
            _, chunks_a, man_a = deploy_messages(prefix, "_all", model_a.read_bytes(), key, seq=100, version="a")
            _, chunks_b, man_b = deploy_messages(prefix, "cam", model_b.read_bytes(), key, seq=200, version="b")
            manifests = [*man_b, *man_a] if order == "newer manifest first" else [*man_a, *man_b]
            publish_raw(broker, [*chunks_b, *chunks_a, *manifests])
            dev.wait(lambda d: d.receiver.current and d.receiver.current["version"] == "b")
            time.sleep(0.5)
            assert dev.accepted[-1][1]["version"] == "b" and dev.receiver.current["seq"] == 200, order


# --------------------------------------------------------------------------- refusals


def test_refusals(broker: Broker, keys: Path, model_a: Path, other_key: object, tmp_path: Path) -> None:
    """Tampered chunk, another key, unsigned, oversized, another input contract, a mismatching contract claim."""
    key = private_key(keys)
    data = model_a.read_bytes()
    tiny = tiny_classifier()

    def case(name: str, messages: list[tuple[str, bytes]], reason: str, **kw: object) -> None:
        prefix = new_prefix()
        sub = Subscriber(broker.port, (f"{prefix}/+/model",))
        try:
            with Device(broker, prefix, "cam", keys, tmp_path / name, **kw) as dev:
                publish_raw(broker, [(t.replace("PFX", prefix), p) for t, p in messages])
                assert_refused(dev, sub, prefix, reason)
        finally:
            sub.close()

    _, chunks, man = deploy_messages("PFX", "_all", data, key, seq=1)
    tampered = list(chunks)
    topic, payload = tampered[2]
    tampered[2] = (topic, payload[:-1] + bytes([payload[-1] ^ 1]))
    case("tampered", [*tampered, *man], "do not match its sha256", timeout=1.0)
    case("truncated", [*chunks[:-1], *man], "only 5 of 6 chunks", timeout=1.0)
    _, chunks, man = deploy_messages("PFX", "_all", data, other_key, seq=1)
    case("other-key", [*chunks, *man], "bad signature")
    _, chunks, man = deploy_messages("PFX", "_all", data, key, seq=1, signed=False)
    case("unsigned", [*chunks, *man], "unsigned")
    _, chunks, man = deploy_messages("PFX", "_all", data, key, seq=1)
    case("oversized", [*chunks, *man], "oversized", max_bytes=100_000)
    _, chunks, man = deploy_messages("PFX", "_all", tiny, key, seq=1, contract=fleet.model_contract(data),
                                     chunk_size=1024)
    case("lying-contract", [*chunks, *man], "input contract is not the manifest's")
    case("not-json", [("PFX/_all/deploy", b"\xff{")], "not JSON")

    # another input contract than the running model's (expected_contract), the live check's refusal
    prefix = new_prefix()
    sub = Subscriber(broker.port, (f"{prefix}/+/model",))
    try:
        with Device(broker, prefix, "cam", keys, tmp_path / "expected") as dev:
            dev.receiver.expected_contract = fleet.model_contract(data)
            _, chunks, man = deploy_messages(prefix, "_all", tiny, key, seq=1, chunk_size=1024)
            publish_raw(broker, [*chunks, *man])
            assert_refused(dev, sub, prefix, "another input contract: input_shape [1, 224, 224, 3] expected")
        with Device(broker, prefix, "cam2", keys, tmp_path / "live", verdict="the camera needs 224x224") as dev:
            dev.wait(lambda d: d.accepted)  # accept was called, said no: the file goes, the seq is not kept
            report = status_of(sub, prefix, "cam2")
            assert report["state"] == "refused" and "the camera needs 224x224" in report["reason"]
            assert not dev.stored() and dev.receiver.current is None
            assert not (dev.folder / "deploy-state.json").exists()
    finally:
        sub.close()


def test_replay_is_refused(broker: Broker, keys: Path, model_a: Path, model_b: Path, tmp_path: Path) -> None:
    prefix = new_prefix()
    key = private_key(keys)
    sub = Subscriber(broker.port, (f"{prefix}/+/model",))
    try:
        old_manifest, old_chunks, old_man = deploy_messages(prefix, "_all", model_b.read_bytes(), key, seq=5,
                                                            version="old")
        _, chunks, man = deploy_messages(prefix, "_all", model_a.read_bytes(), key, seq=10, version="new")
        with Device(broker, prefix, "cam", keys, tmp_path) as dev:
            publish_raw(broker, [*chunks, *man])
            dev.wait_taken(1)
            sub.wait_for(lambda ms: any(m.json()["state"] == "accepted" for m in ms))
            sub.clear()
            dev.said.clear()
            publish_raw(broker, [*old_chunks, *old_man])  # a replay of an older, validly signed deploy
            report = status_of(sub, prefix, "cam")
            assert report["state"] == "refused" and "replay: seq 5 is not above the last accepted seq 10" in \
                report["reason"]
            assert report["current"]["version"] == "new"
            assert len(dev.accepted) == 1
        # the seq survives a restart: the old retained deploy is not taken after a restart either
        with Device(broker, prefix, "cam", keys, tmp_path) as dev:
            time.sleep(1.0)
            assert not dev.accepted and dev.receiver.current["version"] == "new"
    finally:
        sub.close()
    assert old_manifest["seq"] == 5


def test_broker_unreachable_is_one_line(keys: Path, home: Path, model_a: Path, tmp_path: Path) -> None:
    from mqtt_broker import free_port

    proc = cli("deploy", model_a, "--mqtt", f"mqtt://127.0.0.1:{free_port()}/x", "--key", keys / "edgesqz.key",
               home=home, check=False)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "cannot reach the MQTT broker" in proc.stderr
    bad_model = tmp_path / "bad.tflite"
    bad_model.write_bytes(b"not a model at all")
    proc = cli("deploy", bad_model, "--mqtt", "mqtt://127.0.0.1:1/x", "--key", keys / "edgesqz.key", home=home,
               check=False)
    assert proc.returncode == 2 and "TFL3" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_full_disk_is_refused_with_nothing_half_written(broker: Broker, keys: Path, model_a: Path,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from edgesqz import fileio

    real = fileio.atomic_write

    def full(path: object, data: object, *, force: bool = True) -> None:
        if str(path).endswith(".tflite"):
            raise fileio.os_error(path, OSError(errno.ENOSPC, "No space left on device"))  # type: ignore[arg-type]
        real(path, data, force=force)  # type: ignore[arg-type]

    monkeypatch.setattr(fileio, "atomic_write", full)
    prefix = new_prefix()
    sub = Subscriber(broker.port, (f"{prefix}/+/model",))
    try:
        with Device(broker, prefix, "cam", keys, tmp_path) as dev:
            _, chunks, man = deploy_messages(prefix, "_all", model_a.read_bytes(), private_key(keys), seq=1)
            publish_raw(broker, [*chunks, *man])
            assert_refused(dev, sub, prefix, "the disk is full")
            assert not list(dev.folder.rglob("*.tflite*")) and dev.receiver.current is None
    finally:
        sub.close()


def test_broker_away_mid_delivery(keys: Path, model_a: Path, model_b: Path, tmp_path: Path) -> None:
    """Device: keeps waiting through a broker restart, the model in use unchanged; deployer: one error."""
    from edgesqz.deploy import Connection

    b = Broker(tmp_path).start()
    prefix = new_prefix()
    key = private_key(keys)
    try:
        with Device(b, prefix, "cam", keys, tmp_path) as dev:
            _, chunks, man = deploy_messages(prefix, "_all", model_a.read_bytes(), key, seq=1, version="a")
            publish_raw(b, [*chunks, *man])
            dev.wait_taken(1)
            _, chunks, man = deploy_messages(prefix, "_all", model_b.read_bytes(), key, seq=2, version="b")
            publish_raw(b, [*chunks[:2], *man])  # the broker goes away mid-delivery
            b.stop()
            time.sleep(0.5)
            assert len(dev.accepted) == 1 and dev.receiver.current["version"] == "a"
            b.start()
            assert dev.receiver.connected.wait(15)
            publish_raw(b, [*chunks, *man])  # the deployer tries again
            dev.wait_taken(2)
            assert dev.receiver.current["version"] == "b"
            assert any("lost the connection" in line for line in dev.said)
        with Connection(f"{b.url}/{prefix}") as conn:
            b.stop()
            with pytest.raises(EdgesqzError, match="went away") as err:
                for _ in range(50):
                    conn.publish_all([(fleet.chunk_topic(prefix, "_all", 0), b"x" * 1000)], "the chunks")
                    time.sleep(0.1)
            assert err.value.exit_code == 1 and "higher seq supersedes" in str(err.value)
    finally:
        b.stop()


def test_older_deploy_does_not_replace_a_newer_manifest(broker: Broker, keys: Path, model_a: Path, model_b: Path,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two deploys at once: the one with the lower seq, finishing last, does not overwrite the retained manifest."""
    from edgesqz import deploy as deploy_mod

    prefix = new_prefix()
    newer, newer_chunks, newer_man = deploy_messages(prefix, "_all", model_b.read_bytes(), private_key(keys),
                                                     seq=1 << 60, version="newer")
    real = deploy_mod.Connection.publish_all

    def publish_all(self, messages, what):  # type: ignore[no-untyped-def]
        real(self, messages, what)
        if what.startswith("the chunks"):  # the other deploy completes while this one publishes
            publish_raw(broker, [*newer_chunks, *newer_man])

    monkeypatch.setattr(deploy_mod.Connection, "publish_all", publish_all)
    with pytest.raises(EdgesqzError, match="a newer deploy") as err:
        deploy_mod.deploy(model_a, f"{broker.url}/{prefix}", keys / "edgesqz.key", say=lambda m: None,
                          folder=tmp_path / "history")
    assert err.value.exit_code == 1
    sub = Subscriber(broker.port, (fleet.deploy_topic(prefix, "_all"),))
    try:
        sub.wait_for(lambda ms: bool(ms), 10)
        assert sub.messages[-1].json()["seq"] == newer["seq"]
    finally:
        sub.close()
