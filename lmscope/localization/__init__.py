"""Locating what drives a prediction: direct logit attribution, activation patching, causal tracing,
path patching, attribution patching (AtP, AtP*), circuits (EAP, EAP-IG, ACDC) and information-flow
routes. Prompt-pair generators live in :mod:`.tasks`, metrics in :mod:`.metrics`."""

from lmscope.localization import metrics, tasks
from lmscope.localization.acdc import acdc
from lmscope.localization.atp import AtPConfig, atp, atp_star, exact_head_effects
from lmscope.localization.atp_check import head_check
from lmscope.localization.circuit_scores import circuit_scores
from lmscope.localization.circuits import Circuit, EdgeScores, exact_top, extract, faithfulness_curve
from lmscope.localization.dla import DLAConfig, dla
from lmscope.localization.eap import eap
from lmscope.localization.find_circuit import CircuitConfig, find_circuit
from lmscope.localization.flow import FlowConfig, FlowGraphConfig, flow, flow_contributions, graph_edges, route
from lmscope.localization.flow_node import FlowNodeConfig
from lmscope.localization.flow_verify import FlowVerifyConfig
from lmscope.localization.node_circuits import atp_edge_scores, edge_scores_from_nodes
from lmscope.localization.recall import known_facts
from lmscope.localization.path_patching import PathPatchConfig, path_patching
from lmscope.localization.patching import PatchConfig, activation_patching, prepare
from lmscope.localization.tasks import PromptPairs, factual, induction, ioi, pair, task_pairs
from lmscope.localization.tracing import TraceConfig, causal_trace

__all__ = ["AtPConfig", "Circuit", "CircuitConfig", "DLAConfig", "EdgeScores", "FlowConfig", "FlowGraphConfig",
           "FlowNodeConfig", "FlowVerifyConfig", "PatchConfig", "PathPatchConfig",
           "PromptPairs", "TraceConfig", "acdc", "activation_patching", "atp", "atp_edge_scores", "atp_star", "causal_trace",
           "circuit_scores", "dla", "eap", "edge_scores_from_nodes", "exact_head_effects", "exact_top", "extract", "factual",
           "faithfulness_curve", "find_circuit", "flow", "flow_contributions", "graph_edges", "head_check", "induction",
           "ioi", "known_facts", "metrics", "pair", "path_patching", "prepare",
           "route", "task_pairs", "tasks"]
