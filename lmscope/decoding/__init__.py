"""Decoding what representations hold: logit and tuned lens, Patchscopes, probes, steering vectors and
vocabulary projections of weights."""

from lmscope.decoding.ab_data import ABItem, load_ab
from lmscope.decoding.caa import CAAConfig, ab_prompts, caa_sweep, caa_vectors
from lmscope.decoding.lens_training import EvalLensConfig, TrainLensConfig, eval_lens, train_lens
from lmscope.decoding.logit_lens import LensConfig, lens_top, logit_lens, residual_logits
from lmscope.decoding.patchscope_eval import PatchscopeEvalConfig, evaluate_task, task
from lmscope.decoding.patchscope_models import AffineMaps, fit_affine_maps, fit_texts
from lmscope.decoding.patchscopes import (TARGET_PROMPTS, PatchscopeConfig, TargetPrompt, patchscope, patchscope_accuracy,
                                          patchscope_sweep, token_identity)
from lmscope.decoding.probes import ProbeConfig, ProbeRunConfig, cross_validate, fit_probe, layer_list, probe_layers
from lmscope.decoding.projections import (ProjectConfig, embedding_matches, neuron_tokens, ov_circuit, qk_circuit,
                                          vector_tokens)
from lmscope.decoding.steering import (SteerConfig, actadd_vector, caa_vector, direction_from_labelled,
                                       direction_from_texts, erase, generate, generation_result, project, steer)
from lmscope.decoding.tuned_lens import TunedLens, TunedLensConfig, evaluate_lens, train_tuned_lens, tuned_lens

__all__ = ["ABItem", "AffineMaps", "CAAConfig", "PatchscopeEvalConfig", "ab_prompts", "caa_sweep", "caa_vectors",
           "evaluate_task", "fit_affine_maps", "fit_texts", "load_ab", "patchscope_accuracy", "task",
           "TARGET_PROMPTS", "EvalLensConfig", "LensConfig", "PatchscopeConfig", "ProbeConfig", "ProbeRunConfig",
           "ProjectConfig", "SteerConfig", "TargetPrompt", "TrainLensConfig", "TunedLens", "TunedLensConfig",
           "actadd_vector", "caa_vector", "cross_validate", "direction_from_labelled", "direction_from_texts",
           "embedding_matches", "erase", "eval_lens", "evaluate_lens", "fit_probe", "generate", "generation_result",
           "layer_list", "lens_top", "logit_lens", "neuron_tokens", "ov_circuit", "patchscope", "patchscope_sweep",
           "probe_layers", "project", "qk_circuit", "residual_logits", "steer", "token_identity", "train_lens",
           "train_tuned_lens", "tuned_lens", "vector_tokens"]
