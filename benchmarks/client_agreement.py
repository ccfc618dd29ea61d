"""Top-1 agreement of the standard TFLite clients with ``edgesqz classify`` on the same pixels.

Every photo of ``<shared>/data/imagenet-sample-1000`` is centre-cropped and resized once by
``edgesqz.imaging.preprocess`` (the crop ``edgesqz classify`` makes) and handed, as the same RGB
array, to ``edgesqz.device.classifier.Classifier`` and to MediaPipe Tasks and the TFLite Task Library
(in their own venvs, ``scripts/clients.sh``; through ``tests/clients/classify_with.py``). Reports
per model and client: images, top-1 index agreement, label agreement, the largest difference between
the client's top-1 score and edgesqz's probability of that class, and the range of the score sums.

Usage (from the repository root)::

    python benchmarks/client_agreement.py --shared ../shared MODEL.tflite [MODEL.tflite ...] \\
        [--standard-from CLASS_MAP.tflite] [--json benchmarks/results/client_agreement.json]

``--standard-from`` builds the standard model from an int8 class-map model with
``converters.standard_head.add_probability_head`` first and measures it too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "clients" / "classify_with.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="*")
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--standard-from", type=Path, help="an int8 class-map model to add the standard head to")
    parser.add_argument("--every", type=int, default=1, help="use every N-th photo")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "client_agreement.json")
    args = parser.parse_args()

    from edgesqz.device.classifier import Classifier
    from edgesqz.imaging import preprocess, read_image

    work = Path(tempfile.mkdtemp(prefix="edgesqz-clients-"))
    models = list(args.models)
    if args.standard_from:
        from edgesqz.converters.standard_head import add_probability_head

        standard = work / f"{args.standard_from.stem}-standard.tflite"
        standard.write_bytes(add_probability_head(args.standard_from.read_bytes()))
        models.insert(0, standard)
    files = sorted((args.shared / "data" / "imagenet-sample-1000").iterdir())[:: args.every]
    arrays = []
    for f in files:
        path = work / f"{f.stem}.npy"
        np.save(path, preprocess(read_image(f), 224))
        arrays.append(path)
    results: dict[str, Any] = {}
    for model in models:
        clf = Classifier(model, threads=2)
        ours = np.stack([clf.infer(clf.spec.to_tensor(np.load(p))).scores for p in arrays])
        assert clf.labels is not None
        results[model.name] = {"output_kind": clf.output_kind}
        for client in ("mediapipe", "tasklib"):
            python = ROOT / f".venv-{client}" / "bin" / "python"
            start = time.time()
            proc = subprocess.run([str(python), str(RUNNER), client, str(model), *map(str, arrays)],
                                  capture_output=True, text=True)
            lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0:
                results[model.name][client] = {"error": lines[0].get("error") if lines else proc.stderr[-300:]}
                print(f"{model.name} {client}: refused: {results[model.name][client]['error'][:160]}")
                continue
            idx = np.array([line["top"]["index"] for line in lines])
            same = idx == ours.argmax(1)
            # edgesqz's score of the client's top-1 within 1e-5 of its own top-1: an exact tie of the int8 map
            ties = ~same & (ours[np.arange(len(idx)), idx] >= ours.max(1) * (1 - 1e-5))
            labels_ok = [line["top"]["label"] == clf.labels[line["top"]["index"]] for line in lines]
            score_diff = max(abs(line["top"]["score"] - float(s[line["top"]["index"]]))
                             for line, s in zip(lines, ours, strict=True))
            sums = [line["scores"]["sum"] for line in lines]
            results[model.name][client] = {
                "images": len(lines), "top1_same": int(same.sum()), "top1_differs_on_a_tie": int(ties.sum()),
                "labels_same": int(sum(labels_ok)),
                "max_top1_score_difference": round(score_diff, 6), "score_sum_range": [min(sums), max(sums)],
                "differing": [files[i].name for i in np.flatnonzero(~same)], "seconds": round(time.time() - start, 1)}
            print(f"{model.name} {client}: top-1 same {same.sum()}/{len(lines)} ({ties.sum()} of the others "
                  f"tied within 1e-5 in edgesqz's scores), labels same "
                  f"{sum(labels_ok)}/{len(lines)}, max |score - edgesqz| {score_diff:.2e}, "
                  f"score sums {min(sums):.4f}..{max(sums):.4f}", flush=True)
    out = {"benchmark": "client_agreement", "date": time.strftime("%Y-%m-%d"),
           "command": "python benchmarks/client_agreement.py " + " ".join(sys.argv[1:]),
           "photos": len(files), "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
