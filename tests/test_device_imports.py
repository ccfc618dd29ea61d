"""The device side never imports TensorFlow or PyTorch: ``run`` (with ``--serve`` too), ``classify`` and the Python API.

Each check runs in a fresh interpreter with an import watcher installed first, so it proves that no
module even *tried* to import them (a caught ImportError would hide an attempt from ``sys.modules``).
It needs neither library installed, and passes the same in a venv that has them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

HEAVY = ("tensorflow", "torch", "keras", "tf_keras", "jax", "onnx", "onnx2tf", "tensorflow_lite_support")
SENTINEL = "edgesqz_sentinel_heavy_module"  # never installed: proves the watcher sees attempts

PRELUDE = f"""
import importlib.abc, json, sys
HEAVY = {(*HEAVY, SENTINEL)!r}
attempted = []

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            attempted.append(name)
        return None

sys.meta_path.insert(0, Watch())

def report():
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
    sys.stderr.write("IMPORTS " + json.dumps({{"attempted": attempted, "loaded": loaded}}) + "\\n")
"""

CLI_CODE = PRELUDE + """
import typer
try:
    from edgesqz.cli import app
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
except Exception:
    names = set()
if not {"run", "classify"} <= names:  # the device commands on their own
    from edgesqz.device.cli import register
    app = typer.Typer()
    register(app)
try:
    app(sys.argv[1:], standalone_mode=False)
except SystemExit as exc:
    assert not exc.code, exc.code
report()
"""

API_CODE = PRELUDE + """
import io, cv2
from edgesqz.device import Classifier, JsonLinesSink, Pipeline, ServeSink, open_source
clf = Classifier(sys.argv[1])
top = clf.classify(cv2.imread(sys.argv[2]))
sinks = [JsonLinesSink(io.StringIO()), ServeSink(("127.0.0.1", 0))]
summary = Pipeline(open_source(source=sys.argv[3]), clf, sinks, max_frames=3).run()
assert top and summary.frames == 3
report()
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, int8_model: Path) -> dict[str, Path]:
    model = int8_model
    tmp = tmp_path_factory.mktemp("imports")
    image = tmp / "noise.png"
    rng = np.random.default_rng(0)
    cv2.imwrite(str(image), rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
    video = tmp / "noise.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (320, 240))
    for _ in range(5):
        writer.write(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
    writer.release()
    return {"model": model, "image": image, "video": video}


def _imports(code: str, *args: object) -> dict[str, list[str]]:
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(x for x in p.stderr.splitlines() if x.startswith("IMPORTS "))
    return json.loads(line.removeprefix("IMPORTS "))


def test_classify_imports_no_tensorflow_or_torch(inputs: dict[str, Path]) -> None:
    found = _imports(CLI_CODE, "classify", "--model", inputs["model"], inputs["image"], "--json")
    assert found == {"attempted": [], "loaded": []}


def test_run_imports_no_tensorflow_or_torch(inputs: dict[str, Path]) -> None:
    found = _imports(CLI_CODE, "run", "--model", inputs["model"], "--source", inputs["video"], "--json",
                     "--max-frames", 3, "--record", inputs["video"].parent / "rec.avi")
    assert found == {"attempted": [], "loaded": []}


def test_run_serve_imports_no_tensorflow_or_torch(inputs: dict[str, Path]) -> None:
    found = _imports(CLI_CODE, "run", "--model", inputs["model"], "--source", inputs["video"], "--max-frames", 3,
                     "--serve", "127.0.0.1:0", "--token", "t0ken")
    assert found == {"attempted": [], "loaded": []}


def test_python_api_imports_no_tensorflow_or_torch(inputs: dict[str, Path]) -> None:
    found = _imports(API_CODE, inputs["model"], inputs["image"], inputs["video"])
    assert found == {"attempted": [], "loaded": []}


def test_the_watcher_does_see_an_import() -> None:
    """The check is not vacuous: the watcher records an attempt even when the import then fails."""
    code = PRELUDE + f"\ntry:\n    import {SENTINEL}.sub\nexcept ImportError:\n    pass\nreport()\n"
    found = _imports(code)
    assert found == {"attempted": [SENTINEL], "loaded": []}
