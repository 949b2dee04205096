"""Training small models and watching mechanisms form: the few-shot task, clamps, the clamping testbed."""

from lmscope.training.clamping import (ClampConfig, curves_html, curves_png, evaluate, new_testbed, preserved_ablation,
                                       speed, train_clamped)
from lmscope.training.clamps import CLAMPS, Conditions, interventions, match_pattern, prev_token_pattern
from lmscope.training.fewshot import FewShotTask

__all__ = ["CLAMPS", "ClampConfig", "Conditions", "FewShotTask", "curves_html", "curves_png", "evaluate",
           "interventions", "match_pattern", "new_testbed", "preserved_ablation", "prev_token_pattern", "speed",
           "train_clamped"]
