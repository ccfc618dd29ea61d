"""The one way edgesqz writes files: checked first, never half-written, never replacing without ``--force``.

- :func:`check_output` says, before any work starts, whether ``path`` may be written: not an existing
  file (unless ``force``), not a folder, its folder exists (or can be made) and is writable.
- :func:`check_folder` is the same for a folder that receives many files (``--snapshot-dir``).
- :func:`atomic_write` writes a whole file through a temporary file in the same folder, fsync and
  rename: readers see the old file or the whole new one, never a part, and a failure (disk full,
  interrupted) leaves nothing behind.
- :func:`atomic_file` is the same for writers that stream (CSV, video encoders, zip archives): it
  yields the temporary path; the file appears under its name only when the block ends without error.
- Without ``force`` the final rename never replaces a file that appeared meanwhile (hard link, then
  unlink the temporary), so a file the user had is never lost.

Every OS error becomes an :class:`~edgesqz.errors.EdgesqzError` that names the file and says what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from edgesqz.errors import EdgesqzError

_ADVICE = {
    errno.ENOSPC: "the disk is full; free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is used up; free some space or write somewhere else",
    errno.EROFS: "the file system is read-only; write somewhere else",
    errno.EACCES: "permission denied; write somewhere else",
    errno.EPERM: "permission denied; write somewhere else",
}


def os_error(path: str | os.PathLike[str], exc: OSError, doing: str = "write") -> EdgesqzError:
    """A one-line error for an OSError met while ``doing`` something to ``path``."""
    advice = _ADVICE.get(exc.errno or 0) or (exc.strerror or str(exc) or type(exc).__name__)
    return EdgesqzError(f"cannot {doing} {path}: {advice}")


def check_output(path: str | os.PathLike[str], *, force: bool = False, what: str = "output",
                 suffixes: Iterable[str] | None = None, option: str = "-o") -> Path:
    """Check that ``path`` may be written (see the module docstring); returns it as a Path.

    ``suffixes``: allowed file name endings (lower case, with the dot). ``what`` names the file in
    messages (``"--record"``), ``option`` is how the user chooses another one.
    """
    path = Path(path).expanduser()
    if suffixes is not None:
        allowed = tuple(suffixes)
        if not path.name.lower().endswith(allowed):
            raise EdgesqzError(f"{what} {path} must end in {' or '.join(allowed)}")
    if path.is_dir():
        raise EdgesqzError(f"{what} {path} is a folder; give a file name")
    if (path.exists() or path.is_symlink()) and not force:
        raise EdgesqzError(f"{what} {path} already exists; pass --force to replace it or choose another {option}")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(parent, exc, "create folder") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EdgesqzError(f"cannot write to {parent}: permission denied; choose another {option}")
    return path


def check_folder(path: str | os.PathLike[str], *, option: str = "--output-dir") -> Path:
    """Check that files may be written into the folder ``path`` (made when missing); returns it as a Path."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise EdgesqzError(f"{option} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(path, exc, "create folder") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise EdgesqzError(f"{option} {path}: cannot write to the folder (permission denied); choose another one")
    return path


def _publish(tmp: str, path: Path, force: bool) -> None:
    """Move the finished temporary file into place (never over an existing file unless ``force``)."""
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists: nothing the user had is replaced
    except FileExistsError as exc:
        raise EdgesqzError(f"{path} appeared while it was being written; pass --force to replace it") from exc
    except OSError:  # file systems without hard links (FAT on a USB stick): check, then rename
        if path.exists():
            raise EdgesqzError(f"{path} appeared while it was being written; pass --force to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _umask() -> int:
    """The process' umask, read without changing it (Linux: /proc; elsewhere the usual 022)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    return 0o022


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it is fsynced and renamed to ``path``.

    On any exception (or KeyboardInterrupt) the temporary file is removed and ``path`` is untouched.
    The temporary name keeps ``path``'s suffix, so writers that choose a format by suffix still work.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".part{path.suffix}", dir=path.parent)
    except OSError as exc:
        raise os_error(path, exc) from exc
    os.close(fd)
    with contextlib.suppress(OSError):
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the file gets the mode open() would give
    try:
        yield Path(tmp)
        try:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            _publish(tmp, path, force)
        except OSError as exc:
            raise os_error(path, exc) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, force: bool = True) -> None:
    """Write ``data`` (str is UTF-8) to ``path`` whole, or not at all."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_file(path, force=force) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(payload)
                f.flush()
        except OSError as exc:
            raise os_error(path, exc) from exc
