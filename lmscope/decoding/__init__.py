"""Decoding what representations hold: lenses, probes, steering, projections."""

from lmscope.decoding.logit_lens import logit_lens, residual_logits

__all__ = ["logit_lens", "residual_logits"]
