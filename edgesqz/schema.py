"""The one JSON schema of everything edgesqz prints or writes for machines (see docs/schema.md).

Every object carries ``schema`` ("edgesqz/1") and ``kind``; the rest depends on the kind.
Predictions always appear as ``top_k: [{"index", "label", "score"}]`` and times as
``..._ms`` floats, whichever command produced them.
"""

from __future__ import annotations

import json
import time
from typing import Any

from edgesqz._version import __version__

SCHEMA = "edgesqz/1"
KINDS = ("classification", "run_summary", "convert_report", "compare_report", "bench_report", "model_info",
         "doctor_report", "serve_status", "event", "collected", "model_status")


def record(kind: str, **fields: Any) -> dict[str, Any]:
    """A schema object of ``kind``; ``fields`` follow the kind's table in docs/schema.md."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}")
    return {"schema": SCHEMA, "kind": kind, **fields}


def report(kind: str, **fields: Any) -> dict[str, Any]:
    """A whole-run report: a record plus when and by which version it was made."""
    return record(kind, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), edgesqz_version=__version__, **fields)


def top_k(scores: Any, labels: Any, k: int) -> list[dict[str, Any]]:
    """``[{"index", "label", "score"}]`` for the k highest scores (ties: lower index first)."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    k = max(1, min(k, scores.size))
    order = np.argsort(-scores, kind="stable")[:k]
    return [{"index": int(i), "label": str(labels[i]) if labels is not None else str(int(i)),
             "score": round(float(scores[i]), 6)} for i in order]


def dumps(obj: dict[str, Any]) -> str:
    """One line of JSON (for .jsonl streams)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
