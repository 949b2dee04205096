"""Run every benchmark (or those named): `python bench/run.py [sites] [batched]`.
Each writes JSON lines to bench/results/<name>.jsonl (or $LMSCOPE_BENCH_OUT)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

BENCHES = {
    "sites": "bench_sites", "batched": "bench_batched", "attribution": "bench_attribution",
    "patching": "bench_patching", "atp": "bench_atp", "lens": "bench_lens", "harvest": "bench_harvest",
    "probe": "bench_probe", "sae": "bench_sae", "circuits": "bench_circuits",
}

if __name__ == "__main__":
    names = sys.argv[1:] or list(BENCHES)
    for name in names:
        if name not in BENCHES:
            sys.exit(f"unknown benchmark {name!r}; choose from {sorted(BENCHES)}")
        print(f"== {name}")
        importlib.import_module(BENCHES[name]).main()
