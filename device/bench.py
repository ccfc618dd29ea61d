"""``edgesqz bench``: latency you can trust, on the device.

- Cold start (interpreter creation with its delegates, then the first invoke, which packs the
  weights for XNNPACK) is reported apart from the steady state.
- Several models are measured interleaved, one invoke each in turn (A B A B ...), so thermal
  drift or a background job cannot favour one; every thread count is its own round.
- With a frame source, the whole pipeline is timed per stage: capture, preprocess, invoke,
  postprocess, end to end (sequentially, so each stage's cost is visible).
- The report carries the device facts (CPU, governor, clock, temperature, throttling) and the
  runtime versions, so numbers from different boards can be compared.

No TensorFlow, no PyTorch.
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesqz import sysinfo
from edgesqz.device.runtime import (
    Backend,
    Coverage,
    check_model_file,
    check_threads,
    delegate_coverage,
    make_interpreter,
)
from edgesqz.errors import EdgesqzError
from edgesqz.schema import report

Advance = Callable[[int], None]


def parse_threads(text: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4]; a clear error for anything else."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise EdgesqzError(f"--threads takes numbers like 1,2,4, not {text!r}") from exc
    if not values:
        raise EdgesqzError(f"--threads takes numbers like 1,2,4, not {text!r}")
    for v in values:
        check_threads(v)
    return values


def stats(times_ms: Sequence[float]) -> dict[str, float]:
    """min, mean, std, p50, p90, p99 (ms) and FPS (1000 / mean) of a latency sample."""
    a = np.asarray(times_ms, dtype=np.float64)
    mean = float(a.mean())
    return {"runs": int(a.size), "min_ms": round(float(a.min()), 4), "mean_ms": round(mean, 4),
            "std_ms": round(float(a.std()), 4), "p50_ms": round(float(np.percentile(a, 50)), 4),
            "p90_ms": round(float(np.percentile(a, 90)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4),
            "fps": round(1000.0 / mean, 2) if mean > 0 else 0.0}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@dataclass
class _Target:
    path: str
    data: bytes
    threads: int
    interpreter: Any = None
    backend: Backend | None = None
    coverage: Coverage | None = None
    cold: dict[str, float] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)

    def create(self, delegate: str | None) -> None:
        from edgesqz.quiet import captured_output

        t0 = time.perf_counter()
        with captured_output([]):  # the runtime's one-off XNNPACK banner
            self.interpreter, self.backend = make_interpreter(self.data, threads=self.threads, delegate=delegate,
                                                              src=f"model {self.path}")
        t1 = time.perf_counter()
        inp = self.interpreter.get_input_details()[0]
        rng = np.random.default_rng(0)
        if np.issubdtype(inp["dtype"], np.integer):
            info = np.iinfo(inp["dtype"])
            x = rng.integers(info.min, info.max + 1, size=inp["shape"], dtype=inp["dtype"])
        else:
            x = (rng.random(inp["shape"]) * 255).astype(inp["dtype"])
        self.interpreter.set_tensor(inp["index"], x)
        self.interpreter.invoke()
        t2 = time.perf_counter()
        self.cold = {"create_ms": round((t1 - t0) * 1e3, 3), "first_invoke_ms": round((t2 - t1) * 1e3, 3)}
        self.coverage = delegate_coverage(self.interpreter)

    def invoke(self) -> None:
        t0 = time.perf_counter()
        self.interpreter.invoke()
        self.times.append((time.perf_counter() - t0) * 1e3)


def bench_models(models: Sequence[str | os.PathLike[str]], *, threads: Sequence[int], warmup: int = 10,
                 runs: int | None = 100, duration: float | None = None, delegate: str | None = None,
                 progress: Callable[[str, int], Advance] | None = None) -> list[dict[str, Any]]:
    """One result row per (model, thread count); models interleaved within each thread count."""
    if warmup < 0 or (runs is not None and runs < 1) or (duration is not None and not 0 < duration < math.inf):
        raise EdgesqzError("--warmup must be >= 0, --runs >= 1 and --duration a number of seconds > 0")
    blobs = {str(m): check_model_file(m) for m in models}
    rows = []
    for n in threads:
        targets = [_Target(str(m), blobs[str(m)], n) for m in models]
        for t in targets:
            t.create(delegate)
        for _ in range(warmup):
            for t in targets:
                t.interpreter.invoke()
        total = runs if duration is None else None
        advance = progress(f"{n} thread{'s' if n > 1 else ''}", total or 0) if progress else None
        start = time.perf_counter()
        done = 0
        while (duration is None and done < (runs or 0)) or (duration is not None and
                                                            time.perf_counter() - start < duration):
            for t in targets:
                t.invoke()
            done += 1
            if advance:
                advance(1)
        for t in targets:
            assert t.backend is not None and t.coverage is not None
            rows.append({"model": t.path, "size_bytes": len(t.data), "threads": n, "delegate": delegate,
                         "backend": t.backend.name, "backend_version": t.backend.version,
                         "coverage": t.coverage.to_dict(), "cold": t.cold, "latency": stats(t.times),
                         "samples_ms": [round(x, 4) for x in t.times]})
    return rows


def bench_pipeline(model: str | os.PathLike[str], source: Any, *, threads: int, frames: int, warmup: int = 3,
                   delegate: str | None = None, advance: Advance | None = None) -> dict[str, Any]:
    """Per-stage times of the real pipeline (capture, preprocess, invoke, postprocess) on ``source``.

    ``source`` is an unopened :class:`edgesqz.device.sources.FrameSource`; its capture is read
    directly (no thread), so each stage's cost is measured on its own.
    """
    from edgesqz.device.classifier import Classifier

    clf = Classifier(model, threads=threads, delegate=delegate)
    source.open()
    capture = source.capture
    stages: dict[str, list[float]] = {k: [] for k in ("capture", "preprocess", "invoke", "postprocess",
                                                      "end_to_end")}
    try:
        i = 0
        while i < frames + warmup:
            t0 = time.perf_counter()
            got = capture.read()
            if got is None:
                break
            t1 = time.perf_counter()
            tensor = clf.prepare(got[0])
            t2 = time.perf_counter()
            out = clf.infer(tensor)
            clf.top(out.scores)
            t3 = time.perf_counter()
            if i >= warmup:
                stages["capture"].append((t1 - t0) * 1e3)
                stages["preprocess"].append((t2 - t1) * 1e3)
                stages["invoke"].append(out.timings["inference"])
                stages["postprocess"].append((t3 - t2) * 1e3 - out.timings["inference"])
                stages["end_to_end"].append((t3 - t0) * 1e3)
                if advance:
                    advance(1)
            i += 1
    finally:
        capture.close()
    if not stages["end_to_end"]:
        raise EdgesqzError(f"{source.description} gave no frames to measure (it needs more than {warmup})")
    return {"model": str(model), "source": source.description, "threads": threads, "delegate": delegate,
            "stages": {k: stats(v) for k, v in stages.items()}}


def bench_report(rows: list[dict[str, Any]], pipeline: list[dict[str, Any]], settings: dict[str, Any],
                 keep_samples: bool = True) -> dict[str, Any]:
    if not keep_samples:
        rows = [{k: v for k, v in r.items() if k != "samples_ms"} for r in rows]
    return report("bench_report", device=sysinfo.facts(), settings=settings, results=rows, pipeline=pipeline,
                  peak_rss_mb=peak_rss_mb())


CSV_COLUMNS = ("model", "threads", "delegate", "backend", "size_bytes", "create_ms", "first_invoke_ms", "runs",
               "min_ms", "mean_ms", "std_ms", "p50_ms", "p90_ms", "p99_ms", "fps", "delegated_ops", "total_ops")


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike[str], *, force: bool = True) -> None:
    """One row per (model, thread count), written whole or not at all."""
    import csv
    import io

    from edgesqz.fileio import atomic_write

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for r in rows:
        writer.writerow({"model": r["model"], "threads": r["threads"], "delegate": r["delegate"] or "",
                         "backend": r["backend"], "size_bytes": r["size_bytes"], **r["cold"],
                         **{k: v for k, v in r["latency"].items()},
                         "delegated_ops": r["coverage"]["delegated_ops"], "total_ops": r["coverage"]["total_ops"]})
    atomic_write(path, text.getvalue(), force=force)


def require_matplotlib() -> None:
    if not sysinfo.importable("matplotlib"):
        raise EdgesqzError('--plot needs matplotlib: pip install "edgesqz[plot]"')


def plot(rows: list[dict[str, Any]], path: str | os.PathLike[str], *, force: bool = True) -> None:
    """Latency distribution per (model, threads) as box plots (needs matplotlib), written atomically."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows)), 4.5))
    names = [f"{Path(r['model']).stem}\n{r['threads']} thr" for r in rows]
    ax.boxplot([r["samples_ms"] for r in rows], showfliers=True)
    ax.set_xticks(range(1, len(rows) + 1), names, fontsize=8)
    ax.set_ylabel("invoke latency (ms)")
    ax.set_title("edgesqz bench: steady-state latency")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    from edgesqz.fileio import atomic_file, os_error

    try:
        with atomic_file(path, force=force) as tmp:
            try:
                fig.savefig(tmp, dpi=120)
            except OSError as exc:
                raise os_error(path, exc) from exc
    finally:
        plt.close(fig)
