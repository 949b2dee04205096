"""The bench helpers (bench/common.py): checks that fail, the wrong-reference switch, interleaved rounds and
the README summary. The benches themselves run with `python bench/run.py [--quick]`, not in the suite."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench" / "common.py"


def fresh_common(monkeypatch, tmp_path, **env):
    """bench/common.py imported anew (it reads its settings at import), writing into tmp_path."""
    for key in ("BENCH_QUICK", "BENCH_WRONG_REFERENCE", "BENCH_ROUNDS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LMSCOPE_BENCH_OUT", str(tmp_path))
    spec = importlib.util.spec_from_file_location(f"bench_common_{len(env)}_{id(tmp_path)}", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)   # dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


def test_check_passes_within_tolerance_and_fails_beyond(monkeypatch, tmp_path):
    common = fresh_common(monkeypatch, tmp_path)
    ref = torch.tensor([1.0, -2.0, 3.0])
    assert common.check("close", ref + 5e-4, ref, atol=1e-3, why="test")["ok"]
    assert not common.check("far", ref + 2e-3, ref, atol=1e-3, why="test")["ok"]
    assert common.check("relative", ref * (1 + 1e-4), ref, atol=0, rtol=2e-4, why="test")["ok"]
    assert not common.check("shape", ref[:2], ref, atol=1, why="test")["ok"]
    assert not common.check("nan", torch.tensor([float("nan")]), torch.tensor([0.0]), atol=1, why="test")["ok"]
    common.record("demo", work={"a": "x"}, checks=[common.check("far", ref + 1, ref, atol=1e-3, why="test")])
    assert common.failures() == ["demo: far: max abs diff 1 > tolerance 0.001"]
    with pytest.raises(SystemExit):
        common.finish()


def test_wrong_reference_fails_every_check(monkeypatch, tmp_path):
    common = fresh_common(monkeypatch, tmp_path, BENCH_WRONG_REFERENCE="1")
    ref = torch.tensor([0.5, 2.0])
    for atol, rtol in ((1e-3, 0.0), (0.0, 1e-5), (1e-6, 1e-4), (0.0, 0.0)):
        row = common.check("exact", ref.clone(), ref, atol=atol, rtol=rtol, why="test")
        assert not row["ok"] and row["wrong_reference"]


def test_quick_setting_and_rounds(monkeypatch, tmp_path):
    full = fresh_common(monkeypatch, tmp_path)
    assert full.quick(100, 3) == 100 and full.ROUNDS == 3 and not full.QUICK
    small = fresh_common(monkeypatch, tmp_path, BENCH_QUICK="1")
    assert small.quick(100, 3) == 3 and small.ROUNDS == 1
    calls = []
    times, out = full.interleaved({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2},
                                  warmup=False)
    assert calls == ["a", "b"] * 3 and out == {"a": 1, "b": 2} and len(times["a"].runs) == 3


def test_summary_lists_each_side_with_median_range_and_work(monkeypatch, tmp_path):
    common = fresh_common(monkeypatch, tmp_path)
    timings = {"lmscope": common.Timing((2.0, 1.0, 3.0)), "peer": common.Timing((5.0, 4.0, 9.0))}
    common.record("toy", work={"lmscope": "last logits only", "peer": "all | logits"}, timings=timings,
                  checks=[common.check("same", 1.0, 1.0, atol=0, why="test")], notes={"peer": "8 steps"},
                  speedup=2.5, table=[1, 2])
    text = common.summary_markdown()
    assert "| toy | lmscope | 2 (1–3) |  | last logits only |" in text
    assert "| toy | peer | 5 (4–9) | 8 steps | all \\| logits |" in text
    assert "| toy | speedup 2.5 | same: ok |" in text and "table" not in text
    assert (tmp_path / "toy.jsonl").read_text().count("\n") == 1
