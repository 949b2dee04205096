"""Shared bench helpers: timing (best of repeats), peak memory in a fresh process, JSON-lines output."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(os.environ.get("LMSCOPE_BENCH_OUT", Path(__file__).parent / "results"))


def best_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved_best(fns: dict, repeats: int = 3) -> dict:
    """Best time of each function, timed in alternating rounds (fairer than back-to-back on a busy machine)."""
    times = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - t0)
    return times


def record(name: str, **figures) -> dict:
    """Append one benchmark record to results/<name>.jsonl and print it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    row = {"bench": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.machine(),
           "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(), **figures}
    with open(RESULTS / f"{name}.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))
    return row
