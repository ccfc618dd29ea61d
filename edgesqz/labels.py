"""Class labels: names in output order, plus optional ids (ImageNet wnids).

Accepted files: ``.txt`` (one name per line, optionally ``id<TAB>name``), a ``.json`` list of
names, or Keras' ``imagenet_class_index.json`` form ``{"0": ["n01440764", "tench"], ...}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgesqz.errors import EdgesqzError
from edgesqz.fileio import read_capped

MAX_LABELS_BYTES = 8 << 20  # as the labels embedded in a model


@dataclass(frozen=True)
class Labels:
    names: tuple[str, ...]
    ids: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def numbered(cls, count: int) -> Labels:
        return cls(tuple(f"class_{i}" for i in range(count)))

    def index(self) -> dict[str, int]:
        """Map from every id and name (as given and lower-cased) to its class index."""
        table: dict[str, int] = {}
        for i, name in enumerate(self.names):
            table.setdefault(name, i)
            table.setdefault(name.lower(), i)
        for i, ident in enumerate(self.ids or ()):
            table[ident] = i
        return table


def load_labels(path: str | Path) -> Labels:
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = read_capped(f, MAX_LABELS_BYTES)
    except FileNotFoundError as exc:
        raise EdgesqzError(f"labels file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise EdgesqzError(f"labels file {path} is a folder; pass the file") from exc
    except OSError as exc:
        raise EdgesqzError(f"cannot read labels file {path}: {exc.strerror or exc}") from exc
    if data is None:
        raise EdgesqzError(f"labels file {path} is larger than {MAX_LABELS_BYTES >> 20} MB; is it a labels file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EdgesqzError(f"labels file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at position "
                           f"{exc.start}); save it as UTF-8") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EdgesqzError(f"labels file {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        except RecursionError:
            raise EdgesqzError(f"labels file {path} is not a list of labels (nested too deeply)") from None
        if isinstance(data, list) and all(isinstance(x, str) for x in data):
            labels = Labels(tuple(data))
        elif isinstance(data, dict) and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(s, str) for s in v) for v in data.values()
        ):
            try:
                order = sorted(data, key=int)
            except ValueError as exc:
                raise EdgesqzError(f"labels file {path}: keys must be class indices 0..N-1") from exc
            if [int(k) for k in order] != list(range(len(order))):
                raise EdgesqzError(f"labels file {path}: class indices must run 0..{len(order) - 1} without gaps")
            labels = Labels(tuple(data[k][1] for k in order), tuple(data[k][0] for k in order))
        else:
            raise EdgesqzError(
                f"labels file {path}: expected a JSON list of names or {{\"0\": [id, name], ...}}"
            )
    else:
        lines = [line.rstrip("\r") for line in text.split("\n")]
        while lines and not lines[-1].strip():
            lines.pop()
        if all("\t" in line for line in lines) and lines:
            pairs = [line.split("\t", 1) for line in lines]
            labels = Labels(tuple(p[1] for p in pairs), tuple(p[0] for p in pairs))
        else:
            labels = Labels(tuple(lines))
    if len(labels) == 0:
        raise EdgesqzError(f"labels file {path} holds no labels")
    return labels
