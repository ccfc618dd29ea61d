"""The 95 % intervals in accuracy reports: they bracket the estimate and cover the truth ~95 % of the time."""

from __future__ import annotations

import numpy as np
import pytest

from edgesqz.evaluate import agreement_interval, compare, drop_interval


def test_agreement_interval_basics() -> None:
    lo, hi = agreement_interval(775, 800)
    assert 95.0 < lo < 96.875 < hi < 98.5
    lo_small, hi_small = agreement_interval(31, 32)
    assert hi_small - lo_small > 3 * (hi - lo)  # fewer images, wider interval
    lo, hi = agreement_interval(800, 800)
    assert hi == pytest.approx(100.0) and 99.0 < lo < 100.0  # all agree: still not a certainty
    assert agreement_interval(0, 0) == (0.0, 100.0)


@pytest.mark.parametrize(("p", "n"), [(0.97, 800), (0.9, 50)])
def test_agreement_interval_covers_the_true_rate(p: float, n: int) -> None:
    rng = np.random.default_rng(0)
    draws = rng.binomial(n, p, size=4000)
    covered = [lo <= 100 * p <= hi for lo, hi in (agreement_interval(int(k), n) for k in draws)]
    assert 0.93 <= np.mean(covered) <= 0.975


def _paired(rng: np.random.Generator, n: int, only_ref: float, only_model: float, both: float
            ) -> tuple[np.ndarray, np.ndarray]:
    cell = rng.choice(4, size=n, p=[only_ref, only_model, both, 1 - only_ref - only_model - both])
    return (cell == 0) | (cell == 2), (cell == 1) | (cell == 2)


@pytest.mark.parametrize(("n", "only_ref", "only_model", "most"),
                         [(800, 0.02, 0.015, 0.975), (200, 0.01, 0.01, 0.995)])
def test_drop_interval_covers_the_true_drop(n: int, only_ref: float, only_model: float, most: float) -> None:
    """At least nominal coverage; with few discordant images (~4 in the second case) the +1/2
    cells make it conservative, as Agresti & Min report, but it must not be vacuous."""
    rng = np.random.default_rng(1)
    true_drop = 100 * (only_ref - only_model)
    covered = []
    for _ in range(3000):
        ref_ok, mod_ok = _paired(rng, n, only_ref, only_model, 0.65)
        lo, hi = drop_interval(ref_ok, mod_ok)
        covered.append(lo <= true_drop <= hi)
    assert 0.93 <= np.mean(covered) <= most


def test_drop_interval_is_paired() -> None:
    """The same 10 images flip in a 1000-image set: far tighter than two independent accuracies would give."""
    ref_ok = np.zeros(1000, bool)
    ref_ok[:650] = True
    mod_ok = ref_ok.copy()
    mod_ok[:10] = False
    lo, hi = drop_interval(ref_ok, mod_ok)
    assert 0.3 < lo < 1.0 < hi < 1.7
    unpaired_half = 1.96 * np.sqrt(2 * 0.65 * 0.35 / 1000) * 100  # ~4.2 points
    assert hi - lo < unpaired_half


def test_compare_reports_the_intervals() -> None:
    rng = np.random.default_rng(2)
    targets = rng.integers(0, 10, 400)
    reference = rng.normal(size=(400, 10))
    reference[np.arange(400), targets] += 1.5
    model = reference + rng.normal(scale=0.3, size=reference.shape)
    block = compare(reference, model, targets, [f"c{i}" for i in range(10)])
    lo, hi = block["top1_agreement_ci95"]
    assert lo < block["top1_agreement"] < hi
    lo, hi = block["top1_drop_ci95"]
    assert lo < block["top1_drop"] < hi
