"""Decoding what representations hold: logit and tuned lens, Patchscopes, probes, steering vectors and
vocabulary projections of weights."""

from lmscope.decoding.logit_lens import logit_lens, residual_logits
from lmscope.decoding.patchscopes import TARGET_PROMPTS, TargetPrompt, patchscope, patchscope_sweep, token_identity
from lmscope.decoding.probes import ProbeConfig, cross_validate, fit_probe, probe_layers
from lmscope.decoding.projections import embedding_matches, neuron_tokens, ov_circuit, qk_circuit, vector_tokens
from lmscope.decoding.steering import (actadd_vector, caa_vector, direction_from_labelled, direction_from_texts,
                                       erase, generate, project, steer)
from lmscope.decoding.tuned_lens import TunedLens, TunedLensConfig, evaluate_lens, train_tuned_lens, tuned_lens

__all__ = ["TARGET_PROMPTS", "ProbeConfig", "TargetPrompt", "TunedLens", "TunedLensConfig", "actadd_vector",
           "caa_vector", "cross_validate", "direction_from_labelled", "direction_from_texts", "embedding_matches",
           "erase", "evaluate_lens", "fit_probe", "generate", "logit_lens", "neuron_tokens", "ov_circuit",
           "patchscope", "patchscope_sweep", "probe_layers", "project", "qk_circuit", "residual_logits", "steer",
           "token_identity", "train_tuned_lens", "tuned_lens", "vector_tokens"]
