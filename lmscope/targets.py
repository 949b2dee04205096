"""One vocabulary for what a method explains: the metric names and the target/foil tokens.

Attribution (:mod:`lmscope.attribution.targets`) and patching, AtP and circuits
(:mod:`lmscope.localization.metrics`) read their ``metric=`` argument through :func:`canonical_metric`,
so every spelling below works everywhere, and resolve target and foil tokens through
:func:`resolve_tokens`.

Canonical metrics (the scalar read from the answer position's logits):

* ``logit``       the target's logit; with a foil, ``logit(target) − logit(foil)``;
* ``logit_diff``  ``logit(target) − logit(foil)`` (needs a foil; ``logit`` with a foil is the same thing);
* ``probability`` the target's softmax probability (minus the foil's, with a foil, in attribution);
* ``log_prob``    the target's log-probability (contrastive: equal to the logit difference);
* ``kl``          KL(p_clean ‖ p_patched) in nats (patching and circuits only).

Aliases: ``prob`` → probability; ``logprob``, ``log_probability`` → log_prob.

Conventions shared by activation patching, AtP and circuits (METHODS.md §0): the default direction is
``denoise`` (clean values into the corrupted run), values are normalised so that 0 is the corrupted
run and 1 the clean one — ``(M − M_corrupt) / (M_clean − M_corrupt)`` for denoising,
``(M − M_clean) / (M_clean − M_corrupt)`` for noising — and the raw metric differences are kept in
``extras["raw"]``; the default metric is ``logit_diff`` with a foil, ``log_prob`` without.
"""

from __future__ import annotations

from lmscope.errors import InputError

METRICS = ("logit", "logit_diff", "probability", "log_prob", "kl")
ALIASES = {"logit": "logit", "logit_diff": "logit_diff", "probability": "probability", "prob": "probability",
           "log_prob": "log_prob", "logprob": "log_prob", "log_probability": "log_prob", "kl": "kl"}
DIRECTIONS = ("denoise", "noise")
DEFAULT_DIRECTION = "denoise"


def canonical_metric(metric: str, allowed: tuple[str, ...] = METRICS, method: str = "this method") -> str:
    """The canonical name of ``metric`` (any alias); an InputError naming the choices if unknown or not in
    ``allowed`` (canonical names)."""
    name = ALIASES.get(metric) if isinstance(metric, str) else None
    if name is None or name not in allowed:
        raise InputError(f"metric={metric!r} is not available for {method}; use one of {', '.join(allowed)}.")
    return name


def default_metric(foil) -> str:
    """The shared default: ``logit_diff`` when a foil is given, else ``log_prob``."""
    return "logit_diff" if foil is not None else "log_prob"


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise InputError(f"direction={direction!r}: use 'denoise' (clean values into the corrupted run) or "
                         "'noise' (corrupted values into the clean run).")
    return direction


def resolve_tokens(model, target, foil=None) -> tuple[int, int | None]:
    """Token ids of ``target`` and ``foil`` (strings of exactly one token, or ids); a foil equal to the
    target is an error that names the fix."""
    if target is None:
        raise InputError("This method explains a target token: pass target=' Mary' (mind the leading space).")
    t = model.token_id(target)
    if foil is None:
        return t, None
    f = model.token_id(foil)
    if f == t:
        raise InputError(f"The foil {foil!r} is the target itself; choose a different token to contrast "
                         "with, or leave the foil out for a non-contrastive target.")
    return t, f
