"""kure_jax: KURE kurtosis regularisation and quantization-robustness tools for JAX/Flax.

Reference: M. Shkolnik et al., "Robust Quantization: One Model to Rule Them All",
NeurIPS 2020 (arXiv:2002.07686).
"""

from kure_jax.kurtosis import REDUCTIONS as REDUCTIONS
from kure_jax.kurtosis import UNIFORM_KURTOSIS as UNIFORM_KURTOSIS
from kure_jax.kurtosis import add_penalty as add_penalty
from kure_jax.kurtosis import kurtosis as kurtosis
from kure_jax.kurtosis import kurtosis_report as kurtosis_report
from kure_jax.kurtosis import penalty as penalty
from kure_jax.selection import default_selection as default_selection
from kure_jax.selection import paper_selection as paper_selection
from kure_jax.selection import path_to_str as path_to_str
from kure_jax.selection import select as select
from kure_jax.selection import selection_mask as selection_mask

__version__ = "0.1.0"

__all__ = [
    "REDUCTIONS",
    "UNIFORM_KURTOSIS",
    "add_penalty",
    "default_selection",
    "kurtosis",
    "kurtosis_report",
    "paper_selection",
    "path_to_str",
    "penalty",
    "select",
    "selection_mask",
]
