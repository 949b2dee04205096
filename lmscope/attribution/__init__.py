"""Input attribution: which input tokens drive a prediction (the Primer §3.1).

Gradient methods (:mod:`.gradient`), occlusion (:mod:`.perturbation`), context mixing
(:mod:`.context_mixing`), whole generations (:mod:`.generation`), the component logit lens
(:mod:`.component_lens`), and :func:`attribute`, which runs any of them by name.
"""

from lmscope.attribution.component_lens import component_lens
from lmscope.attribution.context_mixing import (alti, alti_logit, attention_norm, attention_rollout, raw_attention,
                                                rollout, token_scores, value_zeroing)
from lmscope.attribution.evaluate import EvaluateConfig, evaluate_attributions, merge_evaluations
from lmscope.attribution.faithfulness import aopc, erasure_curves, evaluate_prompts
from lmscope.attribution.generation import attribute_generation, generate
from lmscope.attribution.gradient import (ConvergenceWarning, input_x_gradient, integrated_gradients, make_baseline,
                                          quadrature, saliency, target_gradients)
from lmscope.attribution.methods import METHODS, AttributeConfig, attribute
from lmscope.attribution.perturbation import occlusion
from lmscope.attribution.targets import METRICS, Target, resolve_target

__all__ = ["METHODS", "METRICS", "AttributeConfig", "ConvergenceWarning", "EvaluateConfig", "aopc", "erasure_curves",
           "evaluate_attributions", "evaluate_prompts", "Target", "alti", "alti_logit", "attention_norm",
           "attention_rollout", "attribute", "attribute_generation", "component_lens", "generate",
           "input_x_gradient", "integrated_gradients", "make_baseline", "merge_evaluations", "occlusion", "quadrature",
           "raw_attention", "resolve_target", "rollout", "saliency", "target_gradients", "token_scores",
           "value_zeroing"]
