"""The load-time check runs once per model fingerprint: a second load of the same folder skips it,
and any change (weights, files, a failed check) makes the next load check again."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import make_tiny, tiny_tokenizer

import lmscope
from lmscope.errors import ModelCheckError
from lmscope.models import checks


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "model"
    make_tiny("llama").hf.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture
def calls(monkeypatch):
    """Counts the real check's runs."""
    seen = []
    real = checks.check_model

    def counting(model):
        seen.append(model.name)
        real(model)

    monkeypatch.setattr(checks, "check_model", counting)
    return seen


def test_second_load_skips_the_check(folder, calls, tmp_path):
    first = lmscope.load(str(folder), progress=False)
    assert first.load_check == "checked" and len(calls) == 1
    records = list((tmp_path / "cache" / checks.CHECKS_FOLDER).glob("*.json"))
    assert len(records) == 1 and records[0].stem == checks.fingerprint(first)
    second = lmscope.load(str(folder), progress=False)
    assert second.load_check == "cached" and len(calls) == 1
    torch.testing.assert_close(second.run("the cat sat").logits, first.run("the cat sat").logits, atol=0, rtol=0)
    third = lmscope.load(str(folder), progress=False, check=False)
    assert third.load_check == "skipped" and len(calls) == 1


def test_changed_weights_or_files_check_again(folder, calls):
    model = lmscope.load(str(folder), progress=False)
    key = checks.fingerprint(model)
    with torch.no_grad():
        model.hf.lm_head.weight.mul_(1.5)
    assert checks.fingerprint(model) != key  # changed weights in memory change the fingerprint
    model.hf.save_pretrained(folder)
    again = lmscope.load(str(folder), progress=False)
    assert again.load_check == "checked" and len(calls) == 2
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, a touched file
    assert lmscope.load(str(folder), progress=False).load_check == "checked" and len(calls) == 3
    assert lmscope.load(str(folder), progress=False).load_check == "cached" and len(calls) == 3


def test_fingerprint_covers_dtype_and_versions(folder, monkeypatch):
    model = lmscope.load(str(folder), progress=False, check=False)
    key = checks.fingerprint(model)
    assert checks.fingerprint(lmscope.load(str(folder), progress=False, check=False)) == key
    assert checks.fingerprint(lmscope.load(str(folder), dtype="bfloat16", progress=False, check=False)) != key
    monkeypatch.setattr(checks.transformers, "__version__", "0.0.0")
    assert checks.fingerprint(model) != key


def test_a_failed_check_records_nothing(folder, monkeypatch, tmp_path):
    def broken(model):
        raise ModelCheckError("broken on purpose")

    monkeypatch.setattr(checks, "check_model", broken)
    with pytest.raises(ModelCheckError, match="on purpose"):
        lmscope.load(str(folder), progress=False)
    assert not list((tmp_path / "cache").rglob("*.json"))
    monkeypatch.undo()
    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path / "cache"))
    assert lmscope.load(str(folder), progress=False).load_check == "checked"


def test_models_built_in_memory_are_always_checked(calls):
    assert make_tiny("llama").load_check == "checked" and make_tiny("llama").load_check == "checked"
    assert len(calls) == 2
