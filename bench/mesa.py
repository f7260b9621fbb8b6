"""Does Mesa cut training memory, at what cost? Plain training and Mesa side by side in one run.

    python bench/mesa.py [--model builtin:resnet56-cifar10] [--batch-size 128] [--epochs 1] [--lr 0.02]
                         [--threads 2] [--data-root DIR] [--rerun ARM,...]

Three training arms fine-tune the same shipped model with the same schedule, seed and data order,
each in its own process (so each one's resident memory is its own) and its own resumable folder
under --work (default runs/bench-mesa/<model>-b<batch>-<epochs>ep/):
- plain:      no hooks on the training steps; its bytes held for backward are measured by the
              same pack hook as Mesa's (compressing nothing) on the first 2 steps of each epoch;
- mesa8:      `mesa: {bits: 8, relu_mask: false}`: every saved activation as 8-bit codes;
- mesa8-mask: `mesa: {bits: 8, relu_mask: true}`: and ReLUs keep 1-bit masks;
- mesa8-release: `mesa: {bits: 8, relu_mask: false, release_memory: true}`: mesa8 with glibc told to hand
              freed buffers back to the OS (utils/memory.release_freed_buffers), so that the resident set
              follows live memory.

What each arm records:
- saved_bytes:   the most bytes one step holds for backward, summed in the pack hook (exact, the
                 same on any device);
- peak_rss_bytes: the training process's peak resident set during the training steps (VmHWM,
                 reset through /proc/self/clear_refs as each epoch starts);
- idle_rss_bytes: its resident set just before training, with the model, the data and the
                 libraries loaded; rss_increase_bytes = peak_rss_bytes - idle_rss_bytes is what
                 training itself costs, the figure the 0.5x goal is about;
- images_per_s:  training images per second (the epochs' train time; evaluation excluded);
- top1:          torch top-1 on the full test set after the schedule.

Then, for plain, mesa8 and mesa8-release, the largest batch (a multiple of 32) whose first --probe-steps
steps stay under a fixed memory cap: plain's peak resident set at --batch-size in the same probe.
Each probe is a process of its own.

Writes bench/results/mesa.json (arms, ratios to plain, the cap and the largest batches, the schedule,
the machine with its CPU flags, provenance). On a CUDA machine (--device cuda) peak_rss is
replaced by peak CUDA memory allocated (torch.cuda.max_memory_allocated).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

from harness import REPO, Arms, machine, write_results  # bench/harness.py

RESULTS = Path(__file__).parent / "results"
ARMS = {"plain": None, "mesa8": {"bits": 8, "relu_mask": False}, "mesa8-mask": {"bits": 8, "relu_mask": True},
        "mesa8-release": {"bits": 8, "relu_mask": False, "release_memory": True}}
CAP_ARMS = ("plain", "mesa8", "mesa8-release")  # the largest batch under plain's peak, for each of these
BATCH_STEP = 32


def plugins_for(arm: str):
    from cifarpress.techniques.mesa.config import MesaConfig
    from cifarpress.techniques.mesa.plugin import Mesa, SavedBytesMeter

    return [SavedBytesMeter()] if ARMS[arm] is None else [Mesa.from_config(MesaConfig(**ARMS[arm]))]


def worker(args) -> None:
    """One arm (or one probe) in this process; prints its record as the last line of stdout."""
    import torch

    from cifarpress.data import load_split
    from cifarpress.model_file import load_model
    from cifarpress.train.trainer import TrainConfig, Trainer
    from cifarpress.utils.memory import rss_bytes

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, _ = load_model(args.model)
    train = load_split("cifar10", "train", args.data_root)
    test = None if args.probe else load_split("cifar10", "test", args.data_root)
    config = TrainConfig(epochs=1 if args.probe else args.epochs, batch_size=args.batch_size, lr=args.lr,
                         schedule="cosine", seed=args.seed,
                         max_steps_per_epoch=args.probe_steps if args.probe else args.max_steps_per_epoch)
    trainer = Trainer(model, config, plugins_for(args.arm), run_dir=None if args.probe else Path(args.folder),
                      device=device, quiet=True)
    if ARMS[args.arm] is not None:  # torch.compile's one-off build of Mesa's kernels, outside the timed steps
        from cifarpress.techniques.mesa.packing import dequantize, quantize

        for shape in ((8, 16, 32, 32), (3, 5, 7, 11)):  # whole dither periods, and a remainder
            dequantize(quantize(torch.randn(shape, device=device), 256))
    gc.collect()
    idle = rss_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)  # the trainer resets the peak
    result = trainer.fit(train, test)
    history = result.history
    peak = max(h["peak_memory_bytes"] for h in history)
    record = {"name": args.arm, "batch_size": args.batch_size, "peak_memory": history[0]["peak_memory"],
              "peak_rss_bytes": peak, "idle_rss_bytes": idle, "rss_increase_bytes": peak - idle,
              "saved_bytes": max(h.get("saved_bytes", 0) for h in history),
              "images_per_s": sum(h["images_per_s"] for h in history) / len(history)}
    if not args.probe:
        record |= {"top1": result.top1, "history": history}
    print(json.dumps(record))


# glibc's default mmap threshold grows with the largest buffer freed, so activation-sized buffers come from
# the heap, whose freed holes stay resident: the peak resident set then counts fragmentation as well as
# live memory. A fixed threshold returns every large buffer to the OS on free (and costs speed in page faults).
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_worker(args, arm: str, batch_size: int, folder: Path | None, probe: bool, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--arm", arm, "--batch-size", str(batch_size),
           "--model", args.model, "--epochs", str(args.epochs), "--lr", str(args.lr), "--seed", str(args.seed),
           "--threads", str(args.threads), "--device", args.device, "--probe-steps", str(args.probe_steps)]
    cmd += ["--probe"] if probe else ["--folder", str(folder)]
    for flag, value in (("--data-root", args.data_root), ("--max-steps-per-epoch", args.max_steps_per_epoch)):
        if value is not None:
            cmd += [flag, str(value)]
    # the repo first, the caller's path kept (packages installed beside the interpreter's, e.g. with --target)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": path, **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{arm} (batch {batch_size}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def largest_batch_under(args, arm: str, cap: int, log) -> tuple[int, list[dict]]:
    """The largest multiple of BATCH_STEP whose probe peaks at or under `cap`: doubling, then bisection."""
    probes: dict[int, dict] = {}

    def fits(batch: int) -> bool:
        if batch not in probes:
            probes[batch] = run_worker(args, arm, batch, None, probe=True)
            log(f"  {arm} batch {batch}: peak {probes[batch]['peak_rss_bytes'] / 2**20:.0f} MiB "
                f"(cap {cap / 2**20:.0f})")
        return probes[batch]["peak_rss_bytes"] <= cap

    low = args.batch_size if fits(args.batch_size) else BATCH_STEP
    high = None
    while high is None:
        if low * 2 > args.max_batch:
            high = args.max_batch + BATCH_STEP  # never probed beyond --max-batch
        elif fits(low * 2):
            low *= 2
        else:
            high = low * 2
    while high - low > BATCH_STEP:
        middle = (low + high) // 2 // BATCH_STEP * BATCH_STEP
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low, [probes[b] for b in sorted(probes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:resnet56-cifar10")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--work", default=None)
    parser.add_argument("--rerun", default="", metavar="ARM,...")
    parser.add_argument("--probe-steps", type=int, default=6, help="steps of each memory-cap probe")
    parser.add_argument("--max-batch", type=int, default=1024, help="largest batch a probe tries")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None, help="smoke tests only")
    parser.add_argument("--out", default=str(RESULTS / "mesa.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from rich.console import Console

    console = Console(width=140)
    name = args.model.split(":")[-1].removesuffix(".pt").replace("/", "_")
    work = Path(args.work) if args.work else REPO / "runs" / "bench-mesa" / f"{name}-b{args.batch_size}-{args.epochs}ep"
    arms = Arms(work, {a for a in args.rerun.split(",") if a}, log=console.print)
    records = {}
    for arm in ARMS:
        console.rule(f"[bold]{arm}")
        records[arm] = arms.run(arm, lambda folder, arm=arm: run_worker(args, arm, args.batch_size, folder, False))
        r = records[arm]
        console.print(f"{arm}: top-1 {r['top1']:.2f}%  held for backward {r['saved_bytes'] / 2**20:.1f} MiB  "
                      f"peak {r['peak_rss_bytes'] / 2**20:.0f} MiB (+{r['rss_increase_bytes'] / 2**20:.0f} over idle)  "
                      f"{r['images_per_s']:.0f} img/s")
    plain = records["plain"]
    for r in records.values():
        r["saved_bytes_ratio"] = r["saved_bytes"] / plain["saved_bytes"]
        r["rss_increase_ratio"] = r["rss_increase_bytes"] / plain["rss_increase_bytes"]
        r["step_time_ratio"] = plain["images_per_s"] / r["images_per_s"]
        r["top1_delta_pp"] = r["top1"] - plain["top1"]

    console.rule("[bold]largest batch under plain's peak")
    cap_probe = run_worker(args, "plain", args.batch_size, None, probe=True)
    cap = cap_probe["peak_rss_bytes"]
    largest = {}
    for arm in CAP_ARMS:
        batch, probes = largest_batch_under(args, arm, cap, console.print)
        largest[arm] = {"batch_size": batch, "probes": probes}
    console.rule("[bold]live memory: the same arms' first steps with a fixed mmap threshold")
    live = {}
    for arm in [a for a in ARMS if not (ARMS[a] or {}).get("release_memory")]:  # that arm releases already
        live[arm] = run_worker(args, arm, args.batch_size, None, probe=True, env=LIVE_MEMORY_ENV)
        console.print(f"  {arm}: +{live[arm]['rss_increase_bytes'] / 2**20:.0f} MiB over idle")
    for r in live.values():
        r["rss_increase_ratio"] = r["rss_increase_bytes"] / live["plain"]["rss_increase_bytes"]
    result = {
        "model": args.model, "dataset": "cifar10", "device": args.device,
        "schedule": {"epochs": args.epochs, "lr": args.lr, "schedule": "cosine", "batch_size": args.batch_size,
                     "seed": args.seed, "threads": args.threads, "from": f"{args.model} (fine-tuning)",
                     "max_steps_per_epoch": args.max_steps_per_epoch},
        "definitions": {
            "saved_bytes": "most bytes one training step holds for backward, summed in the saved-tensor pack hook",
            "peak_rss_bytes": "VmHWM during the training steps (reset via /proc/self/clear_refs each epoch); "
                              "on CUDA, torch.cuda.max_memory_allocated",
            "idle_rss_bytes": "VmRSS just before training (model, data and libraries loaded)",
            "rss_increase_bytes": "peak_rss_bytes - idle_rss_bytes",
            "step_time_ratio": "plain images/s over the arm's",
            "memory_cap": f"plain's peak in a {args.probe_steps}-step probe at batch {args.batch_size}",
            "live_memory_probes": "the arms' first probe steps again under MALLOC_MMAP_THRESHOLD_=131072, so that "
                                  "freed buffers leave the resident set and the peak counts live memory",
        },
        "arms": list(records.values()),
        "memory_cap_bytes": cap, "largest_batch_under_cap": largest,
        "live_memory_probes": {"env": LIVE_MEMORY_ENV, "steps": args.probe_steps, "arms": live},
        "machine": machine(),
    }
    write_results(args.out, result)
    for r in records.values():
        console.print(f"{r['name']:11s} top-1 {r['top1']:.2f} ({r['top1_delta_pp']:+.2f} pp)  "
                      f"held {r['saved_bytes_ratio']:.3f}x  rss increase {r['rss_increase_ratio']:.3f}x  "
                      f"step time {r['step_time_ratio']:.2f}x")
    console.print("live memory (fixed mmap threshold): " + ", ".join(
        f"{a} {r['rss_increase_ratio']:.3f}x" for a, r in live.items()))
    console.print(f"largest batch under {cap / 2**20:.0f} MiB: " + ", ".join(
        f"{a} {largest[a]['batch_size']}" for a in CAP_ARMS) + f"; wrote {args.out}")


if __name__ == "__main__":
    main()
