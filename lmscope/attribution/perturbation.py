"""Perturbation attribution: occlusion (leave-one-out by replacement).

For each window of ``window`` consecutive tokens starting at s, replace the tokens' embeddings by
a baseline token's embedding (positions are kept, so nothing shifts) and measure
``f(x) − f(x with the window replaced)`` (Zeiler & Fergus, 2014; Li et al., 2016; contrastive
erasure with a foil, Yin & Neubig, 2022). A token's score is the mean over the windows covering it
(``window=1`` is leave-one-out). All windows run as one batched run of the foundation
(:meth:`Model.run_sets`), not one forward each. Special-token positions (BOS) are not occluded by
default: in models that use BOS as an attention sink that breaks the forward pass, not a feature.

Shapes: values (T,); ``extras["windows"]`` (T − window + 1,) per-window scores.
"""

from __future__ import annotations

import torch

from lmscope.errors import InputError
from lmscope.interventions import Patch
from lmscope.models import Model
from lmscope.attribution.gradient import _inputs, _prepare, _special_mask, make_baseline
from lmscope.attribution.targets import token_result


def occlusion(model: Model, prompt, target, foil=None, *, metric: str = "logit", position: int | None = None,
              window: int = 1, baseline="unk", skip_special: bool = True, chunk_size: int | None = None):
    """Occlusion scores per token (replacement by ``baseline``: a token, "unk"/"pad"/"eos", "zero")."""
    batch, tgt = _prepare(model, prompt, target, foil, metric, position)
    n_tok = batch.input_ids.shape[1]
    if not isinstance(window, int) or not 1 <= window <= n_tok:
        raise InputError(f"window={window!r} must be between 1 and the prompt's {n_tok} tokens.")
    if baseline == "scaled":
        raise InputError("Occlusion replaces tokens; use baseline='unk', 'pad', 'eos', 'zero' or a token.")
    embed, token = _inputs(model, batch)
    base, desc = make_baseline(model, batch, embed, token, baseline)
    special = _special_mask(model, batch) if skip_special else torch.zeros(n_tok, dtype=torch.bool)
    # the baseline keeps special positions already; occluding them is then a no-op, so skip explicitly
    starts = [s for s in range(n_tok - window + 1) if not special[s:s + window].all()]
    if not starts:
        raise InputError("Every window covers only special tokens; nothing to occlude.")
    sets = [[Patch("embed", value=base[None], positions=list(range(s, s + window)))] for s in starts]
    last = tgt.position == n_tok - 1
    # the unpatched prompt rides along as an empty set (with reuse, only its last position is computed)
    out = model.run_sets(batch, [[]] + sets, logits="last" if last else "all", chunk_size=chunk_size)
    f = tgt.score(out.logits[:, 0])
    clean = f[0]
    scores = (clean - f[1:]).cpu()
    windows = torch.full((n_tok - window + 1,), float("nan"))
    windows[torch.tensor(starts)] = scores
    total, count = torch.zeros(n_tok), torch.zeros(n_tok)
    for s, v in zip(starts, scores.tolist()):
        total[s:s + window] += v
        count[s:s + window] += 1
    values = torch.where(count > 0, total / count.clamp(min=1), torch.zeros(n_tok))
    return token_result(model, batch.str_tokens[0], values, "occlusion", tgt,
                        {"metric": tgt.metric, "window": window, "baseline": str(baseline)},
                        {"windows": windows}, {"f": float(clean), "baseline": desc,
                                               "skipped": [i for i in range(n_tok) if count[i] == 0]})
