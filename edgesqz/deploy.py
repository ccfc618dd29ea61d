"""``edgesqz keys new`` and ``edgesqz deploy``: signed models to a fleet over the user's MQTT broker.

The message format and the device side are in :mod:`edgesqz.device.fleet`. A deploy validates the model,
publishes its chunks then its signed manifest (all retained, QoS 1, each acknowledged by the broker), and
records what it sent in a local history (``$EDGESQZ_HOME/deploy/history.json``, with a copy of the
last :data:`KEEP_HISTORY` models per target) that ``--rollback`` publishes again with a new seq.
Needs paho-mqtt and cryptography only (no TensorFlow).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import secrets
import ssl
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from edgesqz.device import fleet
from edgesqz.errors import EdgesqzError

KEEP_HISTORY = 5  # deploys remembered per target (with a copy of their model)
ACK_TIMEOUT_S = 30.0  # per message, after the previous one was acknowledged
READ_WAIT_S = 0.5  # quiet time after the subscription that ends the read of retained messages


def history_dir() -> Path:
    from edgesqz.paths import home_dir

    return home_dir() / "deploy"


# --------------------------------------------------------------------------- the connection


class Connection:
    """A paho client that connects, publishes QoS 1 and waits for every acknowledgement; no reconnection:
    a broker that goes away is an error."""

    def __init__(self, url: str, *, ca_file: Path | None = None, password: str | None = None) -> None:
        import dataclasses

        from edgesqz.device.mqtt import parse_mqtt_url

        self.target = parse_mqtt_url(url)
        if password is not None and self.target.username and self.target.password is None:
            self.target = dataclasses.replace(self.target, password=password)
        if ca_file is not None and not Path(ca_file).is_file():
            raise EdgesqzError(f"--mqtt-ca {ca_file}: no such file")
        self.ca_file = ca_file
        self.prefix = self.target.prefix
        self.where = f"{self.target.host}:{self.target.port}"
        self._cond = threading.Condition()
        self._acked: set[int] = set()
        self._lost: str | None = None
        self._connected = False
        self._refused: str | None = None
        self._subacks: set[int] = set()
        self.messages: dict[str, bytes] = {}
        self._last_message = 0.0
        self._client: Any = None

    def __enter__(self) -> Connection:
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgesqz-deploy-{secrets.token_hex(4)}",
                             clean_session=True, protocol=mqtt.MQTTv311)
        if self.target.username:
            client.username_pw_set(self.target.username, self.target.password)
        if self.target.tls:
            try:
                client.tls_set(ca_certs=str(self.ca_file) if self.ca_file else None, cert_reqs=ssl.CERT_REQUIRED,
                               tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError) as exc:
                raise EdgesqzError(f"--mqtt-ca {self.ca_file}: cannot load it ({exc})") from exc
        client.max_inflight_messages_set(64)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        try:
            client.connect(self.target.host, self.target.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            raise EdgesqzError(f"cannot reach the MQTT broker at {self.where}: {exc.strerror or exc}") from None
        client.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self._connected or self._refused or self._lost, 10)
        if not self._connected:
            self.__exit__()
            why = self._refused or self._lost or "no answer within 10 s"
            raise EdgesqzError(f"the MQTT broker at {self.where} refused the connection: {why}; check the URL, "
                               "user name and password")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.disconnect()
            self._client.loop_stop()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._cond:
            if reason.is_failure:
                self._refused = reason.getName() if hasattr(reason, "getName") else str(reason)
                client.disconnect()
            else:
                self._connected = True
            self._cond.notify_all()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._cond:
            self._lost = str(reason)
            self._connected = False
            self._cond.notify_all()
        client.reconnect_delay_set(3600, 3600)  # no silent re-delivery: a lost broker is an error

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._cond:
            self._acked.add(mid)
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        with self._cond:
            self._subacks.add(mid)
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._cond:
            if message.payload:
                self.messages[message.topic] = bytes(message.payload)
            else:
                self.messages.pop(message.topic, None)
            self._last_message = time.monotonic()

    def _gone(self, what: str) -> EdgesqzError:
        return EdgesqzError(f"the MQTT broker at {self.where} went away {what} ({self._lost}); the retained set may "
                            "be partial: deploy again (a higher seq supersedes it)", exit_code=1)

    def publish_all(self, messages: list[tuple[str, bytes]], what: str) -> None:
        """Publish retained QoS 1 messages in order; return once the broker acknowledged them all."""
        pending = []
        for topic, payload in messages:
            with self._cond:
                if self._lost:
                    raise self._gone(f"while publishing {what}")
            info = self._client.publish(topic, payload, qos=1, retain=True)
            if info.rc != 0:
                raise self._gone(f"while publishing {what}")
            pending.append(info.mid)
        for mid in pending:
            with self._cond:
                ok = self._cond.wait_for(lambda mid=mid: mid in self._acked or self._lost, ACK_TIMEOUT_S)
                if self._lost or not ok:
                    if not self._lost:
                        self._lost = f"no acknowledgement within {ACK_TIMEOUT_S:g} s"
                    raise self._gone(f"before acknowledging {what}")

    def read_retained(self, topics: list[str], wait: float = READ_WAIT_S, most: float = 5.0) -> dict[str, bytes]:
        """Subscribe, collect what arrives until ``wait`` s of quiet (at most ``most`` s), unsubscribe."""
        with self._cond:
            self.messages.clear()
        result, mid = self._client.subscribe([(t, 1) for t in topics])
        if result != 0:
            raise self._gone("while subscribing")
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks or self._lost, 10) or self._lost:
                raise self._gone("while subscribing")
            self._last_message = time.monotonic()
        start = time.monotonic()
        while time.monotonic() - start < most:
            with self._cond:
                if time.monotonic() - self._last_message >= wait:
                    break
            time.sleep(0.05)
        self._client.unsubscribe(topics)
        with self._cond:
            return dict(self.messages)


# --------------------------------------------------------------------------- history


class History:
    """``history.json``: per ``host:port/prefix/target``, the last deploys (seq, version, sha256, model copy)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or history_dir()
        self.path = self.folder / "history.json"
        self.data: dict[str, Any] = {"schema": fleet.SCHEMA, "last_seq": 0, "targets": {}}
        self._lock_file: Any = None

    def __enter__(self) -> History:
        import fcntl

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock_file = (self.folder / ".lock").open("a")
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        except OSError as exc:
            from edgesqz.fileio import os_error

            raise os_error(self.folder, exc, "use the deploy history folder") from exc
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if not isinstance(data.get("targets"), dict) or not isinstance(data.get("last_seq"), int):
                    raise ValueError
                self.data = data
            except (OSError, ValueError, AttributeError):
                raise EdgesqzError(f"the deploy history {self.path} is damaged; move it away (a new one starts "
                                   "empty: --rollback then has nothing to go back to)") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock_file is not None:
            self._lock_file.close()

    def entries(self, key: str) -> list[dict[str, Any]]:
        return list(self.data["targets"].get(key, []))

    def add(self, key: str, entry: dict[str, Any], model: bytes) -> None:
        from edgesqz.fileio import atomic_write

        models = self.folder / "models"
        models.mkdir(exist_ok=True)
        copy = models / f"{entry['sha256']}.tflite"
        if not copy.exists():
            atomic_write(copy, model, force=True)
        entry = {**entry, "file": str(copy)}
        self.data["targets"][key] = [*self.entries(key), entry][-KEEP_HISTORY:]
        self.data["last_seq"] = max(self.data["last_seq"], entry["seq"])
        atomic_write(self.path, json.dumps(self.data, indent=1) + "\n", force=True)
        used = {Path(e["file"]).name for es in self.data["targets"].values() for e in es}
        for old in models.glob("*.tflite"):
            if old.name not in used:
                with contextlib.suppress(OSError):
                    old.unlink()


def _key(conn: Connection, target: str) -> str:
    return f"{conn.target.host}:{conn.target.port}/{conn.prefix}/{target}"


# --------------------------------------------------------------------------- deploy, rollback, status


def _read_model(path: Path) -> tuple[bytes, dict[str, Any], Any]:
    from edgesqz.device.runtime import check_model_file
    from edgesqz.tflite_metadata import read_metadata

    data = check_model_file(path)
    contract = fleet.model_contract(data, f"model {path}")
    return data, contract, read_metadata(data, src=f"model {path}")


def _targets(devices: list[str] | None) -> list[str]:
    if not devices:
        return [fleet.ALL]
    out = []
    for d in devices:
        fleet.check_device_id(d, "--device")
        if d not in out:
            out.append(d)
    return out


def publish_model(conn: Connection, history: History, data: bytes, contract: dict[str, Any], *, name: str,
                  version: str, key: Any, targets: list[str], say: Any, rollback_of: str | None = None
                  ) -> list[dict[str, Any]]:
    """Publish ``data`` to every target (chunks, then the signed manifest); record it in the history."""
    sha = hashlib.sha256(data).hexdigest()
    digest = bytes.fromhex(sha)
    chunk_size = fleet.CHUNK_SIZE
    n = math.ceil(len(data) / chunk_size)
    # what is on the broker now: a seq to go above, and chunk topics to clear after the manifest
    retained = conn.read_retained([f"{fleet.deploy_topic(conn.prefix, t)}/#" for t in targets])
    seen = 0
    for topic, payload in retained.items():
        if topic.endswith("/deploy"):
            with contextlib.suppress(EdgesqzError):
                seen = max(seen, fleet.parse_manifest(payload)["seq"])
    seq = max(int(time.time() * 1000), history.data["last_seq"] + 1, seen + 1)
    out = []
    for target in targets:
        manifest = {"schema": fleet.SCHEMA, "kind": "model_deploy", "seq": seq, "version": version, "name": name,
                    "sha256": sha, "size": len(data), "chunks": n, "chunk_size": chunk_size, "contract": contract,
                    "created": fleet.now_iso()}
        signed = fleet.sign(manifest, key)
        chunks = [(fleet.chunk_topic(conn.prefix, target, i), digest + data[i * chunk_size:(i + 1) * chunk_size])
                  for i in range(n)]
        say(f"deploy: {version} ({len(data)} bytes, {n} chunk{'s' if n != 1 else ''}, sha256 {sha[:12]}, seq {seq}) "
            f"-> {fleet.deploy_topic(conn.prefix, target)}")
        conn.publish_all(chunks, f"the chunks for {target}")
        # a newer deploy published meanwhile: ours must not replace its retained manifest (devices that are
        # offline now would get the older model when they come back)
        now = conn.read_retained([fleet.deploy_topic(conn.prefix, target)], wait=0.2, most=2.0)
        for payload in now.values():
            try:
                other = fleet.parse_manifest(payload)
            except EdgesqzError:
                continue
            if other["seq"] > seq:
                raise EdgesqzError(f"a newer deploy ({other['version']}, seq {other['seq']}) reached {target} "
                                   f"while this one (seq {seq}) was publishing; this one is dropped (its chunks "
                                   "may have replaced some of the newer deploy's: deploy the newer one again)",
                                   exit_code=1)
        conn.publish_all([(fleet.deploy_topic(conn.prefix, target), json.dumps(signed).encode())],
                         f"the manifest for {target}")
        stale = [t for t in retained if t.startswith(f"{fleet.deploy_topic(conn.prefix, target)}/chunk/")
                 and t.rsplit("/", 1)[1].isdigit() and int(t.rsplit("/", 1)[1]) >= n]
        conn.publish_all([(t, b"") for t in stale], f"the clean-up of {len(stale)} old chunks")
        entry = {"seq": seq, "version": version, "name": name, "sha256": sha, "size": len(data), "chunks": n,
                 "contract": contract, "time": fleet.now_iso(), "rollback_of": rollback_of}
        history.add(_key(conn, target), entry, data)
        out.append({**signed, "topic": fleet.deploy_topic(conn.prefix, target)})
    return out


def deploy(model: Path, url: str, key_path: Path, *, devices: list[str] | None = None, version: str | None = None,
           ca_file: Path | None = None, say: Any = print, folder: Path | None = None) -> list[dict[str, Any]]:
    from edgesqz.keys import load_private_key

    key = load_private_key(key_path)
    data, contract, meta = _read_model(Path(model))
    sha = hashlib.sha256(data).hexdigest()
    name = meta.name or Path(model).stem
    if version is None:
        version = f"{fleet._safe_name(meta.name or Path(model).stem)}" + (f"-{meta.version}" if meta.version else "")
        version = f"{version}+{sha[:8]}"
    elif not version.strip() or len(version) > fleet.MAX_TEXT:
        raise EdgesqzError(f"--version must be 1 to {fleet.MAX_TEXT} characters")
    targets = _targets(devices)
    with History(folder) as history, Connection(url, ca_file=ca_file) as conn:
        return publish_model(conn, history, data, contract, name=name[:fleet.MAX_TEXT], version=version, key=key,
                             targets=targets, say=say)


def rollback(url: str, key_path: Path, *, devices: list[str] | None = None, ca_file: Path | None = None,
             say: Any = print, folder: Path | None = None) -> list[dict[str, Any]]:
    """Publish, for each target, the version deployed before the current one, with a new (higher) seq."""
    from edgesqz.keys import load_private_key

    key = load_private_key(key_path)
    targets = _targets(devices)
    out = []
    with History(folder) as history, Connection(url, ca_file=ca_file) as conn:
        for target in targets:
            entries = history.entries(_key(conn, target))
            if not entries:
                raise EdgesqzError(f"nothing was deployed to {_key(conn, target)} from this machine; nothing to roll "
                                   "back")
            current = entries[-1]
            previous = next((e for e in reversed(entries[:-1]) if e["sha256"] != current["sha256"]), None)
            if previous is None:
                raise EdgesqzError(f"{_key(conn, target)} has only one version in the deploy history "
                                   f"({current['version']}); nothing to roll back to")
            try:
                data = Path(previous["file"]).read_bytes()
            except OSError as exc:
                raise EdgesqzError(f"the copy of {previous['version']} ({previous['file']}) cannot be read: "
                                   f"{exc.strerror or exc}") from None
            if hashlib.sha256(data).hexdigest() != previous["sha256"]:
                raise EdgesqzError(f"the copy of {previous['version']} ({previous['file']}) changed since it was "
                                   "deployed; deploy the model file again instead")
            contract = fleet.check_model_bytes(data, f"the copy of {previous['version']}")
            say(f"rollback: {target}: {current['version']} -> {previous['version']}")
            out += publish_model(conn, history, data, contract, name=previous["name"], version=previous["version"],
                                 key=key, targets=[target], say=say, rollback_of=current["version"])
    return out


def status(url: str, *, wait: float = 2.0, ca_file: Path | None = None) -> list[dict[str, Any]]:
    """The retained ``model_status`` reports under the prefix, one per device, sorted by device."""
    with Connection(url, ca_file=ca_file) as conn:
        retained = conn.read_retained([f"{conn.prefix}/+/model"], wait=min(wait, 1.0), most=wait)
    reports = []
    for topic, payload in retained.items():
        try:
            report = json.loads(payload)
        except ValueError:
            continue
        if isinstance(report, dict) and report.get("kind") == "model_status":
            reports.append({**report, "topic": topic})
    return sorted(reports, key=lambda r: str(r.get("device")))


# --------------------------------------------------------------------------- the commands


keys_app = typer.Typer(help="Ed25519 keys that sign `edgesqz deploy` (devices trust the .pub).", no_args_is_help=True)


@keys_app.command("new")
def keys_new(
    folder: Annotated[Path, typer.Argument(help="Where to write edgesqz.key (mode 0600) and edgesqz.pub.")],
    force: Annotated[bool, typer.Option("--force", help="Replace existing key files (devices then need the new "
                                        ".pub).")] = False,
) -> None:
    """Make an Ed25519 key pair: FOLDER/edgesqz.key (private, 0600, stays here) and FOLDER/edgesqz.pub (for devices)."""
    from edgesqz.keys import load_public_key, new_keys, public_key_id

    private, public = new_keys(folder, force=force)
    typer.echo(f"wrote {private} (private, mode 0600: keep it on this machine)")
    typer.echo(f"wrote {public} (copy it to every device: edgesqz run --trust {public.name}); key id "
               f"{public_key_id(load_public_key(public))}")


def deploy_command(
    model: Annotated[Path | None, typer.Argument(help="The .tflite model to deliver.", readable=False)] = None,
    mqtt: Annotated[str, typer.Option(
        "--mqtt", metavar="mqtt[s]://[USER:PASS@]HOST[:PORT][/PREFIX]",
        help="The broker and topic prefix the devices use (password also from $EDGESQZ_MQTT_PASSWORD).")] = "",
    key: Annotated[Path | None, typer.Option("--key", help="The private key (edgesqz.key from `edgesqz keys new`).",
                                             readable=False)] = None,
    device: Annotated[list[str] | None, typer.Option(
        "--device", metavar="ID", help="Only this device (repeatable; default: every device under the prefix).")]
    = None,
    version: Annotated[str | None, typer.Option("--version", help="The version name devices report (default: "
                                                "the model's metadata name and version + sha256 prefix).")] = None,
    show_status: Annotated[bool, typer.Option("--status", help="List each device's model and last result.")] = False,
    do_rollback: Annotated[bool, typer.Option("--rollback", help="Publish the previous version again (new seq).")]
    = False,
    wait: Annotated[float, typer.Option("--wait", help="--status: seconds to collect reports.")] = 2.0,
    ca_file: Annotated[Path | None, typer.Option("--mqtt-ca", help="CA certificate for mqtts://.", readable=False)]
    = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Deliver a signed model to every Pi (or --device ones) over MQTT; --status, --rollback."""
    if not mqtt:
        raise EdgesqzError("deploy needs --mqtt mqtt://HOST[:PORT][/TOPIC-PREFIX]")
    if show_status and do_rollback:
        raise EdgesqzError("choose --status or --rollback, not both")

    def say(message: str) -> None:
        with contextlib.suppress(OSError):
            typer.echo(message, err=True)

    if show_status:
        if model is not None:
            raise EdgesqzError("--status takes no MODEL")
        reports = status(mqtt, wait=wait, ca_file=ca_file)
        if json_out:
            typer.echo(json.dumps(reports, indent=1))
            return
        if not reports:
            typer.echo("no device has reported a deploy yet")
        for r in reports:
            cur = r.get("current") or {}
            sha = (cur.get("sha256") or "")[:12]
            last = f"{r.get('state')} {r.get('version')} (seq {r.get('seq')})"
            if r.get("reason"):
                last += f": {r['reason']}"
            typer.echo(f"{r.get('device')}: model {cur.get('version') or '-'} {sha or ''} | last: {last} | "
                       f"{r.get('time')}")
        return
    if key is None:
        raise EdgesqzError("deploy needs --key DIR/edgesqz.key (make one with `edgesqz keys new DIR`)")
    if do_rollback:
        if model is not None:
            raise EdgesqzError("--rollback takes no MODEL (it publishes the previous one from the history)")
        sent = rollback(mqtt, key, devices=device, ca_file=ca_file, say=say)
    else:
        if model is None:
            raise EdgesqzError("deploy needs a MODEL.tflite (or --status / --rollback)")
        sent = deploy(model, mqtt, key, devices=device, version=version, ca_file=ca_file, say=say)
    if json_out:
        typer.echo(json.dumps(sent, indent=1))
    else:
        for m in sent:
            typer.echo(f"published {m['version']} (seq {m['seq']}, sha256 {m['sha256'][:12]}) on {m['topic']}")


def register(app: typer.Typer) -> None:
    """Add ``keys`` and ``deploy`` to the main app."""
    app.add_typer(keys_app, name="keys")
    app.command("deploy")(deploy_command)


