"""Progress of long steps (export checks, calibration, evaluation, benches): a Rich bar on a terminal, and
a plain line every few seconds when the output is a log file or a CI pipe, so no step is silent for long.

    for batch in progress(batches, total=len(batches), what="calibrating"):
        ...

Short steps print nothing at all off a terminal: the first line comes after `every` seconds.
"""
from __future__ import annotations

import os
import time
from typing import Iterable, Iterator, TypeVar

from rich.console import Console

T = TypeVar("T")
console = Console(stderr=True)
EVERY_S = float(os.environ.get("CIFARPRESS_PROGRESS_EVERY", "10"))


def progress(items: Iterable[T], total: int | None = None, what: str = "working", unit: str = "batches",
             every: float | None = None) -> Iterator[T]:
    every = EVERY_S if every is None else every
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)  # type: ignore[arg-type]
    if console.is_terminal and not os.environ.get("CI"):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        with Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task(what, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    start = last = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every:
            last = now
            share = f" ({100 * done / total:.0f}%)" if total else ""
            console.print(f"{what}: {done}{'/' + str(total) if total else ''} {unit}{share}, {now - start:.0f} s",
                          highlight=False, markup=False)
