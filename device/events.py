"""Events: "a watched label showed up, stayed a while, and left", from the per-frame scores.

Pure logic (numpy only, no I/O, no clocks of its own): :class:`EventDetector` takes each frame's
timestamp and class probabilities and says when an event starts and when it ends, so it can be
tested on scripted score sequences.

The ``--event`` grammar (repeatable; one rule per option)::

    [NAME=]LABEL[,LABEL...][>=SCORE]

- ``LABEL`` is a class label of the model (case and ``_``/space do not matter), or ``#N`` for
  class index N. Several labels form one *group* watched as one thing: ``cat=tabby,tiger cat,Egyptian cat``
  (ImageNet's cats trade places from frame to frame; as a group they are one steady event).
- Without ``>=SCORE`` the rule is *present* in a frame when one of its labels is the top-1 class.
  With it, when the group's probability (the sum of its labels' scores) is at least SCORE
  (``0.6`` or ``60%``).
- ``NAME`` names the rule in events, topics and file names; default: the labels joined by ``,``.

Timing is measured in time, not frames, so a rule behaves the same at 5 and at 30 fps:

- an event **starts** once the rule has been present for ``start_s`` seconds (default 0.5),
  counted from the first frame it was present in; absences shorter than ``gap_s`` (default
  0.25 s, never more than ``start_s``) do not interrupt that onset, longer ones start it over;
- it **ends** once the rule has been absent for ``end_s`` seconds (default 2.0), counted from the
  first frame it was missing from; a frame where it is present again in between resets the count
  (no flapping: one start and one end per appearance); the run ending ends it too.

Each event carries an id, its rule's name, the label that scored best, start and end (the first
and the last frame it was present in, Unix time), the peak and mean score over the frames it was
present in, their number, and (filled in by the outputs) snapshot and clip paths.
"""

from __future__ import annotations

import difflib
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgesqz.device import options
from edgesqz.errors import EdgesqzError
from edgesqz.schema import record

DEFAULT_START_S = 0.5
DEFAULT_END_S = 2.0
DEFAULT_GAP_S = 0.25
EVENT_GRAMMAR = ("[NAME=][ZONE:]LABEL[,LABEL...][>=SCORE], e.g. 'espresso', 'cat=tabby,tiger cat,Egyptian cat>=0.5', "
                 "'door_open=door:open'")
_ZONE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}(/[A-Za-z0-9][A-Za-z0-9_-]{0,31})?$")
_NAME_OK = re.compile(r"^[^\s/#+=,][^/#+=,]*$")


def slug(text: str) -> str:
    """A name safe in MQTT topics, Home Assistant object ids and file names: ``[a-z0-9_]``, at most 64
    characters, unique for non-ASCII and long names (see :func:`edgesqz.device.options.slug`)."""
    return options.slug(text)


def _norm(label: str) -> str:
    return " ".join(label.replace("_", " ").lower().split())


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class EventRule:
    """One ``--event`` rule: a group of labels (or class indices ``#N``), an optional score, a name."""

    labels: tuple[str, ...]
    min_score: float | None = None
    name: str = ""
    zone: str | None = None  # [CAMERA/]ZONE, or a camera's name: the rule watches only there

    def __post_init__(self) -> None:
        if not self.labels:
            raise EdgesqzError(f"--event needs at least one label: {EVENT_GRAMMAR}")
        if not self.name:
            object.__setattr__(self, "name", ",".join(self.labels))
        if self.min_score is not None and not 0.0 < self.min_score <= 1.0:
            raise EdgesqzError(f"--event {self.name}: the score must be in (0, 1] (or 1%..100%), "
                               f"got {self.min_score}")

    @property
    def slug(self) -> str:
        return slug(self.name)

    @classmethod
    def parse(cls, text: str) -> EventRule:
        """Parse one ``--event`` value (see the module docstring)."""
        spec = text.strip()
        score: float | None = None
        if ">=" in spec:
            spec, _, score_text = spec.rpartition(">=")
            score = _parse_score(score_text, text)
        name = ""
        if "=" in spec:
            name, _, spec = spec.partition("=")
            name = name.strip()
            if not name or not _NAME_OK.match(name):
                raise EdgesqzError(f"--event {text[:80]!r}: the name before '=' must be a word without / # + = , "
                                   f"({EVENT_GRAMMAR})")
            name = options.name(name, "--event: the name before '='", options.EVENT_NAME_MAX)
        zone = None
        head, colon, rest = spec.partition(":")
        if colon and _ZONE_REF.match(head.strip()):
            zone, spec = head.strip(), rest
        labels = tuple(options.name(part, "--event: a label", options.EVENT_NAME_MAX)
                       for part in spec.split(",") if part.strip())
        if not labels:
            raise EdgesqzError(f"--event {text[:80]!r}: no label given; write {EVENT_GRAMMAR}")
        if not name and zone:
            name = f"{zone.replace('/', '_')}_{','.join(labels)}"
        if not name:
            options.name(",".join(labels), "--event: the labels (the rule's name; give a shorter one with NAME=)",
                         options.EVENT_NAME_MAX)
        return cls(labels=labels, min_score=score, name=name, zone=zone)

    def watches(self, camera: str | None, zone: str | None) -> bool:
        """Whether the rule applies to this camera's zone (zone None: the camera's whole frame)."""
        if self.zone is None:
            return True
        if "/" in self.zone:
            return self.zone == f"{camera}/{zone}"
        return self.zone == zone or (zone is None and self.zone == camera)

    def describe(self) -> str:
        when = f"score >= {self.min_score:g}" if self.min_score is not None else "top-1"
        group = "" if self.labels == (self.name,) else f" ({', '.join(self.labels)})"
        where = f" in zone {self.zone}" if self.zone else ""
        return f"{self.name}{group}{where} when {when}"


def _parse_score(text: str, whole: str) -> float:
    value = text.strip()
    try:
        score = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise EdgesqzError(f"--event {whole!r}: {value!r} after '>=' is not a score (0.6 or 60%)") from None
    if not math.isfinite(score) or not 0.0 < score <= 1.0:
        raise EdgesqzError(f"--event {whole!r}: the score must be in (0, 1] (or 1%..100%), got {value}")
    return score


def resolve_indices(rule: EventRule, labels: list[str] | None, classes: int) -> tuple[int, ...]:
    """The class indices a rule watches; a label nobody has is an error naming close ones."""
    names = labels if labels is not None else [str(i) for i in range(classes)]
    by_norm: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        by_norm.setdefault(_norm(name), []).append(i)
    out: list[int] = []
    for label in rule.labels:
        index = options.class_index(label)
        if index is not None:
            if not 0 <= index < classes:
                raise EdgesqzError(f"--event {rule.name}: class {label} does not exist (the model has {classes} "
                                   f"classes, #0 to #{classes - 1})")
            found = [index]
        else:
            found = by_norm.get(_norm(label), [])
        if not found:
            close = difflib.get_close_matches(_norm(label), list(by_norm), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
                "; `edgesqz info MODEL` lists the labels"
            raise EdgesqzError(f"--event {rule.name}: the model has no label {label!r}{hint}")
        out.extend(i for i in found if i not in out)
    return tuple(out)


# --------------------------------------------------------------------------- events


@dataclass
class Event:
    """One appearance of a rule. ``state`` is ``pending`` (onset, not announced), ``active`` or ``ended``."""

    rule: EventRule
    start: float  # Unix time of the first frame the rule was present in
    first_frame: int
    id: str = ""
    state: str = "pending"
    end: float | None = None  # Unix time of the last frame it was present in (set when it ends)
    last_seen: float = 0.0
    last_frame: int = 0
    frames: int = 0  # frames it was present in
    peak_score: float = 0.0
    peak_frame: int = 0
    peak_label: str = ""
    score_sum: float = 0.0
    reason: str | None = None  # why it ended: "absent" or "run_ended"
    timestamp: float = 0.0  # the frame that changed its state (start: the confirming one; end: the deciding one)
    snapshot: dict[str, str] | None = None  # {"annotated": path, "raw": path}, set by the snapshot writer
    clip: str | None = None  # set by the clip writer
    extra: dict[str, Any] = field(default_factory=dict)
    camera: str | None = None  # runs with several cameras or zones: where it happened
    zone: str | None = None

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def mean_score(self) -> float:
        return self.score_sum / self.frames if self.frames else 0.0

    @property
    def duration_s(self) -> float:
        return (self.end if self.end is not None else self.last_seen) - self.start

    def add(self, timestamp: float, frame: int, score: float, label: str) -> bool:
        """Count a frame the rule is present in; True when it is the best so far."""
        self.frames += 1
        self.score_sum += score
        self.last_seen, self.last_frame = timestamp, frame
        if self.frames == 1 or score > self.peak_score:
            self.peak_score, self.peak_frame, self.peak_label = score, frame, label
            return True
        return False

    def to_record(self, *, source: str | None = None, device: str | None = None,
                  clock: str = "wall") -> dict[str, Any]:
        """The ``event`` object of the JSON schema (docs/schema.md); ``clock``: what the times follow."""
        state = "start" if self.state == "active" else "end"
        return record(
            "event",
            state=state,
            id=self.id,
            name=self.name,
            label=self.peak_label,
            labels=list(self.rule.labels),
            min_score=self.rule.min_score,
            device=device,
            source=source,
            clock=clock,
            timestamp=round(self.timestamp, 6),
            start=round(self.start, 6),
            end=round(self.end, 6) if self.end is not None else None,
            duration_s=round(self.duration_s, 3),
            frames=self.frames,
            first_frame=self.first_frame,
            last_frame=self.last_frame,
            peak_frame=self.peak_frame,
            peak_score=round(self.peak_score, 6),
            mean_score=round(self.mean_score, 6),
            reason=self.reason,
            snapshot=self.snapshot,
            clip=self.clip,
            **({"camera": self.camera} if self.camera is not None else {}),
            **({"zone": self.zone} if self.zone is not None else {}),
        )


@dataclass
class _Track:
    rule: EventRule
    indices: np.ndarray
    event: Event | None = None
    absent_since: float | None = None


class EventDetector:
    """Turns per-frame scores into event starts and ends (see the module docstring for the rules).

    ``labels``: the model's labels (index -> name; None: class indices as names). ``update`` is
    called once per classified frame, in order, and returns the events whose state changed on it
    (``state`` ``active``: just started; ``ended``: just ended). :attr:`tracking` holds the events
    being followed (pending or active), e.g. to keep each one's best frame.
    """

    def __init__(self, rules: list[EventRule] | tuple[EventRule, ...], labels: list[str] | None, classes: int, *,
                 start_s: float = DEFAULT_START_S, end_s: float = DEFAULT_END_S, gap_s: float | None = None,
                 run_id: str | None = None, scope: tuple[str | None, str | None] = (None, None),
                 counter: Any = None) -> None:
        for value, option in ((start_s, "--event-start"), (end_s, "--event-end")):
            if not (math.isfinite(value) and value >= 0):
                raise EdgesqzError(f"{option} must be a number of seconds >= 0, got {value}")
        names = [rule.name for rule in rules]
        slugs = [rule.slug for rule in rules]
        for i, s in enumerate(slugs):
            if s in slugs[:i]:
                raise EdgesqzError(f"two --event rules are both called {names[i]!r} (or names that differ only in "
                                   "punctuation); name them with NAME=...")
        self.labels = labels
        self.classes = classes
        self.start_s = float(start_s)
        self.end_s = float(end_s)
        self.gap_s = min(DEFAULT_GAP_S, self.start_s) if gap_s is None else float(gap_s)
        self.run_id = run_id or secrets.token_hex(2)
        self._tracks = [_Track(rule, np.asarray(resolve_indices(rule, labels, classes), dtype=np.intp))
                        for rule in rules]
        self._count = 0
        self.scope = scope
        self._counter = counter  # shared by the detectors of one run (one per zone): ids stay unique

    @property
    def rules(self) -> list[EventRule]:
        return [t.rule for t in self._tracks]

    def relabel(self, labels: list[str] | None, classes: int) -> None:
        """A new model (hot swap): the same rules on its labels; events going on carry on."""
        indices = [np.asarray(resolve_indices(t.rule, labels, classes), dtype=np.intp) for t in self._tracks]
        self.labels, self.classes = labels, classes
        for track, idx in zip(self._tracks, indices, strict=True):
            track.indices = idx

    @property
    def tracking(self) -> dict[str, Event]:
        """Events being followed, by rule name (pending ones included)."""
        return {t.rule.name: t.event for t in self._tracks if t.event is not None}

    def active(self) -> dict[str, bool]:
        """Rule name -> whether an event of it is active (announced and not ended)."""
        return {t.rule.name: t.event is not None and t.event.state == "active" for t in self._tracks}

    def _label(self, index: int) -> str:
        return self.labels[index] if self.labels is not None else str(index)

    def _new_id(self, event: Event) -> str:
        self._count = next(self._counter) if self._counter is not None else self._count + 1
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(event.start))
        camera, zone = self.scope
        where = "_".join(slug(p) for p in (camera, zone) if p)
        what = f"{where}_{event.rule.slug}" if where else event.rule.slug
        return f"{stamp}-{what}-{self.run_id}-{self._count}"

    def update(self, timestamp: float, scores: np.ndarray, frame: int) -> list[Event]:
        """Feed one frame (its capture time in seconds, its class probabilities, its index)."""
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        top1 = int(np.argmax(scores))
        changed: list[Event] = []
        for track in self._tracks:
            rule = track.rule
            group = scores[track.indices]
            score = float(group.sum())
            present = score >= rule.min_score if rule.min_score is not None else top1 in track.indices
            event = track.event
            if present:
                track.absent_since = None
                if event is None:
                    event = track.event = Event(rule=rule, start=timestamp, first_frame=frame, camera=self.scope[0],
                                                zone=self.scope[1])
                event.add(timestamp, frame, score, self._label(int(track.indices[int(np.argmax(group))])))
                if event.state == "pending" and timestamp - event.start >= self.start_s:
                    event.state, event.timestamp = "active", timestamp
                    event.id = self._new_id(event)
                    changed.append(event)
                continue
            if event is None:
                continue
            if track.absent_since is None:
                track.absent_since = timestamp
            gone = timestamp - track.absent_since
            if event.state == "pending" and gone >= self.gap_s:
                track.event, track.absent_since = None, None  # a blip, not an appearance
            elif event.state == "active" and gone >= self.end_s:
                changed.append(self._end(track, timestamp, "absent"))
        return changed

    def finish(self, timestamp: float | None = None) -> list[Event]:
        """End every active event (the run is over); pending ones are dropped."""
        ended = []
        for track in self._tracks:
            if track.event is not None and track.event.state == "active":
                ended.append(self._end(track, timestamp if timestamp is not None else track.event.last_seen,
                                       "run_ended"))
            track.event, track.absent_since = None, None
        return ended

    def _end(self, track: _Track, timestamp: float, reason: str) -> Event:
        event = track.event
        assert event is not None
        event.state, event.end, event.reason, event.timestamp = "ended", event.last_seen, reason, timestamp
        track.event, track.absent_since = None, None
        return event
