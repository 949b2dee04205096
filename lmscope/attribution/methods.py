"""One verb for the family: :func:`attribute` runs any attribution method by name.

``attribute(model, prompt, target, foil, method="integrated-gradients")`` returns a Result over the
prompt's tokens; with ``generate=N`` it generates N tokens and attributes each of them
(:mod:`.generation`). Target-free context-mixing methods return their (T,) row at the last
position here, with the full matrix in ``extras["matrix"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmscope import specs
from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Result

TARGET_METHODS = ("saliency", "input-x-gradient", "integrated-gradients", "occlusion", "alti-logit")
MIXING_METHODS = ("attention", "rollout", "attention-norm", "alti", "value-zeroing")
METHODS = TARGET_METHODS + MIXING_METHODS


def method_function(method: str):
    from lmscope.attribution import context_mixing as cm
    from lmscope.attribution import gradient, perturbation

    table = {
        "saliency": gradient.saliency, "input-x-gradient": gradient.input_x_gradient,
        "integrated-gradients": gradient.integrated_gradients, "occlusion": perturbation.occlusion,
        "alti-logit": cm.alti_logit, "attention": cm.raw_attention, "rollout": cm.attention_rollout,
        "attention-norm": cm.attention_norm, "alti": cm.alti, "value-zeroing": cm.value_zeroing,
    }
    key = method.replace("_", "-")
    if key not in table:
        raise InputError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}.")
    return table[key]


def attribute(model: Model, prompt: str, target=None, foil=None, *, method: str = "integrated-gradients",
              generate: int | None = None, generate_kwargs: dict | None = None, **kwargs) -> Result:
    """Attribute ``target`` (or ``target − foil``) at the last position to the prompt's tokens, or with
    ``generate=N`` every one of N generated tokens (greedy, or ``generate_kwargs``) to the tokens before it.

    A target method without a ``target`` explains the model's own top prediction at that position."""
    method = method.replace("_", "-")
    fn = method_function(method)
    if generate is not None:
        from lmscope.attribution.generation import attribute_generation

        return attribute_generation(model, prompt, method, max_new_tokens=generate,
                                    generate_kwargs=generate_kwargs, foil=foil, **kwargs)
    if method in MIXING_METHODS:
        from lmscope.attribution.context_mixing import token_scores

        if foil is not None:
            raise InputError(f"{method} is not target-specific, so a foil has no meaning for it; use "
                             "alti-logit or a gradient/occlusion method for contrastive attribution.")
        position = kwargs.pop("position", None)
        return token_scores(fn(model, prompt, **kwargs), position)
    if target is None:
        from lmscope.attribution.targets import top_token

        target = top_token(model, prompt, kwargs.get("position"))
    return fn(model, prompt, target, foil, **kwargs)


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class AttributeConfig:
    """Options of ``attribute`` as a method spec (one prompt, a target token and an optional foil)."""

    method: str = specs.option("integrated-gradients", " | ".join(METHODS), choices=METHODS)
    metric: str | None = specs.option(None, "logit | probability | log_prob (default logit; with --generate "
                                            "probability); target-free methods take none.")
    steps: int | None = specs.option(None, "Integrated-gradients steps (default: adaptive, refined until the "
                                           "completeness error is ≤ 1%).")
    baseline: str | None = specs.option(None, "IG/occlusion baseline: neutral (IG's default: UNK, else PAD, else "
                                              "EOS) | scaled (0.3 × input: keeps token identity) | zero | pad | "
                                              "unk | eos | a token.")
    generate: int | None = specs.option(None, "Generate N tokens and attribute each of them.")

    def __post_init__(self):
        object.__setattr__(self, "method", self.method.replace("_", "-"))
        if self.method not in METHODS:
            raise InputError(f"--method {self.method!r} is unknown; use one of {', '.join(METHODS)}.")
        if self.steps is not None and self.method != "integrated-gradients":
            raise InputError("--steps applies to integrated-gradients only; drop it or use that method.")
        if self.baseline is not None and self.method not in ("integrated-gradients", "occlusion"):
            raise InputError("--baseline applies to integrated-gradients and occlusion only.")
        if self.metric is not None and (self.method in MIXING_METHODS or self.method == "alti-logit"):
            raise InputError(f"--metric does not apply to {self.method} (alti-logit explains logits; the "
                             "context-mixing methods have no target); drop it.")
        if self.generate is not None and self.generate < 1:
            raise InputError(f"--generate {self.generate}: give a positive number of tokens.")


def run_attribute(model: Model, prompt: specs.Prompt, config: AttributeConfig) -> Result:
    """Which input tokens drive a prediction: a token heat map and the JSON result."""
    method, generate = config.method, config.generate  # no target: the model's top prediction is explained
    kwargs = {}
    if config.steps is not None:
        kwargs["steps"] = config.steps
    if config.baseline is not None:
        kwargs["baseline"] = config.baseline
    if method not in MIXING_METHODS and method != "alti-logit":
        kwargs["metric"] = config.metric or ("probability" if generate is not None else "logit")
    return attribute(model, prompt.text, prompt.target, prompt.foil, method=method, generate=generate, **kwargs)


specs.register(specs.MethodSpec("attribute", "attribution", "prompt", AttributeConfig, run_attribute,
                                sites=("embed", "attn.pattern")))
