"""Tuned lens: equals the logit lens at initialisation, its evaluation matches an independent KL/CE
computation, save/load round-trips and refuses other models, torchrun DDP with 2 processes gives the
one-process weights, and on the real model a CI-sized training run beats the logit lens at every layer."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lmscope.cli.main import app
from lmscope.data import Corpus, token_contexts
from lmscope.decoding import lens_top, logit_lens
from lmscope.decoding.lens_fit import fit_lens_least_squares
from lmscope.decoding.tuned_lens import (TunedLens, TunedLensConfig, _kl_backward, evaluate_lens, parse_layers,
                                         train_tuned_lens, tuned_lens)
from lmscope.errors import InputError

from conftest import WORDS, free_port, make_tiny

PROMPT = "when Mary and John went to the store John gave a drink to"


def _corpus(n: int = 300, seed: int = 0) -> Corpus:
    g = torch.Generator().manual_seed(seed)
    return Corpus("words", tuple(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g).tolist())
                                 for _ in range(n)))


def test_untrained_lens_is_exactly_the_logit_lens(tiny):
    lens = TunedLens.for_model(tiny)
    a, b = lens_top(tuned_lens(tiny, PROMPT, lens, "Mary", k=4)), lens_top(logit_lens(tiny, PROMPT, "Mary", k=4))
    assert torch.equal(a.values, b.values) and torch.equal(a.extras["target_prob"], b.extras["target_prob"])
    assert a.meta["top_tokens"] == b.meta["top_tokens"] and a.axes[0].labels == b.axes[0].labels
    ctx = token_contexts(tiny, _corpus(), context=12, split="heldout")[:3]
    ev = evaluate_lens(tiny, lens, contexts=ctx)
    assert torch.equal(ev.values[:, 0], ev.values[:, 1]) and torch.equal(ev.values[:, 2], ev.values[:, 3])


def test_evaluation_matches_an_independent_computation(tiny_llama):
    """KL and CE per layer from HF's own hidden states, final norm and head (no lmscope hooks)."""
    m = tiny_llama
    ctx = token_contexts(m, _corpus(), context=10, split="train")[:4]
    lens = TunedLens.for_model(m)
    with torch.no_grad():
        for t in lens.translators:  # a non-trivial lens
            t.weight.normal_(0, 0.05)
            t.bias.normal_(0, 0.05)
        ev = evaluate_lens(m, lens, contexts=ctx, batch_contexts=3)
        out = m.hf(ctx, output_hidden_states=True)
        final = out.logits[:, 1:].log_softmax(-1)
        nxt = ctx[:, 2:]
        for i, h in enumerate(out.hidden_states[:-1]):  # HF's last entry is already normed
            for col, x in ((0, h), (1, h + lens.translators[i](h))):
                logp = m.hf.lm_head(m.hf.model.norm(x))[:, 1:].log_softmax(-1)
                kl = F.kl_div(logp, final, log_target=True, reduction="sum") / final[..., 0].numel()
                ce = F.nll_loss(logp[:, :-1].reshape(-1, logp.shape[-1]), nxt.reshape(-1))
                assert abs(float(kl) - float(ev.values[i, col])) < 1e-4 * max(1.0, float(kl))
                assert abs(float(ce) - float(ev.values[i, col + 2])) < 1e-4 * max(1.0, float(ce))
    assert float(ev.values[-1, 0]) < 1e-5 and abs(float(ev.values[-1, 2]) - ev.meta["ce_model"]) < 1e-4


def test_training_lowers_kl_saves_loads_and_refuses_other_models(tiny_llama, tmp_path):
    m = tiny_llama
    corpus = _corpus()
    cfg = TunedLensConfig(tokens=16 * 8 * 12, context=16, batch_contexts=8, lr=3e-2)
    lens = train_tuned_lens(m, corpus, cfg, progress=False)
    held = token_contexts(m, corpus, 16, "heldout")
    ev = evaluate_lens(m, lens, contexts=held)
    assert (ev.values[:-1, 1] < ev.values[:-1, 0]).all(), ev.values
    assert lens.info["steps"] == 12 and lens.info["mean_kl_per_step"][-1] < lens.info["mean_kl_per_step"][0]
    lens.save(tmp_path / "lens")
    back = TunedLens.load(tmp_path / "lens", m)
    for a, b in zip(lens.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(evaluate_lens(m, back, contexts=held).values, ev.values)
    other = make_tiny("llama", seed=1)  # same shapes, other weights
    with pytest.raises(InputError, match="trained for 'tiny-llama'"):
        TunedLens.load(tmp_path / "lens", other)
    with pytest.raises(InputError, match="trained for"):
        tuned_lens(make_tiny("gpt2"), PROMPT, back)
    with pytest.raises(InputError, match="no tuned lens"):
        TunedLens.load(tmp_path)


def test_kl_gradient_matches_autograd_and_the_model_stays_frozen(tiny_llama, monkeypatch):
    """The closed-form KL gradient (softmax − p) equals autograd through log_softmax; training runs one model
    forward per step and leaves no gradient on the model's parameters."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(6, 50, generator=g) * 3).requires_grad_()
    target = (torch.randn(6, 50, generator=g) * 2).log_softmax(-1)
    cross = _kl_backward(target.exp(), z * 1.0, 0.25)
    ref = z.detach().clone().requires_grad_()
    kl = F.kl_div(ref.log_softmax(-1), target, log_target=True, reduction="sum")
    (0.25 * kl).backward()
    torch.testing.assert_close(z.grad, ref.grad, rtol=1e-5, atol=1e-7)
    assert abs(cross + float((target.exp() * target).sum()) - float(kl.detach())) < 1e-4
    m = tiny_llama
    calls = []
    real_run = m.run
    monkeypatch.setattr(m, "run", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    lens = train_tuned_lens(m, _corpus(), TunedLensConfig(tokens=16 * 4 * 3, context=16, batch_contexts=4),
                            progress=False)
    assert lens.info["steps"] == len(calls) == 3
    assert all(p.grad is None for p in m.hf.parameters())


def test_layer_selection_and_bad_layers(tiny_llama):
    assert parse_layers(None, 3) == (0, 1, 2)
    assert parse_layers(["embed", "1", -2], 3) == (0, 2)
    with pytest.raises(InputError, match="out of range"):
        parse_layers([5], 3)
    with pytest.raises(InputError, match="last block"):
        parse_layers([2], 3)
    cfg = TunedLensConfig(tokens=16 * 4 * 2, context=16, batch_contexts=4)
    lens = train_tuned_lens(tiny_llama, _corpus(), cfg, layers=["0"], progress=False)
    assert lens.trained == (1,)
    moved = [float(t.weight.detach().abs().sum()) for t in lens.translators]
    assert moved[1] > 0 and moved[0] == moved[2] == 0
    res = CliRunner().invoke(app, ["lens", "train", "--tokens", "64", "--out", "x", "--layers", "0,9",
                                   "--model", "/nonexistent-folder"])
    assert res.exit_code == 2
    with pytest.raises(InputError, match="tokens"):
        TunedLensConfig(tokens=10, context=16, batch_contexts=4)


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _torchrun(args: list[str], logs, timeout: float = 300) -> None:
    """Run ``torchrun --nproc_per_node 2 -m lmscope.cli.main ARGS`` in its own session, output to files.

    Output goes to files, not pipes (nothing can block on a full pipe, and workers that outlive
    torchrun cannot hold a pipe open); on a timeout torchrun and every worker are killed and the
    test fails with the end of the log.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for _attempt in range(3):  # a fresh port if another process took ours between the check and the bind
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "lmscope.cli.main", *args]
        with open(logs, "w") as fh:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_tree(proc.pid)
                proc.wait()
                pytest.fail(f"torchrun did not finish in {timeout} s (killed); its log ends:\n"
                            f"{logs.read_text()[-3000:]}")
        if rc == 0 or "address already in use" not in logs.read_text().lower():
            break
    assert rc == 0, logs.read_text()[-3000:]


def test_ddp_two_processes_equal_one_process(tmp_path):
    model = make_tiny("llama")
    folder = tmp_path / "model"
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    text = tmp_path / "words.txt"
    text.write_text("\n\n".join(_corpus(200, seed=3).documents))
    args = ["lens", "train", "--model", str(folder), "--corpus", str(text), "--tokens", str(16 * 4 * 5),
            "--context", "16", "--batch", "4", "--lr", "0.01", "--seed", "1"]
    _torchrun([*args, "--out", str(tmp_path / "ddp")], tmp_path / "torchrun.log")
    one = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    ddp, single = TunedLens.load(tmp_path / "ddp"), TunedLens.load(tmp_path / "one")
    assert ddp.info["world_size"] == 2 and single.info["world_size"] == 1
    assert ddp.info["steps"] == single.info["steps"] == 5
    for (name, a), b in zip(ddp.state_dict().items(), single.state_dict().values()):
        assert a.abs().max() > 1e-3, name  # trained, not still zero
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.real
def test_tuned_lens_beats_logit_lens_on_smollm(smollm, capsys):
    """CI-sized run (1.5k tokens, 6 steps): held-out KL lower than the logit lens at every layer."""
    held = token_contexts(smollm, "default", context=64, split="heldout", max_tokens=64 * 2)
    cfg = TunedLensConfig(tokens=64 * 4 * 6, context=64, batch_contexts=4)
    lens = train_tuned_lens(smollm, "default", cfg, progress=False)
    ev = evaluate_lens(smollm, lens, contexts=held)
    with capsys.disabled():
        print("\nlayer  KL logit  KL tuned  CE logit  CE tuned")
        for label, row in zip(ev.axes[0].labels, ev.values.tolist()):
            print(f"{label:>5}  " + "  ".join(f"{v:8.3f}" for v in row))
    assert (ev.values[:-1, 1] < ev.values[:-1, 0]).all()
    assert float(ev.values[-1, 0]) == float(ev.values[-1, 1]) < 1e-4  # the last layer is the model itself


@pytest.mark.parametrize("target", ["raw", "normed"])
def test_least_squares_translators_match_lstsq_on_the_same_hidden_states(tiny_llama, target):
    """Streamed second moments give the affine map torch.linalg.lstsq finds on HF's own hidden states (first
    position dropped), for every layer; the lens applies it as h + A h + b."""
    m = tiny_llama
    ctx = token_contexts(m, _corpus(), context=12, split="train")[:40]
    lens = fit_lens_least_squares(m, contexts=ctx, batch_contexts=7, ridge=0.0, target=target, progress=False)
    with torch.no_grad():
        hidden = m.hf(ctx, output_hidden_states=True).hidden_states  # the last entry is already normed
        final = hidden[-1]
        x_last = m.run(ctx, cache=[f"blocks.{m.spec.n_layers - 1}.resid_post"], logits="none")
        y = x_last[f"blocks.{m.spec.n_layers - 1}.resid_post"][:, 1:].reshape(-1, m.spec.d_model).double()
        assert not torch.allclose(final[:, 1:].reshape(-1, m.spec.d_model).double(), y)  # really the pre-norm one
        if target == "normed":
            y = y / y.pow(2).mean(-1, keepdim=True).sqrt()
        for i in range(m.spec.n_layers):
            x = hidden[i][:, 1:].reshape(-1, m.spec.d_model).double()
            design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            sol = torch.linalg.lstsq(design, y, driver="gelsd").solution  # (D + 1, D)
            mine = lens.translate(x.float(), i).double()
            torch.testing.assert_close(mine, design @ sol, rtol=1e-3, atol=2e-3 * float(y.abs().max()))
            t = lens.translators[i]
            torch.testing.assert_close(t.weight.double() + torch.eye(m.spec.d_model, dtype=torch.float64),
                                       sol[:-1].T, rtol=1e-3, atol=1e-3 * float(sol.abs().max()))
    assert lens.info["lstsq"]["tokens"] == 40 * 11
    with pytest.raises(InputError, match="target"):
        fit_lens_least_squares(m, contexts=ctx, target="other", progress=False)


def test_kl_fine_tuning_from_least_squares_keeps_the_init_and_lowers_kl(tiny_llama):
    m = tiny_llama
    corpus = _corpus()
    held = token_contexts(m, corpus, 16, "heldout")
    ls = fit_lens_least_squares(m, corpus, tokens=16 * 8 * 12, context=16, progress=False)
    before = {k: v.clone() for k, v in ls.state_dict().items()}
    cfg = TunedLensConfig(tokens=16 * 8 * 12, context=16, batch_contexts=8, lr=3e-3)
    tuned = train_tuned_lens(m, corpus, cfg, init=ls, progress=False)
    assert all(torch.equal(v, ls.state_dict()[k]) for k, v in before.items())  # the init is copied, not trained
    ev_ls, ev_kl = evaluate_lens(m, ls, contexts=held), evaluate_lens(m, tuned, contexts=held)
    assert (ev_ls.values[:-1, 1] < ev_ls.values[:-1, 0]).all(), ev_ls.values
    assert float(ev_kl.values[:-1, 1].mean()) < float(ev_ls.values[:-1, 1].mean())
    assert tuned.info["lstsq"]["tokens"] == ls.info["lstsq"]["tokens"] and tuned.trained == ls.trained


def test_train_workflow_reports_both_stages(tiny_llama, tmp_path):
    from lmscope.decoding.lens_training import TrainLensConfig, train_lens

    m, corpus = tiny_llama, _corpus()
    both = train_lens(m, corpus, TrainLensConfig(tokens=16 * 4 * 3, out_dir=str(tmp_path / "a"), context=16, batch=4,
                                                 lr=3e-3, lstsq_tokens=16 * 40, eval_tokens=16 * 8))
    ls_only = train_lens(m, corpus, TrainLensConfig(tokens=0, out_dir=str(tmp_path / "b"), context=16, batch=4,
                                                    lstsq_tokens=16 * 40, eval_tokens=16 * 8))
    assert both.meta["lens"]["lstsq"]["tokens"] == ls_only.meta["lens"]["lstsq"]["tokens"] == 40 * 15
    torch.testing.assert_close(both.extras["kl_lstsq"], ls_only.values[:, 1])  # same fit, evaluated alike
    assert not torch.equal(both.values[:, 1], ls_only.values[:, 1])  # the KL stage moved the lens
    back = TunedLens.load(tmp_path / "b", m)
    torch.testing.assert_close(evaluate_lens(m, back, corpus, tokens=16 * 8, context=16).values, ls_only.values)
    with pytest.raises(InputError, match="Nothing to train"):
        TrainLensConfig(tokens=0, out_dir="x", lstsq_tokens=0)


@pytest.mark.real
def test_least_squares_lens_halves_the_logit_lens_kl_on_smollm(smollm):
    """A least-squares lens fitted on 1,024 tokens (forward passes only; seconds): held-out KL at most half the
    logit lens's at every layer from 3 to 27 (the issue's target, met at 16k tokens with ratio <= 0.23), and
    the last block's output is left to the model (the last row is the model itself)."""
    held = token_contexts(smollm, "default", context=64, split="heldout", max_tokens=64)
    lens = fit_lens_least_squares(smollm, "default", tokens=1024, context=64, progress=False)
    assert lens.info["lstsq"]["tokens"] == 16 * 63
    ev = evaluate_lens(smollm, lens, contexts=held)
    kl_logit, kl_ls = ev.values[:, 0], ev.values[:, 1]
    ratio = kl_ls / kl_logit
    print("\nKL ratio least squares / logit lens by layer:", [round(float(r), 3) for r in ratio])
    assert (ratio[4:29] <= 0.5).all(), ratio  # rows: embed, 0, 1, ...: layers 3..27 are rows 4..28
    assert float(kl_ls[-1]) == float(kl_logit[-1]) < 1e-4
