"""Component logit lens: what each head and MLP update promotes and suppresses at one position.

Each component's write ``c`` into the residual stream at the position (from
:func:`lmscope.models.decompose`) is projected through the final norm with its scale frozen at the
value of the real final residual (LayerNorm models also centre ``c``; the norm bias is left out)
and through the unembedding: ``Δlogits_c = norm_frozen(c) W_U`` (V,). The largest entries are the
tokens the update promotes, the smallest those it suppresses. Summed over all components plus the
norm bias and unembedding bias, these give the model's own logits exactly; on a soft-capped model
(Gemma 2: logits = c·tanh(z / c)) they give the pre-soft-cap logits z, and with a target
``meta["metric"]`` says so, with the model's value of it and its output value beside it.
Reference: nostalgebraist (2020); Geva et al. (2022); the Primer §4.1.

Shapes: values (component, rank) the top-k logit contributions; ``extras["bottom"]`` (C, k);
``meta["top_tokens"]``/``meta["bottom_tokens"]``; with a target, ``extras["target"]`` (C,).
"""

from __future__ import annotations


from lmscope.errors import InputError
from lmscope.models import Model, decompose
from lmscope.models.adapters import norm_gain
from lmscope.models.decompose import readout_values
from lmscope.results import Axis, Result
from lmscope.attribution.targets import resolve_position, resolve_target


def component_lens(model: Model, prompt: str, *, position: int | None = None, k: int = 10,
                   kinds: tuple[str, ...] = ("head", "mlp"), target=None, foil=None) -> Result:
    """Top and bottom ``k`` tokens of every component's direct logit update at ``position``."""
    if not isinstance(k, int) or k < 1:
        raise InputError(f"k={k!r}: ask for at least one token.")
    bad = set(kinds) - {"embed", "head", "attn_bias", "mlp"}
    if bad:
        raise InputError(f"kinds {sorted(bad)} are unknown; use 'embed', 'head', 'attn_bias', 'mlp'.")
    n_tok = model.encode(prompt).input_ids.shape[1]
    pos = resolve_position(position, n_tok)
    dec = decompose(model, prompt, position=pos)
    keep = [i for i, kind in enumerate(dec.kinds) if kind in kinds]
    vecs = dec.vectors[0, keep].float().cpu()  # (C, D)
    if model.spec.norm == "layer":
        vecs = vecs - vecs.mean(dim=-1, keepdim=True)
    normed = vecs * dec.scale[0].float().cpu() * norm_gain(model.final_norm, model.spec.norm).detach().cpu()
    dlogits = normed @ model.W_U.detach().float().cpu()  # (C, V)
    k = min(k, dlogits.shape[1])
    top, bottom = dlogits.topk(k, dim=-1), dlogits.topk(k, dim=-1, largest=False)
    labels = tuple(dec.labels[i] for i in keep)
    extras = {"bottom": bottom.values}
    target_doc, readout = None, {}
    if target is not None:
        tgt = resolve_target(model, target, foil, "logit", pos)
        extras["target"] = dlogits[:, tgt.target_id] - (dlogits[:, tgt.foil_id] if tgt.foil_id is not None else 0)
        target_doc = tgt.describe()
        readout = readout_values(model, model.unembed(dec.resid[0]), dec.resid[0], tgt.target_id, tgt.foil_id)

    def names(idx):
        return [[model.decode([i]) for i in row] for row in idx.tolist()]

    meta = {"top_tokens": names(top.indices), "bottom_tokens": names(bottom.indices), "position": pos,
            "tokens": dec.batch.str_tokens[0], **readout}
    return Result(top.values, (Axis("component", labels), Axis("rank", tuple(range(1, k + 1)))),
                  "component_lens", model.name, target_doc, {"k": k, "position": position, "kinds": list(kinds)},
                  extras, meta)
