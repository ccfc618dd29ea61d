"""A real Mosquitto broker for the tests (Debian's ``mosquitto`` package) and a real paho subscriber.

:class:`Broker` starts ``mosquitto -c CONF`` on a free loopback port with a small config file
(``listener PORT 127.0.0.1``, ``allow_anonymous true``, no persistence) and can stop and start it
again on the same port. :class:`Subscriber` records every message it receives with the time it
arrived. Tests skip (with the reason) when mosquitto is not installed; CI installs it (``.ci/run``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto")
                                               if Path(p).exists()), None)
    if found is None:
        pytest.skip("needs the Mosquitto MQTT broker: apt-get install mosquitto (.ci/run installs it)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """``mosquitto`` on 127.0.0.1:``port``; :meth:`stop` and :meth:`start` restart it on the same port."""

    def __init__(self, folder: Path, port: int | None = None, extra: str = "") -> None:
        self.binary = mosquitto_binary()
        self.port = port or free_port()
        self.conf = folder / f"mosquitto-{self.port}.conf"
        self.log = folder / f"mosquitto-{self.port}.log"
        # as root, mosquitto would switch to its own user, which cannot read files in the test's folder
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                             f"log_dest stderr\nlog_type error\nlog_type warning\n{user}{extra}")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> Broker:
        log = self.log.open("a")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.02)
        raise AssertionError(f"mosquitto did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    received: float  # time.time()

    def json(self) -> dict:
        return json.loads(self.payload)


class Subscriber:
    """A paho client subscribed to ``topics`` that keeps every message (thread-safe list)."""

    def __init__(self, port: int, topics: tuple[str, ...] = ("#",), client_id: str | None = None) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{free_port()}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.topics = topics
        self.client.connect("127.0.0.1", port, keepalive=30)
        for topic in topics:
            self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the subscription was not acknowledged"

    def _on_message(self, client: object, userdata: object, message: object) -> None:
        with self._lock:
            self.messages.append(Message(message.topic, bytes(message.payload), bool(message.retain), time.time()))

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()

    def on(self, topic: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(self, predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate(list(self.messages)):
                    return
            time.sleep(0.05)
        with self._lock:
            seen = [(m.topic, m.payload[:80]) for m in self.messages][-20:]
        raise AssertionError(f"condition not met within {timeout} s; last messages: {seen}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
