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
  and noisy, and the line says so). :func:`summary_markdown` turns this run's records into the
  tables ``bench/run.py`` writes to ``results/SUMMARY.md`` (for the README).
* ``BENCH_QUICK=1`` (``bench/run.py --quick``) shrinks every bench to a tiny setting (:func:`quick`) and
  one round, to see that it runs end to end; its figures mean nothing. ``BENCH_WRONG_REFERENCE=1``
  shifts every reference in :func:`check` beyond its tolerance, to see that each bench then fails.
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
QUICK = os.environ.get("BENCH_QUICK", "") == "1"
WRONG_REFERENCE = os.environ.get("BENCH_WRONG_REFERENCE", "") == "1"
# fewer than 3 only to try a bench out (the quick setting); the line says so
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "1" if QUICK else "3"))

_FAILED: list[str] = []
_RECORDS: list[dict] = []


def quick(full, small):
    """``small`` under BENCH_QUICK=1 (a tiny setting that only shows the bench runs), else ``full``."""
    return small if QUICK else full


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
    if WRONG_REFERENCE:  # a deliberately wrong reference: ten tolerances off, so the check must fail
        ref_t = ref_t + 10 * (atol + rtol * (float(ref_t.abs().max()) if ref_t.numel() else 0.0)) + 1e-3
        row["wrong_reference"] = True
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
           notes: dict[str, str] | None = None, **figures) -> dict:
    """Append one benchmark record to results/<name>.jsonl and print it; failed checks are remembered.

    ``notes`` (side -> a few words, e.g. the steps a side took to reach a target) go into the summary table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    checks = list(checks)
    import lmscope

    row = {"bench": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "lmscope": _provenance(lmscope.__file__),
           "machine": platform.machine(),
           "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "loadavg": [round(x, 2) for x in os.getloadavg()], "rounds": ROUNDS, "quick": QUICK, "work": work}
    if timings:
        row["timings"] = {side: t.figures() for side, t in timings.items()}
    if notes:
        row["notes"] = notes
    row.update(figures)
    row["checks"] = checks
    row["ok"] = all(c["ok"] for c in checks)
    for c in checks:
        if not c["ok"]:
            _FAILED.append(f"{name}: {c['check']}: {_failure(c)}")
    _RECORDS.append(row)
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


# figures of a record shown in the summary besides the timings: scalars only (lists and tables stay in the JSON)
_SKIPPED = {"bench", "time", "lmscope", "machine", "cpus", "torch", "threads", "loadavg", "rounds", "quick", "work",
            "timings", "notes", "checks", "ok"}


def summary_markdown(records: list[dict] | None = None) -> str:
    """This run's records as Markdown for the README: one table of every timed side (median and min–max over
    the interleaved rounds, and the work that side does), then each record's other scalar figures and checks."""
    records = _RECORDS if records is None else records
    if not records:
        return "No benchmark records.\n"
    first = records[0]
    rounds = sorted({r["rounds"] for r in records})
    lines = [f"Benchmarks of lmscope ({first['lmscope']}), torch {first['torch']}, {first['cpus']} CPUs, "
             f"{first['threads']} threads; load average at each record in the JSON lines. Times: median "
             f"(min–max) of {'/'.join(map(str, rounds))} interleaved rounds."]
    if any(r.get("quick") for r in records):
        lines.append("**QUICK SETTING (BENCH_QUICK=1): tiny sizes, one round; these figures mean nothing.**")
    if any(c.get("wrong_reference") for r in records for c in r["checks"]):
        lines.append("**BENCH_WRONG_REFERENCE=1: every reference was shifted on purpose; every check must fail.**")
    lines += ["", "| bench | side | time, s: median (min–max) | note | work |", "|---|---|---|---|---|"]
    for r in records:
        for side, t in (r.get("timings") or {}).items():
            note = (r.get("notes") or {}).get(side, "")
            lines.append(f"| {r['bench']} | {side} | {t['median_s']:.3g} ({t['min_s']:.3g}–{t['max_s']:.3g}) | "
                         f"{_cell(note)} | {_cell(r['work'].get(side, ''))} |")
    lines += ["", "| bench | figures | checks |", "|---|---|---|"]
    for r in records:
        figures = ", ".join(f"{k} {v}" for k, v in r.items() if k not in _SKIPPED and isinstance(v, (int, float, str)))
        checks = "; ".join(f"{c['check']}: {'ok' if c['ok'] else 'FAILED'}" for c in r["checks"]) or "none"
        lines.append(f"| {r['bench']} | {_cell(figures)} | {_cell(checks)} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
