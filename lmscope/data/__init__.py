"""Text corpora, token contexts and the disk-backed activation store (lenses, SAEs and probes use them)."""

from lmscope.data.corpus import Corpus, default_corpus_dir, load_corpus, token_contexts
from lmscope.data.facts import Triple, world_facts
from lmscope.data.labelled import LabelledSet, load_labelled
from lmscope.data.store import ActivationStore, StoreError, harvest, site_activations

__all__ = ["ActivationStore", "Corpus", "LabelledSet", "load_labelled", "StoreError", "default_corpus_dir", "harvest", "load_corpus",
           "site_activations", "token_contexts", "Triple", "world_facts"]
