"""One validated parse for ``edgesqz run``'s option values: pure functions, no I/O, no imports of the heavy stack.

Every function takes the raw value and the option's name, and returns the parsed value or raises
:class:`~edgesqz.errors.EdgesqzError` with one line that names the option and says what it takes, so
``run`` refuses a bad value with ``error: ...`` (exit 2) before anything starts. A value that passes
here never crashes the code that uses it (no NaN slipping past ``x <= 0``, no ``'²'.isdigit()``, no
host name the IDNA codec rejects later, no MQTT topic the broker or paho refuses):

- :func:`finite`: a finite number in a range; :func:`positive_int`: a whole number in a range;
- :func:`name`: printable text of bounded length (rule names, labels);
- :func:`class_index`: ``#N`` with ASCII digits only;
- :func:`slug`: a bounded ``[a-z0-9_]`` name for files, ids and topics (a short hash keeps it unique
  when non-ASCII text or truncation would lose information);
- :func:`hostname`, :func:`parse_url`: URLs as the network sees them (IDNA host, port 1..65535);
  :func:`redact_url` hides a password before a URL is printed;
- :func:`mqtt_topic`, :func:`mqtt_topic_level`: MQTT topic names by the MQTT 3.1.1/5 rules (UTF-8,
  no NUL or control characters, no wildcards, no leading ``$``, at most 65535 bytes).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from edgesqz.errors import EdgesqzError

NAME_MAX = 200  # topic prefixes: characters
EVENT_NAME_MAX = 1000  # rule names and labels: characters (their slugs are bounded separately)
SLUG_MAX = 64  # the part of event ids and file names made from a name: bytes (ASCII)
TOPIC_MAX_BYTES = 65535  # MQTT: a topic is a UTF-8 string with a 16-bit length
HOST_MAX = 253
_CLASS_INDEX = re.compile(r"#([0-9]{1,9})")


def finite(value: Any, name: str, lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False, unit: str = "") -> float:
    """``value`` as a finite float with ``lo <= value <= hi`` (``lo < value`` when ``lo_open``)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    low_ok = lo is None or (number > lo if lo_open else number >= lo)
    if math.isfinite(number) and low_ok and (hi is None or number <= hi):
        return number
    unit = f" {unit}" if unit else ""
    if lo is not None and hi is not None:
        want = (f"a number{unit} above {lo:g} and at most {hi:g}" if lo_open
                else f"a number{unit} from {lo:g} to {hi:g}")
    elif lo is not None:
        want = f"a number{unit} {'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        want = f"a number{unit} <= {hi:g}"
    else:
        want = f"a finite number{unit}"
    raise EdgesqzError(f"{name} must be {want}, got {value!r}" if not isinstance(value, (int, float))
                       else f"{name} must be {want}, got {value:g}")


def positive_int(value: Any, name: str, lo: int = 1, hi: int | None = None) -> int:
    """``value`` as an int with ``lo <= value <= hi`` (a bool, a float or text is refused)."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().lstrip("+").isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        limit = f">= {lo}" if value < lo else f"<= {hi}"
        raise EdgesqzError(f"{name} must be {limit}, got {value}")
    raise EdgesqzError(f"{name} must be a whole number, got {value!r}")


def name(text: str, what: str, max_len: int = NAME_MAX) -> str:
    """Printable text (letters of any script, no control characters), 1..``max_len`` characters, stripped."""
    value = text.strip() if isinstance(text, str) else ""
    if not value:
        raise EdgesqzError(f"{what} is empty")
    if len(value) > max_len:
        raise EdgesqzError(f"{what} is {len(value)} characters long; at most {max_len}")
    bad = next((c for c in value if not c.isprintable() and c != " "), None)
    if bad is not None:
        raise EdgesqzError(f"{what} {value[:60]!r} contains the control character {bad!r}; use printable text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise EdgesqzError(f"{what} {value[:60]!r} is not valid text (a lone surrogate)") from None
    return value


def class_index(label: str) -> int | None:
    """N for ``#N`` (ASCII digits only: ``'#²'`` is not an index), else None."""
    match = _CLASS_INDEX.fullmatch(label.strip())
    return int(match.group(1)) if match else None


def short_hash(text: str, n: int = 6) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def slug(text: str, max_len: int = SLUG_MAX) -> str:
    """A name safe in MQTT topics, Home Assistant object ids and file names: ``[a-z0-9_]``, at most ``max_len``.

    Accents are dropped (``café`` -> ``cafe``); when that loses information (any non-ASCII character)
    or the name is longer than ``max_len``, ``_`` and a 6-digit hash of the whole name are appended, so
    ``猫`` and ``犬`` (or two long names sharing their first 64 characters) never collide.
    """
    folded = unicodedata.normalize("NFKD", text)
    ascii_text = "".join(c for c in folded if not unicodedata.combining(c)).encode("ascii", "ignore").decode()
    out = re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")
    lossy = not text.isascii()
    if lossy or len(out) > max_len:
        tag = short_hash(text)
        keep = max(0, max_len - len(tag) - 1)
        out = f"{out[:keep].rstrip('_')}_{tag}".lstrip("_") if out[:keep].strip("_") else f"x_{tag}"
    return out or "x"


# --------------------------------------------------------------------------- hosts and URLs


def hostname(host: str, what: str) -> str:
    """A host name or IP address as the resolver will take it: IDNA-encodable labels of 1..63 bytes."""
    if not host:
        raise EdgesqzError(f"{what}: no host name")
    with_brackets = host.strip("[]")
    try:
        ipaddress.ip_address(with_brackets)
        return with_brackets
    except ValueError:
        pass
    if len(host) > HOST_MAX:
        raise EdgesqzError(f"{what}: the host name is {len(host)} characters long; at most {HOST_MAX}")
    bad = next((c for c in host if not c.isprintable() or c.isspace()), None)
    if bad is not None:
        raise EdgesqzError(f"{what}: the host name {host[:60]!r} contains {bad!r}")
    try:
        encoded = host.rstrip(".").encode("idna")  # refuses empty labels (a..b) and labels over 63 bytes
    except UnicodeError as exc:
        why = "an empty label (two dots in a row)" if ".." in host or host.startswith(".") else \
            "a label longer than 63 characters" if any(len(p) > 63 for p in host.split(".")) else str(exc)
        raise EdgesqzError(f"{what}: {host[:80]!r} is not a valid host name ({why})") from None
    if not encoded or len(encoded) > HOST_MAX:
        raise EdgesqzError(f"{what}: {host[:80]!r} is not a valid host name")
    return host


@dataclass(frozen=True)
class Url:
    scheme: str
    host: str
    port: int  # the given port, else the scheme's default
    username: str | None
    password: str | None
    path: str  # percent-decoded
    parts: SplitResult

    def without_userinfo(self) -> str:
        """The URL as sent on the network: no ``user:password@``."""
        netloc = self.parts.netloc.rpartition("@")[2]
        return self.parts._replace(netloc=netloc).geturl()


def parse_url(url: str, what: str, schemes: dict[str, int], usage: str) -> Url:
    """``url`` with a scheme of ``schemes`` (scheme -> default port), a valid host and a port 1..65535."""
    text = url.strip() if isinstance(url, str) else ""
    bad = next((c for c in text if not c.isprintable() or c.isspace()), None)
    if bad is not None:
        raise EdgesqzError(f"{usage}, not {redact_url(text)!r} (it contains {bad!r})")
    try:
        parts = urlsplit(text)
        host = parts.hostname
    except ValueError as exc:
        raise EdgesqzError(f"{usage}, not {redact_url(text)!r} ({exc})") from None
    if parts.scheme not in schemes or not host:
        raise EdgesqzError(f"{usage}, not {redact_url(text)!r}")
    hostname(host, f"{what} {redact_url(text)!r}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise EdgesqzError(f"{usage}, not {redact_url(text)!r} (the port is a number from 1 to 65535)")
    return Url(parts.scheme, host, port or schemes[parts.scheme],
               unquote(parts.username) if parts.username else None,
               unquote(parts.password) if parts.password is not None else None, unquote(parts.path), parts)


def redact_url(url: str) -> str:
    """``scheme://user:***@host/...``: the URL with its password hidden, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{hostport}").geturl()


# --------------------------------------------------------------------------- MQTT topics


def mqtt_topic(topic: str, what: str, *, max_len: int = NAME_MAX, levels: bool = True) -> str:
    """A topic (or prefix) to publish under: MQTT's rules, plus a length bound for prefixes and ids.

    UTF-8 without NUL, control characters or non-characters; no ``+`` or ``#`` (wildcards are for
    subscribing); not starting with ``$`` (``$SYS/`` belongs to the broker); no empty level; at most
    ``max_len`` characters and 65535 bytes. ``levels=False``: a single level (no ``/``).
    """
    if not isinstance(topic, str) or not topic:
        raise EdgesqzError(f"{what} is empty")
    if len(topic) > max_len or len(topic.encode("utf-8", "surrogatepass")) > TOPIC_MAX_BYTES:
        raise EdgesqzError(f"{what} is {len(topic)} characters long; at most {max_len}")
    for c in topic:
        if c == "\0" or unicodedata.category(c) in ("Cc", "Cs") or c in "\ufffe\uffff":
            raise EdgesqzError(f"{what} {topic[:60]!r} contains the control character {c!r}; MQTT topics may not")
        if c in "+#":
            raise EdgesqzError(f"{what} {topic[:60]!r} contains {c!r}: a wildcard, which topics to publish to may "
                               "not contain")
    if topic.startswith("$"):
        raise EdgesqzError(f"{what} {topic[:60]!r} starts with '$': such topics ($SYS/...) belong to the broker")
    if not levels and "/" in topic:
        raise EdgesqzError(f"{what} {topic[:60]!r}: one topic level, without '/'")
    if "//" in topic or topic.startswith("/") or topic.endswith("/"):
        raise EdgesqzError(f"{what} {topic[:60]!r} has an empty topic level ('//', or '/' at an end)")
    return topic


def mqtt_topic_level(text: str, what: str, max_len: int = SLUG_MAX) -> str:
    """One topic level (a device id): see :func:`mqtt_topic`."""
    return mqtt_topic(text, what, max_len=max_len, levels=False)


def device_id(text: str, what: str = "--device-id") -> str:
    """A device id: ``[a-z0-9_]``, 1..64 characters (it is a topic level, a Home Assistant id and a file name part)."""
    value = name(text, what, max_len=SLUG_MAX) if len(text) <= SLUG_MAX else None
    if value is None:
        raise EdgesqzError(f"{what} is {len(text)} characters long; at most {SLUG_MAX}")
    if not re.fullmatch(r"[a-z0-9_]+", value):
        raise EdgesqzError(f"{what} {value!r}: use lower-case letters, digits and _ only (e.g. {slug(value)!r})")
    return value


MQTT_USAGE = "--mqtt takes mqtt://[USER[:PASSWORD]@]HOST[:PORT][/TOPIC-PREFIX] (mqtts:// for TLS)"
MQTT_DEFAULT_PREFIX = "edgesqz"


def mqtt_url(url: str) -> tuple[Url, str]:
    """A ``--mqtt`` URL and its topic prefix (default ``edgesqz``), both checked."""
    text = url.strip() if isinstance(url, str) else ""
    if "?" in text or "#" in text:
        raise EdgesqzError(f"{MQTT_USAGE}, not {redact_url(text)!r} (no ? or #: the topic prefix may not hold "
                           "wildcards)")
    target = parse_url(text, "--mqtt", {"mqtt": 1883, "mqtts": 8883}, MQTT_USAGE)
    prefix = target.path.strip("/") or MQTT_DEFAULT_PREFIX
    return target, mqtt_topic(prefix, "--mqtt: the topic prefix")


def mqtt_discovery(value: str | None) -> str:
    """``--mqtt-discovery``: a topic prefix, or '' for off."""
    disc = "homeassistant" if value is None else value.strip().strip("/")
    if disc.lower() in ("off", "none", "no", "false", ""):
        return ""
    return mqtt_topic(disc, "--mqtt-discovery (a topic prefix, or 'off')")


def check_run(*, events: list[str] | None = None, event_start: float | None = None, event_end: float | None = None,
              preroll: float | None = None, keep: int | None = None, max_disk: float | None = None,
              mqtt: str | None = None, mqtt_discovery_prefix: str | None = None, device: str | None = None,
              webhooks: list[str] | None = None) -> None:
    """Every event, MQTT and webhook value of ``edgesqz run``, checked before anything opens (one error each)."""
    from edgesqz.device.events import EventRule

    for text in events or ():
        EventRule.parse(text)
    for value, option in ((event_start, "--event-start"), (event_end, "--event-end")):
        if value is not None:
            finite(value, option, 0, 86400, unit="of seconds")
    if preroll is not None:
        finite(preroll, "--preroll", 0, 60, unit="of seconds")
    if keep is not None:
        positive_int(keep, "--keep", 1, 1_000_000)
    if max_disk is not None:
        finite(max_disk, "--max-disk", 0, 1e9, lo_open=True, unit="of MB")
    if mqtt is not None:
        mqtt_url(mqtt)
    if mqtt_discovery_prefix is not None:
        mqtt_discovery(mqtt_discovery_prefix)
    if device is not None:
        device_id(device)
    for url in webhooks or ():
        parse_url(url, "--webhook", {"http": 80, "https": 443}, "--webhook takes an http:// or https:// URL")
