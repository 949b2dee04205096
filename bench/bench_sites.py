"""Benchmark (a): a forward with every site of every layer cached, against the plain HF forward.

Target: time ratio ≤ 1.3. Peak memory is measured in fresh subprocesses (resident-memory growth sampled during the
forward), because CPU tensors have no allocator statistics.
"""

from __future__ import annotations

import subprocess
import sys

import torch

import lmscope
from lmscope.models.checks import all_sites

from common import best_time, record

PROMPT = "When Mary and John went to the store, John gave a drink to Mary because she was thirsty after the long walk."


def _peak(mode: str) -> float:
    """Peak RSS growth (MiB) during one forward, sampled every 0.5 ms in a fresh process."""
    code = f"""
import threading, time, psutil, torch, lmscope
from lmscope.models.checks import all_sites
m = lmscope.load(progress=False, check=False)
b = m.encode({PROMPT!r})
torch.set_grad_enabled(False)
m.forward(m.encode("warm up"))
proc = psutil.Process()
base = proc.memory_info().rss
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.0005)
th = threading.Thread(target=sample)
th.start()
if {mode!r} == "plain":
    out = m.forward(b)
else:
    with m.hooks(cache=all_sites(m)) as session:
        out = m.forward(b)
done.set()
th.join()
print((peak[0] - base) / 2**20)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    model = lmscope.load(progress=False)
    batch = model.encode(PROMPT)
    sites = all_sites(model)
    torch.set_grad_enabled(False)

    def plain():
        model.forward(batch)

    def cached():
        with model.hooks(cache=sites) as session:
            model.forward(batch)
        return session.cache

    n_tensors = len(cached())
    t_plain, t_cached = best_time(plain, 7), best_time(cached, 7)
    mem_plain, mem_cached = _peak("plain"), _peak("cached")
    record("sites_cache_all", tokens=batch.input_ids.shape[1], sites=n_tensors,
           plain_s=round(t_plain, 4), cached_s=round(t_cached, 4), time_ratio=round(t_cached / t_plain, 3),
           plain_peak_mib=round(mem_plain, 1), cached_peak_mib=round(mem_cached, 1),
           mem_ratio=round(mem_cached / max(mem_plain, 1e-9), 2), target="time_ratio <= 1.3")


if __name__ == "__main__":
    main()
