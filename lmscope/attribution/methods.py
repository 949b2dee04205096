"""One verb for the family: :func:`attribute` runs any attribution method by name.

``attribute(model, prompt, target, foil, method="integrated-gradients")`` returns a Result over the
prompt's tokens; with ``generate=N`` it generates N tokens and attributes each of them
(:mod:`.generation`). Target-free context-mixing methods return their (T,) row at the last
position here, with the full matrix in ``extras["matrix"]``.
"""

from __future__ import annotations

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
