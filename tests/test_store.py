"""The activation store: harvested vectors equal the model's own activations, shards stream back in
shuffled batches, a harvest killed with SIGKILL resumes to the same shards, damage is detected and named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmscope.data import ActivationStore, StoreError, harvest
from lmscope.errors import InputError, SiteError

TESTS = Path(__file__).parent


def _contexts(n: int = 24, t: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 80, (n, t), generator=torch.Generator().manual_seed(seed))


def _reference(model, site, ids, mask=None, keep_first=False):
    """Naive: cache the site with a full forward, flatten heads, keep real positions after the first."""
    mask = torch.ones_like(ids) if mask is None else mask
    rows = []
    for i in range(len(ids)):
        real = mask[i].bool()
        run = model.run(ids[i:i + 1, real], cache=[site], logits="none")
        x = run[site][0].reshape(int(real.sum()), -1)
        rows.append(x if keep_first else x[1:])
    return torch.cat(rows)


@pytest.mark.parametrize("site", ["blocks.1.resid_post", "blocks.2.attn.z", "blocks.0.mlp.post", "embed"])
def test_harvest_equals_model_activations(tiny, tmp_path, site):
    ids = _contexts(6, 9)
    store = harvest(tiny, site, ids, tmp_path / "s", batch_size=4, shard_tokens=20, progress=False)
    ref = _reference(tiny, site, ids)
    got = torch.cat([store.load_shard(i) for i in range(len(store.shards))])
    assert got.shape == ref.shape == (6 * 8, store.d)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert store.site == site and store.model == tiny.name and len(store) == 48


def test_padding_skipped_first_kept_and_n_tokens(tiny_llama, tmp_path):
    ids = _contexts(5, 8, seed=1)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 2:] = 0  # right padding
    store = harvest(tiny_llama, "blocks.1.resid_post", ids, tmp_path / "a", attention_mask=mask, keep_first=True,
                    batch_size=2, shard_tokens=16, progress=False)
    ref = _reference(tiny_llama, "blocks.1.resid_post", ids, mask, keep_first=True)
    got = torch.cat([store.load_shard(i) for i in range(len(store.shards))])
    assert len(store) == int(mask.sum())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    part = harvest(tiny_llama, "blocks.1.resid_post", ids, tmp_path / "b", n_tokens=11, shard_tokens=8, progress=False)
    assert len(part) == 11
    full = _reference(tiny_llama, "blocks.1.resid_post", ids)
    torch.testing.assert_close(torch.cat(list(part.batches(4, shuffle=False))), full[:11], rtol=1e-5, atol=1e-5)


def test_batches_shuffle_cover_everything_once(tiny_llama, tmp_path):
    store = harvest(tiny_llama, "blocks.0.resid_post", _contexts(20, 6), tmp_path / "s", shard_tokens=12,
                    progress=False)
    plain = torch.cat(list(store.batches(7, shuffle=False)))
    shuffled = list(store.batches(7, shuffle=True, seed=3, buffer_shards=2))
    assert all(b.shape == (7, store.d) for b in shuffled[:-1]) and sum(map(len, shuffled)) == len(store) == 100
    mixed = torch.cat(shuffled)
    assert not torch.equal(mixed, plain)
    key = lambda x: x[torch.argsort(x[:, 0])]  # noqa: E731 - same multiset of rows
    torch.testing.assert_close(key(mixed), key(plain), rtol=0, atol=0)
    again = torch.cat(list(store.batches(7, shuffle=True, seed=3, buffer_shards=2)))
    assert torch.equal(again, mixed)
    two = list(store.batches(10, epochs=2, drop_last=True))
    assert len(two) == 20 and not torch.equal(two[0], two[10])


_CHILD = """
import sys, time, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads({threads})
from conftest import make_tiny
import lmscope.data.store as store
real = store._write_atomic
def slow(path, data):
    real(path, data)
    time.sleep(0.15)
store._write_atomic = slow
ids = torch.randint(3, 80, (64, 10), generator=torch.Generator().manual_seed(0))
store.harvest(make_tiny("llama"), "blocks.1.resid_post", ids, {out!r}, batch_size=4, shard_tokens=18,
              progress=False)
"""


def test_resume_after_sigkill_gives_the_same_shards(tiny_llama, tmp_path):
    out = tmp_path / "killed"
    code = _CHILD.format(tests=str(TESTS), threads=torch.get_num_threads(), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            m = out / "manifest.json"
            if m.exists() and len(json.loads(m.read_text())["shards"]) >= 8:
                break
            assert proc.poll() is None, "the harvest subprocess ended early"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and 8 <= len(manifest["shards"]) < 32
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(out)
    ids = _contexts(64, 10)
    resumed = harvest(tiny_llama, "blocks.1.resid_post", ids, out, batch_size=4, shard_tokens=18, progress=False)
    fresh = harvest(tiny_llama, "blocks.1.resid_post", ids, tmp_path / "fresh", batch_size=4, shard_tokens=18,
                    progress=False)
    assert [s["sha256"] for s in resumed.shards] == [s["sha256"] for s in fresh.shards]
    assert len(resumed.shards) == 32 and len(resumed) == 64 * 9
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "fresh").iterdir())
    resumed.verify()


def test_damaged_shards_are_named_and_nothing_is_overwritten(tiny_llama, tmp_path):
    ids = _contexts(12, 8)
    out = tmp_path / "s"
    store = harvest(tiny_llama, "blocks.0.resid_post", ids, out, shard_tokens=20, progress=False)
    shard = out / store.shards[1]["file"]
    good = shard.read_bytes()
    bad = bytearray(good)
    bad[-5] ^= 0xFF
    shard.write_bytes(bytes(bad))
    with pytest.raises(StoreError, match="shard_00001.safetensors.*corrupted"):
        store.verify()
    with pytest.raises(StoreError, match="shard_00001"):
        list(store.batches(4))
    shard.write_bytes(good[: len(good) // 2])
    with pytest.raises(StoreError, match="shard_00001.safetensors.*truncated"):
        ActivationStore(out).verify()
    # a different harvest into the same folder is refused and leaves every file as it was
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(StoreError, match="different harvest.*site"):
        harvest(tiny_llama, "blocks.1.resid_post", ids, out, shard_tokens=20, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not empty"):
        harvest(tiny_llama, "blocks.0.resid_post", ids, tmp_path / "other", progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_harvest_input(tiny_llama, tmp_path):
    ids = _contexts(2, 5)
    with pytest.raises(SiteError, match="out of range"):
        harvest(tiny_llama, "blocks.7.resid_post", ids, tmp_path / "a", progress=False)
    with pytest.raises(InputError, match="not one vector per token"):
        harvest(tiny_llama, "blocks.0.attn.pattern", ids, tmp_path / "b", progress=False)
    with pytest.raises(InputError, match="n_tokens"):
        harvest(tiny_llama, "blocks.0.resid_post", ids, tmp_path / "c", n_tokens=100, progress=False)
    with pytest.raises(InputError, match="vocabulary"):
        harvest(tiny_llama, "blocks.0.resid_post", ids + 1000, tmp_path / "d", progress=False)
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore(tmp_path)
