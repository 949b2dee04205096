"""Self-trained small LMs (lmscope.models.trained) on tiny recipes: training lowers the loss and is
deterministic; a registered name trains at first use, is cached like a converted GGUF, loads as a
checked Model, and the next load reads the cache without training."""

from __future__ import annotations

import pytest
import torch

import lmscope
from lmscope.models import loading, trained
from lmscope.models.trained import TrainedModel, facts, train_small_lm

from conftest import WORDS


def _corpus(n: int = 80) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (30,), generator=g).tolist()) for _ in range(n)]


def _tiny(arch: str, steps: int = 24) -> TrainedModel:
    return TrainedModel(f"tiny-{arch}-lm", "a test recipe", arch, d_model=16, n_layers=2, vocab_size=300, d_state=4,
                        d_mlp=32, n_heads=2, n_facts=8, steps=steps, batch=8, context=24, lr=1e-2)


def test_facts_are_fixed_and_distinct():
    a, b = facts(40), facts(40)
    assert a == b and len({s for s, _ in a}) == 40
    assert all(c in trained.CITIES for _, c in a)


@pytest.mark.parametrize("arch", ["mamba", "llama", "rwkv"])
def test_training_lowers_the_loss_and_is_deterministic(arch):
    entry = _tiny(arch)
    model, tok, log = train_small_lm(entry, _corpus(), progress=False)
    losses = log["losses"]
    assert len(losses) == entry.steps and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5
    again, _, log2 = train_small_lm(entry, _corpus(), progress=False)
    assert log2["losses"] == losses
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_registered_recipe_trains_once_then_loads_from_the_cache(tmp_path, monkeypatch):
    entry = _tiny("mamba", steps=6)
    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path))
    monkeypatch.setitem(trained.TRAINED, entry.name, entry)
    monkeypatch.setattr(trained, "_corpus_texts", lambda chars: _corpus(40))
    calls = []

    def counted(e, corpus=None, progress=True):
        calls.append(e.name)
        return train_small_lm(e, corpus, progress=False)

    monkeypatch.setattr(loading, "train_small_lm", counted)
    row = next(r for r in loading.list_models() if r["name"] == entry.name)  # `lmscope models` lists it
    assert (row["kind"], row["installed"], row["prepared"]) == ("trained", True, False)
    m = lmscope.load(entry.name, progress=False)
    assert calls == [entry.name] and m.spec.family == "mamba" and m.load_check == "checked"
    row = next(r for r in loading.list_models() if r["name"] == entry.name)
    assert row["prepared"] is True and loading.prepared(entry.name)
    folders = [p for p in tmp_path.iterdir() if p.name.startswith(entry.name)]
    assert len(folders) == 1 and (folders[0] / "lmscope-training.json").is_file()
    again = lmscope.load(entry.name, progress=False)
    assert calls == [entry.name]  # no second training
    ids = m.encode("the cat sat").input_ids
    assert torch.equal(m.run(ids).logits, again.run(ids).logits)


def test_lmscope_models_lists_the_trained_models(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lmscope.cli.main import app

    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path))  # nothing trained or cached there
    res = CliRunner().invoke(app, ["models"], terminal_width=300)
    assert res.exit_code == 0, res.output
    for name in trained.TRAINED:
        line = next(x for x in res.output.splitlines() if name in x)
        assert "trained by" in line and "│ no " in line  # not prepared in an empty cache
