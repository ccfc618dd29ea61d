"""Ed25519 keys that sign model deployments (``edgesqz keys new``, ``edgesqz deploy --key``, ``run --trust``).

- ``DIR/edgesqz.key``: the private key, PKCS8 PEM without encryption, created with mode 0600 from the
  first byte (``os.open(..., 0o600)`` on a temporary file in the same folder, then a rename): it is never
  readable by others, even briefly. It stays on the machine that deploys.
- ``DIR/edgesqz.pub``: the public key, SubjectPublicKeyInfo PEM; copy it to every device.

Loading refuses, in one line (exit 2): a private key file readable by group or others ("chmod 600
FILE"), a file larger than :data:`MAX_KEY_BYTES`, an empty file, anything that is not an Ed25519 key in
PEM (an RSA key, an encrypted key, garbage). Needs only ``cryptography`` (a device dependency).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any

from edgesqz.errors import EdgesqzError
from edgesqz.fileio import os_error, read_capped

PRIVATE_NAME = "edgesqz.key"
PUBLIC_NAME = "edgesqz.pub"
MAX_KEY_BYTES = 16 << 10  # an Ed25519 PEM is about 120 bytes


def _read_key_file(path: Path, what: str) -> bytes:
    if path.is_dir():
        raise EdgesqzError(f"{what} {path} is a folder; give the key file ({path / PRIVATE_NAME} or "
                           f"{path / PUBLIC_NAME})")
    try:
        with path.open("rb") as f:
            data = read_capped(f, MAX_KEY_BYTES)
    except FileNotFoundError:
        raise EdgesqzError(f"{what} {path} does not exist; make a key pair with `edgesqz keys new DIR`") from None
    except OSError as exc:
        raise os_error(path, exc, "read") from exc
    if data is None:
        raise EdgesqzError(f"{what} {path} is larger than {MAX_KEY_BYTES >> 10} KiB: it is not an Ed25519 key "
                           "from `edgesqz keys new`")
    if not data.strip():
        raise EdgesqzError(f"{what} {path} is empty; make a key pair with `edgesqz keys new DIR`")
    return data


def load_private_key(path: str | os.PathLike[str]) -> Any:
    """The Ed25519 private key in ``path``; refused when group or others may read the file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path).expanduser()
    data = _read_key_file(path, "private key")
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise os_error(path, exc, "read") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise EdgesqzError(f"private key {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
                           f"chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted
        raise EdgesqzError(f"private key {path} is encrypted; edgesqz uses an unencrypted key with mode 0600 "
                           "(`edgesqz keys new DIR`)") from None
    except (ValueError, UnicodeError) as exc:
        raise EdgesqzError(f"private key {path} is not a PEM private key ({_first(exc)}); make one with "
                           "`edgesqz keys new DIR`") from None
    except Exception as exc:  # cryptography's UnsupportedAlgorithm and friends
        raise EdgesqzError(f"private key {path} cannot be loaded ({_first(exc)}); make one with "
                           "`edgesqz keys new DIR`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgesqzError(f"private key {path} is a {_kind(key)} key, not Ed25519; make one with "
                           "`edgesqz keys new DIR`")
    return key


def load_public_key(path: str | os.PathLike[str], what: str = "public key") -> Any:
    """The Ed25519 public key in ``path`` (SubjectPublicKeyInfo PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path).expanduser()
    data = _read_key_file(path, what)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnicodeError) as exc:
        hint = " (that is the private key: give the .pub file)" if b"PRIVATE KEY" in data else ""
        raise EdgesqzError(f"{what} {path} is not a PEM public key{hint} ({_first(exc)}); copy DIR/{PUBLIC_NAME} "
                           "from `edgesqz keys new DIR`") from None
    except Exception as exc:
        raise EdgesqzError(f"{what} {path} cannot be loaded ({_first(exc)}); copy DIR/{PUBLIC_NAME} from "
                           "`edgesqz keys new DIR`") from None
    if not isinstance(key, Ed25519PublicKey):
        raise EdgesqzError(f"{what} {path} is a {_kind(key)} key, not Ed25519; copy DIR/{PUBLIC_NAME} from "
                           "`edgesqz keys new DIR`")
    return key


def public_key_id(public_key: Any) -> str:
    """A short fingerprint: the first 16 hex digits of the SHA-256 of the raw 32-byte public key."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _kind(key: Any) -> str:
    return type(key).__name__.removeprefix("_").replace("PrivateKey", "").replace("PublicKey", "") or "other"


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _write_new(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write ``data`` to a temporary file created with ``mode`` (never wider), then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)  # the umask may only narrow; make it exact
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the file appeared meanwhile
            tmp.unlink()
    except FileExistsError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise EdgesqzError(f"{path} appeared meanwhile; pass --force to replace it") from None
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise os_error(path, exc) from exc


def new_keys(folder: str | os.PathLike[str], *, force: bool = False) -> tuple[Path, Path]:
    """Make ``FOLDER/edgesqz.key`` (0600) and ``FOLDER/edgesqz.pub`` (0644); existing files are kept unless
    ``force``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise EdgesqzError(f"{folder} is a file; keys new takes a folder")
    private, public = folder / PRIVATE_NAME, folder / PUBLIC_NAME
    existing = [p for p in (private, public) if p.exists() or p.is_symlink()]
    if existing and not force:
        raise EdgesqzError(f"{' and '.join(str(p) for p in existing)} already exist{'s' if len(existing) == 1 else ''};"
                           " they are kept (devices trust that key). Pass --force to replace them")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(folder, exc, "create") from exc
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private, pem, 0o600, force)
    _write_new(public, pub, 0o644, force)
    return private, public
