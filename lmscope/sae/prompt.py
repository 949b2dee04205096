"""The SAE features of one prompt (``sae-prompt``; CLI ``lmscope sae prompt``; the app's SAE view).

The prompt runs through the model once; the SAE encodes its site's activation at every position. At the
chosen position the ``latents`` most active features are kept, and for each:

* its activation at every token of the prompt (``extras["by_token"]``, (latent, position));
* its logit effects: the tokens its decoder direction promotes and suppresses through the unembedding
  (:func:`lmscope.sae.features.decoder_logits`, the "logit weights" of SAE dashboards);
* with ``contexts`` > 0, its top-activating contexts in that many held-out contexts of the corpus, and its
  firing density there (:func:`lmscope.sae.features.feature_report`);
* for an attention-output SAE (site ``blocks.{l}.attn.z``, Kissane et al. 2024), per-head attribution: the
  direct feature attribution of its pre-activation at the position to each head (exact: the heads' terms plus
  a constant give the pre-activation; :func:`lmscope.sae.attention.direct_feature_attribution`), and each
  head's share of the decoder row's norm (weights only).

Values: (latent,) activations at the position, largest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmscope import specs
from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Axis, Result
from lmscope.sae.attention import direct_feature_attribution, head_attribution
from lmscope.sae.features import decoder_logits, feature_report
from lmscope.sae.folders import SAEFolders, _held_out
from lmscope.sae.io import check_fits, load_sae
from lmscope.sites import resolve_position


@dataclass(frozen=True)
class SAEPromptConfig:
    """Options of ``sae-prompt``."""

    prompt: str = specs.option(help="The prompt whose features are shown.")
    position: int | None = specs.option(None, "Token position read (default: last).")
    latents: int = specs.option(8, "How many of the most active latents at the position.")
    contexts: int = specs.option(0, "Held-out contexts of 128 tokens searched for each latent's top-activating "
                                    "ones (0: none; the prompt view alone needs no corpus).")
    top: int = specs.option(5, "Top-activating contexts per latent (with --contexts).", flags=("--top",))
    tokens: int = specs.option(8, "Promoted and suppressed tokens per latent.")

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt:
            raise InputError("prompt: give a non-empty prompt.")
        for name in ("latents", "top", "tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name}={value!r}: give 1 or more.")
        if isinstance(self.contexts, bool) or not isinstance(self.contexts, int) or self.contexts < 0:
            raise InputError(f"contexts={self.contexts!r}: give 0 or more.")


def check_prompt(inputs: SAEFolders, config: SAEPromptConfig) -> None:
    load_sae(inputs.one("sae prompt"))


@torch.no_grad()
def run_sae_prompt(model: Model, inputs: SAEFolders, config: SAEPromptConfig) -> Result:
    """The most active SAE features at one position of a prompt: activations per token, logit effects,
    top-activating contexts, per-head attribution for attention-output SAEs."""
    sae = load_sae(inputs.one("sae prompt"))
    site = check_fits(sae, model)
    run = model.run(config.prompt, cache=[site.name], logits="none")
    act = run[site.name][0]
    f_TF = sae.encode(act.reshape(act.shape[0], -1).float())
    tokens = run.batch.str_tokens[0]
    pos = resolve_position(config.position, len(tokens))
    top = f_TF[pos].topk(min(config.latents, sae.cfg.d_sae))
    latents = top.indices
    promoted, suppressed = decoder_logits(sae, model, latents, config.tokens)
    feats = [{"latent": int(lat), "active": bool(v > 0), "promoted": p, "suppressed": s}
             for lat, v, p, s in zip(latents.tolist(), top.values.tolist(), promoted, suppressed)]
    extras = {"by_token": f_TF[:, latents].T.contiguous()}
    if config.contexts:
        report = feature_report(sae, model, _held_out(model, inputs, config.contexts), latents=latents, k=config.top,
                                n_tokens=1)
        for feat, rep in zip(feats, report.meta["features"]):
            feat["contexts"], feat["density"] = rep["contexts"], rep["density"]
        extras["density"] = report.extras["density"]
    if site.kind == "attn.z":
        shares = head_attribution(sae, model).values[latents]
        for j, feat in enumerate(feats):
            dfa = direct_feature_attribution(sae, model, config.prompt, int(latents[j]), pos)
            feat["heads"] = {"dfa": [round(float(x), 6) for x in dfa.meta["by_head"]],
                             "constant": dfa.meta["constant"], "pre_activation": dfa.meta["pre_activation"],
                             "weight_share": [round(float(x), 6) for x in shares[j]]}
    meta = {"tokens": tokens, "position": pos, "site": site.name, "arch": sae.cfg.arch, "d_sae": sae.cfg.d_sae,
            "features": feats, "active": int((f_TF[pos] > 0).sum())}
    return Result(top.values, (Axis("latent", tuple(str(i) for i in latents.tolist())),), "sae-prompt", model.name,
                  {"position": pos}, {"site": site.name, "arch": sae.cfg.arch, "position": config.position,
                                      "latents": config.latents, "contexts": config.contexts},
                  extras, meta)


specs.register(specs.MethodSpec("sae-prompt", "sae", "sae", SAEPromptConfig, run_sae_prompt, cli=("sae", "prompt"),
                                cli_inputs=("folder", "corpus"), check=check_prompt))
