"""The one way edgesqz writes files: checked first, never half-written, never replacing without ``--force``.

- :func:`check_output` says, before any work starts, whether ``path`` may be written: not an existing
  file (unless ``force``), not a folder, its folder exists (or can be made) and is writable.
- :func:`check_folder` is the same for a folder that receives many files (``--snapshot-dir``).
- :func:`atomic_write` writes a whole file through a temporary file in the same folder, fsync and
  rename: readers see the old file or the whole new one, never a part, and a failure (disk full,
  interrupted) leaves nothing behind.
- :func:`atomic_file` is the same for writers that stream (CSV, video encoders, zip archives): it
  yields the temporary path; the file appears under its name only when the block ends without error.
- :func:`open_stream` is for outputs that grow while a command runs (JSON lines people ``tail -f``):
  created new (never truncating a file the user had unless ``force``), written line by line.
- Without ``force`` the final rename never replaces a file that appeared meanwhile (hard link, then
  unlink the temporary), so a file the user had is never lost.
- Devices and pipes (``/dev/null``, ``/dev/full``, a FIFO) are written to as they are; an output is never
  one of the command's inputs (same inode), even with ``force``.

Every OS error becomes an :class:`~edgesqz.errors.EdgesqzError` that names the file and says what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

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


def read_capped(f: IO[bytes], limit: int) -> bytes | None:
    """The whole content of an open file, or None when it holds more than ``limit`` bytes.

    A regular file is measured first (a 2 GB file is refused without reading it); anything else (a
    pipe) is read in chunks up to ``limit + 1`` bytes. Never reserves ``limit`` bytes up front, as
    ``f.read(limit + 1)`` does.
    """
    try:
        info = os.fstat(f.fileno())
    except (OSError, AttributeError, ValueError):
        info = None
    if info is not None and stat.S_ISREG(info.st_mode) and info.st_size > limit:
        return None
    chunks, total = [], 0
    while total <= limit:
        chunk = f.read(min(1 << 24, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return None if total > limit else b"".join(chunks)


def file_kind(mode: int) -> str:
    """What a file is, from its ``st_mode``: "a regular file", "a FIFO (named pipe)", "a character device"..."""
    for test, text in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return text
    return "not a regular file"


def read_regular(path: str | os.PathLike[str], limit: int, what: str = "file") -> bytes | None:
    """The whole content of the regular file ``path`` (or a symlink to one), or None when it is over ``limit``.

    Anything else (a FIFO, which would block the open or the read forever; ``/dev/zero``, which never
    ends; a folder) is refused before a byte is read: stat first (nothing with side effects is even
    opened), then the opened descriptor is checked again (``O_NONBLOCK``: a FIFO swapped in meanwhile
    cannot hang the open), and the size is taken from that stat, so no more than it is ever read.
    Errors are :class:`EdgesqzError` naming ``what`` and ``path``.
    """
    def refuse(mode: int) -> EdgesqzError:
        return EdgesqzError(f"{what} {path} is {file_kind(mode)}, not a regular file; give a file")

    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise refuse(info.st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise EdgesqzError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise refuse(info.st_mode)
        if info.st_size > limit:
            return None
        chunks, total = [], 0
        while total < info.st_size:
            chunk = os.read(fd, min(1 << 24, info.st_size - total))
            if not chunk:
                break  # the file shrank meanwhile: what is there is all there is
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise EdgesqzError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def is_special(path: str | os.PathLike[str]) -> bool:
    """An existing character device, FIFO or socket (``/dev/null``, ``/dev/stdout``, a named pipe): written to
    as it is, never replaced."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _same_file(a: Path, b: Path) -> bool:
    """Same inode (hard links, symlinks, ``./x`` vs ``x``), or the same path once resolved."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_output(path: str | os.PathLike[str], *, force: bool = False, what: str = "output",
                 suffixes: Iterable[str] | None = None, option: str = "-o",
                 inputs: Iterable[tuple[str, str | os.PathLike[str] | None]] = (), create_parents: bool = True,
                 special_ok: bool = True) -> Path:
    """Check that ``path`` may be written (see the module docstring); returns it as a Path.

    ``suffixes``: allowed file name endings (lower case, with the dot). ``what`` names the file in
    messages (``"--record"``), ``option`` is how the user chooses another one. ``inputs``: ``(what,
    path)`` of files the command reads; the output may not be one of them, even with ``force``.
    ``create_parents``: make a missing folder (else it is an error). ``special_ok``: an existing device
    or pipe (``/dev/null``, a FIFO) may be written to as it is (else: only regular files).
    """
    path = Path(path).expanduser()
    if suffixes is not None:
        allowed = tuple(suffixes)
        if not path.name.lower().endswith(allowed):
            raise EdgesqzError(f"{what} {path} must end in {' or '.join(allowed)}")
    for role, other in inputs:
        if other is not None and _same_file(path, Path(other).expanduser()):
            raise EdgesqzError(f"{what} {path} is the same file as {role} {other}, which this command reads; "
                               f"choose another {option}")
    if path.is_dir():
        raise EdgesqzError(f"{what} {path} is a folder; give a file name")
    if is_special(path):
        if not special_ok:
            raise EdgesqzError(f"{what} {path} is not a regular file; choose a file name for {option}")
        if not os.access(path, os.W_OK):
            raise EdgesqzError(f"cannot write to {path}: permission denied; choose another {option}")
        return path
    if (path.exists() or path.is_symlink()) and not force:
        raise EdgesqzError(f"{what} {path} already exists; pass --force to replace it or choose another {option}")
    parent = path.parent
    if not parent.is_dir():
        if not create_parents:
            why = "is not a folder" if parent.exists() else "does not exist"
            raise EdgesqzError(f"{what} {path}: the folder {parent} {why}; create it or choose another {option}")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(parent, exc, "create folder") from exc
    try:  # really try: access() says yes to root on a read-only file system
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise os_error(parent, exc, "write to") from exc
    os.close(fd)
    os.unlink(probe)
    return path


def check_distinct(outputs: Iterable[tuple[str, str | os.PathLike[str] | None]]) -> None:
    """Refuse two outputs of one command that are the same file (``-o x --record x``)."""
    given = [(what, Path(p).expanduser()) for what, p in outputs if p is not None]
    for i, (what_a, a) in enumerate(given):
        for what_b, b in given[i + 1:]:
            if _same_file(a, b):
                raise EdgesqzError(f"{what_a} and {what_b} are the same file {a}; give each its own file")


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


class PendingFile:
    """A temporary file beside ``path`` that becomes ``path`` on :meth:`commit` (fsync, then rename; no
    replacing unless ``force``) or disappears on :meth:`discard`. Keeps ``path``'s suffix, so writers that
    choose a format by suffix (video encoders) still work. For writers that hold the file open across
    threads; :func:`atomic_file` is the context-manager form.
    """

    def __init__(self, path: str | os.PathLike[str], *, force: bool = True) -> None:
        self.path = Path(path)
        self.force = force
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".part{self.path.suffix}",
                                       dir=self.path.parent)
        except OSError as exc:
            raise os_error(self.path, exc) from exc
        try:  # mkstemp makes it 0600; the file should get the usual permissions, as open() would give it
            os.fchmod(fd, 0o666 & ~_umask())
        finally:
            os.close(fd)
        self.tmp = Path(tmp)

    def commit(self) -> None:
        try:
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
            _publish(str(self.tmp), self.path, self.force)
        except OSError as exc:
            self.discard()
            raise os_error(self.path, exc) from exc
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it is fsynced and renamed to ``path``.

    On any exception (or KeyboardInterrupt) the temporary file is removed and ``path`` is untouched.
    The temporary name keeps ``path``'s suffix, so writers that choose a format by suffix still work.
    """
    pending = PendingFile(path, force=force)
    try:
        yield pending.tmp
        pending.commit()
    finally:
        pending.discard()


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, force: bool = True) -> None:
    """Write ``data`` (str is UTF-8) to ``path`` whole, or not at all. A device or pipe is written directly."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if is_special(path):
        try:
            with open(path, "wb") as f:
                f.write(payload)
        except OSError as exc:
            raise os_error(path, exc) from exc
        return
    with atomic_file(path, force=force) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(payload)
                f.flush()
        except OSError as exc:
            raise os_error(path, exc) from exc


def open_stream(path: str | os.PathLike[str], *, force: bool = False) -> IO[str]:
    """A text file for output that grows while the command runs (JSON lines that people ``tail -f``).

    A device or pipe is opened as it is. Otherwise the file is created new: without ``force`` it must
    not exist (checked atomically, O_EXCL); with ``force`` an existing file is replaced by a new, empty
    one at once (a rename, so a file linked to it elsewhere is not truncated). Line buffered.
    """
    path = Path(path)
    try:
        if is_special(path):
            return open(path, "w", encoding="utf-8", buffering=1)
        if not force:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        else:
            pending = PendingFile(path, force=True)
            fd = os.open(pending.tmp, os.O_WRONLY)
            os.replace(pending.tmp, path)
        return os.fdopen(fd, "w", encoding="utf-8", buffering=1)
    except FileExistsError as exc:
        raise EdgesqzError(f"{path} appeared meanwhile; pass --force to replace it") from exc
    except OSError as exc:
        raise os_error(path, exc) from exc


def _umask() -> int:
    """The process's umask, read without changing it (other threads may be creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Errors that mean the reader of a stream went away (`| head`, a closed SSH session): not a failure to report.
_READER_GONE = (errno.EPIPE, errno.EIO, errno.ECONNRESET)


def reader_gone(exc: OSError) -> bool:
    """True when writing failed because the other end of stdout/stderr is gone (pipe closed, terminal hung up)."""
    return isinstance(exc, BrokenPipeError) or exc.errno in _READER_GONE


def silence(stream: IO[str]) -> None:
    """Point ``stream``'s file descriptor at /dev/null after it failed, so the flush at exit cannot fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


class OutputError(EdgesqzError):
    """Writing to standard output failed: its reader went away (exit 0, nothing to say) or, e.g., the disk
    under a redirection is full (a one-line error)."""

    def __init__(self, exc: OSError) -> None:
        self.reader_gone = reader_gone(exc)
        super().__init__("standard output was closed" if self.reader_gone else str(os_error("standard output", exc)),
                         exit_code=0 if self.reader_gone else 2)


class GuardedStream:
    """``sys.stdout`` / ``sys.stderr`` for the command line: a failed write becomes :class:`OutputError`
    (stdout; Typer would turn a bare EPIPE into a silent exit 1) or is dropped (stderr: a message to a
    terminal that hung up is nobody's loss). Either way the descriptor then points at /dev/null, so the
    flush at exit cannot fail again. Everything else is the stream's own.
    """

    def __init__(self, stream: IO[str], *, drop_errors: bool = False) -> None:
        self._stream = stream
        self._drop = drop_errors
        self._failed = False

    def _failure(self, exc: OSError) -> None:
        silence(self._stream)
        self._failed = True
        if not self._drop:
            raise OutputError(exc) from None

    def write(self, text: str) -> int:
        if not text:  # Click probes streams with write(b"") and write(""): no failure to report there
            try:
                return self._stream.write(text)
            except OSError:
                return 0
        if self._failed:
            return len(text)
        try:
            return self._stream.write(text)
        except OSError as exc:
            self._failure(exc)
            return len(text)

    def flush(self) -> None:
        if self._failed:
            return
        try:
            self._stream.flush()
        except OSError as exc:
            self._failure(exc)

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)
