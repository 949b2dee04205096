"""Model editing: ROME (r-ROME's consistent key) with causal tracing choosing the layer, and CounterFact-style
evaluation on offline counterfactual facts."""

from lmscope.editing.edit import Edit, load_edit
from lmscope.editing.evaluate import fact_metrics, ngram_entropy, object_scores
from lmscope.editing.facts import CounterFact, counterfactual_facts
from lmscope.editing.layer import choose_layer, trace_curve
from lmscope.editing.memit import memit, memit_update
from lmscope.editing.rome import Fact, RomeSettings, compute_key, compute_value, rank_one_update, rome
from lmscope.editing.second_moment import second_moment
from lmscope.editing.workflow import EditConfig, EditEvalConfig, edit_fact, evaluate_edits

__all__ = ["CounterFact", "Edit", "EditConfig", "EditEvalConfig", "Fact", "RomeSettings", "choose_layer",
           "compute_key", "compute_value", "counterfactual_facts", "edit_fact", "evaluate_edits", "fact_metrics",
           "load_edit", "memit", "memit_update", "ngram_entropy", "object_scores", "rank_one_update", "rome",
           "second_moment", "trace_curve"]
