"""Activation patching on the real default model and a 50-prompt IOI dataset: where the information
sits (name positions early, the final position late), and sweep cells against unbatched runs."""

from __future__ import annotations

import pytest
import torch

from lmscope import Patch
from lmscope.localization.patching import activation_patching, prepare
from lmscope.localization.tasks import ioi


@pytest.fixture(scope="module")
def ioi50(smollm):
    return ioi(smollm, 50, seed=0)


def test_ioi_residual_sweep_moves_from_names_to_end(smollm, ioi50):
    setup = prepare(smollm, ioi50)
    assert setup.clean_value > 2.0 and setup.corrupt_value < 0  # the model does IOI; ABC removes it
    pos = ioi50.positions[0]
    names = sorted({pos["IO"], pos["S1"], pos["S2"]})
    end = pos["END"]
    assert all(p["END"] == end and sorted({p["IO"], p["S1"], p["S2"]}) == names for p in ioi50.positions)
    # the sweep itself on a 16-prompt subset of the 50 (CI cost), a layer subset and the differing positions
    sub = ioi50.subset(range(16))
    setup = prepare(smollm, sub)
    layers = [0, 10, 20, 29]
    res = activation_patching(smollm, sub, "resid_pre", layers=layers, positions=[*names, end], setup=setup)
    v = res.values  # (layer, [names..., END]), normalised: 1 = clean restored
    # early: the effect lives at the name positions, none at END yet (its token is the same in both runs)
    assert int(v[0].abs().argmax()) < len(names) and float(v[0].abs().max()) > 0.3 and abs(float(v[0, -1])) < 0.02
    # late: everything has moved to the final position
    assert int(v[-1].abs().argmax()) == len(names) and float(v[-1, -1]) > 0.7
    assert float(v[-1, :-1].abs().max()) < 0.15
    # spot-check cells against single unbatched patched forwards
    cache = smollm.run(setup.clean, cache=[f"blocks.{l}.resid_pre" for l in (10, 20)]).cache
    for li, layer in ((1, 10), (2, 20)):
        for pi, p in ((1, names[1]), (3, end)):
            nm = f"blocks.{layer}.resid_pre"
            lg = smollm.run(setup.corrupt, interventions=[Patch(nm, value=cache[nm], positions=[p])],
                            logits="last").logits
            ref = setup.normalise(setup.metric(lg), "denoise")
            assert float(v[li, pi]) == pytest.approx(float(ref), abs=2e-3)


def test_real_head_patching_spot_check(smollm, ioi50):
    pairs = ioi50.subset(range(8))
    setup = prepare(smollm, pairs)
    res = activation_patching(smollm, pairs, "z", layers=[27], heads=[0, 4], normalise=False, setup=setup)
    nm = "blocks.27.attn.z"
    cache = smollm.run(setup.clean, cache=[nm]).cache
    for i, h in enumerate((0, 4)):
        lg = smollm.run(setup.corrupt, interventions=[Patch(nm, value=cache[nm], heads=[h])], logits="last").logits
        assert float(res.values[0, i]) == pytest.approx(float(setup.metric(lg)), abs=1e-3)
    assert torch.isfinite(res.values).all()
