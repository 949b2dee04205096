"""The other state-space families on tiny random configs, with the load checks Mamba has: every site fires
with its shape, the explicit mixer path gives the native logits, each block's write is out_proj(s ⊙ SiLU(g)),
and the residual decomposition adds up (all in :func:`check_model`, run at load); plus what differs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_tiny
from lmscope.errors import ModelCheckError
from lmscope.models.checks import check_model
from lmscope.sites import KINDS

PROMPT = "the cat sat on the mat and the dog ran to the"


@pytest.fixture(scope="module")
def falcon():
    return make_tiny("falcon_mamba")


def test_falcon_mamba_loads_checked_with_every_ssm_site(falcon):
    assert falcon.spec.family == "falcon_mamba" and falcon.load_check == "checked"
    assert "ssm" in falcon.parts and "mlp" not in falcon.parts and "attention" not in falcon.parts
    sites = [f"blocks.1.{k}" for k in KINDS if KINDS[k].part == "ssm"]
    run = falcon.run(PROMPT, cache=sites)
    t = run.batch.input_ids.shape[1]
    for name in sites:
        assert tuple(run[name].shape) == KINDS[name.split(".", 2)[2]].shape(falcon.spec, 1, t), name
    check_model(falcon)  # again, explicitly


def test_falcon_mamba_norms_are_in_the_explicit_path(falcon, monkeypatch):
    """Without its Δ/B/C norms (plain Mamba's path) the explicit mixer misses the native logits: the check says so."""
    a = falcon.adapter
    plain = dataclasses.replace(a, block=dataclasses.replace(
        a.block, mixer=dataclasses.replace(a.block.mixer, selective_norms=None)))
    monkeypatch.setattr(falcon, "adapter", plain)
    with pytest.raises(ModelCheckError, match="state-space mixer"):
        check_model(falcon)
    monkeypatch.undo()
    # the norms are RMS norms of x_proj's Δ_rank, B and C: B as the scan sees it has unit RMS per token
    mx = falcon.hf.backbone.layers[1].mixer
    u = falcon.run(PROMPT, cache=["blocks.1.ssm.conv"])["blocks.1.ssm.conv"]
    from lmscope.models.ssm import selective

    _, _, b, c = selective(mx, u, a.block.mixer.selective_norms)
    for x in (b, c):
        torch.testing.assert_close(x.pow(2).mean(-1), torch.ones(x.shape[:2]), rtol=1e-3, atol=1e-3)


def test_falcon_mamba_takes_the_toolbox(falcon):
    """Knockout, state steering and ROME's memory work as on Mamba (the same part)."""
    from lmscope import Knockout

    base = falcon.run(PROMPT, cache=["blocks.1.ssm.out"], logits="last")
    ko = falcon.run(PROMPT, interventions=[Knockout(1, from_positions=[-1], to_positions=[0, 1, 2])],
                    cache=["blocks.1.ssm.out"], logits="last")
    assert not torch.allclose(ko.logits, base.logits)
    torch.testing.assert_close(ko["blocks.1.ssm.out"][0, :-1], base["blocks.1.ssm.out"][0, :-1])
    mem = falcon.memory(1)
    assert mem.kind == "ssm" and mem.param is falcon.hf.backbone.layers[1].mixer.out_proj.weight
