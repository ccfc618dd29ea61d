"""``edgesqz run --mqtt``: a real Mosquitto broker on a loopback port and a real paho subscriber.

Proves: event start/end messages equal the JSON-lines events; rule states and the retained
online/offline status; the broker's last will says "offline" when ``run`` is killed (SIGKILL);
Home Assistant discovery payloads follow Home Assistant's discovery schema; a broker stopped and
restarted mid-run loses no event and keeps their order. Skips without mosquitto (CI installs it).
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from event_helpers import CAT, Run, events_of, jsonl, write_scenes
from mqtt_broker import Broker, Message, Subscriber, mosquitto_binary
from test_device_run import CLI

from edgesqz.device.events import EventRule
from edgesqz.device.mqtt import Topics, discovery_messages, parse_mqtt_url
from edgesqz.errors import EdgesqzError

PREFIX = "test/cams"
DEVICE = "cam_1"
BASE = f"{PREFIX}/{DEVICE}"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    mosquitto_binary()
    b = Broker(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def scenes(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    coffee, cat, rocket = photos_dir / "coffee.png", photos_dir / "chelsea.png", photos_dir / "rocket.jpg"
    tmp = tmp_path_factory.mktemp("mqtt-videos")
    return {
        # espresso 2 s, background 2 s, cat 2 s, background 1.5 s: two events
        "two": write_scenes(tmp / "two.mp4", [(coffee, 60), (rocket, 60), (cat, 60), (rocket, 45)]),
        # four rounds of espresso 1.5 s, background 1.5 s, cat 1.5 s, background 1.5 s: eight events in 24 s
        "many": write_scenes(tmp / "many.mp4", [(coffee, 45), (rocket, 45), (cat, 45), (rocket, 45)] * 4),
    }


def run_args(model: Path, video: Path, broker: Broker, *extra: object) -> list[object]:
    return ["--model", model, "--source", video, "--fps", 30, "--threads", 1, "--event", "espresso", "--event", CAT,
            "--event-end", 1, "--mqtt", f"{broker.url}/{PREFIX}", "--device-id", DEVICE, *extra]


def event_messages(messages: list[Message]) -> list[dict]:
    return [m.json() for m in messages if m.topic == f"{BASE}/event"]


# --------------------------------------------------------------------------- without a broker


def test_mqtt_urls() -> None:
    t = parse_mqtt_url("mqtt://broker.lan/home/cams", environ={})
    assert (t.host, t.port, t.prefix, t.tls, t.username, t.password) == ("broker.lan", 1883, "home/cams", False,
                                                                         None, None)
    t = parse_mqtt_url("mqtts://pi:s%40cret@10.0.0.2:8884", environ={})
    assert (t.host, t.port, t.prefix, t.tls, t.username, t.password) == ("10.0.0.2", 8884, "edgesqz", True, "pi",
                                                                         "s@cret")
    assert parse_mqtt_url("mqtts://pi@host/", environ={"EDGESQZ_MQTT_PASSWORD": "pw"}).password == "pw"
    assert "pw" not in parse_mqtt_url("mqtt://pi:pw@host").describe()
    for bad in ("http://host", "mqtt://", "mqtt://host:99999", "mqtt://host/a/+/b", "mqtt://host/a#", "host:1883"):
        with pytest.raises(EdgesqzError, match="--mqtt"):
            parse_mqtt_url(bad)


# What Home Assistant's MQTT integration accepts (its discovery docs and the sensor / binary_sensor schemas).
# Home Assistant strips the discovery prefix, then matches the rest of the topic with this pattern.
HA_TOPIC = re.compile(r"^(?P<component>\w+)/(?:(?P<node>[a-zA-Z0-9_-]+)/)?(?P<object>[a-zA-Z0-9_-]+)/config$")
HA_COMMON = {"availability", "availability_mode", "availability_template", "availability_topic", "device",
             "enabled_by_default", "encoding", "entity_category", "entity_picture", "expire_after", "force_update",
             "icon", "json_attributes_template", "json_attributes_topic", "name", "object_id", "default_entity_id",
             "payload_available", "payload_not_available", "qos", "unique_id", "value_template", "state_topic",
             "origin", "platform"}
HA_KEYS = {"sensor": HA_COMMON | {"device_class", "last_reset_value_template", "options",
                                  "suggested_display_precision", "state_class", "unit_of_measurement"},
           "binary_sensor": HA_COMMON | {"device_class", "off_delay", "payload_off", "payload_on"}}
HA_DEVICE_KEYS = {"configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model",
                  "model_id", "name", "serial_number", "suggested_area", "sw_version", "via_device"}
HA_BINARY_CLASSES = {"battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door", "garage_door",
                     "gas", "heat", "light", "lock", "moisture", "motion", "moving", "occupancy", "opening", "plug",
                     "power", "presence", "problem", "running", "safety", "smoke", "sound", "tamper", "update",
                     "vibration", "window"}


def check_home_assistant_discovery(configs: dict[str, dict], *, status_topic: str, prefix: str = "homeassistant"
                                   ) -> dict[str, dict]:
    """Validate discovery configs (topic -> payload) as Home Assistant reads them; returns them by component."""
    unique_ids: set[str] = set()
    devices = []
    by_component: dict[str, list[dict]] = {}
    for topic, config in configs.items():
        assert topic.startswith(f"{prefix}/"), topic
        match = HA_TOPIC.match(topic.removeprefix(f"{prefix}/"))
        assert match, topic
        component = match["component"]
        assert component in HA_KEYS, topic
        assert isinstance(config, dict) and set(config) <= HA_KEYS[component], set(config) - HA_KEYS[component]
        assert config["state_topic"] and "+" not in config["state_topic"] and "#" not in config["state_topic"]
        assert config["unique_id"] not in unique_ids, "unique_id must be unique"
        unique_ids.add(config["unique_id"])
        assert config["availability_topic"] == status_topic
        assert (config["payload_available"], config["payload_not_available"]) == ("online", "offline")
        device = config["device"]
        assert set(device) <= HA_DEVICE_KEYS and device["identifiers"] and all(isinstance(i, str)
                                                                                for i in device["identifiers"])
        devices.append(json.dumps(device, sort_keys=True))
        assert config["origin"]["name"] == "edgesqz"
        assert config.get("qos", 0) in (0, 1, 2)
        if component == "binary_sensor":
            assert config["device_class"] in HA_BINARY_CLASSES
            assert config["payload_on"] != config["payload_off"]
        by_component.setdefault(component, []).append(config)
    assert len(set(devices)) == 1, "every entity belongs to the same device"
    return by_component


def test_discovery_payloads_follow_home_assistants_schema() -> None:
    topics = Topics("home/cams", "kitchen")
    rules = [EventRule.parse("espresso"), EventRule.parse(CAT), EventRule.parse("Parcel Box>=0.4")]
    configs = dict(discovery_messages(topics, rules, model="squeezenet1_1 int8"))
    found = check_home_assistant_discovery(configs, status_topic="home/cams/kitchen/status")
    assert len(found["sensor"]) == 2 and len(found["binary_sensor"]) == 3  # the label and the model
    assert {c["state_topic"] for c in found["binary_sensor"]} == {
        "home/cams/kitchen/rule/espresso/state", "home/cams/kitchen/rule/cat/state",
        "home/cams/kitchen/rule/parcel_box/state"}
    assert found["sensor"][0]["state_topic"] == "home/cams/kitchen/label"
    assert "homeassistant/binary_sensor/edgesqz_kitchen/parcel_box/config" in configs
    other = dict(discovery_messages(Topics("home/cams", "porch"), rules))  # a second Pi on the same broker
    assert not {c["unique_id"] for c in configs.values()} & {c["unique_id"] for c in other.values()}
    assert not set(configs) & set(other)


# --------------------------------------------------------------------------- with Mosquitto


def test_events_status_states_and_discovery(int8_model: Path, scenes: dict[str, Path], broker: Broker,
                                            tmp_path: Path) -> None:
    sub = Subscriber(broker.port, (f"{PREFIX}/#", "homeassistant/#"))
    out = tmp_path / "run.jsonl"
    try:
        run = Run(CLI, *run_args(int8_model, scenes["two"], broker, "--output", out))
        assert run.wait(120) == 0, run.stderr
        sub.wait_for(lambda ms: any(m.topic == f"{BASE}/status" and m.payload == b"offline" for m in ms), 15)
    finally:
        sub.close()
    assert "Traceback" not in run.stderr and f"mqtt: connected to mqtt://127.0.0.1:{broker.port}/{PREFIX}" in run.stderr
    expected = events_of(jsonl(out))
    assert [(e["name"], e["state"]) for e in expected] == [("espresso", "start"), ("espresso", "end"),
                                                           ("cat", "start"), ("cat", "end")]
    assert event_messages(sub.messages) == expected  # the same records, in the same order
    assert all(e["device"] == DEVICE for e in expected)

    assert [m.payload for m in sub.on(f"{BASE}/status")] == [b"online", b"offline"]
    for rule in ("espresso", "cat"):
        states = [m.payload for m in sub.on(f"{BASE}/rule/{rule}/state")]
        assert states[-2:] == [b"ON", b"OFF"] and set(states[:-2]) <= {b"OFF"}, states
        last = sub.on(f"{BASE}/rule/{rule}/last")[-1].json()
        assert last["name"] == rule and last["state"] == "end"
    labels = [m.json() for m in sub.on(f"{BASE}/label")]
    assert {"espresso", "Egyptian cat"} <= {x["label"] for x in labels}
    times = [m.received for m in sub.on(f"{BASE}/label")]
    assert all(b - a > 0.9 for a, b in itertools.pairwise(times))  # at most one a second

    configs = {m.topic: m.json() for m in sub.messages if m.topic.startswith("homeassistant/") and m.payload}
    assert all(m.retain is False or m.topic.startswith("homeassistant/") for m in sub.messages
               if m.topic.startswith("homeassistant/"))
    found = check_home_assistant_discovery(configs, status_topic=f"{BASE}/status")
    assert {c["name"] for c in found["binary_sensor"]} == {"espresso", "cat"}
    assert found["sensor"][0]["device"]["model"].startswith("squeezenet1_1")
    # what a subscriber that comes later (Home Assistant restarting) gets: the retained state
    late = Subscriber(broker.port, (f"{BASE}/#", "homeassistant/#"))
    try:
        late.wait_for(lambda ms: len({m.topic for m in ms}) >= 7, 10)
    finally:
        late.close()
    retained = {m.topic: m.payload for m in late.messages if m.retain}
    assert retained[f"{BASE}/status"] == b"offline"
    assert retained[f"{BASE}/rule/espresso/state"] == b"OFF" and retained[f"{BASE}/rule/cat/state"] == b"OFF"
    assert set(configs) <= set(retained)
    assert f"{BASE}/event" not in retained  # events are not retained: a newcomer does not see old ones as new


def test_last_will_says_offline_when_run_is_killed(int8_model: Path, scenes: dict[str, Path], broker: Broker) -> None:
    sub = Subscriber(broker.port, (f"{BASE}/status",))
    run = Run(CLI, *run_args(int8_model, scenes["many"], broker, "--mqtt-discovery", "off"))
    try:
        sub.wait_for(lambda ms: any(m.payload == b"online" for m in ms), 60)
        time.sleep(0.5)
        run.kill()  # SIGKILL: no goodbye from edgesqz; the broker publishes the will
        killed = time.time()
        sub.wait_for(lambda ms: ms and ms[-1].payload == b"offline", 10)
    finally:
        run.kill()
        sub.close()
    assert sub.messages[-1].received - killed < 5
    late = Subscriber(broker.port, (f"{BASE}/status",))
    try:
        late.wait_for(lambda ms: bool(ms), 10)
    finally:
        late.close()
    assert late.messages[0].retain and late.messages[0].payload == b"offline"


def test_broker_restart_mid_run_loses_no_event(int8_model: Path, scenes: dict[str, Path], tmp_path: Path) -> None:
    broker = Broker(tmp_path).start()
    out = tmp_path / "run.jsonl"
    first = Subscriber(broker.port, (f"{BASE}/event",))
    second = None
    try:
        run = Run(CLI, *run_args(int8_model, scenes["many"], broker, "--output", out))
        first.wait_for(lambda ms: len(ms) >= 1, 60)  # the first event started
        broker.stop()  # the broker goes away for 5 s while events go on
        time.sleep(5)
        broker.start()
        second = Subscriber(broker.port, (f"{BASE}/event",))  # reconnects before edgesqz's back-off ends
        assert run.wait(120) == 0, run.stderr
        second.wait_for(lambda ms: any(m.json() == events_of(jsonl(out))[-1] for m in ms), 20)
    finally:
        first.close()
        if second is not None:
            second.close()
        broker.stop()
    expected = events_of(jsonl(out))
    assert len(expected) >= 12, [(e["name"], e["state"]) for e in expected]
    got = []
    for record in event_messages(first.messages) + event_messages(second.messages):
        if record not in got:  # QoS 1 is at least once: a message in flight at the break may come twice
            got.append(record)
    assert got == expected
    assert "lost the connection" in run.stderr and "Traceback" not in run.stderr
    queued = [e for e in expected if e["timestamp"] > first.messages[-1].received]
    assert queued, "some events happened while the broker was down"


def test_unreachable_broker_warns_and_the_run_goes_on(int8_model: Path, scenes: dict[str, Path],
                                                      tmp_path: Path) -> None:
    from mqtt_broker import free_port

    out = tmp_path / "run.jsonl"
    run = Run(CLI, "--model", int8_model, "--source", scenes["two"], "--fps", 30, "--threads", 1, "--event", "espresso",
              "--mqtt", f"mqtt://127.0.0.1:{free_port()}/x", "--output", out)
    assert run.wait(120) == 0, run.stderr
    assert "cannot reach the broker" in run.stderr and "not delivered" in run.stderr
    assert [e["state"] for e in events_of(jsonl(out))] == ["start", "end"]


def test_refused_login_is_one_error(int8_model: Path, scenes: dict[str, Path], tmp_path: Path) -> None:
    pw = tmp_path / "passwords"
    pw.write_text("")
    broker = Broker(tmp_path, extra=f"password_file {pw}\n")
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true", "allow_anonymous false"))
    broker.start()
    try:
        run = Run(CLI, "--model", int8_model, "--source", scenes["two"], "--event", "espresso",
                  "--mqtt", f"mqtt://nobody:wrong@127.0.0.1:{broker.port}/x")
        assert run.wait(60) == 2, run.stderr
    finally:
        broker.stop()
    errors = [line for line in run.lines if line.startswith("error:")]
    assert len(errors) == 1 and "refused" in errors[0] and "password" in errors[0], run.stderr
    assert "Traceback" not in run.stderr


def test_mqtt_without_events_publishes_the_label_sensor(int8_model: Path, scenes: dict[str, Path],
                                                        broker: Broker) -> None:
    sub = Subscriber(broker.port, (f"{PREFIX}/solo/#", "homeassistant/+/edgesqz_solo/#"))
    try:
        run = Run(CLI, "--model", int8_model, "--source", scenes["two"], "--fps", 30, "--threads", 1,
                  "--mqtt", f"{broker.url}/{PREFIX}", "--device-id", "solo")
        assert run.wait(120) == 0, run.stderr
        sub.wait_for(lambda ms: any(m.payload == b"offline" for m in ms), 15)
    finally:
        sub.close()
    assert [m.payload for m in sub.on(f"{PREFIX}/solo/status")] == [b"online", b"offline"]
    assert {m.json()["label"] for m in sub.on(f"{PREFIX}/solo/label")} >= {"espresso", "Egyptian cat"}
    configs = {m.topic: m.json() for m in sub.messages if m.topic.startswith("homeassistant/")}
    found = check_home_assistant_discovery(configs, status_topic=f"{PREFIX}/solo/status")
    assert set(found) == {"sensor"} and not [m for m in sub.messages if m.topic.endswith("/event")]


def _openssl(*args: object, cwd: Path) -> None:
    import subprocess

    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def test_mqtts_with_a_private_ca(int8_model: Path, scenes: dict[str, Path], tmp_path: Path) -> None:
    """A broker with its own CA (as a Mosquitto at home has): mqtts:// with --mqtt-ca, and without it a warning."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", 2,
             "-subj", "/CN=edgesqz test CA", cwd=tmp_path)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=tmp_path)
    (tmp_path / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", 2, "-extfile", "san.ext", cwd=tmp_path)
    broker = Broker(tmp_path, extra=f"cafile {tmp_path / 'ca.crt'}\ncertfile {tmp_path / 'server.crt'}\n"
                                    f"keyfile {tmp_path / 'server.key'}\n").start()
    import paho.mqtt.client as mqtt

    received: list[bytes] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tls-test")
    sub.tls_set(ca_certs=str(tmp_path / "ca.crt"))
    sub.on_message = lambda c, u, m: received.append(bytes(m.payload))
    try:
        sub.connect("localhost", broker.port)
        sub.subscribe(f"{BASE}/event", qos=1)
        sub.loop_start()
        args = ["--model", int8_model, "--source", scenes["two"], "--fps", 30, "--threads", 1, "--event", "espresso",
                "--event-end", 1, "--device-id", DEVICE, "--mqtt-discovery", "off"]
        run = Run(CLI, *args, "--mqtt", f"mqtts://localhost:{broker.port}/{PREFIX}", "--mqtt-ca", tmp_path / "ca.crt")
        assert run.wait(120) == 0, run.stderr
        assert f"mqtt: connected to mqtts://localhost:{broker.port}" in run.stderr
        time.sleep(0.5)
        assert [json.loads(p)["state"] for p in received] == ["start", "end"]
        untrusted = Run(CLI, *args, "--max-frames", 5, "--mqtt", f"mqtts://localhost:{broker.port}/{PREFIX}")
        assert untrusted.wait(120) == 0, untrusted.stderr
        assert "cannot reach the broker" in untrusted.stderr and "--mqtt-ca" in untrusted.stderr
    finally:
        sub.disconnect()
        sub.loop_stop()
        broker.stop()
