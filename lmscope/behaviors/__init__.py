"""Behaviours of pretrained models: head detectors (the head atlas) and neuron analysis."""

from lmscope.behaviors.heads import ROLES, HeadsConfig, atlas_grid, head_atlas, pattern_scores, repeated_tokens
from lmscope.behaviors.neurons import (NeuronsConfig, concept_scores, neuron_report, top_activations,
                                       vocab_projection)

__all__ = ["ROLES", "HeadsConfig", "NeuronsConfig", "atlas_grid", "concept_scores", "head_atlas", "neuron_report",
           "pattern_scores", "repeated_tokens", "top_activations", "vocab_projection"]
