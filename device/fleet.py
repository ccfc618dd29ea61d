"""Signed model delivery over MQTT: the message format (shared with ``edgesqz deploy``) and :class:`ModelReceiver`.

Topics (``PREFIX`` from the ``--mqtt`` URL, ``TARGET`` a device id or ``_all`` for every device):

- ``PREFIX/TARGET/deploy/chunk/I`` (retained, QoS 1): chunk I of the model, published first. Payload: the
  model's 32-byte SHA-256 digest, then up to ``chunk_size`` bytes of the model. The digest lets a device
  keep the chunks of two deploys apart; it proves nothing (the manifest's signed sha256 does).
- ``PREFIX/TARGET/deploy`` (retained, QoS 1): the manifest, a ``model_deploy`` JSON object signed with
  Ed25519 (see :func:`canonical`), published last.
- ``PREFIX/DEVICE/model`` (retained, QoS 1): the device's ``model_status`` report.

Everything received is untrusted. A manifest is accepted only when it is at most
:data:`MAX_MANIFEST_BYTES` of JSON with the required fields and types, its signature verifies with the
trusted public key, its ``seq`` is above the last accepted one (persisted, so a replay is refused even
after a restart), its size is at most ``max_bytes``, its chunks add up to its size and sha256, the bytes
pass the model validator (:func:`edgesqz.tflite_validate.validate_model`) and the metadata reader, and
the model's input contract equals the one the manifest states. Only then is the model written
(atomically) and handed to ``accept``; nothing refused ever reaches the TFLite runtime.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgesqz.errors import EdgesqzError

log = logging.getLogger("edgesqz.device.fleet")

SCHEMA = "edgesqz/1"
ALL = "_all"  # the target that means every device under the prefix
CHUNK_SIZE = 256 << 10
MIN_CHUNK_SIZE = 1 << 10
MAX_CHUNK_SIZE = 1 << 20
DIGEST_BYTES = 32  # the chunk header: the model's raw SHA-256
MAX_MANIFEST_BYTES = 64 << 10
MAX_TEXT = 200  # version, name, created
ASSEMBLE_TIMEOUT_S = 120.0  # how long a verified manifest waits for its chunks
CONNECT_WAIT_S = 5.0
STATE_FILE = "deploy-state.json"
DEPLOYED_DIR = "deployed"
KEEP_DEPLOYED = 3  # model files kept in models_dir/deployed (the one in use and the previous ones)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_AUTH_FAILURES = {"Bad user name or password", "Not authorized", "Client identifier not valid", "Banned",
                  "Bad authentication method"}

# field -> type; bool is refused where int is expected
MANIFEST_FIELDS: dict[str, type] = {
    "schema": str, "kind": str, "seq": int, "version": str, "name": str, "sha256": str, "size": int, "chunks": int,
    "chunk_size": int, "contract": dict, "created": str, "signature": str,
}
CONTRACT_FIELDS: dict[str, Any] = {
    "input_shape": list, "input_dtype": str, "input_scale": (float, int, type(None)),
    "input_zero_point": (int, type(None)), "classes": int,
}


# --------------------------------------------------------------------------- topics


def deploy_topic(prefix: str, target: str) -> str:
    return f"{prefix}/{target}/deploy"


def chunk_topic(prefix: str, target: str, index: int) -> str:
    return f"{prefix}/{target}/deploy/chunk/{index}"


def status_topic(prefix: str, device: str) -> str:
    return f"{prefix}/{device}/model"


def check_device_id(device: str, what: str = "device id") -> str:
    """A device id is one MQTT topic level: no ``/ + #``, not empty, not ``_all``."""
    if not device or any(c in device for c in "/+#\0") or device == ALL or len(device) > 128:
        raise EdgesqzError(f"{what} {device!r} must be one topic level (no / + #, not {ALL!r}, at most 128 "
                           "characters)")
    return device


# --------------------------------------------------------------------------- manifests


def canonical(manifest: dict[str, Any]) -> bytes:
    """What the signature covers: the manifest without ``signature``, sorted keys, compact separators, UTF-8."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def sign(manifest: dict[str, Any], private_key: Any) -> dict[str, Any]:
    """The manifest with its ``signature`` (base64 of the Ed25519 signature of :func:`canonical`)."""
    signature = private_key.sign(canonical(manifest))
    return {**{k: v for k, v in manifest.items() if k != "signature"},
            "signature": base64.b64encode(signature).decode("ascii")}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_manifest(payload: bytes) -> dict[str, Any]:
    """A manifest's JSON, with its fields and types checked (not its signature); EdgesqzError says why not."""
    if len(payload) > MAX_MANIFEST_BYTES:
        raise EdgesqzError(f"the manifest is {len(payload)} bytes (at most {MAX_MANIFEST_BYTES})")
    try:
        manifest = json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeError, ValueError, RecursionError):
        raise EdgesqzError("the manifest is not JSON") from None
    if not isinstance(manifest, dict):
        raise EdgesqzError("the manifest is not a JSON object")
    if "signature" not in manifest:
        raise EdgesqzError("the manifest is unsigned (no signature)")
    for key, kind in MANIFEST_FIELDS.items():
        value = manifest.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, kind):
            raise EdgesqzError(f"the manifest's {key} is missing or not a {kind.__name__}")
    if manifest["schema"] != SCHEMA or manifest["kind"] != "model_deploy":
        raise EdgesqzError(f"the manifest is not an {SCHEMA} model_deploy")
    for key in ("version", "name", "created"):
        if not manifest[key] or len(manifest[key]) > MAX_TEXT:
            raise EdgesqzError(f"the manifest's {key} is empty or longer than {MAX_TEXT} characters")
    if not _HEX64.fullmatch(manifest["sha256"]):
        raise EdgesqzError("the manifest's sha256 is not 64 lower-case hex digits")
    if not 0 <= manifest["seq"] < 1 << 62:
        raise EdgesqzError("the manifest's seq is out of range")
    size, chunk_size = manifest["size"], manifest["chunk_size"]
    if size < 1 or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise EdgesqzError(f"the manifest's size or chunk_size is out of range (chunks of {MIN_CHUNK_SIZE} to "
                           f"{MAX_CHUNK_SIZE} bytes)")
    if manifest["chunks"] != math.ceil(size / chunk_size):
        raise EdgesqzError(f"the manifest's chunks ({manifest['chunks']}) do not fit its size and chunk_size")
    check_contract(manifest["contract"], "the manifest's contract")
    return manifest


def verify(manifest: dict[str, Any], public_key: Any) -> None:
    """Raise EdgesqzError unless ``manifest["signature"]`` is the trusted key's signature of :func:`canonical`."""
    from cryptography.exceptions import InvalidSignature

    try:
        signature = base64.b64decode(manifest["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise EdgesqzError("the manifest's signature is not base64") from None
    if len(signature) != 64:
        raise EdgesqzError("the manifest's signature is not an Ed25519 signature (64 bytes)")
    try:
        public_key.verify(signature, canonical(manifest))
    except InvalidSignature:
        raise EdgesqzError("bad signature: the manifest was not signed by the trusted key, or was changed") from None


# --------------------------------------------------------------------------- the input contract

# TFLite TensorType -> numpy dtype name (the types a classifier's input may have and a few more)
_DTYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16", 9: "int8",
           10: "float64", 15: "uint32", 16: "uint16"}


def check_contract(contract: dict[str, Any], what: str) -> None:
    for key, kind in CONTRACT_FIELDS.items():
        value = contract.get(key, ...)
        if value is ... or isinstance(value, bool) or not isinstance(value, kind):
            raise EdgesqzError(f"{what} has no valid {key}")
    shape = contract["input_shape"]
    if not 1 <= len(shape) <= 8 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31
                                             for d in shape):
        raise EdgesqzError(f"{what} has an invalid input_shape")


def model_contract(data: bytes, src: str = "the model") -> dict[str, Any]:
    """The input contract of a VALIDATED classifier model, read from the flatbuffer (no interpreter):
    ``{"input_shape", "input_dtype", "input_scale", "input_zero_point", "classes"}``.

    Raises EdgesqzError when the model is not an image classifier edgesqz can run.
    """
    import numpy as np
    from flatbuffers import number_types as fbn

    from edgesqz.device.classifier import check_classifier_io
    from edgesqz.tflite_metadata import _PARSE_ERRORS, _Tbl
    from edgesqz.tflite_validate import (
        _M_SUBGRAPHS,
        _Q_SCALE,
        _Q_ZERO_POINT,
        _SG_INPUTS,
        _SG_OUTPUTS,
        _SG_TENSORS,
        _T_QUANT,
        _T_SHAPE,
        _T_TYPE,
        _ints,
    )

    try:
        sub = _Tbl.root(data).tables(_M_SUBGRAPHS)[0]
        tensors = sub.tables(_SG_TENSORS)

        def detail(i: int) -> dict[str, Any]:
            t = tensors[i]
            ttype = t.scalar(_T_TYPE, fbn.Int8Flags)
            q = t.table(_T_QUANT)
            scales = (q.floats(_Q_SCALE) or []) if q is not None else []
            zeros = _ints(q, _Q_ZERO_POINT, fbn.Int64Flags, cap=1 << 16) if q is not None else []
            return {"shape": _ints(t, _T_SHAPE, cap=16), "dtype": np.dtype(_DTYPES.get(ttype, "void")),
                    "scale": scales[0] if len(scales) == 1 else None,
                    "zero_point": zeros[0] if len(zeros) == 1 else None}

        inputs = [detail(i) for i in _ints(sub, _SG_INPUTS)]
        outputs = [detail(i) for i in _ints(sub, _SG_OUTPUTS)]
    except (*_PARSE_ERRORS, IndexError) as exc:
        raise EdgesqzError(f"{src}: cannot read its input and output tensors ({exc})") from None
    classes = check_classifier_io(src, inputs, outputs)
    inp = inputs[0]
    quantized = inp["dtype"] != np.float32 and inp["scale"] is not None
    return {"input_shape": [int(d) for d in inp["shape"]], "input_dtype": inp["dtype"].name,
            "input_scale": float(inp["scale"]) if quantized else None,
            "input_zero_point": int(inp["zero_point"] or 0) if quantized else None, "classes": int(classes)}


def check_model_bytes(data: bytes, src: str) -> dict[str, Any]:
    """Validate model bytes like :func:`edgesqz.device.runtime.check_model_file` does a file; return its contract."""
    from edgesqz.tflite_metadata import read_metadata
    from edgesqz.tflite_validate import validate_model

    validate_model(data, src)
    read_metadata(data, src=src)
    return model_contract(data, src)


def contract_differences(actual: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """``key: expected X, the model has Y`` for every contract field that differs."""
    out = []
    for key in CONTRACT_FIELDS:
        a, e = actual.get(key), expected.get(key)
        if isinstance(a, float) and isinstance(e, (int, float)) and not isinstance(e, bool):
            same = math.isclose(a, e, rel_tol=1e-6, abs_tol=0.0)
        else:
            same = a == e
        if not same:
            out.append(f"{key} {json.dumps(e)} expected, the model has {json.dumps(a)}")
    return out


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:64]
    return cleaned or "model"


def summary(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    if not manifest:
        return None
    return {k: manifest.get(k) for k in ("version", "name", "sha256", "seq")}


# --------------------------------------------------------------------------- the receiver


@dataclasses.dataclass
class _Pending:
    target: str
    manifest: dict[str, Any]
    digest: bytes
    deadline: float
    fingerprint: bytes = b""  # of the manifest message: a final refusal is not evaluated again
    tried: int = -1  # the chunk generation last checked (a mismatch waits for new chunks)
    mismatch: bool = False


class ModelReceiver:
    """Receives signed models on ``PREFIX/DEVICE/deploy`` and ``PREFIX/_all/deploy`` (see the module docstring).

    ``accept(path, manifest)`` is called in the receiver's own thread with the stored, validated model; it
    returns None when the model was taken into use, else the reason it was refused. ``expected_contract``
    (a contract dict, default None) may be set to refuse, before ``accept``, a model whose input contract
    differs (e.g. the contract of the running model); ``assemble_timeout`` is how long a verified manifest
    waits for its chunks.
    """

    def __init__(self, url: str, *, device: str, trust: Path, models_dir: Path,
                 accept: Callable[[Path, dict], str | None], password: str | None = None,
                 ca_file: Path | None = None, max_bytes: int = 32 << 20,
                 say: Callable[[str], None] | None = None) -> None:
        from edgesqz.device.mqtt import parse_mqtt_url
        from edgesqz.keys import load_public_key

        self.target = parse_mqtt_url(url)
        if password is not None and self.target.username and self.target.password is None:
            self.target = dataclasses.replace(self.target, password=password)
        if ca_file is not None and not Path(ca_file).is_file():
            raise EdgesqzError(f"--mqtt-ca {ca_file}: no such file")
        if ca_file is not None and not self.target.tls:
            raise EdgesqzError("--mqtt-ca needs an mqtts:// URL")
        self.device = check_device_id(device)
        self.public_key = load_public_key(trust, "--trust")
        self.models_dir = Path(models_dir).expanduser()
        self.accept = accept
        self.ca_file = ca_file
        if max_bytes < 1:
            raise EdgesqzError("max_bytes must be positive")
        self.max_bytes = int(max_bytes)
        self.say = say or (lambda message: log.warning("%s", message))
        self.expected_contract: dict[str, Any] | None = None
        self.assemble_timeout = ASSEMBLE_TIMEOUT_S
        self.client_id = f"edgesqz-fleet-{device}-{secrets.token_hex(3)}"
        self.connected = threading.Event()
        self.prefix = self.target.prefix
        self._state_path = self.models_dir / STATE_FILE
        self._state = self._load_state()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: _Pending | None = None
        # (target, index, digest) -> (payload without the header, arrival time)
        self._chunks: dict[tuple[str, int, bytes], tuple[bytes, float]] = {}
        self._held = 0
        self._generation = 0
        self._refused: set[bytes] = set()  # digests of manifest payloads refused for good
        self._client: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._first = threading.Event()
        self._login_refused: str | None = None
        self._outage_said = False

    # -- persisted state

    def _load_state(self) -> dict[str, Any]:
        try:
            with self._state_path.open("rb") as f:
                from edgesqz.fileio import read_capped

                data = read_capped(f, MAX_MANIFEST_BYTES * 4)
        except FileNotFoundError:
            return {"seq": -1, "manifest": None, "path": None}
        except OSError as exc:
            raise EdgesqzError(f"cannot read {self._state_path}: {exc.strerror or exc}") from exc
        try:
            state = json.loads(data or b"")
            seq = state["seq"]
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise ValueError("seq")
        except (ValueError, KeyError, TypeError):
            # Refusing to start would keep the camera down; starting from seq -1 would accept replays.
            raise EdgesqzError(f"{self._state_path} is damaged; it holds the last accepted deploy's seq (replay "
                               "protection): delete it only if you trust every retained deploy message") from None
        return {"seq": seq, "manifest": state.get("manifest"), "path": state.get("path")}

    def _save_state(self, manifest: dict[str, Any], path: Path) -> None:
        from edgesqz.fileio import atomic_write

        state = {"schema": SCHEMA, "seq": manifest["seq"], "manifest": manifest, "path": str(path),
                 "updated": now_iso()}
        atomic_write(self._state_path, json.dumps(state, indent=1) + "\n", force=True)
        self._state = {"seq": manifest["seq"], "manifest": manifest, "path": str(path)}

    @property
    def current(self) -> dict | None:
        """The manifest of the model in use from a deploy (persisted in ``models_dir/deploy-state.json``), or None."""
        manifest = self._state.get("manifest")
        return dict(manifest) if isinstance(manifest, dict) else None

    @property
    def current_path(self) -> Path | None:
        """The stored file of :attr:`current`, when it still exists."""
        path = self._state.get("path")
        return Path(path) if path and Path(path).is_file() else None

    @property
    def last_seq(self) -> int:
        return int(self._state["seq"])

    # -- connection

    def start(self) -> None:
        """Connect (waits at most a few seconds; an unreachable broker is retried in the background) and subscribe."""
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True,
                             protocol=mqtt.MQTTv311)
        if self.target.username:
            client.username_pw_set(self.target.username, self.target.password)
        if self.target.tls:
            try:
                client.tls_set(ca_certs=str(self.ca_file) if self.ca_file else None, cert_reqs=ssl.CERT_REQUIRED,
                               tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError) as exc:
                raise EdgesqzError(f"--mqtt-ca {self.ca_file}: cannot load it ({exc})") from exc
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = lambda *args: self._first.set()
        client.on_message = self._on_message
        self._client = client
        self._stop.clear()
        self._thread = threading.Thread(target=self._work, name="edgesqz-fleet", daemon=True)
        self._thread.start()
        where = f"{self.target.host}:{self.target.port}"
        try:
            socket.getaddrinfo(self.target.host, self.target.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            self.say(f"warning: deploy: cannot resolve {self.target.host} ({exc.strerror}); retrying in the "
                     "background")
        client.connect_async(self.target.host, self.target.port, keepalive=30)
        client.loop_start()
        self._first.wait(CONNECT_WAIT_S)
        if self._login_refused is not None:
            self.close()
            raise EdgesqzError(f"--mqtt: the broker at {where} refused the connection: {self._login_refused}; "
                               "check the user name and password")
        if not self.connected.is_set():
            self._outage_said = True
            self.say(f"warning: deploy: cannot reach the broker at {where} yet; retrying in the background")

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.disconnect()
            self._client.loop_stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
        with self._lock:
            self._chunks.clear()
            self._held = 0
            self._pending = None

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            name = reason.getName() if hasattr(reason, "getName") else str(reason)
            if not self._first.is_set() and name in _AUTH_FAILURES:
                self._login_refused = name
                self._first.set()
            return
        if self._outage_said:
            self.say(f"deploy: connected to {self.target.host}:{self.target.port}")
        self._outage_said = False
        client.subscribe([(f"{deploy_topic(self.prefix, self.device)}/#", 1),
                          (f"{deploy_topic(self.prefix, ALL)}/#", 1)])
        self.connected.set()
        self._first.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        if not self._stop.is_set() and not self._outage_said:
            self._outage_said = True
            self.say(f"warning: deploy: lost the connection to {self.target.host}:{self.target.port} ({reason}); "
                     "reconnecting (the running model is unchanged)")

    # -- messages (paho's thread: cheap work only)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            self._handle(message.topic, bytes(message.payload), bool(message.retain))
        except Exception as exc:  # never let one message kill paho's thread
            log.exception("deploy: message on %s: %s", message.topic, exc)

    def _handle(self, topic: str, payload: bytes, retained: bool) -> None:
        head = f"{self.prefix}/"
        if not topic.startswith(head):
            return
        parts = topic[len(head):].split("/")
        if len(parts) < 2 or parts[0] not in (self.device, ALL) or parts[1] != "deploy":
            return
        target = parts[0]
        if len(parts) == 2:
            if payload:
                self._on_manifest(target, payload, retained)
        elif (len(parts) == 4 and parts[2] == "chunk" and parts[3].isdigit() and len(parts[3]) <= 6
              and len(payload) > DIGEST_BYTES):
            self._on_chunk(target, int(parts[3]), payload)

    def _on_manifest(self, target: str, payload: bytes, retained: bool) -> None:
        fingerprint = hashlib.sha256(target.encode() + b"\0" + payload).digest()
        if fingerprint in self._refused:
            return  # refused before (a retained message seen again after a reconnection)
        if len(self._refused) > 10_000:  # a flood of junk: forget (re-checking costs a signature check)
            self._refused.clear()
        manifest: dict[str, Any] | None = None
        try:
            manifest = parse_manifest(payload)
            verify(manifest, self.public_key)
        except EdgesqzError as exc:
            self._refused.add(fingerprint)
            self._refuse(manifest, str(exc))
            return
        current = self.current or {}
        with self._lock:
            last = self.last_seq
            if manifest["seq"] <= last:
                if retained and ((manifest["seq"] == last and manifest["sha256"] == current.get("sha256"))
                                 or manifest["seq"] < last):
                    # the deploy in use, or an older retained one another target still holds: nothing new
                    return
                self._refused.add(fingerprint)
                reason = f"replay: seq {manifest['seq']} is not above the last accepted seq {last}"
            elif manifest["size"] > self.max_bytes:
                self._refused.add(fingerprint)
                reason = (f"oversized: {manifest['size']} bytes, this device accepts at most {self.max_bytes} "
                          "(max_bytes)")
            else:
                pending = self._pending
                if pending is not None and pending.manifest["seq"] >= manifest["seq"]:
                    if pending.manifest["seq"] > manifest["seq"]:
                        self.say(f"deploy: {manifest['version']} (seq {manifest['seq']}) is superseded by "
                                 f"{pending.manifest['version']} (seq {pending.manifest['seq']}); ignored")
                    return
                if pending is not None:
                    self.say(f"deploy: {pending.manifest['version']} (seq {pending.manifest['seq']}) is superseded "
                             f"by {manifest['version']} (seq {manifest['seq']})")
                # chunks of other deploys stay (within max_bytes): a newer manifest may follow
                self._pending = _Pending(target, manifest, bytes.fromhex(manifest["sha256"]),
                                         time.monotonic() + self.assemble_timeout, fingerprint)
                reason = None
        if reason is not None:
            self._refuse(manifest, reason)
        else:
            self._wake.set()

    def _on_chunk(self, target: str, index: int, payload: bytes) -> None:
        digest, data = payload[:DIGEST_BYTES], payload[DIGEST_BYTES:]
        with self._lock:
            pending = self._pending
            if pending is not None and pending.target == target and pending.digest == digest:
                if index >= pending.manifest["chunks"] or len(data) > pending.manifest["chunk_size"]:
                    return
            elif len(data) > MAX_CHUNK_SIZE:
                return
            key = (target, index, digest)
            old = self._chunks.pop(key, None)
            if old is not None:
                self._held -= len(old[0])
            if self._held + len(data) > self.max_bytes:
                self._evict_unrelated()
            if self._held + len(data) > self.max_bytes:
                return  # dropped: more than max_bytes of chunks that belong to no manifest we wait for
            self._chunks[key] = (data, time.monotonic())
            self._held += len(data)
            self._generation += 1
        self._wake.set()

    def _evict_unrelated(self, older_than: float | None = None) -> None:
        """Drop held chunks that do not belong to the pending manifest (all, or those older than a time). Locked."""
        pending = self._pending
        for key in list(self._chunks):
            target, _index, digest = key
            if pending is not None and target == pending.target and digest == pending.digest:
                continue
            if older_than is not None and self._chunks[key][1] >= older_than:
                continue
            self._held -= len(self._chunks.pop(key)[0])

    # -- the worker thread: assembly, checks, storing, accept

    def _work(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.25)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._step()
            except Exception as exc:  # a bug must not stop the receiver; the model in use is unchanged
                log.exception("deploy: %s", exc)

    def _step(self) -> None:
        now = time.monotonic()
        with self._lock:
            self._evict_unrelated(older_than=now - self.assemble_timeout)
            pending = self._pending
            if pending is None:
                return
            m = pending.manifest
            parts = [self._chunks.get((pending.target, i, pending.digest)) for i in range(m["chunks"])]
            complete = all(p is not None for p in parts)
            generation = self._generation
            check = complete and generation != pending.tried
            if check:
                pending.tried = generation
        if check:
            # hash the chunks where they are; join them (one copy) only when they match
            sha = hashlib.sha256()
            for p in parts:
                sha.update(p[0])  # type: ignore[index]
            size = sum(len(p[0]) for p in parts)  # type: ignore[index]
            if size == m["size"] and sha.hexdigest() == m["sha256"]:
                with self._lock:
                    if self._pending is not pending:
                        return  # superseded meanwhile
                    self._pending = None
                    for i in range(m["chunks"]):
                        old = self._chunks.pop((pending.target, i, pending.digest), None)
                        if old is not None:
                            self._held -= len(old[0])
                data = b"".join(p[0] for p in parts)  # type: ignore[index]
                del parts
                self._install(m, data, pending.fingerprint)
                return
            pending.mismatch = True
        if now >= pending.deadline:
            with self._lock:
                if self._pending is not pending:
                    return
                self._pending = None
                self._evict_unrelated()
                have = sum(1 for p in parts if p is not None)
            if complete or pending.mismatch:
                reason = ("its chunks do not match its sha256 (tampered or truncated); waited "
                          f"{self.assemble_timeout:g} s for matching chunks")
            else:
                reason = f"only {have} of {m['chunks']} chunks arrived within {self.assemble_timeout:g} s"
            self._refuse(m, reason)

    def _install(self, manifest: dict[str, Any], data: bytes, fingerprint: bytes = b"") -> None:
        src = f"deployed model {manifest['version']}"
        reason = None
        try:
            contract = check_model_bytes(data, src)
        except EdgesqzError as exc:
            reason = f"invalid model: {exc}"
        else:
            diffs = contract_differences(contract, manifest["contract"])
            if diffs:
                reason = "the model's input contract is not the manifest's: " + "; ".join(diffs)
            elif self.expected_contract is not None:
                diffs = contract_differences(contract, self.expected_contract)
                if diffs:
                    reason = "a model for another input contract: " + "; ".join(diffs)
        if reason is not None:
            self._refused.add(fingerprint)  # the same message again (a reconnection) is not checked again
            self._refuse(manifest, reason)
            return
        with self._lock:
            if manifest["seq"] <= self.last_seq:
                return  # a newer one was accepted meanwhile
        from edgesqz.fileio import atomic_write

        folder = self.models_dir / DEPLOYED_DIR
        path = folder / f"{_safe_name(manifest['name'])}-{manifest['sha256'][:12]}.tflite"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data, force=True)
        except OSError as exc:
            self._refuse(manifest, f"cannot store the model in {folder}: {exc.strerror or exc}")
            return
        except EdgesqzError as exc:
            self._refuse(manifest, f"cannot store the model: {exc}")
            return
        try:
            verdict = self.accept(path, manifest)
        except Exception as exc:
            verdict = f"the live check failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"
        if verdict is not None:
            self._refused.add(fingerprint)
            if path != self.current_path:
                with contextlib.suppress(OSError):
                    path.unlink()
            self._refuse(manifest, f"refused by the live check: {verdict}")
            return
        try:
            self._save_state(manifest, path)
        except EdgesqzError as exc:
            # in use now, but the seq is not persisted: say so (a restart would accept an older retained deploy)
            self.say(f"warning: deploy: {manifest['version']} is in use but its seq was not saved: {exc}")
        self._prune(folder, keep=path)
        self.say(f"deploy: accepted {manifest['version']} (seq {manifest['seq']}, sha256 "
                 f"{manifest['sha256'][:12]}) -> {path}")
        self.report("accepted", manifest, None)

    def _prune(self, folder: Path, keep: Path) -> None:
        with contextlib.suppress(OSError):
            files = sorted((p for p in folder.glob("*.tflite") if p != keep), key=lambda p: p.stat().st_mtime,
                           reverse=True)
            for old in files[KEEP_DEPLOYED - 1:]:
                old.unlink()

    def _refuse(self, manifest: dict[str, Any] | None, reason: str) -> None:
        what = f"{manifest.get('version')} (seq {manifest.get('seq')})" if isinstance(manifest, dict) else "a deploy"
        self.say(f"warning: deploy: refused {what}: {reason}")
        self.report("refused", manifest, reason)

    # -- the report

    def report(self, state: str, manifest: dict | None, reason: str | None) -> None:
        """Publish the retained ``model_status`` on ``PREFIX/DEVICE/model`` (QoS 1; queued while disconnected)."""
        m = manifest if isinstance(manifest, dict) else {}

        def field(key: str, kind: type) -> Any:
            value = m.get(key)
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        record = {"schema": SCHEMA, "kind": "model_status", "device": self.device, "state": state,
                  "version": field("version", str), "name": field("name", str), "sha256": field("sha256", str),
                  "seq": field("seq", int), "reason": reason, "time": now_iso(), "current": summary(self.current)}
        if self._client is None:
            return
        payload = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        with contextlib.suppress(Exception):
            self._client.publish(status_topic(self.prefix, self.device), payload, qos=1, retain=True)


def default_models_dir() -> Path:
    """Where ``run`` keeps deployed models: ``$EDGESQZ_HOME/models``."""
    from edgesqz.paths import home_dir

    return home_dir() / "models"


__all__ = ["ALL", "CHUNK_SIZE", "ModelReceiver", "canonical", "check_model_bytes", "chunk_topic",
           "contract_differences", "deploy_topic", "model_contract", "parse_manifest", "sign", "status_topic",
           "verify"]

