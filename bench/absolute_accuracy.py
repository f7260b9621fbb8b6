"""Absolute top-1 of every kept ONNX file on the official test images 0-999 and on all 10,000.

    python bench/absolute_accuracy.py [FILES...] [--threads 2] [--out bench/results/absolute_accuracy.json]
                                      [--jpeg-test DIR]

Needs the setup's data build (build_cifar10.py --test mixed: images 0-999 are the official pixels,
1000-9999 the JPEG copy; $CIFARPRESS_DATA). Images 0-999 are the honest absolute figure (standard error
about 1 pp at 90%); all 10,000 the comparison between files, which every file sees alike. Quantized files
get the graph's own math beside this CPU's kernels. Without FILES: every *.onnx in bench/results.
--jpeg-test DIR (a build_cifar10.py DIR --test jpeg) adds each file's top-1 on the JPEG copies of the same
images 0-999: the gap between the two is what the JPEG test images cost a model (large for models trained
on the official pixels, which never saw JPEG artefacts).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cifarpress.runtime.ort import is_quantized_graph, onnx_predictions
from cifarpress.runtime.latency import machine_description
from cifarpress.utils.io import atomic_write_json
from cifarpress.data import describe_split, load_split
from harness import command_line, with_provenance  # bench/harness.py: a script's own folder is on sys.path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "absolute_accuracy.json")
    parser.add_argument("--jpeg-test", help="data root of a --test jpeg build: also score the JPEG copies of 0-999")
    args = parser.parse_args()
    test = load_split("cifar10", "test")
    official = test.official_prefix
    if not 0 < official < len(test):
        sys.exit(f"the test set is {describe_split(test)}; build it with build_cifar10.py --test mixed")
    labels = test.labels.numpy()
    jpeg = load_split("cifar10", "test", args.jpeg_test) if args.jpeg_test else None
    if jpeg is not None and not (jpeg.labels[:official] == test.labels[:official]).all():
        sys.exit(f"{args.jpeg_test} does not hold the same test images in the same order")
    rows = []
    for path in args.files or sorted(RESULTS.glob("*.onnx")):
        row = {"file": str(path)}
        for name, exact in (("", False), ("graph_", True)) if is_quantized_graph(path) else (("", False),):
            correct = onnx_predictions(path, test.images, args.threads, exact=exact) == labels
            p = float(correct[:official].mean())
            row[f"{name}top1_all"] = 100 * float(correct.mean())
            row[f"{name}top1_official_0_{official - 1}"] = 100 * p
            row[f"{name}standard_error_pp"] = 100 * (p * (1 - p) / official) ** 0.5
            if jpeg is not None:
                on_jpeg = onnx_predictions(path, jpeg.images[:official], args.threads, exact=exact) == labels[:official]
                row[f"{name}top1_jpeg_copies_0_{official - 1}"] = 100 * float(on_jpeg.mean())
        rows.append(row)
        print(f"{path.name}: official 0-{official - 1} {row[f'top1_official_0_{official - 1}']:.1f}% "
              f"(±{row['standard_error_pp']:.1f}), all {row['top1_all']:.2f}%", flush=True)
    atomic_write_json(args.out, with_provenance({"command": command_line(), "test_set": describe_split(test),
                                                 "jpeg_test_set": describe_split(jpeg) if jpeg is not None else None,
                                                 "machine": machine_description(), "files": rows}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
