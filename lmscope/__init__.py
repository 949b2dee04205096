"""lmscope: open up decoder language models, on any Hugging Face causal LM."""

__version__ = "0.1.0"

from lmscope.errors import LmscopeError  # noqa: E402
from lmscope.interventions import Ablate, Add, Erase, Knockout, Patch, Scale  # noqa: E402
from lmscope.models import Model, decompose, load  # noqa: E402
from lmscope.results import Axis, Result, ResultSet  # noqa: E402

__all__ = ["Ablate", "Add", "Axis", "Erase", "Knockout", "LmscopeError", "Model", "Patch", "Result", "ResultSet",
           "Scale", "__version__", "decompose", "load"]
