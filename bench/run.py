"""Run every benchmark (or those named): `python bench/run.py [--quick] [sites] [batched] ...`.

Each writes JSON lines to bench/results/<name>.jsonl (or $LMSCOPE_BENCH_OUT), and the run writes
``SUMMARY.md`` there: the Markdown tables for the README (every timed side as median and min–max of the
interleaved rounds, with the work it does; the other figures and the checks). Every bench compares
lmscope's output with a reference; the run goes on through all named benches and then exits non-zero
when a check failed or a bench raised, listing them. BENCH_ROUNDS sets the timing rounds (default 3).
``--quick`` (BENCH_QUICK=1) runs each bench at a tiny size and one round, only to see it runs end to
end; BENCH_WRONG_REFERENCE=1 shifts every reference so that every check must fail.
The lmscope benched is this checkout's (its root goes first on the import path).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bench this checkout's lmscope, not whichever copy is installed (an editable install may point elsewhere)
sys.path[:0] = [str(HERE), str(HERE.parent)]
if "--quick" in sys.argv[1:]:  # before common is imported: it reads the setting once
    os.environ["BENCH_QUICK"] = "1"

import torch  # noqa: E402

import common  # noqa: E402

BENCHES = {
    "sites": "bench_sites", "batched": "bench_batched", "attribution": "bench_attribution",
    "patching": "bench_patching", "atp": "bench_atp", "lens": "bench_lens", "harvest": "bench_harvest",
    "probe": "bench_probe", "sae": "bench_sae", "circuits": "bench_circuits", "app": "bench_app",
    "editing": "bench_editing",
}

if __name__ == "__main__":
    names = [a for a in sys.argv[1:] if a != "--quick"] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHES)}")
    crashed = []
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            with torch.enable_grad():  # a bench may switch gradients off globally; the next one starts afresh
                importlib.import_module(BENCHES[name]).main()
        except Exception:  # noqa: BLE001 - report it, run the other benches, fail at the end
            traceback.print_exc()
            crashed.append(f"{name}: raised (traceback above)")
        print(f"== {name} took {time.perf_counter() - t0:.0f} s", flush=True)
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    summary = common.RESULTS / "SUMMARY.md"
    text = common.summary_markdown()
    if crashed:
        text += "\nBenches that raised: " + ", ".join(c.split(":")[0] for c in crashed) + ".\n"
    summary.write_text(text)
    print(f"wrote {summary}", flush=True)
    problems = crashed + common.failures()
    if problems:
        sys.exit("bench failures:\n  " + "\n  ".join(problems))
