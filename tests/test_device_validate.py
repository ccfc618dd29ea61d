"""The mechanisms behind the fault suite, in-process: model validation, image headers, outputs, reconnect, display."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fault_models import crafted_models, split_zip, tiny_classifier

from edgesqz.errors import EdgesqzError
from edgesqz.fileio import (
    GuardedStream,
    OutputError,
    PendingFile,
    check_distinct,
    check_output,
    open_stream,
    read_capped,
)
from edgesqz.imaging import MAX_IMAGE_PIXELS, image_header, read_image
from edgesqz.tflite_metadata import check_info, read_metadata
from edgesqz.tflite_validate import validate_model

# --------------------------------------------------------------------------- models


def test_real_and_tiny_models_are_valid(int8_model: Path, float_model: Path) -> None:
    from edgesqz.doctor import tiny_model

    for data in (int8_model.read_bytes(), float_model.read_bytes(), tiny_model(), tiny_classifier(8)):
        validate_model(data)


def test_crafted_damage_is_named(int8_model: Path) -> None:
    for name, (data, needle) in crafted_models(int8_model.read_bytes()).items():
        with pytest.raises(EdgesqzError, match=r"not a valid \.tflite model") as info:
            validate_model(data, "model m.tflite")
        assert needle in str(info.value), (name, str(info.value))
        assert str(info.value).startswith("model m.tflite") and "\n" not in str(info.value)


def test_truncations_and_caps(int8_model: Path) -> None:
    data = int8_model.read_bytes()
    flatbuffer = split_zip(data)[0]
    for cut in (8, 100, 4000, len(flatbuffer) // 2, len(flatbuffer) - 1):
        with pytest.raises(EdgesqzError, match=r"not a valid \.tflite model"):
            validate_model(flatbuffer[:cut])
    with pytest.raises(EdgesqzError, match="no TFL3 file identifier"):
        validate_model(b"\x00" * 64)


def test_metadata_values_are_checked_in_one_place() -> None:
    check_info({"preprocessing": {"size": 224, "crop_fraction": 0.875}, "output": {"kind": "logits",
                                                                                  "classes": 10}}, "m")
    check_info({"input": None, "labels": {"ids": None}, "unknown": object()}, "m")  # null = absent; others kept
    for info, needle in (({"preprocessing": "abc"}, "preprocessing = \"abc\", expected a JSON object"),
                         ({"preprocessing": {"crop_fraction": 2}}, "in (0, 1]"),
                         ({"input": {"size": True}}, "input.size = true, expected a whole number"),
                         ({"output": {"classes": 1.5}}, "output.classes"),
                         ({"labels": {"ids": [1, 2]}}, "a list of strings"),
                         ({"accuracy": {"model": {"top1": float("nan")}}}, "accuracy.model.top1")):
        with pytest.raises(EdgesqzError, match="embedded metadata") as exc:
            check_info(info, "model m.tflite")
        assert needle in str(exc.value) and str(exc.value).startswith("model m.tflite")


def test_metadata_members_are_bounded(int8_model: Path) -> None:
    import zipfile

    from edgesqz.tflite_metadata import MAX_ASSOCIATED_BYTES

    flatbuffer, members = split_zip(int8_model.read_bytes())
    out = io.BytesIO()
    out.write(flatbuffer)
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("labels.txt", b"\n" * (MAX_ASSOCIATED_BYTES + 1))
        zf.writestr("edgesqz.json", members["edgesqz.json"])
    with pytest.raises(EdgesqzError, match=r"labels\.txt claims"):
        read_metadata(out.getvalue(), src="model b.tflite")


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".webp", ".tif", ".ppm", ".pgm"])
def test_image_header_matches_the_decoder(ext: str) -> None:
    image = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    data = cv2.imencode(ext, image[..., 0] if ext == ".pgm" else image)[1].tobytes()
    header = image_header(data)
    assert header is not None and (header.width, header.height) == (53, 37)


def test_read_image_bounds(tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"  # 63 MP: decoded at half size
    cv2.imwrite(str(big), np.full((7000, 9000, 3), 90, np.uint8))
    assert read_image(big).shape == (3500, 4500, 3)
    png = bytearray(cv2.imencode(".png", np.zeros((10, 10, 3), np.uint8))[1].tobytes())
    struct.pack_into(">II", png, 16, 10000, 10000)  # 100 MP, not a JPEG: refused before decoding
    (tmp_path / "big.png").write_bytes(bytes(png))
    with pytest.raises(EdgesqzError, match=r"10000x10000 \(100 megapixels\)"):
        read_image(tmp_path / "big.png")
    assert MAX_IMAGE_PIXELS < 10000 * 10000
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(EdgesqzError, match="cannot decode image"):
        read_image(tmp_path / "text.jpg")


# --------------------------------------------------------------------------- outputs


def test_check_output_refuses_inputs_and_specials(tmp_path: Path) -> None:
    src = tmp_path / "clip.mp4"
    src.write_bytes(b"video")
    os.link(src, tmp_path / "hard.mp4")
    for target in (src, tmp_path / "hard.mp4", tmp_path / "." / "clip.mp4"):
        with pytest.raises(EdgesqzError, match="same file as --source"):
            check_output(target, force=True, inputs=[("--source", src)])
    assert check_output("/dev/null", special_ok=True) == Path("/dev/null")
    with pytest.raises(EdgesqzError, match="not a regular file"):
        check_output("/dev/null", special_ok=False)
    with pytest.raises(EdgesqzError, match="does not exist"):
        check_output(tmp_path / "no" / "x.json", create_parents=False)
    with pytest.raises(EdgesqzError, match="the same file"):
        check_distinct([("--output", tmp_path / "a"), ("--record", tmp_path / "." / "a")])
    check_distinct([("--output", tmp_path / "a"), ("--record", None)])


def test_open_stream_never_truncates_without_force(tmp_path: Path) -> None:
    target = tmp_path / "r.jsonl"
    with open_stream(target) as f:
        f.write("one\n")
    with pytest.raises(EdgesqzError, match="appeared meanwhile"):
        open_stream(target)
    linked = tmp_path / "linked.jsonl"
    os.link(target, linked)
    with open_stream(target, force=True) as f:  # a new file: the hard link keeps the old content
        f.write("two\n")
    assert target.read_text() == "two\n" and linked.read_text() == "one\n"
    assert sorted(os.listdir(tmp_path)) == ["linked.jsonl", "r.jsonl"]


def test_pending_file_permissions_and_discard(tmp_path: Path) -> None:
    pending = PendingFile(tmp_path / "v.mp4", force=False)
    pending.tmp.write_bytes(b"x")
    pending.commit()
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "v.mp4").stat().st_mode & 0o777 == 0o666 & ~mask
    pending = PendingFile(tmp_path / "w.mp4")
    pending.discard()
    assert os.listdir(tmp_path) == ["v.mp4"]


def test_read_capped_does_not_reserve_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    with path.open("rb") as f:
        assert read_capped(f, 1 << 40) == b"abc"  # a 1 TiB cap: must not allocate it
    with path.open("rb") as f:
        assert read_capped(f, 2) is None  # too large
    big = tmp_path / "sparse"
    with big.open("wb") as f:
        f.truncate(3 << 30)  # 3 GB of nothing: refused from its size, not read
    with big.open("rb") as f:
        assert read_capped(f, 1 << 30) is None
    read, write = os.pipe()
    os.write(write, b"x" * 10)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        assert read_capped(f, 9) is None


def test_guarded_stdout() -> None:
    class Failing(io.StringIO):
        def __init__(self, error: int) -> None:
            super().__init__()
            self.error = error

        def flush(self) -> None:
            raise OSError(self.error, os.strerror(self.error))

        def fileno(self) -> int:
            raise io.UnsupportedOperation

    import errno

    for code, gone in ((errno.EPIPE, True), (errno.ENOSPC, False)):
        stream = GuardedStream(Failing(code))
        stream.write("x\n")
        with pytest.raises(OutputError) as info:
            stream.flush()
        assert info.value.reader_gone is gone and (info.value.exit_code == 0) is gone
        stream.flush()  # once failed, quiet
    quiet = GuardedStream(Failing(errno.EIO), drop_errors=True)
    quiet.write("x")
    quiet.flush()


# --------------------------------------------------------------------------- reconnect and display


def test_parse_reconnect() -> None:
    from edgesqz.device.sources import parse_reconnect

    assert list(parse_reconnect("3").delays()) == [0.5, 1.0, 2.0]
    assert list(parse_reconnect("0").delays()) == []
    timed = list(parse_reconnect("20s").delays())
    assert timed == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0] and sum(timed[:-1]) < 20 <= sum(timed)
    forever = parse_reconnect("forever").delays()
    assert [next(forever) for _ in range(8)][-1] == 8.0
    for bad in ("-1", "x", "0m", "nans"):
        with pytest.raises(EdgesqzError, match="--reconnect takes"):
            parse_reconnect(bad)


def test_display_check_connects(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgesqz.sysinfo import display_check

    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("DISPLAY", raising=False)
    assert display_check() == (False, "no display ($DISPLAY and $WAYLAND_DISPLAY are unset)")
    monkeypatch.setenv("DISPLAY", ":4243")  # nothing listens there
    found, why = display_check(timeout=0.2)
    assert not found and "no X server answers" in why
    with socket.socket() as server:  # an "X server" on TCP display N: port 6000 + N
        for n in range(50, 90):
            try:
                server.bind(("127.0.0.1", 6000 + n))
                break
            except OSError:
                continue
        else:
            pytest.skip("no free port 6050..6089")
        server.listen(1)
        monkeypatch.setenv("DISPLAY", f"127.0.0.1:{n}.0")
        assert display_check(timeout=2) == (True, f"X server 127.0.0.1:{n}.0")
    monkeypatch.setenv("DISPLAY", "nonsense")
    assert display_check()[0] is False


def test_list_images_reports_an_unreadable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgesqz import imaging

    real_walk = os.walk

    def walk(top: str, onerror=None, **kwargs):  # type: ignore[no-untyped-def]
        onerror(PermissionError(13, "Permission denied", str(top)))
        return real_walk(top, onerror=onerror, **kwargs)

    monkeypatch.setattr(imaging.os, "walk", walk)
    with pytest.raises(EdgesqzError, match=r"cannot read folder .*: Permission denied; check its permissions"):
        imaging.list_images(tmp_path)


def test_summary_reservoir_is_bounded() -> None:
    from edgesqz.device.results import LatencyStats

    stats = LatencyStats()
    for i in range(50_000):
        stats.add(float(i % 100))
    assert len(stats._samples) == stats.capacity == 20_000 and stats.count == 50_000
    assert json.dumps(stats.to_dict())
