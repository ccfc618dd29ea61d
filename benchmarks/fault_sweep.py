"""Fault sweep for issues 19 ("never crash, never lose a file, never blow up memory") and 26 (hostile values that
pass a first check, clocks, webhooks, files, signals, model paths, doctor, SSE): every case, how it ends now.

    python benchmarks/fault_sweep.py [--out benchmarks/results/fault_sweep] [--mutants 30] [--skip-convert] [--keep]
                                     [--only STEP ...] [--before OLD.json]

``--only hostile`` runs issue 26's cases alone; ``--before OLD.json`` adds a before/after table of the cases an
earlier run (e.g. of the code before a fix, with ``--device-python`` pointing at it) also has.

Runs each case of the issue against the real ``edgesqz`` command line in subprocesses: the device commands
(run, classify, info, bench, doctor, edgetpu check, compare) with the device venv's Python (``.venv-device``,
no TensorFlow or PyTorch), ``convert`` with the host venv's (``.venv``, TensorFlow and torch). Everything
happens in a temporary folder under /tmp (models are copies; photos are read from the shared data folder), with
``EDGESQZ_HOME``/``EDGESQZ_CACHE`` pointing there too; nothing in the repository is written except the results.

A case is **ok** when it exits 0 with the right result, or exits 1..127 with exactly one ``error:`` line on
stderr (containing what the fault suite expects) and no traceback, crash or "internal error" (exit 143 on
SIGTERM is the documented exception for commands other than ``run``), and every file in the case's folder
is byte for byte what it was (outputs asked for with ``--force`` may be replaced; no temporary file left).

Writes ``OUT.md`` (the table, the mutated-model counts, the problems with a command to reproduce each) and
``OUT.json``, and prints the table. The helpers come from the fault suite (``tests/fault_models.py``,
``tests/mjpeg_server.py``, ``tests/test_device_faults.py``). Takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import http.server
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from event_helpers import write_scenes  # noqa: E402
from fault_models import (  # noqa: E402
    crafted_models,
    first_op,
    join_zip,
    mutant,
    rebuild,
    split_zip,
    structure_positions,
    tiny_classifier,
)
from mjpeg_server import MjpegServer  # noqa: E402
from mqtt_broker import Broker, free_port  # noqa: E402
from serve_viewers import write_video  # noqa: E402
from test_device_faults import (  # noqa: E402
    PI_MEMORY,
    REGRESSION_SEEDS,
    _metadata_model,
    forged_images,
    limit_memory,
    snapshot,
)

from edgesqz.device.clips import mp4_incomplete  # noqa: E402

BAD_MARKERS = ("Traceback", "internal error", "Fatal Python error", "Segmentation fault", "Aborted", "double free",
               "core dumped")
TRUNCATIONS = (0.0001, 0.02, 0.5, 0.97, 0.9999)
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24
NAN_SCALES_RECIPE = """cd /work/main && .venv-device/bin/python -c "
import sys; sys.path.insert(0, 'tests')
from pathlib import Path
from fault_models import first_op, rebuild
def nan_scales(m, s):
    q = m.subgraphs[0].tensors[first_op(m, s, 'CONV_2D').inputs[1]].quantization
    q.scale = [float('nan')] * len(q.scale)
model = Path('edgesqz/models/squeezenet1_1-int8.tflite').read_bytes()
Path('/tmp/nan-weight-scales.tflite').write_bytes(rebuild(model, nan_scales))"
.venv-device/bin/python -m edgesqz classify --model /tmp/nan-weight-scales.tflite ../shared/data/photos/coffee.png"""


# --------------------------------------------------------------------------- running


@dataclass
class Proc:
    argv: list[str]
    returncode: int | None  # None: hung, killed after the timeout
    stdout: str
    stderr: str
    seconds: float
    rss_mb: float | None = None
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # what differs from the sweep's environment
    wrap: str = ""  # how the command was run: "ulimit -v ...", "> /dev/full", "| head -1" ...

    @property
    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    def repro(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        cmd = shlex.join(self.argv)
        if self.wrap.startswith(("|", ">")):
            cmd = f"{cmd} {self.wrap}"
        elif self.wrap.startswith("("):
            cmd = f"{cmd}  # {self.wrap[1:-1]}"
        elif self.wrap:
            cmd = f"{self.wrap} {cmd}"
        return " ".join(x for x in (f"cd {shlex.quote(self.cwd)} &&" if self.cwd else "", env, cmd) if x)


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def drop_dac() -> None:
    """preexec_fn: root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, so file permissions apply as to a user."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def execute(argv: list[str], *, env: dict[str, str], cwd: Path | None = None, stdout: Any = None,
            preexec: Callable[[], None] | None = None,
            timeout: float = 120) -> tuple[int | None, str, str, float, float]:
    """(exit status or None when killed for hanging, stdout, stderr, seconds, peak RSS of the child in MB)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=out if stdout is None else stdout, stderr=err, preexec_fn=preexec)
        hung = threading.Event()

        def kill() -> None:
            hung.set()
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return (None if hung.is_set() else proc.returncode, out.read().decode(errors="replace"),
                err.read().decode(errors="replace"), seconds, usage.ru_maxrss / 1024)


def judge(p: Proc, expect: str, needles: Iterable[str] = (), check: Callable[[Proc], tuple[bool, str]] | None = None,
          allow_sigterm: bool = False) -> tuple[bool, str]:
    """(ok, what to show): exit 0 with the right result, or 1..127 with one error: line; never a crash."""
    if p.returncode is None:
        return False, f"hung: killed after {p.seconds:.0f} s"
    if p.returncode < 0:
        return False, f"killed by {signal.Signals(-p.returncode).name}; stderr ends: {p.stderr.strip()[-200:]}"
    for marker in BAD_MARKERS:
        if marker in p.stderr:
            return False, f"{marker} on stderr: " + next(line for line in p.stderr.splitlines() if marker in line)
    problems: list[str] = []
    outcome = ""
    if check is not None:
        good, outcome = check(p)
        if not good:
            problems.append(outcome)
    errors = p.errors
    if expect == "ok" and p.returncode != 0:
        problems.append(f"expected exit 0, got {p.returncode}")
    if expect == "error" and p.returncode == 0:
        problems.append("expected a refusal, got exit 0")
    if expect == "report":  # doctor: a report on stdout, exit 0 or 1; no error: line needed
        if p.returncode not in (0, 1):
            problems.append(f"exit {p.returncode}")
        for needle in needles:
            if needle not in p.stdout:
                problems.append(f"report lacks {needle!r}")
    elif p.returncode != 0:
        if not (0 < p.returncode < 128 or (allow_sigterm and p.returncode == 128 + signal.SIGTERM)):
            problems.append(f"exit {p.returncode} is not 1..127")
        if allow_sigterm and p.returncode == 128 + signal.SIGTERM and not errors:  # "interrupted by SIGTERM"
            errors = [line for line in p.stderr.splitlines() if line.startswith("interrupted by")]
        if len(errors) != 1:
            problems.append(f"{len(errors)} 'error:' lines (stderr: {' / '.join(p.stderr.strip().splitlines()[:4])})")
        for needle in needles:
            if not any(needle in e for e in errors):
                problems.append(f"message lacks {needle!r}")
    shown = errors[0] if errors and p.returncode else (outcome or first_line(p.stderr) or first_line(p.stdout))
    if outcome and errors and p.returncode and outcome not in shown:
        shown = f"{shown} [{outcome}]"
    if problems:
        return False, "; ".join(dict.fromkeys(problems)) + (f" -- {shown}" if shown not in problems else "")
    return True, shown


class Watch:
    """The user's files in ``folder``: unchanged byte for byte; ``allowed`` names may be written (--force)."""

    def __init__(self, folder: Path, allowed: Iterable[str] = ()) -> None:
        self.folder = folder
        self.allowed = set(allowed)
        self.before = snapshot(folder)

    def result(self) -> tuple[bool, str]:
        after = snapshot(self.folder)
        changed = [k for k in self.before if k in after and after[k] != self.before[k] and k not in self.allowed]
        removed = [k for k in self.before if k not in after]
        new = [k for k in after if k not in self.before and k not in self.allowed]
        if changed or removed or new:
            return False, "no: " + "; ".join(f"{what} {', '.join(names)}" for what, names in
                                             (("changed", changed), ("removed", removed), ("new", new)) if names)
        written = sorted(k for k in self.allowed if k in after and self.before.get(k) != after[k])
        return True, "yes" + (f" ({', '.join(written)} written, as asked)" if written else "")


@dataclass
class Row:
    group: str
    case: str
    command: str
    exit: str
    detail: str
    files: str
    ok: bool
    repro: str = ""
    seconds: float = 0.0
    rss_mb: float | None = None


# --------------------------------------------------------------------------- the sweep


class Sweep:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.device = [str(args.device_python), "-m", "edgesqz"]
        self.host = [str(args.host_python), "-m", "edgesqz"]
        self.rows: list[Row] = []
        self.mutants: list[dict[str, Any]] = []
        self.group = ""
        env = {k: v for k, v in os.environ.items()
               if k not in ("DISPLAY", "WAYLAND_DISPLAY", "EDGESQZ_MODEL", "EDGESQZ_DEBUG")}
        env.update(EDGESQZ_HOME=str(work / "home"), EDGESQZ_CACHE=str(work / "home" / "cache"),
                   TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        self.env = env
        self.photos = args.photos
        self.coffee = args.photos / "coffee.png"
        self.model_bytes = args.model.read_bytes()
        self.model = work / "m.tflite"
        self.model.write_bytes(self.model_bytes)
        self.video = write_video(work / "clip.mp4", 150)  # 5 s at 30 fps, 640x480
        self.models = work / "models"  # damaged models; the cases that name one check this folder
        self.models.mkdir()
        self.mutant_dir = work / "mutants"
        self.mutant_dir.mkdir()

    # ------------------------------------------------------------------ helpers

    def short(self, argv: list[str], wrap: str = "", env: dict[str, str] | None = None) -> str:
        prog = "edgesqz(host)" if argv[:3] == self.host else "edgesqz"
        text = shlex.join([prog, *argv[3:]]) if argv[1:3] == ["-m", "edgesqz"] else shlex.join(argv)
        for path, name in ((str(self.work) + "/", ""), (str(self.photos) + "/", "photos/"),
                           (str(self.args.imagenet) + "/", "imagenet/"), (str(self.args.weights), "W.pth")):
            text = text.replace(path, name)
        if env:
            text = " ".join(f"{k}={v.replace(str(self.work) + '/', '')}" for k, v in env.items()) + " " + text
        return f"{text} {wrap}".strip() if wrap else text

    def call(self, *args: object, host: bool = False, cwd: Path | None = None, env: dict[str, str] | None = None,
             stdout: Any = None, preexec: Callable[[], None] | None = None, wrap: str = "",
             timeout: float = 120) -> Proc:
        argv = [*(self.host if host else self.device), *map(str, args)]
        rc, out, err, seconds, rss = execute(argv, env={**self.env, **(env or {})}, cwd=cwd, stdout=stdout,
                                             preexec=preexec, timeout=timeout)
        return Proc(argv, rc, out, err, seconds, rss, str(cwd) if cwd else None, dict(env or {}), wrap)

    def add(self, case: str, p: Proc, ok: bool, detail: str, files: tuple[bool, str], command: str = "") -> Row:
        if not command:
            command = self.short(p.argv, p.wrap if p.wrap.startswith(("|", ">")) else "", p.env)
            if p.wrap.startswith("ulimit"):
                command = f"(ulimit -v 3 GB) {command}"
            elif p.wrap.startswith("setpriv"):
                command = f"(root without DAC caps) {command}"
        detail = detail.replace(str(self.work) + "/", "")
        row = Row(self.group, case, command,
                  "hung" if p.returncode is None else str(p.returncode), detail, files[1], ok and files[0],
                  p.repro(), round(p.seconds, 2), round(p.rss_mb, 1) if p.rss_mb else None)
        self.rows.append(row)
        mark = "ok" if row.ok else "PROBLEM"
        print(f"  [{mark:7}] {case}: exit {row.exit}, {detail[:110]}", flush=True)
        return row

    def case(self, case: str, *args: object, expect: str, needles: Iterable[str] = (),
             check: Callable[[Proc], tuple[bool, str]] | None = None, watch: Path | None = None,
             allowed: Iterable[str] = (), allow_sigterm: bool = False, rss: bool = False, recipe: str = "",
             **kw: Any) -> Row:
        """One command; ``recipe``: shell lines that rebuild its input outside the sweep (shown for a PROBLEM)."""
        folder = watch or kw.get("cwd") or self.models
        w = Watch(folder, allowed)
        p = self.call(*args, **kw)
        ok, detail = judge(p, expect, needles, check, allow_sigterm)
        if rss and p.rss_mb:
            detail += f" (peak RSS {p.rss_mb:.0f} MB, {p.seconds:.1f} s)"
        row = self.add(case, p, ok, detail, w.result())
        if recipe:
            row.repro = recipe
        return row

    def multi(self, case: str, commands: list[list[object]], *, expect: str, needles: Iterable[str] = (),
              recipe: str = "", **kw: Any) -> Row:
        """Several commands as one row (e.g. info / classify / run on one damaged model)."""
        w = Watch(kw.pop("watch", self.models))
        results = [(p := self.call(*c, **kw), judge(p, expect, needles)) for c in commands]
        ok = all(r[1][0] for r in results)
        bad = [f"{self.short(p.argv)}: {d}" for p, (good, d) in results if not good]
        detail = "; ".join(bad) if bad else results[0][1][1]
        command = " ; ".join(self.short(p.argv) for p, _ in results)
        if kw.get("wrap", "").startswith("setpriv"):
            command = f"(root without DAC caps) {command}"
        first_bad = next((p for p, (good, _) in results if not good), results[0][0])
        p = Proc(first_bad.argv, first_bad.returncode, "", "", sum(r[0].seconds for r in results), None,
                 first_bad.cwd, first_bad.env, first_bad.wrap)
        row = self.add(case, p, ok, detail, w.result(), command)
        row.exit = ",".join("hung" if r[0].returncode is None else str(r[0].returncode) for r in results)
        if recipe:
            row.repro = recipe
        return row

    def folder(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def write_model(self, name: str, data: bytes, folder: Path | None = None) -> Path:
        path = (folder or self.models) / name
        path.write_bytes(data)
        return path

    # ------------------------------------------------------------------ 1. existing outputs

    def existing_outputs(self) -> None:
        self.group = "1. existing outputs"
        d = self.folder("outputs")
        shutil.copy(self.model, d / "m.tflite")
        shutil.copy(self.video, d / "clip.mp4")
        os.link(d / "clip.mp4", d / "link.mp4")
        for name in ("out.jsonl", "out.mp4", "bench.json", "bench.csv", "other.tflite"):
            (d / name).write_bytes(b"the user's own " + name.encode())
        base = ["run", "--model", "m.tflite", "--source", "clip.mp4", "--max-frames", 3, "--threads", 1]
        bench = ["bench", "m.tflite", "--runs", 5, "--warmup", 1]
        refusals = [
            ("run -o existing .jsonl", [*base, "-o", "out.jsonl"], "--output out.jsonl already exists; pass --force"),
            ("run -o existing .tflite (not the model)", [*base, "-o", "other.tflite"], "already exists"),
            ("run -o the model .tflite --force", [*base, "-o", "m.tflite", "--force"], "same file as --model"),
            ("run --record existing .mp4", [*base, "--record", "out.mp4"], "--record out.mp4 already exists"),
            ("run --record == --source", [*base, "--record", "clip.mp4"], "same file as --source"),
            ("run --record == --source --force", [*base, "--record", "clip.mp4", "--force"], "same file as --source"),
            ("run --record hard link of --source --force", [*base, "--record", "link.mp4", "--force"],
             "same file as --source"),
            ("run -o x.mp4 --record x.mp4", [*base, "-o", "x.mp4", "--record", "x.mp4"], "the same file"),
            ("bench --json existing", [*bench, "--json", "bench.json"], "--json bench.json already exists"),
            ("bench --csv existing", [*bench, "--csv", "bench.csv"], "--csv bench.csv already exists"),
            ("bench --json the model --force", [*bench, "--json", "m.tflite", "--force"], "same file as model"),
        ]
        for case, args, needle in refusals:
            row = self.case(case, *args, expect="error", needles=[needle], cwd=d)
            if case.startswith("bench"):
                row.detail += f" (after {row.seconds:.1f} s: refused before measuring)"

        def run_forced(p: Proc) -> tuple[bool, str]:
            try:
                summary = json.loads((d / "out.jsonl").read_text().splitlines()[-1])
            except (OSError, ValueError, IndexError) as exc:
                return False, f"out.jsonl has no summary ({exc})"
            frames = count_frames(d / "out.mp4")
            good = summary.get("frames") == 3 and frames == 3
            return good, f"summary written ({summary.get('frames')} frames), recording plays {frames} frames"

        self.case("run -o existing --record existing --force", *base, "-o", "out.jsonl", "--record", "out.mp4",
                  "--force", expect="ok", check=run_forced, cwd=d, allowed=["out.jsonl", "out.mp4"])

        def bench_forced(p: Proc) -> tuple[bool, str]:
            try:
                report = json.loads((d / "bench.json").read_text())
                rows = (d / "bench.csv").read_text().splitlines()
            except (OSError, ValueError) as exc:
                return False, f"bench.json/csv unreadable ({exc})"
            return len(rows) >= 2, f"bench.json is JSON ({len(report)} keys), bench.csv has {len(rows) - 1} row(s)"

        self.case("bench --json/--csv existing --force", *bench, "--json", "bench.json", "--csv", "bench.csv",
                  "--force", expect="ok", check=bench_forced, cwd=d, allowed=["bench.json", "bench.csv"])

    # ------------------------------------------------------------------ 2. signals

    def signals(self) -> None:
        self.group = "2. signals mid-run"
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
            self.signal_mid_run(sig)
        d = self.folder("sigterm-bench")
        (d / "notes.txt").write_text("the user's notes\n")
        w = Watch(d)
        argv = [*self.device, "bench", str(self.model), "--runs", "1000000", "--json", "b.json"]
        proc = subprocess.Popen(argv, cwd=d, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.perf_counter()
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            rc = None
        p = Proc(argv, rc, out, err, time.perf_counter() - t0, None, str(d), {}, "(SIGTERM after 3 s)")
        ok, detail = judge(p, "error", ["interrupted by SIGTERM"], allow_sigterm=True)
        if rc != 128 + signal.SIGTERM:
            ok, detail = False, f"expected exit 143, got {rc} -- {detail}"
        self.add("SIGTERM mid bench (not run: 143 expected)", p, ok, detail, w.result(),
                 self.short(argv) + " + SIGTERM after 3 s")

    def signal_mid_run(self, sig: signal.Signals) -> None:
        d = self.folder(f"signal-{sig.name}")
        (d / "notes.txt").write_text("the user's notes\n")
        w = Watch(d, ["x.jsonl", "x.mp4"])
        argv = [*self.device, "run", "--model", str(self.model), "--source", str(self.video), "--fps", "30",
                "--json", "-o", "x.jsonl", "--record", "x.mp4", "--threads", "1"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=d, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        watchdog = threading.Timer(90, proc.kill)
        watchdog.start()
        try:
            lines = [proc.stdout.readline() for _ in range(5)] if proc.stdout else []
            if all(lines):
                proc.send_signal(sig)
            rest, err = proc.communicate(timeout=60)
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, err = proc.communicate()
            rc = None
        finally:
            watchdog.cancel()
        p = Proc(argv, rc, "".join(lines) + rest, err, time.perf_counter() - t0, None, str(d), {},
                 f"(kill -{sig.name[3:]} after 5 frames)")

        def check(p: Proc) -> tuple[bool, str]:
            if not all(lines):
                return False, "fewer than 5 frames before the signal"
            summary = parse_jsonl(p.stdout)[-1:] or [{}]
            s = summary[0]
            try:
                in_file = parse_jsonl((d / "x.jsonl").read_text())[-1]
            except (OSError, IndexError):
                in_file = {}
            frames = count_frames(d / "x.mp4")
            extra = sorted(set(os.listdir(d)) - {"notes.txt", "x.jsonl", "x.mp4"})
            good = (s.get("kind") == "run_summary" and s.get("stopped_by") == sig.name and in_file == s
                    and frames == s.get("frames") and frames >= 5 and not extra)
            return good, (f"summary written (stopped_by {s.get('stopped_by')}, {s.get('frames')} frames"
                          f"{', same in x.jsonl' if in_file == s else ', NOT in x.jsonl'}), recording plays "
                          f"{frames} frames{f', left behind: {extra}' if extra else ''}")

        ok, detail = judge(p, "ok", check=check)
        self.add(f"{sig.name} mid run -o x.jsonl --record x.mp4", p, ok, detail, w.result(),
                 self.short(argv) + f" + {sig.name} after 5 frames")

    # ------------------------------------------------------------------ 3. models

    def models_cases(self) -> None:
        self.group = "3. damaged models, impossible threads"
        self.case("classify --threads 100000", "classify", "--model", self.model, self.coffee, "--threads", 100000,
                  expect="error", needles=["--threads must be between 1 and 64"])
        self.case("bench --threads 100000", "bench", self.model, "--threads", 100000, "--runs", 2,
                  expect="error", needles=["--threads must be between 1 and"])
        for name, (data, needle) in crafted_models(self.model_bytes).items():
            path = self.write_model(f"{name}.tflite", data)
            self.multi(f"crafted: {name}", [["info", path], ["info", "--json", path],
                                            ["classify", "--model", path, self.coffee],
                                            ["bench", path, "--runs", 2, "--warmup", 0], ["edgetpu", "check", path]],
                       expect="error", needles=[needle, "not a valid .tflite model"])
        self.mutated()

    def mutated(self) -> None:
        positions = structure_positions(self.model_bytes)
        seeds = list(range(self.args.mutants)) + [s for s in REGRESSION_SEEDS if s >= self.args.mutants]
        items: list[tuple[str, Path]] = []
        for seed in seeds:
            items.append((f"seed={seed}", self.write_model(f"mutant-{seed}.tflite",
                                                           mutant(self.model_bytes, positions, seed),
                                                           self.mutant_dir)))
        for fraction in TRUNCATIONS:
            cut = max(1, int(len(self.model_bytes) * fraction))
            items.append((f"truncated={fraction}", self.write_model(f"truncated-{fraction}.tflite",
                                                                    self.model_bytes[:cut], self.mutant_dir)))
        commands = {"info": lambda m: ["info", m], "info --json": lambda m: ["info", "--json", m],
                    "classify": lambda m: ["classify", "--model", m, self.coffee, "--threads", 1],
                    "bench": lambda m: ["bench", m, "--runs", 2, "--warmup", 0],
                    "edgetpu check": lambda m: ["edgetpu", "check", m]}
        w = Watch(self.mutant_dir)
        jobs = [(label, path, cmd, make(path)) for label, path in items for cmd, make in commands.items()]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.args.jobs) as pool:
            procs = list(pool.map(lambda job: self.call(*job[3]), jobs))
        print(f"  {len(jobs)} runs on {len(items)} damaged models in {time.perf_counter() - t0:.0f} s", flush=True)
        by_model: dict[str, dict[str, Proc]] = {}
        for (label, _, cmd, _), p in zip(jobs, procs, strict=True):
            by_model.setdefault(label, {})[cmd] = p
        for label, runs in by_model.items():
            for cmd, p in runs.items():
                kind, why = classify_run(p, cmd)
                if cmd == "edgetpu check" and runs["info --json"].returncode and p.returncode == 0:
                    kind, why = "PROBLEM", "edgetpu check accepts a model that info rejects"
                self.mutants.append({"model": label, "command": cmd, "exit": p.returncode, "outcome": kind,
                                     "line": why, "repro": p.repro(), "seconds": round(p.seconds, 2)})
        files = w.result()
        for family in ("seed", "truncated"):
            entries = [m for m in self.mutants if m["model"].startswith(family + "=")]
            for cmd in commands:
                sub = [m for m in entries if m["command"] == cmd]
                counts = Counter(m["outcome"] for m in sub)
                bad = [m["model"] for m in sub if m["outcome"] == "PROBLEM"]
                models = len({m["model"] for m in sub})
                detail = (f"{models} models: {counts['exit 0']} exit 0, {counts['clean error']} clean error"
                          + (f", {counts['verdict']} 'NOT fully compatible' verdict" if counts["verdict"] else "")
                          + f", {counts['PROBLEM']} crash/unclean" + (f" ({', '.join(bad)})" if bad else ""))
                what = "seeded byte mutations" if family == "seed" else "truncated models"
                exits = ",".join(f"{k}x{v}" for k, v in sorted(Counter(str(m["exit"]) for m in sub).items()))
                shown = "edgesqz " + " ".join(map(str, commands[cmd]("MODEL")))
                shown = shown.replace(str(self.photos) + "/", "photos/")
                self.rows.append(Row(self.group, f"{models} {what}: {cmd}", shown,
                                     exits, detail, files[1], not bad and files[0],
                                     "\n".join(m["repro"] for m in sub if m["outcome"] == "PROBLEM")))
                print(f"  [{'ok' if not bad else 'PROBLEM':7}] {what} / {cmd}: {detail}", flush=True)

    # ------------------------------------------------------------------ 4. memory

    def memory(self) -> None:
        self.group = "4. memory"
        d = self.folder("memory")
        scratch = self.folder("memory-forged")
        forged = {p.suffix: p for p in forged_images(scratch, self.coffee)}
        for ext in (".png", ".jpg"):
            shutil.copy(forged[ext], d / f"forged{ext}")
        pi = f"ulimit -v {PI_MEMORY // 1024};"
        for ext in (".png", ".jpg"):
            self.case(f"classify forged{ext} claiming 30000x30000", "classify", "--model", self.model,
                      d / f"forged{ext}", expect="error", needles=["forged" + ext], cwd=d, rss=True)
            self.case(f"classify forged{ext}, RLIMIT_AS 3 GB", "classify", "--model", self.model, d / f"forged{ext}",
                      expect="error", needles=["forged" + ext], cwd=d, rss=True, preexec=limit_memory(), wrap=pi)
        def skipped_one(p: Proc) -> tuple[bool, str]:
            s = (parse_jsonl(p.stdout)[-1:] or [{}])[0]
            warning = next((line for line in p.stderr.splitlines() if line.startswith("warning:")), "no warning")
            return (s.get("kind") == "run_summary",
                    f"summary: {s.get('frames')} frames, {s.get('skipped')} skipped; stderr: {warning[:60]}...")

        self.case("run --source forged.png, RLIMIT_AS 3 GB", "run", "--model", self.model, "--source",
                  d / "forged.png", "--json", expect="either", needles=["forged.png"], check=skipped_one, cwd=d,
                  rss=True, preexec=limit_memory(), wrap=pi)
        flatbuffer, members = split_zip(self.model_bytes)
        bomb = join_zip(flatbuffer, {**members, "labels.txt": b"x\n" * (64 << 20)}, compress=zipfile.ZIP_DEFLATED)
        path = self.write_model("bomb.tflite", bomb)
        for cmd in (["info", path], ["classify", "--model", path, self.coffee]):
            self.case(f"labels.txt zip bomb (128 MiB in {len(bomb) // 1024} kB): {cmd[0]}, RLIMIT_AS 3 GB", *cmd,
                      expect="error", needles=["labels.txt claims 128 MiB"], rss=True, preexec=limit_memory(),
                      wrap=pi)
        lying = bytearray(bomb)  # the zip understates the size: reading stops there and the CRC check fails
        for signature, name_at, size_at in ((b"PK\x03\x04", 30, 22), (b"PK\x01\x02", 46, 24)):
            pos = lying.find(signature, len(flatbuffer))
            while pos != -1:
                if lying[pos + name_at:pos + name_at + 10] == b"labels.txt":
                    struct.pack_into("<I", lying, pos + size_at, 4000)
                pos = lying.find(signature, pos + 4)
        path = self.write_model("lying-zip.tflite", bytes(lying))
        self.case("labels.txt zip bomb that understates its size: classify", "classify", "--model", path, self.coffee,
                  expect="error", needles=["corrupt associated files"], rss=True, preexec=limit_memory(), wrap=pi)

    # ------------------------------------------------------------------ 5. one-line errors

    def one_line_errors(self) -> None:
        self.group = "5. one-line errors"
        scratch = self.folder("forged")
        forged = {p.suffix: p for p in forged_images(scratch, self.coffee)}
        mixed = self.folder("mixed")
        for name in ("coffee.png", "chelsea.png"):
            shutil.copy(self.photos / name, mixed / name)
        shutil.copy(forged[".png"], mixed / "forged.png")

        def two_good(p: Proc) -> tuple[bool, str]:
            names = [Path(r.get("image", "")).name for r in parse_jsonl(p.stdout)]
            return sorted(names) == ["chelsea.png", "coffee.png"], f"good images still classified: {names}"

        self.case("classify folder with a forged PNG", "classify", "--model", self.model, mixed, "--json",
                  "--threads", 1, expect="error", needles=["forged.png"], check=two_good, cwd=mixed)

        def skipped(p: Proc) -> tuple[bool, str]:
            s = (parse_jsonl(p.stdout)[-1:] or [{}])[0]
            return (s.get("frames") == 2 and s.get("skipped") == 1,
                    f"summary: {s.get('frames')} frames, {s.get('skipped')} skipped")

        self.case("run --source folder with a forged PNG", "run", "--model", self.model, "--source", mixed, "--json",
                  expect="ok", check=skipped, cwd=mixed)
        data = self.folder("labelled")
        for src in sorted(self.args.imagenet.iterdir())[:: 250][:4]:
            shutil.copy(src, data / src.name)
        shutil.copy(forged[".png"], data / "n07920052_forged.png")

        def compared(p: Proc) -> tuple[bool, str]:
            try:
                r = json.loads(p.stdout)
            except ValueError:
                return False, "no JSON report"
            return (r.get("images") == 4 and r.get("skipped_unreadable") == 1,
                    f"report: {r.get('images')} images, {r.get('skipped_unreadable')} skipped unreadable")

        self.case("compare --data with a forged PNG", "compare", self.model, self.model, "--data", data, "--json",
                  "--threads", 1, expect="ok", check=compared, cwd=data)
        if not self.args.skip_convert:
            self.convert_calib(forged)
        # ENOSPC
        base = ["run", "--model", self.model, "--source", self.video, "--max-frames", 3]
        out = self.folder("enospc")
        self.case("run -o /dev/full", *base, "-o", "/dev/full", expect="error",
                  needles=["cannot write /dev/full: the disk is full"], cwd=out)
        self.case("run --record /dev/full", *base, "--record", "/dev/full", expect="error", needles=["/dev/full"],
                  cwd=out)
        with open("/dev/full", "w") as full:
            for case, args in (("run --json > /dev/full", [*base, "--json"]),
                               ("classify --json > /dev/full", ["classify", "--model", self.model, self.photos,
                                                                "--json"]),
                               ("info > /dev/full", ["info", self.model]),
                               ("bench --json - > /dev/full", ["bench", self.model, "--runs", 5, "--json", "-"])):
                self.case(case, *args, expect="error", needles=["cannot write standard output: the disk is full"],
                          cwd=out, stdout=full, wrap="> /dev/full")

        def table_first(p: Proc) -> tuple[bool, str]:
            return "ai_edge_litert" in p.stdout, "the table was printed before failing"

        self.case("bench --json /dev/full", "bench", self.model, "--runs", 20, "--json", "/dev/full", expect="error",
                  needles=["cannot write /dev/full"], check=table_first, cwd=out)

        def quick(p: Proc) -> tuple[bool, str]:
            good = p.seconds < 10 and "peak RSS" not in p.stderr
            return good, f"refused after {p.seconds:.1f} s, nothing measured" if good else \
                f"took {p.seconds:.1f} s / measured first"

        self.case("bench --runs 2000 --json missing/b.json", "bench", self.model, "--runs", 2000, "--json",
                  "missing/b.json", expect="error", needles=["does not exist"], check=quick, cwd=out)
        self.case("bench --runs 2000 --json /sys/fs/... (read-only fs)", "bench", self.model, "--runs", 2000,
                  "--json", "/sys/fs/edgesqz-bench.json", expect="error", needles=["cannot write to /sys/fs"],
                  check=quick, cwd=out)
        ro = self.folder("perm-ro")
        ro.chmod(0o555)
        caps = "setpriv --bounding-set -dac_override,-dac_read_search"
        try:
            self.case("bench --runs 2000 --json ro/b.json (read-only folder, root without DAC caps)", "bench",
                      self.model, "--runs", 2000, "--json", ro / "b.json", expect="error",
                      needles=["cannot write to", "permission denied"], check=quick, watch=ro, preexec=drop_dac,
                      wrap=caps)
            self.case("run -o ro/x.jsonl (read-only folder, root without DAC caps)", "run", "--model", self.model,
                      "--source", self.coffee, "-o", ro / "x.jsonl", expect="error", needles=["permission denied"],
                      watch=ro, preexec=drop_dac, wrap=caps)
        finally:
            ro.chmod(0o755)
        self.case("run -o missing/x.jsonl", *base, "-o", "missing/x.jsonl", expect="error",
                  needles=["does not exist"], cwd=out)
        # compare of models that do not match
        from edgesqz.doctor import tiny_model

        tiny = self.write_model("tiny8.tflite", tiny_classifier(8))
        relu = self.write_model("relu.tflite", tiny_model())
        self.case("compare models with different input sizes", "compare", self.model, tiny, "--data", data,
                  expect="error", needles=["different input sizes"], cwd=data)
        self.case("compare with a non-classifier", "compare", self.model, relu, "--data", data, expect="error",
                  needles=["is not an image classifier"], cwd=data)
        self.case("compare --data missing folder", "compare", self.model, self.model, "--data", data / "nope",
                  expect="error", needles=["--data needs a labelled folder"], cwd=data)
        # metadata with wrong value types
        info = json.loads(split_zip(self.model_bytes)[1]["edgesqz.json"])
        cases = {
            "crop_fraction \"abc\"": (json.dumps({**info, "preprocessing": {**info["preprocessing"],
                                                                            "crop_fraction": "abc"}}),
                                      "preprocessing.crop_fraction"),
            "output = [1, 2]": (json.dumps({**info, "output": [1, 2]}), "expected a JSON object"),
            "output.kind \"boxes\"": (json.dumps({**info, "output": {"kind": "boxes", "classes": 1000}}),
                                      "output.kind"),
            "input.size true": (json.dumps({**info, "input": {**info.get("input", {}), "size": True}}),
                                "input.size"),
            "100000-deep JSON": ("[" * 100000 + "]" * 100000, "edgesqz.json is not valid JSON"),
        }
        for i, (label, (text, needle)) in enumerate(cases.items()):
            path = self.write_model(f"meta-{i}.tflite",
                                    _metadata_model(self.model_bytes, **{"edgesqz.json": text.encode()}))
            self.multi(f"edgesqz.json {label}: info / classify / run",
                       [["info", path], ["classify", "--model", path, self.coffee],
                        ["run", "--model", path, "--source", self.coffee]], expect="error", needles=[needle])
        path = self.models / "weight-without-data.tflite"
        self.multi("weight tensor without data: info / classify / run",
                   [["info", path], ["classify", "--model", path, self.coffee],
                    ["run", "--model", path, "--source", self.coffee]], expect="error", needles=["no data"])
        # broken pipe
        many = self.folder("many")
        for src in sorted(self.args.imagenet.iterdir())[:40]:
            shutil.copy(src, many / src.name)
        self.head_one("classify --json DIR | head -1", ["classify", "--model", str(self.model), str(many), "--json"])
        self.head_one("run --json VIDEO | head -1", ["run", "--model", str(self.model), "--source", str(self.video),
                                                     "--json"])

    def convert_calib(self, forged: dict[str, Path]) -> None:
        d = self.folder("convert")
        calib = self.folder("convert/calib")
        for src in sorted(self.args.imagenet.iterdir())[3::97][:10]:
            shutil.copy(src, calib / src.name)
        shutil.copy(forged[".png"], calib / "forged.png")
        shutil.copy(forged[".jpg"], calib / "forged.jpg")
        (calib / "notes.jpg").write_text("not an image")

        def calibrated(p: Proc) -> tuple[bool, str]:
            try:
                report = json.loads(p.stdout)
            except ValueError:
                report = {}
            if not report:
                with contextlib.suppress(OSError, ValueError):
                    report = json.loads((d / "out" / "model.report.json").read_text())
            c = report.get("calibration") or {}
            written = (d / "out" / "model.tflite").exists()
            warn = next((line for line in p.stderr.splitlines() if "skip" in line.lower()), "")
            return (written and c.get("count") == 10 and c.get("skipped") == 3,
                    f"model written: {written}; calibration {c.get('count')} images, {c.get('skipped')} skipped"
                    + (f"; stderr: {warn.strip()}" if warn else ""))

        self.folder("convert/out")
        self.case("convert --int8 --calib folder with 3 unreadable images", "convert", "--weights",
                  self.args.weights, "--int8", "--calib", "calib", "--calib-count", 20, "-o", "out/model.tflite",
                  "--json", expect="ok", check=calibrated, host=True, cwd=d, timeout=600,
                  allowed=["out/model.tflite", "out/model.report.json"])

    def head_one(self, case: str, args: list[str]) -> None:
        argv = [*self.device, *args]
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        watchdog = threading.Timer(120, proc.kill)
        watchdog.start()
        try:
            first = proc.stdout.readline() if proc.stdout else ""
            if proc.stdout:
                proc.stdout.close()  # `| head -1`
            err = proc.stderr.read() if proc.stderr else ""
            rc: int | None = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            err, rc = "", None
        finally:
            watchdog.cancel()
        p = Proc(argv, rc, first, err, time.perf_counter() - t0, wrap="| head -1")

        def check(p: Proc) -> tuple[bool, str]:
            quiet = "error" not in p.stderr.lower()
            return (p.stdout.startswith("{") and quiet,
                    "first line read, then a quiet exit" if quiet else f"stderr: {first_line(p.stderr)}")

        ok, detail = judge(p, "ok", check=check)
        self.add(case, p, ok, detail, (True, "yes (writes nothing)"))

    # ------------------------------------------------------------------ 6. silently wrong

    def silently_wrong(self) -> None:
        self.group = "6. silently wrong"
        d = self.folder("nan")
        if not self.args.skip_convert:
            nan_pth = d / "nan.pth"
            script = ("import sys, torch\nsd = torch.load(sys.argv[1], map_location='cpu')\n"
                      "sd['features.0.weight'] = torch.full_like(sd['features.0.weight'], float('nan'))\n"
                      "torch.save(sd, sys.argv[2])\n")
            rc, _, err, _, _ = execute([str(self.args.host_python), "-c", script, str(self.args.weights), str(nan_pth)],
                                       env=self.env)
            if rc == 0:
                calib = self.work / "convert" / "calib"
                calib_args: list[object] = ["--calib", calib, "--calib-count", 20] if calib.exists() else [
                    "--calib", self.args.imagenet, "--calib-count", 10]
                self.case("convert --int8 of a .pth with NaN weights", "convert", "--weights", nan_pth, "--int8",
                          *calib_args, "-o", "nan.tflite", expect="error", needles=["NaN"], host=True, cwd=d,
                          timeout=600)
            else:
                print(f"  (cannot make the NaN .pth: {first_line(err)})")
        float_model = self.float_model()
        if float_model is not None:
            def nan_conv(m: Any, s: Any) -> None:
                t = m.subgraphs[0].tensors[first_op(m, s, "CONV_2D").inputs[1]]
                data = np.full(len(m.buffers[t.buffer].data) // 4, np.nan, np.float32)
                m.buffers[t.buffer].data = np.frombuffer(data.tobytes(), np.uint8)

            path = self.write_model("nan-float.tflite", rebuild(float_model.read_bytes(), nan_conv))
            self.case("classify with a float model whose conv weights are NaN", "classify", "--model", path,
                      self.coffee, expect="error", needles=["NaN or infinite scores"])
            self.case("run with a float model whose conv weights are NaN", "run", "--model", path, "--source",
                      self.photos, expect="error", needles=["NaN or infinite scores"])

        def nan_scales(m: Any, s: Any) -> None:  # the int8 analogue: per-channel weight scales NaN
            q = m.subgraphs[0].tensors[first_op(m, s, "CONV_2D").inputs[1]].quantization
            q.scale = [float("nan")] * len(q.scale)

        path = self.write_model("nan-weight-scales.tflite", rebuild(self.model_bytes, nan_scales))

        def not_silent(p: Proc) -> tuple[bool, str]:
            top = next((line.split()[2:-2] for line in p.stdout.splitlines() if line.startswith("coffee.png")), [])
            return False, f"classified without complaint: top-1 {' '.join(top)!r} (espresso expected)"

        self.case("classify with an int8 model whose conv weight scales are NaN", "classify", "--model", path,
                  self.coffee, expect="error", needles=["quantisation scale of nan"],
                  check=lambda p: (True, "") if p.returncode else not_silent(p), recipe=NAN_SCALES_RECIPE)
        base = ["run", "--model", self.model, "--source", self.video]
        for args, needle in ((["--fps", "nan"], "--fps must be > 0"), (["--fps", "inf"], "--fps must be > 0"),
                             (["--duration", "nan"], "--duration"), (["--mean", "nan"], "--mean")):
            self.case(f"run {' '.join(args)}", *base, *args, expect="error", needles=[needle])
        self.case("bench --duration inf", "bench", self.model, "--duration", "inf", expect="error",
                  needles=["--duration a number of seconds > 0"])

    def float_model(self) -> Path | None:
        found = Path(os.environ.get("EDGESQZ_TEST_MODELS", ROOT / ".test-models")) / "squeezenet1_1-float32.tflite"
        if found.exists():
            return found
        if self.args.skip_convert:
            print("  (no float32 model: skipping the NaN float model cases)")
            return None
        target = self.work / "float" / "squeezenet1_1-float32.tflite"
        target.parent.mkdir(exist_ok=True)
        rc, _, err, _, _ = execute([*self.host, "convert", "--weights", str(self.args.weights), "--float32", "-o",
                                    str(target)], env=self.env, timeout=600)
        if rc != 0:
            print(f"  (cannot convert a float32 model: {first_line(err)})")
            return None
        return target

    # ------------------------------------------------------------------ 7. messages

    def messages(self) -> None:
        self.group = "7. messages"
        perm = self.folder("perm")
        locked = self.folder("perm/locked")
        shutil.copy(self.coffee, locked / "a.png")
        mixed = self.folder("perm/mixed")
        shutil.copy(self.coffee, mixed / "coffee.png")
        shutil.copy(self.photos / "chelsea.png", mixed / "locked.png")
        caps = "setpriv --bounding-set -dac_override,-dac_read_search"
        shutil.copy(self.model, perm / "locked.tflite")
        (perm / "locked.txt").write_text("tench\n")
        locked.chmod(0o000)
        for path in (mixed / "locked.png", perm / "locked.tflite", perm / "locked.txt"):
            path.chmod(0o000)
        try:
            self.case("classify chmod-000 folder as plain root (moot: root reads it)", "classify", "--model",
                      self.model, locked, expect="ok", watch=perm,
                      check=lambda p: (True, "exit 0, classified: root ignores the permission bits (moot)"))
            self.case("classify chmod-000 folder (root without DAC caps)", "classify", "--model", self.model, locked,
                      expect="error", needles=["cannot read folder", "ermission"], watch=perm, preexec=drop_dac,
                      wrap=caps, recipe=f"mkdir -p /tmp/locked && cp {self.coffee} /tmp/locked/ && chmod 000 "
                      f"/tmp/locked\n{caps} {self.args.device_python} -m edgesqz classify /tmp/locked")
            self.case("run --source chmod-000 folder (root without DAC caps)", "run", "--model", self.model,
                      "--source", locked, expect="error", needles=["cannot read folder", "ermission"], watch=perm,
                      preexec=drop_dac, wrap=caps)
            self.case("classify a chmod-000 image file (root without DAC caps)", "classify", "--model", self.model,
                      mixed / "locked.png", expect="error", needles=["locked.png", "ermission"], watch=perm,
                      preexec=drop_dac, wrap=caps, recipe=f"cp {self.coffee} /tmp/locked.png && chmod 000 "
                      f"/tmp/locked.png\n{caps} {self.args.device_python} -m edgesqz classify /tmp/locked.png")

            def good_one(p: Proc) -> tuple[bool, str]:
                names = [Path(r.get("image", "")).name for r in parse_jsonl(p.stdout)]
                return names == ["coffee.png"], f"readable image still classified: {names}"

            self.case("classify folder with a chmod-000 image (root without DAC caps)", "classify", "--model",
                      self.model, mixed, "--json", expect="error", needles=["locked.png"], check=good_one,
                      watch=perm, preexec=drop_dac, wrap=caps)
            model = perm / "locked.tflite"
            dev = f"{caps} {self.args.device_python} -m edgesqz"
            self.multi("chmod-000 model file (root without DAC caps): info / classify --model / run --model",
                       [["info", model], ["classify", "--model", model, self.coffee],
                        ["run", "--model", model, "--source", self.coffee]], expect="error",
                       needles=["locked.tflite", "ermission"], watch=perm, preexec=drop_dac, wrap=caps,
                       recipe=f"cp {self.args.model} /tmp/locked.tflite && chmod 000 /tmp/locked.tflite\n"
                       f"{dev} info /tmp/locked.tflite\n{dev} classify --model /tmp/locked.tflite {self.coffee}\n"
                       f"{dev} run --model /tmp/locked.tflite --source {self.coffee}")
            self.case("classify --labels chmod-000 file (root without DAC caps)", "classify", "--model", self.model,
                      "--labels", perm / "locked.txt", self.coffee, expect="error",
                      needles=["locked.txt", "ermission"], watch=perm, preexec=drop_dac, wrap=caps,
                      recipe=f"echo tench > /tmp/locked.txt && chmod 000 /tmp/locked.txt\n"
                      f"{dev} classify --labels /tmp/locked.txt {self.coffee}")
        finally:
            locked.chmod(0o755)
            for path in (mixed / "locked.png", perm / "locked.tflite", perm / "locked.txt"):
                path.chmod(0o644)

        def custom_op(m: Any, s: Any) -> None:
            op = first_op(m, s, "SOFTMAX")
            code = s.OperatorCodeT()
            code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.CUSTOM
            code.customCode = "EdgesqzNoSuchOp"
            m.operatorCodes.append(code)
            op.opcodeIndex, op.builtinOptionsType, op.builtinOptions = len(m.operatorCodes) - 1, 0, None

        path = self.write_model("custom-op.tflite", rebuild(self.model_bytes, custom_op))
        self.case("runtime cannot load (unknown custom op): classify", "classify", "--model", path, self.coffee,
                  expect="error", needles=["cannot load", "convert it again, or pip install -U ai-edge-litert"])
        def nan_activation_scale(m: Any, s: Any) -> None:
            m.subgraphs[0].tensors[first_op(m, s, "CONV_2D").outputs[0]].quantization.scale = [float("nan")]

        path = self.write_model("nan-activation-scale.tflite", rebuild(self.model_bytes, nan_activation_scale))
        self.case("an activation's quantisation scale is NaN: classify", "classify", "--model", path, self.coffee,
                  expect="error", needles=["quantisation scale of nan"])
        shim = self.folder("no-runtime/ai_edge_litert")
        (shim / "__init__.py").write_text('raise ImportError("libLiteRt.so: cannot open shared object file")\n')
        self.case("no runtime importable (broken ai_edge_litert): classify", "classify", "--model", self.model,
                  self.coffee, expect="error", needles=["pip install ai-edge-litert"],
                  env={"PYTHONPATH": str(shim.parent)})
        labels = split_zip(self.model_bytes)[1]["labels.txt"].replace(b"goldfish", b"poisson rouge \xe9")
        path = self.write_model("latin1-labels.tflite", _metadata_model(self.model_bytes, **{"labels.txt": labels}))
        self.case("embedded labels.txt not UTF-8: classify", "classify", "--model", path, self.coffee,
                  expect="error", needles=["labels.txt is not UTF-8 text"])
        latin = self.models / "latin1.txt"
        latin.write_bytes(labels)
        self.case("--labels file not UTF-8: classify", "classify", "--model", self.model, "--labels", latin,
                  self.coffee, expect="error", needles=["not UTF-8"])
        self.case("compare without --data", "compare", self.model, self.model, expect="error",
                  recipe=f"{self.args.device_python} -m edgesqz compare {self.args.model} {self.args.model}")
        self.streams()

    def streams(self) -> None:
        garbage = MjpegServer(garbage=True).start()
        try:
            self.case("HTTP source sending garbage", "run", "--model", self.model, "--source", garbage.url,
                      expect="error", needles=["sends nothing OpenCV can decode"], timeout=180)
        finally:
            garbage.stop()
        with html_404_server() as url:
            self.case("HTTP source answering 404 (HTML)", "run", "--model", self.model, "--source", url,
                      "--reconnect", 0, expect="error", needles=[url.split("/")[2]], timeout=180)
        self.case("HTTP source: connection refused", "run", "--model", self.model, "--source",
                  "http://127.0.0.1:9/none.mjpg", expect="error", needles=["cannot connect"], timeout=180)
        self.stream_lost(reconnect="0")
        self.stream_lost(reconnect="60s")

    def stream_lost(self, reconnect: str) -> None:
        server = MjpegServer(fps=20).start()
        argv = [*self.device, "run", "--model", str(self.model), "--source", server.url, "--json", "--threads", "1",
                "--reconnect", reconnect]
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[tuple[float, str]] = []
        reader = threading.Thread(target=lambda: lines.extend((time.perf_counter(), x) for x in proc.stdout or []),
                                  daemon=True)
        errors: list[str] = []
        err_reader = threading.Thread(target=lambda: errors.extend(proc.stderr or []), daemon=True)
        reader.start()
        err_reader.start()
        rc: int | None = None
        restart, alive, before = 0.0, False, 0
        try:
            wait_for(lambda: len(lines) >= 10 or proc.poll() is not None, 30)
            before = len(lines)
            server.stop()
            if reconnect == "0":
                wait_for(lambda: proc.poll() is not None, 60)
            else:
                time.sleep(2.5)
                alive = proc.poll() is None
                server.start()
                restart = time.perf_counter()
                wait_for(lambda: sum(t > restart for t, _ in lines) >= 10 or proc.poll() is not None, 30)
                proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finally:
            server.stop()
        reader.join(10)
        err_reader.join(10)
        p = Proc(argv, rc, "".join(x for _, x in lines), "".join(errors), time.perf_counter() - t0)
        if reconnect == "0":
            ok, detail = judge(p, "error", ["--reconnect 0"])
            self.add("MJPEG stream stops, --reconnect 0", p, ok, detail, (True, "yes (writes nothing)"),
                     self.short(argv) + " + server stopped after 10 frames")
            return
        after = sum(1 for t, x in lines if t > restart and x.startswith('{"schema"') and "run_summary" not in x)

        def check(p: Proc) -> tuple[bool, str]:
            s = (parse_jsonl(p.stdout)[-1:] or [{}])[0]
            good = (alive and after >= 10 and s.get("reconnects", 0) >= 1 and s.get("stopped_by") == "SIGINT"
                    and "is back" in p.stderr)
            back = "stderr says 'is back'" if "is back" in p.stderr else "stderr does NOT say 'is back'"
            return good, (f"carried on: {before} frames before the outage, {after} after the restart "
                          f"(stopped after 10 by SIGINT); summary {s.get('frames')} frames, reconnects="
                          f"{s.get('reconnects')}; {back}")

        ok, detail = judge(p, "ok", check=check)
        self.add("MJPEG stream stops 2.5 s and comes back, --reconnect 60s", p, ok, detail,
                 (True, "yes (writes nothing)"), self.short(argv) + " + server stop 2.5 s, start, SIGINT")

    # ------------------------------------------------------------------ 8. doctor and display

    def doctor(self) -> None:
        self.group = "8. doctor, display"
        d = self.folder("doctor")
        (d / "dangling.tflite").symlink_to(d / "gone.tflite")
        (d / "truncated.tflite").write_bytes(self.model_bytes[: len(self.model_bytes) // 3])
        for label, name, needle in (("dangling link", "dangling.tflite", "does not exist"),
                                    ("truncated model", "truncated.tflite", "not a valid .tflite model")):
            env = {"EDGESQZ_MODEL": str(d / name)}
            self.case(f"doctor, EDGESQZ_MODEL = {label}", "doctor", expect="report", needles=[needle], env=env,
                      cwd=d, check=lambda p: (True, first_line(next((x for x in p.stdout.splitlines()
                                                                      if x.startswith("FAIL")), "no FAIL line"))))
            self.case(f"classify, EDGESQZ_MODEL = {label}", "classify", self.coffee, expect="error",
                      needles=[needle], env=env, cwd=d)
        self.case("doctor, DISPLAY=:99 without an X server", "doctor", expect="report", needles=["no X server"],
                  env={"DISPLAY": ":99"}, cwd=d,
                  check=lambda p: (True, next((x.strip() for x in p.stdout.splitlines() if "display" in x), "")))

        def ran(p: Proc) -> tuple[bool, str]:
            s = (parse_jsonl(p.stdout)[-1:] or [{}])[0]
            return s.get("frames") == 1, f"headless run, {s.get('frames')} frame(s)"

        self.case("run, DISPLAY=:99 without an X server (no --no-display)", "run", "--model", self.model, "--source",
                  self.coffee, "--json", expect="ok", check=ran, env={"DISPLAY": ":99"}, cwd=d, timeout=60)

    # ------------------------------------------------------------------ 9. issue 26: hostile values, by class

    def hostile(self) -> None:
        """Issue 26: values that pass a first check, clocks, webhooks, files, signals, model paths, doctor, SSE."""
        d = self.folder("hostile")
        (d / "notes.txt").write_text("the user's notes\n")
        photos = self.photos
        self.scenes = write_scenes(self.work / "scenes.mp4", [(photos / "rocket.jpg", 60), (photos / "coffee.png", 90),
                                                              (photos / "rocket.jpg", 120), (photos / "coffee.png", 60),
                                                              (photos / "rocket.jpg", 90)])
        base = ["run", "--model", self.model, "--source", self.scenes, "--threads", 1]
        ev = ["--event", "espresso"]

        self.group = "26.1 option values that pass a first check"
        a64 = "a" * 64
        for case, args, needle in (
            ("--event '#²' (a digit to isdigit(), not to int())", ["--event", "#²"], "#²"),
            ("--event '#٣' (Arabic-Indic digit)", ["--event", "#٣"], "#٣"),
            ("--max-disk nan", [*ev, "--snapshot-dir", "s", "--max-disk", "nan"], "--max-disk"),
            ("--max-disk inf", [*ev, "--snapshot-dir", "s", "--max-disk", "inf"], "--max-disk"),
            ("--preroll nan", [*ev, "--clip-dir", "c", "--preroll", "nan"], "--preroll"),
            ("--event-start nan", [*ev, "--event-start", "nan"], "--event-start"),
            ("--event-end inf", [*ev, "--event-end", "inf"], "--event-end"),
            ("--mqtt mqtt://a..b (IDNA: empty label)", ["--mqtt", "mqtt://a..b"], "not a valid host name"),
            ("--mqtt host with a 64-char label", ["--mqtt", f"mqtt://{a64}.example"], "not a valid host name"),
            ("--mqtt mqtt://127.0.0.1:0 (not 1883)", ["--mqtt", "mqtt://127.0.0.1:0"], "1 to 65535"),
            ("--mqtt mqtt://127.0.0.1:65536", ["--mqtt", "mqtt://127.0.0.1:65536"], "1 to 65535"),
            ("--mqtt prefix $SYS/x", ["--mqtt", "mqtt://127.0.0.1/$SYS/x"], "'$'"),
            ("--mqtt-discovery 'ha/+'", ["--mqtt", "mqtt://127.0.0.1", "--mqtt-discovery", "ha/+"], "--mqtt-discovery"),
            ("--webhook http://a..b/", [*ev, "--webhook", "http://a..b/"], "not a valid host name"),
            ("--webhook http://127.0.0.1:0/", [*ev, "--webhook", "http://127.0.0.1:0/"], "1 to 65535"),
            ("--webhook with a space in the host", [*ev, "--webhook", "http://a b/"], "--webhook"),
            ("--event name with a control character", ["--event", "cup\x01=espresso"], "control character"),
        ):
            self.case(case, *base, "--max-frames", 3, *args, expect="error", needles=[needle], cwd=d, timeout=60)

        self.group = "26.9 MQTT topics and broker answers"
        for case, args, needle in (
            ("--mqtt prefix with a control character (%01)", ["--mqtt", "mqtt://127.0.0.1/a%01b"], "control character"),
            ("--mqtt prefix with NUL (%00)", ["--mqtt", "mqtt://127.0.0.1/a%00b"], "--mqtt"),
            ("--mqtt 70,000-character prefix", ["--mqtt", "mqtt://127.0.0.1/" + "p" * 70000], "characters long"),
            ("--device-id of 70,000 characters", ["--mqtt", "mqtt://127.0.0.1", "--device-id", "d" * 70000],
             "--device-id"),
        ):
            self.case(case, *base, "--max-frames", 3, *args, expect="error", needles=[needle], cwd=d, timeout=60)
        with tempfile.TemporaryDirectory() as tmp:
            pw = Path(tmp) / "passwords"
            pw.write_text("")
            broker = Broker(Path(tmp), extra=f"password_file {pw}\n")
            broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true", "allow_anonymous false"))
            broker.start()
            try:
                for case, url in (("broker refuses anonymous clients", broker.url),
                                  ("broker refuses the password", f"mqtt://cam:wrong@127.0.0.1:{broker.port}")):
                    self.case(f"{case} (real Mosquitto)", *base, "--max-frames", 3, *ev, "--mqtt", url, expect="error",
                              needles=["refused the connection: Not authorized"], cwd=d, timeout=60)
            finally:
                broker.stop()

        self.group = "26.2 event time from the source's clock"
        self.media_clock(d, base)
        self.paced_start(d, base)

        # Below, events start at once and end after 0.2 s: the same events whatever the clock (before issue 26 a
        # video read at full speed was timed by the wall clock, and its 3 s scenes lasted 0.015 s).
        quick = [*base, "--event-start", 0, "--event-end", 0.2]
        self.group = "26.3 webhooks"
        self.webhooks(d, quick)

        self.group = "26.4 files: clip finalisation, names from rule names"
        self.rule_names(quick)
        self.clip_disk_full(quick)

        self.group = "26.5 second Ctrl-C while closing"
        self.second_sigint()

        self.group = "26.6 model paths that are not files"
        self.model_paths()

        self.group = "26.7 doctor with a bad model"
        self.doctor_models()

        self.group = "26.8 SSE ids across runs"
        self.sse_stale_id(base)

    def run_events(self, p: Proc) -> list[dict[str, Any]]:
        return [o for o in parse_jsonl(p.stdout) if o.get("kind") == "event"]

    def media_clock(self, d: Path, base: list[object]) -> None:
        def check(p: Proc) -> tuple[bool, str]:
            objs = parse_jsonl(p.stdout)
            frames = [o for o in objs if o.get("kind") == "classification"]
            starts = [o for o in objs if o.get("kind") == "event" and o.get("state") == "start"]
            summary = objs[-1] if objs else {}
            if not frames or len(starts) != 2:
                return False, f"{len(starts)} event starts (2 expected)"
            t0 = frames[0]["timestamp"]
            at = [round(s["start"] - t0, 2) for s in starts]
            good = abs(at[0] - 2.0) < 0.15 and abs(at[1] - 9.33) < 0.15  # frames 60 and 280 at 30 fps
            return good, (f"played at {summary.get('fps_mean')} FPS; events start at media {at} s "
                          f"(frames 60 and 280 of the video: 2.0 and 9.33 s), clock {starts[0].get('clock')!r}")

        self.case("recorded video without --fps (~200+ FPS): events at their media times", *base, *["--event",
                  "espresso"], "--json", expect="ok", check=check, cwd=d, timeout=120)

    def paced_start(self, d: Path, base: list[object]) -> None:
        """--fps 30 after a 5 s wait for a broker that accepts TCP but never answers: no burst of frames."""
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nobody ever answers the CONNECT
        try:
            def check(p: Proc) -> tuple[bool, str]:
                objs = parse_jsonl(p.stdout)
                frames = [o["timestamp"] for o in objs if o.get("kind") == "classification"][:30]
                summary = objs[-1] if objs else {}
                span = frames[-1] - frames[0] if len(frames) == 30 else 0.0
                good = span > 0.8 and (summary.get("dropped") or 0) < 15
                return good, (f"first 30 frames span {span:.2f} s (1 s at 30 fps; a burst: ~0), "
                              f"{summary.get('dropped')} frames dropped")

            self.case("--fps 30 after waiting 5 s for a silent broker: no initial burst", *base, "--fps", 30,
                      "--max-frames", 60, "--json", "--mqtt", f"mqtt://127.0.0.1:{silent.getsockname()[1]}",
                      expect="ok", check=check, cwd=d, timeout=120)
        finally:
            silent.close()

    def webhooks(self, d: Path, base: list[object]) -> None:
        hooks = HookServer()
        try:
            url = hooks.url
            auth_url = url.replace("http://", "http://cam:s3cret@")

            def auth(p: Proc) -> tuple[bool, str]:
                got = hooks.auth("/auth")
                shown = "cam:***@" in p.stderr
                leaked = "s3cret" in p.stderr or "s3cret" in p.stdout
                good = bool(got) and all(a == "Basic Y2FtOnMzY3JldA==" for a in got) and shown and not leaked
                return good, (f"{len(got)} POSTs with Authorization {got[:1]}; stderr shows 'cam:***@': {shown}; "
                              f"password printed: {leaked}")

            self.case("--webhook http://user:pass@host/ (Basic auth, redacted)", *base, "--event", "espresso",
                      "--webhook", auth_url + "/auth", expect="ok", check=auth, cwd=d, timeout=120)

            def redirects(p: Proc) -> tuple[bool, str]:
                at_ok = hooks.bodies("/ok")
                n = len(self.run_events(p))
                said_302 = any("302" in line for line in p.stderr.splitlines())
                good = n >= 2 and len(at_ok) == n and said_302 and f"0 delivered, {n} not delivered" in p.stderr
                reports = " / ".join(x for x in p.stderr.splitlines() if "delivered," in x)
                return good, (f"{n} events; 307 -> {len(at_ok)} POSTs with the event at the target; 302 reported: "
                              f"{said_302}; summary: {reports}")

            self.case("--webhook answering 307 (followed, POST kept) and 302 (not delivered, said why)", *base,
                      "--event", "espresso", "--json", "--webhook", url + "/r307", "--webhook", url + "/r302",
                      expect="ok",
                      check=redirects, cwd=d, timeout=120)

            def bounded(p: Proc) -> tuple[bool, str]:
                objs = parse_jsonl(p.stdout)
                summary = objs[-1] if objs else {}
                tail = p.seconds - (summary.get("duration_s") or 0)
                reports = [x for x in p.stderr.splitlines() if "delivered," in x]
                good = tail < 20 and len(reports) == 4
                return good, f"{p.seconds:.1f} s in all, {tail:.1f} s beyond the video; {len(reports)} per-URL reports"

            self.case("four --webhook URLs that hang: one bounded drain at exit", *base, "--event", "espresso",
                      "--json", *[x for i in range(4) for x in ("--webhook", f"{url}/hang?{i}")], expect="ok",
                      check=bounded, cwd=d, timeout=150)
        finally:
            hooks.close()

    def rule_names(self, base: list[object]) -> None:
        d = self.folder("rule-names")
        (d / "notes.txt").write_text("the user's notes\n")
        media = self.folder("rule-names-media")
        long_name = "a very long rule name " * 14  # 308 characters
        long_name = long_name.strip()

        def check(p: Proc) -> tuple[bool, str]:
            events = self.run_events(p)
            ids = sorted({e["id"] for e in events})
            rules = {e["name"]: e["id"].split("-")[1] for e in events}
            files = sorted(x.name for x in media.iterdir())
            missing = [i for i in ids if not all(f"{i}{ext}" in files for ext in (".jpg", ".raw.jpg", ".mp4"))]
            longest = max((len(x.encode()) for x in files), default=0)
            good = len(rules) == 3 and len(set(rules.values())) == 3 and not missing and longest <= 120
            return good, (f"{len(ids)} events of {len(rules)} rules, id parts {sorted(rules.values())}; "
                          f"{len(files)} files, {len(missing)} events without their 3 files, longest name "
                          f"{longest} bytes")

        self.case("a 308-char rule name and two non-ASCII names (猫, 犬), with snapshots and clips", *base, "--fps", 30,
                  "--event", f"{long_name}=espresso", "--event", "猫=espresso", "--event", "犬=espresso",
                  "--snapshot-dir", media, "--clip-dir", media, "--json", expect="ok", check=check, cwd=d,
                  timeout=120)

    def clip_disk_full(self, base: list[object]) -> None:
        d = self.folder("clip-full")
        (d / "notes.txt").write_text("the user's notes\n")
        clips = self.folder("clip-full-clips")
        limit = 400_000

        def fsize() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        def check(p: Proc) -> tuple[bool, str]:
            visible = sorted(clips.glob("*.mp4"))
            broken = [c.name for c in visible if mp4_incomplete(c)]
            parts = [c.name for c in clips.iterdir() if ".part" in c.name]
            said = [x for x in p.stderr.splitlines() if "could not finish it" in x]
            spam = sum("Failed to write frame" in x for x in p.stderr.splitlines())
            good = not broken and not parts and len(said) >= 1 and spam == 0
            return good, (f"{len(visible)} clip(s) visible, {len(broken)} without their index {broken[:2]}, "
                          f"{len(parts)} .part left; said why: {said[:1]}; {spam} encoder warnings")

        self.case("clips on a full disk (ulimit -f 400 kB): no ID.mp4 without its index", *base, "--event",
                  "espresso", "--clip-dir", clips, "--preroll", 1, expect="ok",
                  check=check, preexec=fsize, wrap=f"(ulimit -f {limit // 1024})", cwd=d, timeout=120)

    def second_sigint(self) -> None:
        d = self.folder("sigint-twice")
        long_video = write_scenes(self.work / "coffee-long.mp4", [(self.photos / "coffee.png", 600)])
        argv = [*self.device, "run", "--model", str(self.model), "--source", str(long_video), "--fps", "30",
                "--threads", "1", "--event", "espresso", "--event-start", "0", "--clip-dir", "clips", "--json"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=d, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        err_lines: list[str] = []
        out_lines: list[str] = []
        readers = [threading.Thread(target=lambda s=s, acc=acc: acc.extend(s), daemon=True)
                   for s, acc in ((proc.stderr, err_lines), (proc.stdout, out_lines))]
        for r in readers:
            r.start()
        rc: int | None = None
        try:
            wait_for(lambda: any("started" in x for x in err_lines) or proc.poll() is not None, 60)
            time.sleep(3)  # a 3 s clip under way, frames queued for it
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
            proc.send_signal(signal.SIGINT)  # while the clip is being finalised
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for r in readers:
            r.join(5)
        p = Proc(argv, rc, "".join(out_lines), "".join(err_lines), time.perf_counter() - t0, None, str(d), {},
                 "(SIGINT twice, 50 ms apart, 3 s into an event)")

        def check(p: Proc) -> tuple[bool, str]:
            announced = [e.get("clip") for e in parse_jsonl(p.stdout) if e.get("kind") == "event" and e.get("clip")]
            folder = d / "clips"
            names = sorted(x.name for x in folder.iterdir()) if folder.exists() else []
            parts = [n for n in names if ".part" in n]
            missing = [Path(c).name for c in announced if not (folder / Path(c).name).exists()
                       or mp4_incomplete(folder / Path(c).name)]
            good = p.returncode == 0 and not parts and not missing and bool(announced)
            return good, (f"exit {p.returncode}; {len(announced)} clip(s) announced, {len(missing)} missing or "
                          f"incomplete, {len(parts)} .part left ({', '.join(names)[:120]})")

        ok, detail = judge(p, "ok", check=check)
        self.add("second Ctrl-C while a clip is finalised", p, ok, detail,
                 (True, "yes (clips: see detail)"), self.short(argv) + " + SIGINT x2, 50 ms apart")

    def model_paths(self) -> None:
        d = self.folder("model-paths")
        fifo = d / "model.fifo"
        os.mkfifo(fifo)
        home = self.work / "home-fifo"
        (home / "models").mkdir(parents=True)
        os.mkfifo(home / "models" / "latest.tflite")
        for case, args, env, needle in (
            ("classify --model FIFO (no writer: would block forever)", ["--model", fifo], {}, "FIFO"),
            ("classify --model /dev/zero (endless)", ["--model", "/dev/zero"], {}, "character device"),
            ("classify, EDGESQZ_MODEL = FIFO", [], {"EDGESQZ_MODEL": str(fifo)}, "EDGESQZ_MODEL"),
            ("classify, EDGESQZ_MODEL = /dev/zero", [], {"EDGESQZ_MODEL": "/dev/zero"}, "EDGESQZ_MODEL"),
            ("classify, latest.tflite is a FIFO", [], {"EDGESQZ_HOME": str(home)}, "latest.tflite"),
        ):
            self.case(case, "classify", *args, self.coffee, expect="error", needles=[needle], env=env, cwd=d,
                      timeout=30, rss=True)
        self.case("info --model /dev/zero", "info", "/dev/zero", expect="error", needles=["character device"],
                  cwd=d, timeout=30, rss=True)

    def doctor_models(self) -> None:
        d = self.folder("doctor-models")
        garbage = d / "garbage.tflite"
        garbage.write_bytes(os.urandom(4096))
        home = self.work / "home-garbage"
        (home / "models").mkdir(parents=True)
        (home / "models" / "latest.tflite").write_bytes(os.urandom(4096))
        tf_here = subprocess.run([self.device[0], "-c", "import importlib.util as u; "
                                  "print(u.find_spec('tensorflow') is not None)"], capture_output=True, text=True,
                                 env=self.env).stdout.strip() == "True"

        def finding(names: str, fix: str) -> Callable[[Proc], tuple[bool, str]]:
            def check(p: Proc) -> tuple[bool, str]:
                lines = p.stdout.splitlines()
                i = next((i for i, x in enumerate(lines) if x.startswith("FAIL model")), None)
                if i is None:
                    return False, "no FAIL model line"
                text = " ".join(x.strip() for x in lines[i:i + 3])
                convert_ok = tf_here or "edgesqz convert" not in text
                good = names in text and fix in text and convert_ok
                return good, f"{text[:300]} [TensorFlow here: {tf_here}]"
            return check

        self.case("doctor, EDGESQZ_MODEL = random bytes", "doctor", expect="report",
                  check=finding("EDGESQZ_MODEL=", "unset EDGESQZ_MODEL"), env={"EDGESQZ_MODEL": str(garbage)}, cwd=d)
        self.case("doctor, latest.tflite = random bytes", "doctor", expect="report",
                  check=finding("latest.tflite", "rm "), env={"EDGESQZ_HOME": str(home)}, cwd=d)
        fifo = d / "m.fifo"
        os.mkfifo(fifo)
        self.case("doctor, EDGESQZ_MODEL = FIFO", "doctor", expect="report",
                  check=finding("EDGESQZ_MODEL=", "unset EDGESQZ_MODEL"), env={"EDGESQZ_MODEL": str(fifo)}, cwd=d,
                  timeout=60)

    def sse_stale_id(self, base: list[object]) -> None:
        d = self.folder("sse")
        port = free_port()
        argv = [*self.device, *map(str, base), "--fps", "30", "--loop", "--serve", str(port), "--event", "espresso"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=d, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        results: dict[str, str] = {}
        try:
            wait_for(lambda: _listening(port) or proc.poll() is not None, 60)
            for header in ("999999999999", "1", "0123abcd-5", "9" * 40):
                results[header[:16]] = _first_event(port, header)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
        p = Proc(argv, proc.returncode, "", err, time.perf_counter() - t0, None, str(d))

        def check(p: Proc) -> tuple[bool, str]:
            good = all(v.startswith("got") for v in results.values())
            return good, "; ".join(f"Last-Event-ID {k}: {v}" for k, v in results.items())

        ok, detail = judge(p, "ok", check=check)
        self.add("/events with a stale or huge Last-Event-ID (another run's)", p, ok, detail,
                 (True, "yes (writes nothing)"), self.short(argv) + " + GET /events with Last-Event-ID")


# --------------------------------------------------------------------------- small helpers


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                out.append(value)
    return out


def count_frames(path: Path) -> int:
    if not path.exists():
        return 0
    cap = cv2.VideoCapture(str(path))
    frames = 0
    while cap.read()[0]:
        frames += 1
    cap.release()
    return frames


def classify_run(p: Proc, command: str) -> tuple[str, str]:
    """A mutated model's run: 'exit 0', 'clean error', 'verdict' (edgetpu check: not compatible) or 'PROBLEM'."""
    ok, detail = judge(p, "either")
    if ok:
        return ("exit 0" if p.returncode == 0 else "clean error"), detail
    if (command == "edgetpu check" and p.returncode == 1 and "NOT fully compatible" in p.stdout
            and not any(m in p.stderr for m in BAD_MARKERS)):
        return "verdict", first_line(p.stdout)
    return "PROBLEM", detail


def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    end = time.perf_counter() + timeout
    while not condition() and time.perf_counter() < end:
        time.sleep(0.05)


@contextlib.contextmanager
def html_404_server() -> Iterator[str]:
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html><body><h1>404 Not Found</h1></body></html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/stream.mjpg"
    finally:
        server.shutdown()
        server.server_close()


class HookServer:
    """Webhook endpoints: /ok and /auth record POSTs (and the Authorization header), /r307 and /r302 redirect
    to /ok, /hang never answers."""

    def __init__(self) -> None:
        received: list[tuple[str, str | None, bytes]] = []
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                if path == "/hang":
                    time.sleep(60)
                    return
                if path in ("/r307", "/r302"):
                    self.send_response(int(path[2:]))
                    self.send_header("Location", "/ok")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with lock:
                    received.append((path, self.headers.get("Authorization"), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.received = received
        self.lock = lock
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def bodies(self, path: str) -> list[bytes]:
        with self.lock:
            return [b for p, _, b in self.received if p == path and b]

    def auth(self, path: str) -> list[str | None]:
        with self.lock:
            return [a for p, a, _ in self.received if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _first_event(port: int, last_event_id: str, timeout: float = 5.0) -> str:
    """GET /events with a Last-Event-ID: 'got id ...' for the first event within ``timeout``, else what happened."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/events", headers={"Last-Event-ID": last_event_id})
        resp = conn.getresponse()
        if resp.status != 200:
            return f"HTTP {resp.status}"
        end = time.monotonic() + timeout
        event_id = ""
        while time.monotonic() < end:
            line = resp.fp.readline().decode(errors="replace").strip()
            if line.startswith("id:"):
                event_id = line[3:].strip()
            if line.startswith("data:"):
                return f"got id {event_id or '?'}"
        return f"no event in {timeout:g} s"
    except (OSError, http.client.HTTPException) as exc:
        return f"no event in {timeout:g} s ({type(exc).__name__})"
    finally:
        conn.close()


def md_cell(text: str, limit: int = 260) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def versions(args: argparse.Namespace) -> dict[str, str]:
    def out(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT).stdout.strip()
        return ""

    return {
        "commit": out(["git", "rev-parse", "--short", "HEAD"]),
        "edgesqz": out([str(args.device_python), "-c", "import edgesqz; print(edgesqz.__version__)"]),
        "runtime": out([str(args.device_python), "-c", "import ai_edge_litert as a; print(a.__version__)"]),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, running as uid {os.getuid()}",
    }


def before_after(rows: list[Row], before: dict[str, Any]) -> list[str]:
    """A table of the cases ``before`` (an earlier OUT.json) has: how each ended then and now."""
    then = {r["case"]: r for r in before.get("rows", [])}
    meta = before.get("meta", {})
    shown = [r for r in rows if r.case in then]
    if not shown:
        return []
    lines = ["", f"## Before and after (issue 26): commit {meta.get('commit', '?')} then, this commit now", "",
             f"The same cases run on commit {meta.get('commit', '?')} (before the fixes); "
             f"{sum(not then[r.case]['ok'] for r in shown)} of {len(shown)} were problems then, "
             f"{sum(not r.ok for r in shown)} now.", "",
             "| class | case | before: exit, outcome | verdict | after: exit, outcome | verdict |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in shown:
        b = then[r.case]
        lines.append(f"| {md_cell(r.group, 60)} | {md_cell(r.case, 120)} | {b['exit']}: {md_cell(b['detail'], 220)} | "
                     f"{'ok' if b['ok'] else '**PROBLEM**'} | {r.exit}: {md_cell(r.detail, 220)} | "
                     f"{'ok' if r.ok else '**PROBLEM**'} |")
    return lines


def write_report(sweep: Sweep, out: Path, seconds: float, meta: dict[str, str],
                 before: dict[str, Any] | None = None) -> str:
    rows = sweep.rows
    problems = [r for r in rows if not r.ok]
    lines = [
        "# Fault sweep (issues 19 and 26): every case, how it ends now",
        "",
        f"`python benchmarks/fault_sweep.py` on commit {meta['commit']}, edgesqz {meta['edgesqz']}, "
        f"ai_edge_litert {meta['runtime']}, Python {meta['python']}, {meta['machine']}; "
        f"{len(rows)} rows ({sum(r.ok for r in rows)} ok, {len(problems)} PROBLEM) in {seconds:.0f} s.",
        "",
        "ok = exit 0 with the right result, or exit 1..127 with exactly one `error:` line (with what the fault "
        "suite expects) and no traceback/crash (143 for SIGTERM on commands other than `run`); and the case's "
        "folder byte for byte as it was (outputs asked for with `--force` may be written; no temporary file left). "
        "Device commands run in `.venv-device` (no TensorFlow/PyTorch), `convert` in `.venv`.",
        "",
        "Running as root makes `chmod 000` moot (root reads and writes anything): the permission cases also run "
        "with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped from the bounding set (root without them obeys "
        "file permissions like a user; `setpriv --bounding-set -dac_override,-dac_read_search` does the same "
        "from a shell).",
        "",
        "| case | command (short) | exit | first line of stderr / outcome | user files unchanged | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    group = ""
    for r in rows:
        if r.group != group:
            group = r.group
            lines.append(f"| **{md_cell(group)}** | | | | | |")
        lines.append(f"| {md_cell(r.case)} | `{md_cell(r.command, 200)}` | {r.exit} | {md_cell(r.detail, 400)} | "
                     f"{md_cell(r.files)} | {'ok' if r.ok else '**PROBLEM**'} |")
    if sweep.mutants:
        lines += ["", "## Damaged models, per model", "",
                  "Seeded mutations of the graph (not the weights) of the real int8 model "
                  "(`tests/fault_models.py: mutant`) and truncations; what each command did.", "",
                  "| model | info | info --json | classify | bench | edgetpu check |",
                  "| --- | --- | --- | --- | --- | --- |"]
        table: dict[str, dict[str, str]] = {}
        for m in sweep.mutants:
            mark = {"exit 0": "0", "clean error": f"{m['exit']} error", "verdict": "1 verdict"}.get(
                m["outcome"], f"**{m['exit']} PROBLEM**")
            table.setdefault(m["model"], {})[m["command"]] = mark
        for model, cells in table.items():
            lines.append(f"| {model} | " + " | ".join(cells.get(c, "") for c in
                                                      ("info", "info --json", "classify", "bench", "edgetpu check"))
                         + " |")
    if before is not None:
        lines += before_after(rows, before)
    lines += ["", "## Problems", ""]
    if not problems:
        lines.append("None: every case ends as the issue asks.")
    for r in problems:
        lines += [f"- **{md_cell(r.case)}** ({r.group}): {md_cell(r.detail, 600)}", "", "  ```sh",
                  *(f"  {x}" for x in (r.repro or r.command).splitlines()[:12]), "  ```", ""]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({
        "meta": {**meta, "seconds": round(seconds, 1)},
        "rows": [asdict(r) for r in rows],
        "mutants": sweep.mutants,
        **({"before": {"meta": before.get("meta", {}), "rows": before.get("rows", [])}} if before else {}),
    }, indent=1) + "\n")
    return text


def main() -> int:
    shared = Path(os.environ.get("EDGESQZ_SHARED", ROOT.parent / "shared"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fault_sweep",
                        help="results path without suffix (.md and .json are written)")
    parser.add_argument("--device-python", type=Path, default=ROOT / ".venv-device" / "bin" / "python")
    parser.add_argument("--host-python", type=Path, default=ROOT / ".venv" / "bin" / "python")
    parser.add_argument("--model", type=Path, default=ROOT / "edgesqz" / "models" / "squeezenet1_1-int8.tflite")
    parser.add_argument("--weights", type=Path, default=shared / "weights" / "squeezenet1_1-torchvision-fp16r.pth")
    parser.add_argument("--photos", type=Path, default=shared / "data" / "photos")
    parser.add_argument("--imagenet", type=Path, default=shared / "data" / "imagenet-sample-1000")
    parser.add_argument("--mutants", type=int, default=30, help="seeded mutated models (plus the regression seeds)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel runs for the mutated models")
    parser.add_argument("--skip-convert", action="store_true", help="leave out the cases that need TensorFlow")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (e.g. hostile: issue 26)")
    parser.add_argument("--before", type=Path, help="an earlier OUT.json: the report gets a before/after table of "
                                                    "its cases")
    args = parser.parse_args()
    for venv in ("device_python", "host_python"):
        if not getattr(args, venv).exists():
            setattr(args, venv, Path(sys.executable))
    os.environ.setdefault("EDGESQZ_SHARED", str(shared))
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="edgesqz-fault-sweep-", dir="/tmp"))
    sweep = Sweep(args, work)
    try:
        for step in (sweep.existing_outputs, sweep.signals, sweep.models_cases, sweep.memory, sweep.one_line_errors,
                     sweep.silently_wrong, sweep.messages, sweep.doctor, sweep.hostile):
            if args.only and step.__name__ not in args.only:
                continue
            print(f"== {step.__name__}", flush=True)
            step()
    finally:
        seconds = time.perf_counter() - t0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        before = json.loads(args.before.read_text()) if args.before else None
        text = write_report(sweep, args.out, seconds, versions(args), before)
        if args.keep:
            print(f"kept {work}")
        else:
            for path in work.rglob("*"):  # undo any chmod before removing
                if path.is_dir() and not path.is_symlink():
                    path.chmod(0o755)
            shutil.rmtree(work, ignore_errors=True)
    print(text)
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')} in {seconds:.0f} s")
    return 1 if any(not r.ok for r in sweep.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
