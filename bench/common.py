"""Shared bench helpers: interleaved repeated timing, checks against a reference, one record schema.

* :func:`interleaved` times every side of a comparison in rounds (A, B, C, A, B, C, ...; at least
  3 rounds) and reports each side's median with its min–max. Interleaving spreads a busy machine's
  slow spells over all sides instead of one.
* :func:`check` compares lmscope's output with its reference (a peer library, a plain PyTorch
  loop, or a closed form) and fails when the largest difference exceeds the tolerance stated at
  the call, with the reason for its value. A failed check is recorded and printed; ``bench/run.py``
  (and each bench run as a script, through :func:`finish`) exits non-zero after every bench has
  written what it measured.
* :func:`record` appends one JSON line to ``results/<name>.jsonl``: the figures, ``work`` (side ->
  one line on what that side computes, so a speed-up that comes from doing less work says so),
  ``checks``, the machine and its load average (1, 5, 15 min; a figure taken under load is slow
  and noisy, and the line says so).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(os.environ.get("LMSCOPE_BENCH_OUT", Path(__file__).parent / "results"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))  # fewer than 3 only to try a bench out; the line says so

_FAILED: list[str] = []


@dataclass(frozen=True)
class Measured:
    """A side's own measurement of its time, for sides that leave work out of the clock (e.g. evaluation
    between training chunks); :func:`interleaved` uses ``seconds`` instead of the wall-clock time."""

    seconds: float
    value: object = None


@dataclass(frozen=True)
class Timing:
    """The times (s) of one side over the rounds."""

    runs: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def figures(self, digits: int = 3) -> dict:
        return {"median_s": round(self.median, digits), "min_s": round(min(self.runs), digits),
                "max_s": round(max(self.runs), digits), "runs": len(self.runs)}

    def text(self) -> str:
        return f"{self.median:.3g} s ({min(self.runs):.3g}–{max(self.runs):.3g})"


def interleaved(sides: dict[str, Callable[[], object]], rounds: int | None = None,
                warmup: bool | Iterable[str] = True) -> tuple[dict[str, Timing], dict[str, object]]:
    """Time each side in ``rounds`` interleaved rounds; returns ({side: Timing}, {side: its last output}).

    ``warmup`` runs every side (True) or the named ones once untimed first (lazy initialisation,
    allocator growth); leave it off for sides that take minutes, whose first steps warm up anyway.
    A side that returns :class:`Measured` reports its own time.
    """
    rounds = ROUNDS if rounds is None else rounds
    warm = list(sides) if warmup is True else [] if warmup is False else list(warmup)
    outputs: dict[str, object] = {}
    for name in warm:
        outputs[name] = _value(sides[name]())
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            out = fn()
            elapsed = time.perf_counter() - t0
            times[name].append(out.seconds if isinstance(out, Measured) else elapsed)
            outputs[name] = _value(out)
    return {name: Timing(tuple(t)) for name, t in times.items()}, outputs


def _value(out):
    return out.value if isinstance(out, Measured) else out


def ratio(slow: Timing, fast: Timing) -> float:
    """Ratio of the medians, rounded (how many times faster ``fast`` is)."""
    return round(slow.median / fast.median, 2)


def check(name: str, got, reference, *, atol: float, why: str, rtol: float = 0.0) -> dict:
    """lmscope's output against its reference: passes when max|got − reference| ≤ atol + rtol · max|reference|.

    ``why`` says why the tolerance has its value (what rounding or approximation it allows). Shapes
    must match and every value must be finite.
    """
    got_t = torch.as_tensor(got, dtype=torch.float64).detach().cpu()
    ref_t = torch.as_tensor(reference, dtype=torch.float64).detach().cpu()
    row = {"check": name, "atol": atol, "rtol": rtol, "why": why}
    if got_t.shape != ref_t.shape:
        row.update(ok=False, error=f"shape {tuple(got_t.shape)} against reference {tuple(ref_t.shape)}")
    else:
        diff = float((got_t - ref_t).abs().max()) if got_t.numel() else 0.0
        bound = atol + rtol * (float(ref_t.abs().max()) if ref_t.numel() else 0.0)
        row.update(max_abs_diff=diff, tolerance=bound, ok=math.isfinite(diff) and diff <= bound)
    if not row["ok"]:
        print(f"CHECK FAILED {name}: {_failure(row)}")
    return row


def _failure(row: dict) -> str:
    return row.get("error") or f"max abs diff {row['max_abs_diff']:.3g} > tolerance {row['tolerance']:.3g}"


def record(name: str, *, work: dict[str, str], checks: list[dict] = (), timings: dict[str, Timing] | None = None,
           **figures) -> dict:
    """Append one benchmark record to results/<name>.jsonl and print it; failed checks are remembered."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    checks = list(checks)
    import lmscope

    row = {"bench": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "lmscope": _provenance(lmscope.__file__),
           "machine": platform.machine(),
           "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "loadavg": [round(x, 2) for x in os.getloadavg()], "rounds": ROUNDS, "work": work}
    if timings:
        row["timings"] = {side: t.figures() for side, t in timings.items()}
    row.update(figures)
    row["checks"] = checks
    row["ok"] = all(c["ok"] for c in checks)
    for c in checks:
        if not c["ok"]:
            _FAILED.append(f"{name}: {c['check']}: {_failure(c)}")
    with open(RESULTS / f"{name}.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1), flush=True)
    return row


def _provenance(init_file: str) -> str:
    """Where the benched lmscope came from: its checkout folder and commit (``+`` when it has local changes)."""
    root = Path(init_file).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty=+"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{root} {commit}".strip()


def failures() -> list[str]:
    """Checks that failed in this process so far (bench: check, difference)."""
    return list(_FAILED)


def finish() -> None:
    """Exit non-zero when a check failed (for a bench run as a script)."""
    if _FAILED:
        raise SystemExit("failed checks:\n  " + "\n  ".join(_FAILED))
