"""Is the data pipeline the bottleneck? Training images/s with real loading vs one cached batch.

    python bench/data_pipeline.py [--model resnet20] [--steps 40] [--rounds 3] [--threads N]

Both arms run the same training step (forward, backward, SGD) on the same
model; arm "loader" draws every batch through BatchLoader (index, pad-4 crop,
flip, normalize, channels-last), arm "cached" reuses one batch already in
memory. The arms alternate in rounds so machine noise hits both alike. The
ratio loader/cached is the share of training speed the pipeline keeps.
Writes bench/results/data_pipeline.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from cifarpress.runtime.latency import machine_description
from cifarpress.utils.io import atomic_write_json
from cifarpress.data import BatchLoader, load_split
from cifarpress.models import build_model
from harness import with_provenance  # bench/harness.py: a script's own folder is on sys.path

RESULTS = Path(__file__).parent / "results"


def timed_steps(model, optimizer, batches, steps: int) -> float:
    """Images per second over `steps` training steps drawn from `batches`."""
    criterion = nn.CrossEntropyLoss()
    seen, start = 0, time.perf_counter()
    for _ in range(steps):
        images, labels = next(batches)
        loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(labels)
    return seen / (time.perf_counter() - start)


def endless(loader: BatchLoader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="steps per arm per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default=str(RESULTS / "data_pipeline.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    train = load_split("cifar10", "train", args.data_root)
    load_s = time.perf_counter() - t0
    loader = BatchLoader(train, args.batch_size, train=True, channels_last=True)
    real = endless(loader)
    cached_batch = next(iter(loader))
    cached = iter(lambda: cached_batch, None)

    # Pipeline cost alone, without a model.
    t0 = time.perf_counter()
    for _ in range(50):
        next(real)
    pipeline_ips = 50 * args.batch_size / (time.perf_counter() - t0)

    torch.manual_seed(0)
    model = build_model(args.model).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    timed_steps(model, optimizer, cached, 5)  # warm-up
    arms = {"loader": [], "cached": []}
    for _ in range(args.rounds):
        arms["loader"].append(timed_steps(model, optimizer, real, args.steps))
        arms["cached"].append(timed_steps(model, optimizer, cached, args.steps))
    loader_ips = sum(arms["loader"]) / len(arms["loader"])
    cached_ips = sum(arms["cached"]) / len(arms["cached"])
    result = {
        "model": args.model, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "steps_per_arm_per_round": args.steps, "rounds": args.rounds,
        "train_images_per_s": {"loader": loader_ips, "cached": cached_ips},
        "per_round": arms, "ratio_loader_over_cached": loader_ips / cached_ips,
        "pipeline_only_images_per_s": pipeline_ips, "dataset_load_s": load_s,
        "machine": machine_description(), "torch": torch.__version__,
    }
    atomic_write_json(args.out, with_provenance(result))
    print(json.dumps({k: result[k] for k in ("train_images_per_s", "ratio_loader_over_cached",
                                             "pipeline_only_images_per_s", "threads")}, indent=2))


if __name__ == "__main__":
    main()
