"""MQTT for events (``--mqtt mqtt://[user:pass@]host[:port]/prefix``, ``mqtts://`` for TLS), with paho-mqtt.

Each device publishes under ``PREFIX/DEVICE/`` (DEVICE: ``--device-id``, the host name by default),
so many cameras share one broker:

- ``PREFIX/DEVICE/status``: ``online``, retained; ``offline`` when the run ends, or from the broker
  (the last will) when the Pi dies or loses the network;
- ``PREFIX/DEVICE/event``: every event start and end, the ``event`` JSON record (QoS 1, not retained);
- ``PREFIX/DEVICE/rule/RULE/state``: ``ON`` while an event of the rule is going on, else ``OFF`` (retained);
- ``PREFIX/DEVICE/rule/RULE/last``: the rule's latest ``event`` record (retained);
- ``PREFIX/DEVICE/label``: the current top-1 ``{"label", "index", "score", "frame", "timestamp"}`` (retained),
  when it changes, at most once a second.

Home Assistant MQTT discovery (``--mqtt-discovery PREFIX``, default ``homeassistant``; ``off``):
a ``sensor`` for the current label and a ``binary_sensor`` (device class ``occupancy``) per
``--event`` rule, all in one device, with ``PREFIX/DEVICE/status`` as availability topic. The
configurations are retained and sent again whenever Home Assistant announces itself
(``homeassistant/status`` = ``online``) and after every reconnection.

Delivery: the event messages are QoS 1. While the broker is unreachable they wait in paho's queue
(at most ``max_queued`` messages; beyond, new ones are dropped and counted) and go out in order
once it is back; paho reconnects with back-off (1 s doubling to 30 s). Nothing here blocks the
camera loop: ``publish`` only queues; paho's own thread does the network.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgesqz._version import __version__
from edgesqz.device import options
from edgesqz.device.events import slug
from edgesqz.device.eventsink import EventOutput
from edgesqz.device.shutdown import HURRY
from edgesqz.errors import EdgesqzError
from edgesqz.schema import dumps, record

if TYPE_CHECKING:
    from edgesqz.device.events import Event, EventRule
    from edgesqz.device.eventsink import EventSink
    from edgesqz.device.results import Result

log = logging.getLogger("edgesqz.device.mqtt")

MQTT_USAGE = options.MQTT_USAGE
DEFAULT_PREFIX = options.MQTT_DEFAULT_PREFIX
DEFAULT_DISCOVERY = "homeassistant"
PASSWORD_ENV = "EDGESQZ_MQTT_PASSWORD"
LABEL_INTERVAL_S = 1.0
CONNECT_WAIT_S = 5.0
FLUSH_S = 5.0
PROJECT_URL = "https://github.com/edgesqz/edgesqz"
_AUTH_FAILURES = {"Bad user name or password", "Not authorized", "Client identifier not valid", "Banned",
                  "Bad authentication method"}


@dataclass(frozen=True)
class MqttTarget:
    """A parsed ``--mqtt`` URL."""

    host: str
    port: int
    prefix: str
    tls: bool
    username: str | None = None
    password: str | None = None

    def describe(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}/{self.prefix}"


def parse_mqtt_url(url: str, environ: dict[str, str] | None = None) -> MqttTarget:
    """``mqtt://[user[:pass]@]host[:port][/prefix]``; a user without a password reads ``$EDGESQZ_MQTT_PASSWORD``.

    Checked as the network and the broker will see it (:mod:`edgesqz.device.options`): an IDNA host
    name, a port from 1 to 65535 (``:0`` is refused, not taken as the default), a prefix that is a valid
    MQTT topic (no wildcards, no control characters, not ``$SYS/...``, at most 200 characters).
    """
    environ = os.environ if environ is None else environ
    target, prefix = options.mqtt_url(url)
    username, password = target.username, target.password
    if username and password is None:
        password = environ.get(PASSWORD_ENV)
    return MqttTarget(host=target.host, port=target.port, prefix=prefix, tls=target.scheme == "mqtts",
                      username=username, password=password)


# --------------------------------------------------------------------------- topics and discovery


@dataclass(frozen=True)
class Topics:
    prefix: str
    device: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def event(self) -> str:
        return f"{self.base}/event"

    @property
    def label(self) -> str:
        return f"{self.base}/label"

    def state(self, rule_slug: str, scope: tuple[str | None, str | None] = (None, None)) -> str:
        return f"{self.where(scope)}/rule/{rule_slug}/state"

    def last(self, rule_slug: str, scope: tuple[str | None, str | None] = (None, None)) -> str:
        return f"{self.where(scope)}/rule/{rule_slug}/last"

    def where(self, scope: tuple[str | None, str | None]) -> str:
        """A zone's topics: ``PREFIX/DEVICE/CAMERA/ZONE`` (``PREFIX/DEVICE/CAMERA`` for a camera's whole frame;
        ``PREFIX/DEVICE`` in a run of one camera without zones, as before zones existed)."""
        return "/".join([self.base, *(p for p in scope if p)])

    def zone_label(self, scope: tuple[str | None, str | None]) -> str:
        return f"{self.where(scope)}/label"

    def camera_status(self, camera: str) -> str:
        return f"{self.base}/{camera}/status"

    @property
    def model(self) -> str:
        return f"{self.base}/model"


def discovery_messages(topics: Topics, rules: list[EventRule], *, discovery_prefix: str = DEFAULT_DISCOVERY,
                       model: str | None = None,
                       scopes: dict[tuple[str | None, str | None], list[EventRule]] | None = None,
                       ) -> list[tuple[str, dict[str, Any]]]:
    """Home Assistant MQTT discovery: (config topic, config) for the label sensor and one binary sensor per rule.

    Follows Home Assistant's discovery schema: ``<discovery_prefix>/<component>/<node_id>/<object_id>/config``
    with ids in ``[a-zA-Z0-9_-]``, a ``unique_id`` per entity, one ``device`` (``identifiers``) for them all,
    the availability topic with its payloads, and an ``origin``.
    """
    node = f"edgesqz_{topics.device}"
    device: dict[str, Any] = {"identifiers": [node], "name": f"edgesqz {topics.device}", "manufacturer": "edgesqz",
                              "model": model or "SqueezeNet image classifier", "sw_version": __version__}
    common = {"availability_topic": topics.status, "payload_available": "online", "payload_not_available": "offline",
              "device": device, "origin": {"name": "edgesqz", "sw_version": __version__, "support_url": PROJECT_URL},
              "qos": 1}
    model_sensor = (f"{discovery_prefix}/sensor/{node}/model/config", {
        "name": "Model", "unique_id": f"{node}_model", "state_topic": topics.model,
        "value_template": "{{ value_json.version or value_json.sha256 }}", "json_attributes_topic": topics.model,
        "icon": "mdi:brain", "entity_category": "diagnostic", **common})
    if scopes is None or list(scopes) == [(None, None)]:
        out = [(f"{discovery_prefix}/sensor/{node}/label/config", {
            "name": "Label", "unique_id": f"{node}_label", "state_topic": topics.label,
            "value_template": "{{ value_json.label }}", "json_attributes_topic": topics.label, "icon": "mdi:cctv",
            **common}), model_sensor]
        for rule in rules:
            out.append((f"{discovery_prefix}/binary_sensor/{node}/{rule.slug}/config", {
                "name": rule.name, "unique_id": f"{node}_{rule.slug}", "state_topic": topics.state(rule.slug),
                "payload_on": "ON", "payload_off": "OFF", "device_class": "occupancy",
                "json_attributes_topic": topics.last(rule.slug), **common}))
        return out
    # Several cameras or zones: one label sensor per zone (and per camera without zones), the binary sensors of
    # the rules on it; each is available while the run is online AND its camera delivers frames.
    out = [model_sensor]
    for scope, scope_rules in scopes.items():
        camera = scope[0]
        key = "_".join(slug(p) for p in scope if p)
        title = " ".join(p for p in scope if p)
        available = {**common, "availability": [
            {"topic": topics.status, "payload_available": "online", "payload_not_available": "offline"},
            {"topic": topics.camera_status(str(camera)), "payload_available": "online",
             "payload_not_available": "unavailable"}], "availability_mode": "all"}
        for k in ("availability_topic", "payload_available", "payload_not_available"):
            available.pop(k)
        out.append((f"{discovery_prefix}/sensor/{node}/{key}_label/config", {
            "name": f"{title} label", "unique_id": f"{node}_{key}_label", "state_topic": topics.zone_label(scope),
            "value_template": "{{ value_json.label }}", "json_attributes_topic": topics.zone_label(scope),
            "icon": "mdi:cctv", **available}))
        for rule in scope_rules:
            out.append((f"{discovery_prefix}/binary_sensor/{node}/{key}_{rule.slug}/config", {
                "name": f"{title} {rule.name}", "unique_id": f"{node}_{key}_{rule.slug}",
                "state_topic": topics.state(rule.slug, scope), "payload_on": "ON", "payload_off": "OFF",
                "device_class": "occupancy", "json_attributes_topic": topics.last(rule.slug, scope), **available}))
    return out


# --------------------------------------------------------------------------- the output


class MqttOutput(EventOutput):
    """Publishes events, rule states and the current label to an MQTT broker (see the module docstring)."""

    def __init__(self, url: str, *, device: str, discovery: str | None = None, ca_file: str | Path | None = None,
                 max_queued: int = 1000, keepalive: int = 30, client_id: str | None = None,
                 reconnect: tuple[int, int] = (1, 30), password: str | None = None) -> None:
        self.target = parse_mqtt_url(url)
        if password is not None and self.target.username and self.target.password is None:
            self.target = dataclasses.replace(self.target, password=password)
        self.discovery = options.mqtt_discovery(discovery)
        if ca_file is not None and not Path(ca_file).is_file():
            raise EdgesqzError(f"--mqtt-ca {ca_file}: no such file")
        if ca_file is not None and not self.target.tls:
            raise EdgesqzError("--mqtt-ca needs an mqtts:// URL")
        self.ca_file = ca_file
        self.topics = Topics(self.target.prefix, options.mqtt_topic_level(device, "--device-id"))
        self.max_queued = max_queued
        self.keepalive = keepalive
        self.client_id = client_id or f"edgesqz-{device}-{secrets.token_hex(3)}"
        self.reconnect = reconnect
        self.rules: list[EventRule] = []
        self.labels: list[str] | None = None
        self.model: str | None = None
        self.source: str | None = None
        self.connected = threading.Event()
        self.connections = 0
        self.dropped = 0
        self._first = threading.Event()
        self._refused: str | None = None
        self._client: Any = None
        self._lock = threading.Lock()
        self._states: dict[str, str] = {}
        self._unacked: set[int] = set()  # mids of QoS 1 messages the broker has not acknowledged yet
        self._early: collections.OrderedDict[int, None] = collections.OrderedDict()  # acks seen before their mid
        self._label: dict[str, Any] | None = None
        self._label_sent: tuple[str, float] = ("", -1e9)
        self.scopes: dict[tuple[str | None, str | None], list[EventRule]] = {(None, None): []}
        self._labels: dict[tuple[str | None, str | None], dict[str, Any]] = {}
        self._labels_sent: dict[tuple[str | None, str | None], tuple[str, float]] = {}
        self._cameras: list[Any] = []
        self._camera_states: dict[str, str] = {}
        self._cameras_checked = 0.0
        self._outage_warned = False
        self._opened = False
        self._closed = False

    def describe(self) -> str:
        return f"{self.target.describe()} as {self.topics.base}/"

    # -- connection

    def connect(self, say: Any = None) -> None:
        """Start the client; wait up to 5 s for the broker. A refused login raises; an unreachable broker warns."""
        import paho.mqtt.client as mqtt

        say = say or (lambda message: log.warning("%s", message))
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True,
                             protocol=mqtt.MQTTv311)
        if self.target.username:
            client.username_pw_set(self.target.username, self.target.password)
        if self.target.tls:
            try:
                client.tls_set(ca_certs=str(self.ca_file) if self.ca_file else None,
                               cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError) as exc:
                raise EdgesqzError(f"--mqtt-ca {self.ca_file}: cannot load it ({exc})") from exc
        client.will_set(self.topics.status, "offline", qos=1, retain=True)
        client.reconnect_delay_set(*self.reconnect)
        client.max_queued_messages_set(self.max_queued)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self._client = client
        where = f"{self.target.host}:{self.target.port}"
        try:
            socket.getaddrinfo(self.target.host, self.target.port, type=socket.SOCK_STREAM)
            resolved = True
        except socket.gaierror as exc:
            resolved = False
            say(f"warning: mqtt: cannot resolve {self.target.host} ({exc.strerror}); retrying in the background")
        client.connect_async(self.target.host, self.target.port, keepalive=self.keepalive)
        client.loop_start()
        self._first.wait(CONNECT_WAIT_S)
        if self._refused is not None:
            self._stop_client()
            hint = (f"; check the user name and password (mqtt://USER:PASSWORD@HOST, or ${PASSWORD_ENV})"
                    if self._refused in _AUTH_FAILURES else "")
            raise EdgesqzError(f"--mqtt: the broker at {where} refused the connection: {self._refused}{hint}")
        if self.connected.is_set():
            say(f"mqtt: connected to {self.target.describe()}; publishing under {self.topics.base}/"
                + (f", Home Assistant discovery under {self.discovery}/" if self.discovery else ""))
        elif resolved:
            hint = (" (with mqtts://, also check the broker's certificate is signed by a CA this machine trusts, "
                    "or give it with --mqtt-ca FILE)") if self.target.tls else ""
            say(f"warning: mqtt: cannot reach the broker at {where} yet; retrying in the background "
                f"(events are queued meanwhile){hint}")
            self._outage_warned = True

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            name = reason.getName() if hasattr(reason, "getName") else str(reason)
            if not self._first.is_set():  # the broker answered, and said no: its reason, not "cannot reach"
                self._refused = name
                self._first.set()
                return
            log.warning("warning: mqtt: the broker refused the connection (%s); retrying", name)
            return
        self.connections += 1
        if self._outage_warned:
            log.warning("mqtt: connected to %s:%d", self.target.host, self.target.port)
        self._outage_warned = False
        self.connected.set()
        self._first.set()
        if self.discovery:
            client.subscribe(f"{self.discovery}/status", qos=1)
        self._announce(everything=self._opened)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        if not self._closed and not self._outage_warned and self._refused is None:
            self._outage_warned = True
            log.warning("warning: mqtt: lost the connection to %s:%d (%s); reconnecting, events are queued",
                        self.target.host, self.target.port, reason)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._first.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if self.discovery and message.topic == f"{self.discovery}/status" and message.payload == b"online":
            self._announce()  # Home Assistant restarted: it may have lost what it knew

    def _announce(self, *, status: bool = True, everything: bool = True) -> None:
        """Availability, discovery, rule states and the label: everything a (re)started broker or HA needs."""
        if status:
            self._publish(self.topics.status, "online", retain=True)
        if not everything:
            return
        if self.discovery:
            for topic, config in discovery_messages(self.topics, self.rules, discovery_prefix=self.discovery,
                                                    model=self.model, scopes=self.scopes):
                self._publish(topic, dumps(config), retain=True)
        with self._lock:
            states = dict(self._states)
            label = self._label
            labels = dict(self._labels)
            cameras = dict(self._camera_states)
        for camera, state in cameras.items():
            self._publish(self.topics.camera_status(camera), state, retain=True)
        for scope, rules in self.scopes.items():
            for rule in (self.rules if scope == (None, None) else rules):
                key = self.topics.state(rule.slug, scope)
                self._publish(key, states.get(key, "OFF"), retain=True)
        if label is not None:
            self._publish(self.topics.label, dumps(label), qos=0, retain=True)
        if self.model_identity is not None and self.publish_model:
            self._publish(self.topics.model, self._model_payload(), retain=True)
        for scope, value in labels.items():
            self._publish(self.topics.zone_label(scope), dumps(value), qos=0, retain=True)

    def _publish(self, topic: str, payload: str, *, qos: int = 1, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            return
        import paho.mqtt.client as mqtt

        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("warning: mqtt: %d messages queued while the broker is away; dropping new ones "
                            "(%d so far)", self.max_queued, self.dropped)
            return
        with self._lock:
            if self._early.pop(info.mid, False) is None:
                return  # already acknowledged (the ack beat us here)
            self._unacked.add(info.mid)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._lock:
            if mid in self._unacked:
                self._unacked.discard(mid)
            else:  # a QoS 0 message, or an ack that came before _publish noted the mid
                self._early[mid] = None
                while len(self._early) > 1000:
                    self._early.popitem(last=False)

    def _stop_client(self) -> None:
        if self._client is not None:
            self._closed = True
            with contextlib.suppress(Exception):
                self._client.disconnect()
            self._client.loop_stop()

    # -- EventOutput

    def open(self, sink: EventSink) -> None:
        if self._client is None:
            self.connect()
        self.rules = list(sink.rules)
        self.labels = sink.detector.labels if sink.detector is not None else None
        self.model = sink.model
        self.model_identity = sink.model_identity
        self.source = sink.source
        self.scopes = {scope: sink.scope_rules(*scope) for scope in sink.scopes}
        self._cameras = list(sink.cameras) if sink.scopes != [(None, None)] else []
        with self._lock:
            self._states = {self.topics.state(rule.slug, scope): "OFF"
                            for scope, rules in self.scopes.items()
                            for rule in (self.rules if scope == (None, None) else rules)}
            self._camera_states = {c.name: "online" if c.state == "online" else "unavailable" for c in self._cameras}
        self._opened = True
        if self.connected.is_set():
            self._announce(status=False)  # now that the rules and the model are known

    def frame(self, result: Result) -> None:
        if self._cameras:
            self._zone_labels(result)
            return
        index = int(np.argmax(result.scores))
        label = self.labels[index] if self.labels is not None else str(index)
        now = time.monotonic()
        with self._lock:
            self._label = {"label": label, "index": index, "score": round(float(result.scores[index]), 6),
                           "frame": result.frame.index, "timestamp": round(result.frame.timestamp, 6)}
            last, at = self._label_sent
            if label == last or now - at < LABEL_INTERVAL_S:
                return
            self._label_sent = (label, now)
            payload = dumps(self._label)
        if self.connected.is_set():
            self._client.publish(self.topics.label, payload, qos=0, retain=True)

    model_identity: dict[str, Any] | None = None
    publish_model = True  # False with run --trust: the fleet receiver reports on PREFIX/DEVICE/model

    def _model_payload(self) -> str:
        ident = self.model_identity or {}
        return dumps(record("model_status", device=self.topics.device, state="running", **ident,
                            time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))

    def model_changed(self, identity: dict[str, Any]) -> None:
        """A new model was swapped in: say which on PREFIX/DEVICE/model (retained; Home Assistant's Model sensor)."""
        self.model_identity = identity
        if self.connected.is_set() and self.publish_model:
            self._publish(self.topics.model, self._model_payload(), retain=True)

    def _zone_labels(self, result: Result) -> None:
        """Each zone's current label (at most once a second per zone, when it changes); camera availability."""
        now = time.monotonic()
        publish: list[tuple[str, str, bool]] = []
        with self._lock:
            for zone, scores, _top in result.scopes():
                scope = (result.camera, zone)
                index = int(np.argmax(scores))
                label = self.labels[index] if self.labels is not None else str(index)
                value = {"label": label, "index": index, "score": round(float(scores[index]), 6),
                         "frame": result.frame.index, "timestamp": round(result.frame.timestamp, 6)}
                self._labels[scope] = value
                last, at = self._labels_sent.get(scope, ("", -1e9))
                if label != last and now - at >= LABEL_INTERVAL_S:
                    self._labels_sent[scope] = (label, now)
                    publish.append((self.topics.zone_label(scope), dumps(value), False))
            if now - self._cameras_checked >= LABEL_INTERVAL_S:
                self._cameras_checked = now
                for cam in self._cameras:
                    state = "online" if cam.state == "online" else "unavailable"
                    if self._camera_states.get(cam.name) != state:
                        self._camera_states[cam.name] = state
                        publish.append((self.topics.camera_status(cam.name), state, True))
        if self.connected.is_set():
            for topic, payload, important in publish:
                if important:
                    self._publish(topic, payload, retain=True)
                else:
                    self._client.publish(topic, payload, qos=0, retain=True)

    def event(self, record: dict[str, Any], event: Event, best: Result | None) -> None:
        slug = event.rule.slug
        scope = (event.camera, event.zone)
        state = "ON" if record["state"] == "start" else "OFF"
        with self._lock:
            self._states[self.topics.state(slug, scope)] = state
        payload = dumps(record)
        self._publish(self.topics.event, payload)
        self._publish(self.topics.state(slug, scope), state, retain=True)
        self._publish(self.topics.last(slug, scope), payload, retain=True)

    def close(self) -> None:
        """Deliver what is queued (up to 5 s), say ``offline``, disconnect."""
        if self._client is None or self._closed:
            return
        deadline = time.monotonic() + FLUSH_S
        while time.monotonic() < deadline:
            with self._lock:
                left = len(self._unacked)
            if not left or HURRY.is_set():  # a second Ctrl-C: do not wait
                break
            time.sleep(0.02)
        if left:
            log.warning("warning: mqtt: %d messages were not delivered (the broker at %s:%d is unreachable)", left,
                        self.target.host, self.target.port)
        if self.connected.is_set():
            for camera in list(self._camera_states):
                self._client.publish(self.topics.camera_status(camera), "unavailable", qos=1, retain=True)
            info = self._client.publish(self.topics.status, "offline", qos=1, retain=True)
            with contextlib.suppress(Exception):
                info.wait_for_publish(2.0)
        self._stop_client()
