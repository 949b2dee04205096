"""The clamping testbed: the few-shot sampler, each clamp fixes what it says inside a training forward (the
clamped activation equals the clamp value and the parameters behind it get no gradient), checkpoints load
as lmscope models, and a short run shows the ln 2 plateau and the drop."""

from __future__ import annotations

import math

import pytest
import torch

import lmscope
from lmscope.errors import InputError
from lmscope.models import named_parameters, save_model
from lmscope.training import (ClampConfig, Conditions, FewShotTask, interventions, match_pattern, new_testbed,
                              preserved_ablation, prev_token_pattern, train_clamped)
from lmscope.training.clamping import as_batch, label_logits

TASK = FewShotTask(classes=12, labels=5, heldout_classes=4, feature_dim=32, seed=0)


@pytest.fixture(scope="module")
def model():
    return new_testbed(TASK, seed=0)


def _batch(n=16, split="train", seed=0):
    return TASK.sample(n, torch.Generator().manual_seed(seed), split)


def test_sampler_is_bursty_with_relabelled_pairs():
    b = _batch(200)
    ids, tgt = b["ids"], b["target"]
    rows = torch.arange(200)
    assert ids.shape == (200, 5)
    assert torch.equal(ids[rows, b["correct"]], tgt) and torch.equal(ids[:, 1:4:2].sort(1).values,
                                                                     ids[:, 1:4:2].sort(1).values)
    assert torch.equal(ids[rows, b["correct"] - 1], ids[:, 4])  # the query's exemplar sits before its label
    assert (ids[rows, b["other"] - 1] != ids[:, 4]).all()
    train_pairs = {tuple(sorted(p)) for p in ids[:, [1, 3]].tolist()}
    held = {tuple(sorted(p)) for p in _batch(200, "heldout_labels")["ids"][:, [1, 3]].tolist()}
    assert train_pairs <= set(TASK.label_pairs("train")) and held <= set(TASK.label_pairs("heldout_labels"))
    assert len(TASK.label_pairs("train")) == 8 and len(TASK.label_pairs("heldout_labels")) == 2
    assert not train_pairs & held
    first_new = TASK.exemplar_id(torch.tensor(TASK.classes), torch.tensor(0))
    assert (_batch(50, "new_classes")["ids"][:, 4] >= first_new).all()
    assert (tgt < TASK.labels).all() and len(set(tgt.tolist())) == TASK.labels


def _train_forward(model, cond, batch, cache=()):
    """One training forward (as train_clamped does it) with gradients; the label loss and the run."""
    for p in named_parameters(model).values():
        p.grad = None
    with torch.enable_grad():
        ivs = interventions(model, cond, batch)
        logits, out = label_logits(model, batch, ivs, TASK, cache=cache)
        torch.nn.functional.cross_entropy(logits, batch["target"]).backward()
    return logits, out


def _head_grad(model, layer, proj, head):
    """|grad| of one head's rows (q/k/v) or columns (o) of a projection."""
    w = named_parameters(model)[f"model.layers.{layer}.self_attn.{proj}_proj.weight"]
    dh = model.spec.d_head
    g = w.grad if w.grad is not None else torch.zeros_like(w)
    return (g[:, head * dh:(head + 1) * dh] if proj == "o" else g[head * dh:(head + 1) * dh]).abs().sum().item()


def test_prev_token_clamp_fixes_the_pattern_and_stops_its_qk_gradient(model):
    cond = Conditions(clamps=("prev_token",), pt_head="0.2")
    _, out = _train_forward(model, cond, _batch(), cache=["blocks.0.attn.pattern", "blocks.0.attn.v",
                                                          "blocks.0.attn.z"])
    pat = out["blocks.0.attn.pattern"]
    assert torch.equal(pat[:, 2], prev_token_pattern(5).expand(16, 5, 5))
    # the head's output is the clamp applied to its values (an independent product, not the cached pattern)
    torch.testing.assert_close(out["blocks.0.attn.z"][:, :, 2], prev_token_pattern(5) @ out["blocks.0.attn.v"][:, :, 2])
    assert _head_grad(model, 0, "q", 2) == 0 and _head_grad(model, 0, "k", 2) == 0
    assert _head_grad(model, 0, "v", 2) > 0 and _head_grad(model, 0, "q", 1) > 0


def test_match_clamp_fixes_the_query_row_only(model):
    cond = Conditions(clamps=("match",), ih_head="1.3", strength=0.9)
    b = _batch()
    _, out = _train_forward(model, cond, b, cache=["blocks.1.attn.pattern"])
    pat = out["blocks.1.attn.pattern"][:, 3]
    torch.testing.assert_close(pat[:, 4], match_pattern(b, 5, 0.9)[:, 0, 4])
    assert torch.allclose(pat[:, :4].sum(-1), torch.ones(16, 4)) and not torch.equal(pat[:, :4], torch.zeros(16, 4, 5))
    # the loss reads only the query position of the last layer, whose row is clamped: no gradient to its QK
    assert _head_grad(model, 1, "q", 3) == 0 and _head_grad(model, 1, "k", 3) == 0
    assert _head_grad(model, 1, "v", 3) > 0 and _head_grad(model, 1, "q", 0) > 0


def test_copy_clamp_puts_the_heads_scores_on_the_labels(model):
    cond = Conditions(clamps=("copy",), ih_head="1.3")
    b = _batch()
    logits, out = _train_forward(model, cond, b, cache=["blocks.1.attn.q", "blocks.1.attn.k"])
    q, k = out["blocks.1.attn.q"][:, 4, 3], out["blocks.1.attn.k"][:, :, 3]  # (B, dh), (B, T, dh)
    scores = torch.einsum("bd,btd->bt", q, k) / math.sqrt(model.spec.d_head)
    rows = torch.arange(16)
    torch.testing.assert_close(logits[rows, b["target"]], scores[rows, b["correct"]])
    other = b["ids"][rows, b["other"]]
    torch.testing.assert_close(logits[rows, other], scores[rows, b["other"]])
    assert ((logits > -1e8).sum(-1) == 2).all()
    for proj in ("v", "o"):
        assert _head_grad(model, 1, proj, 3) == 0
    assert named_parameters(model)["lm_head.weight"].grad is None or \
        named_parameters(model)["lm_head.weight"].grad.abs().sum() == 0
    assert _head_grad(model, 1, "q", 3) > 0 and _head_grad(model, 1, "q", 2) == 0


def test_layer1_clamp_silences_layer0_and_shifts_layer1_queries_and_keys(model):
    cond = Conditions(clamps=("layer1",))
    b = _batch()
    ids = b["ids"]
    logits, out = _train_forward(model, cond, b, cache=["blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.resid_pre"])
    hf = model.hf
    emb = model.W_E[ids].detach()
    torch.testing.assert_close(out["blocks.1.resid_pre"], emb)  # layer 0 writes nothing
    shifted = torch.cat([emb[:, :1], emb[:, :3], emb[:, 4:]], dim=1)
    attn = hf.model.layers[1].self_attn
    x = hf.model.layers[1].input_layernorm(shifted)
    cos, sin = hf.model.rope(torch.arange(5)[None].expand(16, 5), x.dtype)
    for name, proj in (("q", attn.q_proj), ("k", attn.k_proj)):
        v = proj(x).view(16, 5, 8, 8)
        rot = torch.cat([-v[..., 4:], v[..., :4]], dim=-1)
        want = v * cos[:, :, None] + rot * sin[:, :, None]
        torch.testing.assert_close(out[f"blocks.1.attn.{name}"], want.detach(), atol=1e-5, rtol=1e-5)
    for proj in "qkvo":
        assert all(_head_grad(model, 0, proj, h) == 0 for h in range(8))
    assert _head_grad(model, 1, "q", 0) > 0


def test_head_ablation_and_preserved_ablation(model):
    cond = Conditions(ablate=("1.0", "1.5"))
    _, out = _train_forward(model, cond, _batch(), cache=["blocks.1.attn.z"])
    assert out["blocks.1.attn.z"][:, :, [0, 5]].abs().max() == 0
    assert all(_head_grad(model, 1, p, h) == 0 for p in "qkvo" for h in (0, 5)) and _head_grad(model, 1, "v", 1) > 0
    # preserving layer 1's patterns keeps them at the unablated run's values
    b = _batch()
    keep = Conditions(ablate=tuple(f"0.{h}" for h in range(8)), preserve="patterns")
    with torch.no_grad():
        clean = model.run(as_batch(b["ids"]), cache=["blocks.1.attn.pattern"])["blocks.1.attn.pattern"]
        got = model.run(as_batch(b["ids"]), interventions=interventions(model, keep, b),
                        cache=["blocks.1.attn.pattern"])["blocks.1.attn.pattern"]
    torch.testing.assert_close(got, clean)
    acc = preserved_ablation(model, TASK, b)
    assert set(acc) == {"intact", "ablated", "ablated_preserved"}


def test_config_validation():
    with pytest.raises(InputError, match="unknown"):
        ClampConfig(clamps=("magic",))
    with pytest.raises(InputError, match="LAYER.HEAD"):
        ClampConfig(single_head="three")
    assert len(ClampConfig(single_head="1.3").conditions().ablate) == 7


def test_short_run_shows_the_plateau_and_the_drop_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path / "cache"))
    cfg = ClampConfig(steps=SHORT_STEPS, lr=SHORT_LR, classes=SHORT_CLASSES, eval_every=SHORT_EVERY, eval_batch=128,
                      seed=0, out_dir=str(tmp_path / "m"))
    model, res = train_clamped(cfg, progress=False)
    loss = res.sel(series="loss").values.tolist()
    ln2 = math.log(2)
    steps = [int(s) for s in res.axes[1].labels]
    speed = res.meta["speed_step"]
    assert loss[0] > 1.4  # near ln 5: any of the 5 labels
    # the plateau: before the drop, evaluations sit near ln 2 (the two labels in context), far from ln 5 and 0
    plateau = [s for s, v in zip(steps, loss) if 0 < s and (speed is None or s < speed) and 0.6 < v < 1.1]
    assert len(plateau) >= 2, loss
    # the drop: the loss falls below 0.4·ln 2 and stays low; a layer-2 head's induction strength rises with it
    assert speed is not None and speed > plateau[-1] and max(loss[-3:]) < 0.4 * ln2, loss
    strength = torch.stack([res.sel(series=f"strength.H{h}").values for h in range(8)])
    assert strength[:, -1].max() > 0.4 and strength[:, 0].abs().max() < 0.1
    loaded = lmscope.load(res.meta["model_dir"], progress=False)
    b = TASK.sample(8, torch.Generator().manual_seed(1))  # any ids of the same vocabulary layout
    ids = b["ids"].clamp(max=loaded.spec.d_vocab - 3)
    torch.testing.assert_close(loaded.run(ids).logits, model.run(ids).logits, atol=0, rtol=0)
    save_model(model, tmp_path / "again")


# the fast CI schedule: 4 classes, lr 3e-3 (measured: loss ≈ 0.96 at steps 20-40, below 0.4·ln 2 from step 120)
SHORT_STEPS, SHORT_LR, SHORT_CLASSES, SHORT_EVERY = 200, 3e-3, 4, 20


def test_cli_run_and_plot(tmp_path):
    from typer.testing import CliRunner

    from lmscope.cli.main import app
    from lmscope.results import Result

    j = tmp_path / "a.json"
    res = CliRunner().invoke(app, ["clamp", "run", "--steps", "4", "--classes", "6", "--eval-every", "2",
                                   "--clamp", "match", "--json", str(j), "--png", str(tmp_path / "a.png"),
                                   "--html", str(tmp_path / "a.html")])
    assert res.exit_code == 0, res.output
    r = Result.load(j)
    assert r.axes[1].labels == ("0", "2", "4") and r.meta["condition"] == "match"
    assert (tmp_path / "a.png").stat().st_size > 0 and "<svg" in (tmp_path / "a.html").read_text()
    res = CliRunner().invoke(app, ["clamp", "plot", str(j), str(j), "--png", str(tmp_path / "b.png")])
    assert res.exit_code == 0 and (tmp_path / "b.png").stat().st_size > 0, res.output
    bad = CliRunner().invoke(app, ["clamp", "run", "--clamp", "magic"])
    assert bad.exit_code == 2 and "unknown" in bad.output
