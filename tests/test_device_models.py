"""The model used when none is named: --model, EDGESQZ_MODEL, convert's latest, then the installed default.

The installed default (edgesqz/models/) must work from the first minute with the device install alone:
a standard classifier with ImageNet class names, made by edgesqz's own convert (its provenance file says
how), and `info`/`doctor` must say which model is in use and why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgesqz.device.models import choose_model, packaged_model

ROOT = Path(__file__).resolve().parents[1]


def edgesqz(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgesqz", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("EDGESQZ_HOME", str(home))
    monkeypatch.delenv("EDGESQZ_MODEL", raising=False)
    return home


def test_the_installed_default_is_a_standard_imagenet_classifier(empty_home: Path) -> None:
    from edgesqz.converters.standard_head import standard_classifier_problems
    from edgesqz.tflite_metadata import read_metadata

    path = packaged_model()
    assert path is not None and path.parent == ROOT / "edgesqz" / "models"
    assert choose_model(None).path == path and choose_model(None).origin == "packaged"
    data = path.read_bytes()
    assert standard_classifier_problems(data) == []
    assert len(data) < 1_500_000  # the wheel stays lean
    meta = read_metadata(data)
    assert meta.labels is not None and meta.labels[967] == "espresso" and len(meta.labels) == 1000
    assert meta.info["output"]["kind"] == "probabilities" and meta.info["input"]["dtype"] == "uint8"
    provenance = json.loads(path.with_suffix(".json").read_text())
    assert provenance["weights"]["sha256"] == meta.info["source_weights"]["sha256"]
    assert len(provenance["calibration"]["files"]) == provenance["calibration"]["count"] == 200
    assert "edgesqz convert --int8" in provenance["command"]
    assert provenance["accuracy"]["top1_agreement"] == meta.info["accuracy"]["top1_agreement"]


def test_classify_works_from_the_first_minute(empty_home: Path, photos: list[Path]) -> None:
    result = edgesqz("classify", *[str(p) for p in photos], "--json")
    assert result.returncode == 0, result.stderr
    assert "the default model installed with edgesqz" in result.stderr
    top1 = {Path(r["source"]).name: r["top_k"][0]["label"] for r in map(json.loads, result.stdout.splitlines())}
    assert top1["coffee.png"] == "espresso"
    assert top1["chelsea.png"] in ("Egyptian cat", "tiger cat", "tabby")


def test_order_option_env_latest_packaged(empty_home: Path, tmp_path: Path, int8_model: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_model(None).origin == "packaged"
    latest = empty_home / "models" / "latest.tflite"
    latest.parent.mkdir(parents=True)
    latest.symlink_to(int8_model)
    assert (choose_model(None).path, choose_model(None).origin) == (latest, "latest")
    other = tmp_path / "mine.tflite"
    other.write_bytes(int8_model.read_bytes())
    monkeypatch.setenv("EDGESQZ_MODEL", str(other))
    assert (choose_model(None).path, choose_model(None).origin) == (other, "env")
    assert choose_model(Path("x.tflite")).origin == "option"  # --model wins over everything

    result = edgesqz("info", "--json", env={"EDGESQZ_MODEL": str(other), "EDGESQZ_HOME": str(empty_home)})
    assert result.returncode == 0 and json.loads(result.stdout)["origin"] == "env"
    result = edgesqz("doctor", env={"EDGESQZ_MODEL": "", "EDGESQZ_HOME": str(empty_home)})
    assert "the model edgesqz convert wrote last" in result.stdout, result.stdout

    monkeypatch.setenv("EDGESQZ_MODEL", str(tmp_path / "gone.tflite"))
    with pytest.raises(Exception, match=r"EDGESQZ_MODEL=.*does not exist"):
        choose_model(None)


def test_a_dangling_latest_is_an_error_not_a_silent_fallback(empty_home: Path, tmp_path: Path) -> None:
    latest = empty_home / "models" / "latest.tflite"
    latest.parent.mkdir(parents=True)
    latest.symlink_to(tmp_path / "deleted.tflite")
    result = edgesqz("info", env={"EDGESQZ_HOME": str(empty_home), "EDGESQZ_MODEL": ""})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "which does not exist" in result.stderr and "installed default" in result.stderr
