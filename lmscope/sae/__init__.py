"""Sparse autoencoders: ReLU, Gated, TopK and JumpReLU SAEs; training, evaluation, features, attention-output SAEs.

One file per architecture (relu.py, gated.py, topk.py, jumprelu.py); training.py trains from an activation
store; evaluation.py measures L0, variance explained, CE loss recovered and shrinkage; features.py builds
feature dashboards; attention.py has the per-head analyses of attention-output SAEs; io.py reads and writes
SAELens-compatible folders.
"""

from lmscope.sae.attention import direct_feature_attribution, head_attribution
from lmscope.sae.base import SAE, LossOut, SAEConfig
from lmscope.sae.evaluation import METRICS, compare, density_histogram, evaluate, evaluate_activations, pareto_png
from lmscope.sae.features import (decoder_logits, feature_report, features_html, residual_directions,
                                  top_activations)
from lmscope.sae.folders import (SAECompareConfig, SAEEvalConfig, SAEFeaturesConfig, SAEFolders, run_sae_compare,
                                 run_sae_eval, run_sae_features)
from lmscope.sae.gated import GatedConfig, GatedSAE
from lmscope.sae.io import ARCHS, check_fits, load_sae, make_sae, save_sae, tl_hook_name
from lmscope.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from lmscope.sae.relu import ReLUConfig, ReLUSAE
from lmscope.sae.topk import TopKConfig, TopKSAE
from lmscope.sae.train_site import SAETrainConfig, train_site_sae
from lmscope.sae.training import TensorSource, TrainConfig, TrainingError, TrainState, geometric_median, train

__all__ = [
    "METRICS", "compare", "decoder_logits", "density_histogram", "direct_feature_attribution", "evaluate",
    "evaluate_activations", "feature_report", "features_html", "head_attribution", "pareto_png",
    "residual_directions", "top_activations",
    "ARCHS", "GatedConfig", "GatedSAE", "JumpReLUConfig", "JumpReLUSAE", "LossOut", "ReLUConfig", "ReLUSAE", "SAE",
    "SAEConfig", "TensorSource", "TopKConfig", "TopKSAE", "TrainConfig", "TrainState", "TrainingError",
    "check_fits", "geometric_median", "load_sae", "make_sae", "save_sae", "tl_hook_name", "train",
    "SAETrainConfig", "train_site_sae",
    "SAECompareConfig", "SAEEvalConfig", "SAEFeaturesConfig", "SAEFolders", "run_sae_compare", "run_sae_eval",
    "run_sae_features",
]
