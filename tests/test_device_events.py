"""The event detector (edgesqz.device.events) on scripted score sequences with timestamps.

Pure logic: no model, no camera. A "timeline" says, for any time t, which class is on top and with
what score; it is sampled at a frame rate (with a little jitter, as cameras deliver) and fed to the
detector. The checks: flicker does not split an event, short gaps are bridged and long ones are
not, blips never start one, and 5 fps and 30 fps sampling of the same timeline give the same events.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest

from edgesqz.device.events import EventDetector, EventRule, resolve_indices, slug
from edgesqz.errors import EdgesqzError

LABELS = ["background", "tabby", "tiger cat", "espresso", "crane", "crane"]
BG, TABBY, TIGER, ESPRESSO = 0, 1, 2, 3
T0 = 1_800_000_000.0  # a Unix time


def probs(top: int, score: float = 0.8, second: int | None = None, second_score: float = 0.0) -> np.ndarray:
    """Probabilities with ``top`` first at ``score``; the rest spread over the other classes."""
    p = np.zeros(len(LABELS), np.float32)
    p[top] = score
    if second is not None:
        p[second] = second_score
    rest = [i for i in range(len(LABELS)) if p[i] == 0]
    p[rest] = (1 - p.sum()) / len(rest)
    return p


Timeline = Callable[[float], np.ndarray]


def run(detector: EventDetector, timeline: Timeline, seconds: float, fps: float, jitter: float = 0.1,
        seed: int = 0) -> list[tuple[str, object]]:
    """Sample ``timeline`` at ``fps`` for ``seconds`` (timestamps jittered by a fraction of a frame)."""
    rng = np.random.default_rng(seed)
    out = []
    n = int(seconds * fps)
    for i in range(n):
        t = i / fps + float(rng.uniform(0, jitter / fps))
        for event in detector.update(T0 + t, timeline(t), i):
            out.append((event.state, _copy(event)))
    for event in detector.finish(T0 + n / fps):
        out.append((event.state, _copy(event)))
    return out


def _copy(event: object) -> object:
    import copy

    return copy.copy(event)


def present_during(intervals: list[tuple[float, float]], label: int = TABBY) -> Timeline:
    def timeline(t: float) -> np.ndarray:
        return probs(label if any(a <= t < b for a, b in intervals) else BG)
    return timeline


def detector(*specs: str, **kwargs: float) -> EventDetector:
    return EventDetector([EventRule.parse(s) for s in specs], LABELS, len(LABELS), **kwargs)


def starts_ends(events: list[tuple[str, object]]) -> list[tuple[str, float, float | None]]:
    return [(state, e.start - T0, None if e.end is None else e.end - T0) for state, e in events]


# --------------------------------------------------------------------------- timing


def test_one_appearance_gives_one_start_and_one_end() -> None:
    events = run(detector("tabby"), present_during([(1.0, 4.0)]), 8.0, 30)
    assert [s for s, _ in events] == ["active", "ended"]
    (_, start), (_, end) = events
    assert start.id == end.id and start.id.endswith("-tabby-" + start.id.split("-")[-2] + "-1")
    assert start.start - T0 == pytest.approx(1.0, abs=1 / 30)
    assert start.timestamp - start.start == pytest.approx(0.5, abs=1 / 30)  # announced after 0.5 s
    assert end.end - T0 == pytest.approx(4.0, abs=2 / 30)  # the last frame it was seen in
    assert end.timestamp - T0 == pytest.approx(6.0, abs=2 / 30)  # after 2 s of absence
    assert end.reason == "absent" and end.frames == pytest.approx(90, abs=2)
    assert end.peak_score == pytest.approx(0.8) and end.mean_score == pytest.approx(0.8)
    assert end.peak_label == "tabby" and end.duration_s == pytest.approx(3.0, abs=2 / 30)


def test_flicker_does_not_split_an_event() -> None:
    """Every 7th frame the classifier says something else, and there are 0.4 s gaps: still one event."""
    base = present_during([(1.0, 3.0), (3.4, 6.0)])

    def timeline(t: float) -> np.ndarray:
        frame = round(t * 30)
        return probs(ESPRESSO) if 1.0 <= t < 6.0 and frame % 7 == 0 else base(t)

    events = run(detector("tabby"), timeline, 10.0, 30)
    assert [s for s, _ in events] == ["active", "ended"]
    assert events[1][1].end - T0 == pytest.approx(6.0, abs=2 / 30)


def test_gap_longer_than_the_hold_time_gives_two_events() -> None:
    short = run(detector("tabby", end_s=2.0), present_during([(1.0, 3.0), (4.5, 6.0)]), 10.0, 30)
    assert [s for s, _ in short] == ["active", "ended"]  # 1.5 s gap < 2 s hold
    long = run(detector("tabby", end_s=2.0), present_during([(1.0, 3.0), (5.5, 7.0)]), 12.0, 30)
    assert [s for s, _ in long] == ["active", "ended", "active", "ended"]  # 2.5 s gap > 2 s hold
    assert long[0][1].id != long[2][1].id and long[2][1].id.endswith("-2")
    assert long[1][1].end - T0 == pytest.approx(3.0, abs=2 / 30)
    assert long[2][1].start - T0 == pytest.approx(5.5, abs=2 / 30)


def test_blips_never_start_an_event() -> None:
    """One frame of the label every 0.4 s (noise), and 0.3 s appearances: shorter than the start time."""
    def blips(t: float) -> np.ndarray:
        return probs(TABBY if round(t * 30) % 12 == 0 else BG)

    assert run(detector("tabby"), blips, 10.0, 30) == []
    assert run(detector("tabby"), present_during([(1.0, 1.3), (3.0, 3.3), (5.0, 5.4)]), 8.0, 30) == []


def test_onset_bridges_short_gaps_but_not_long_ones() -> None:
    # 0.3 s present, 0.1 s gone, 0.3 s present: one onset of 0.7 s -> starts
    assert len(run(detector("tabby"), present_during([(1.0, 1.3), (1.4, 1.8)]), 5.0, 30)) == 2
    # 0.3 s present, 0.4 s gone (more than the 0.25 s gap), 0.3 s present: two blips, no event
    assert run(detector("tabby"), present_during([(1.0, 1.3), (1.7, 2.0)]), 5.0, 30) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_5_fps_and_30_fps_give_the_same_events(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    intervals, t = [], 0.5
    for _ in range(8):  # appearances of 0.3..4 s separated by gaps of 0.1..4 s
        length, gap = float(rng.uniform(0.3, 4.0)), float(rng.choice([0.1, 0.15, 0.6, 1.2, 2.8, 4.0]))
        intervals.append((t, t + length))
        t += length + gap
    timeline = present_during(intervals)
    fast = starts_ends(run(detector("tabby"), timeline, t + 3, 30, seed=seed))
    slow = starts_ends(run(detector("tabby"), timeline, t + 3, 5, seed=seed))
    assert fast, intervals
    assert [s for s, *_ in fast] == [s for s, *_ in slow], (fast, slow, intervals)
    for (_, a_start, a_end), (_, b_start, b_end) in zip(fast, slow, strict=True):
        assert abs(a_start - b_start) <= 0.2 + 1e-6  # one frame at 5 fps
        if a_end is not None:
            assert abs(a_end - b_end) <= 0.2 + 1e-6


def test_defaults_are_the_same_in_frames_at_any_rate() -> None:
    """The start comes 0.5 s after the first frame, whatever the rate (a frame count would not)."""
    for fps in (5, 10, 15, 30, 60):
        events = run(detector("tabby"), present_during([(1.0, 5.0)]), 9.0, fps, jitter=0)
        start = events[0][1]
        assert start.timestamp - start.start == pytest.approx(0.5, abs=1 / fps + 1e-6), fps


def test_run_end_ends_active_events_and_drops_pending_ones() -> None:
    det = detector("tabby", "coffee=espresso")
    for i in range(30):  # 1 s of tabby; espresso only in the last 0.2 s (pending)
        t = T0 + i / 30
        det.update(t, probs(TABBY, 0.5, ESPRESSO, 0.45) if i < 24 else probs(ESPRESSO), i)
    assert set(det.tracking) == {"tabby", "coffee"} and det.active() == {"tabby": True, "coffee": False}
    ended = det.finish(T0 + 1.0)
    assert [(e.name, e.reason, e.state) for e in ended] == [("tabby", "run_ended", "ended")]
    assert det.tracking == {}


# --------------------------------------------------------------------------- scores and groups


def test_group_watches_several_labels_as_one() -> None:
    """The top-1 alternates between tabby and tiger cat: one label flaps without a hold time, a group does not."""
    def alternating(t: float) -> np.ndarray:
        if not 1.0 <= t < 5.0:
            return probs(BG)
        return probs(TABBY, 0.5, TIGER, 0.4) if round(t * 30) % 2 else probs(TIGER, 0.5, TABBY, 0.4)

    group = run(detector("cat=tabby,tiger_cat"), alternating, 8.0, 30)
    assert [s for s, _ in group] == ["active", "ended"]
    assert group[0][1].name == "cat" and group[1][1].peak_score == pytest.approx(0.9)
    assert group[1][1].peak_label in {"tabby", "tiger cat"}
    # without a hold time the single label flaps (it drops out every other frame); the group never does
    flapping = run(detector("tabby", end_s=0.0), alternating, 8.0, 30)
    assert len(flapping) > 10
    assert [s for s, _ in run(detector("cat=tabby,tiger cat", end_s=0.0), alternating, 8.0, 30)] == ["active", "ended"]
    # with a score, the group's probability (0.9) counts, not either label's (0.5 or 0.4)
    assert len(run(detector("cat=tabby,tiger cat>=0.8"), alternating, 8.0, 30)) == 2
    assert run(detector("tabby>=0.8"), alternating, 8.0, 30) == []


def test_score_threshold_uses_the_group_probability() -> None:
    def timeline(t: float) -> np.ndarray:
        if 1.0 <= t < 3.0:
            return probs(ESPRESSO, 0.4, TABBY, 0.35)  # tabby 0.35 alone; with tiger cat (0.04) still < 0.5
        if 6.0 <= t < 8.0:
            return probs(TABBY, 0.7)
        return probs(BG)

    events = run(detector("tabby>=50%"), timeline, 11.0, 30)
    assert [s for s, _ in events] == ["active", "ended"] and events[0][1].start - T0 == pytest.approx(6.0, abs=0.05)
    low = run(detector("tabby>=0.3"), timeline, 11.0, 30)
    assert [s for s, _ in low] == ["active", "ended", "active", "ended"]  # not top-1, but above its score


def test_event_record() -> None:
    events = run(detector("cat=tabby,tiger cat>=0.6"), present_during([(1.0, 2.0)]), 5.0, 30)
    start, end = events[0][1], events[1][1]
    end.snapshot, end.clip = {"annotated": "a.jpg", "raw": "a.raw.jpg"}, "a.mp4"
    rec = end.to_record(source="camera 0", device="pi-kitchen")
    assert rec["schema"] == "edgesqz/1" and rec["kind"] == "event" and rec["state"] == "end"
    assert rec["id"] == start.id and rec["name"] == "cat" and rec["labels"] == ["tabby", "tiger cat"]
    assert rec["label"] == "tabby" and rec["min_score"] == 0.6 and rec["device"] == "pi-kitchen"
    assert rec["reason"] == "absent" and rec["frames"] == end.frames and rec["clip"] == "a.mp4"
    assert rec["start"] < rec["end"] < rec["timestamp"] and rec["duration_s"] == pytest.approx(1.0, abs=0.07)
    assert rec["first_frame"] <= rec["peak_frame"] <= rec["last_frame"]
    assert 0 < rec["mean_score"] <= rec["peak_score"] <= 1


# --------------------------------------------------------------------------- grammar


def test_grammar() -> None:
    assert EventRule.parse("espresso") == EventRule(("espresso",), None, "espresso")
    assert EventRule.parse("cat=tabby, tiger cat ,Egyptian cat>=0.5") == \
        EventRule(("tabby", "tiger cat", "Egyptian cat"), 0.5, "cat")
    assert EventRule.parse("tabby>=80%").min_score == pytest.approx(0.8)
    assert EventRule.parse("tabby,tiger cat").name == "tabby,tiger cat"
    assert EventRule.parse("#281").labels == ("#281",)
    assert slug("Egyptian cat, tabby!") == "egyptian_cat_tabby"
    for bad, needle in [("", "no label"), (">=0.5", "no label"), ("tabby>=1.5", "(0, 1]"), ("tabby>=abc", "score"),
                        ("tabby>=0", "(0, 1]"), ("=tabby", "name"), ("a/b=tabby", "name"), (" , ", "no label")]:
        with pytest.raises(EdgesqzError, match=re.escape(needle)):
            EventRule.parse(bad)


def test_labels_are_resolved_against_the_model() -> None:
    classes = len(LABELS)
    assert resolve_indices(EventRule.parse("Tiger_Cat"), LABELS, classes) == (TIGER,)
    assert resolve_indices(EventRule.parse("crane"), LABELS, classes) == (4, 5)  # a label two classes share
    assert resolve_indices(EventRule.parse("#5,tabby"), LABELS, classes) == (5, TABBY)
    assert resolve_indices(EventRule.parse("3"), None, classes) == (3,)  # no labels: indices are the names
    with pytest.raises(EdgesqzError, match="no label 'tabbby'; did you mean 'tabby'"):
        resolve_indices(EventRule.parse("tabbby"), LABELS, classes)
    with pytest.raises(EdgesqzError, match="#9 does not exist"):
        resolve_indices(EventRule.parse("#9"), LABELS, classes)
    with pytest.raises(EdgesqzError, match="both called"):
        detector("cat=tabby", "cat=tiger cat")
    with pytest.raises(EdgesqzError, match="--event-end"):
        detector("tabby", end_s=-1)
