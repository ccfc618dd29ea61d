"""Rebuild ``edgesqz/data/imagenet1k_labels.txt`` (``wnid<TAB>name``, torchvision's output order).

Sources (both public, permissively licensed; provenance in ``edgesqz/data/README.md``):

- class names: ``_IMAGENET_CATEGORIES`` in ``torchvision/models/_meta.py`` (torchvision, BSD-3-Clause),
  the names torchvision's ImageNet weights report, in output order;
- wnids: ``timm/data/_info/imagenet_synsets.txt`` (timm, Apache-2.0), the 1000 ILSVRC-2012 synsets in
  sorted order, which is torchvision's class order (ImageFolder sorts the class folders).

Usage::

    pip download --no-deps torchvision==0.29.1 timm==1.0.31 -d /tmp/wheels
    python scripts/make_imagenet_labels.py /tmp/wheels/torchvision-*.whl /tmp/wheels/timm-*.whl \\
        [--check ../shared/data/labels/imagenet_class_index.json]

``--check`` compares the result with a Keras-style ``imagenet_class_index.json`` (the wnids must match
exactly, the names may differ only where torchvision disambiguated duplicates). Only the standard
library: the wheels are read as zip files, the names list with ``ast.literal_eval`` (never imported).
"""

from __future__ import annotations

import argparse
import ast
import json
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "edgesqz" / "data" / "imagenet1k_labels.txt"


def torchvision_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read("torchvision/models/_meta.py").decode("utf-8")
    for node in ast.parse(source).body:
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "_IMAGENET_CATEGORIES"):
            names = ast.literal_eval(node.value)
            break
    else:
        raise SystemExit(f"{wheel}: no _IMAGENET_CATEGORIES in torchvision/models/_meta.py")
    return list(names)


def timm_wnids(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read("timm/data/_info/imagenet_synsets.txt").decode("utf-8").split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("torchvision_wheel", type=Path)
    parser.add_argument("timm_wheel", type=Path)
    parser.add_argument("--check", type=Path, help="a Keras-style imagenet_class_index.json to compare with")
    parser.add_argument("-o", "--output", type=Path, default=OUT)
    args = parser.parse_args()

    names, wnids = torchvision_names(args.torchvision_wheel), timm_wnids(args.timm_wheel)
    if len(names) != 1000 or len(wnids) != 1000:
        raise SystemExit(f"expected 1000 names and 1000 wnids, got {len(names)} and {len(wnids)}")
    if wnids != sorted(wnids) or len(set(wnids)) != 1000:
        raise SystemExit("the wnids are not 1000 distinct synsets in sorted order")
    if len(set(names)) != 1000 or any("\t" in n or "\n" in n for n in names):
        raise SystemExit("the names must be distinct and hold no tab or line break")
    if args.check:
        index = json.loads(args.check.read_text())
        ref = [index[str(i)] for i in range(len(index))]
        if [w for w, _ in ref] != wnids:
            raise SystemExit(f"the wnids differ from {args.check}")
        differ = [(i, n, r) for i, (n, (_, r)) in enumerate(zip(names, ref, strict=True))
                  if n != r.replace("_", " ")]
        print(f"wnids equal to {args.check}'s; names that differ beyond '_' vs ' ': {differ}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(f"{w}\t{n}\n" for w, n in zip(wnids, names, strict=True)), encoding="utf-8")
    print(f"wrote {args.output} (1000 lines)")


if __name__ == "__main__":
    main()
