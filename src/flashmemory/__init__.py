"""FlashMemory: Lookahead Sparse Attention for Hugging Face causal LMs.

A KV cache in two tiers (every chunk in host memory, a budgeted resident set on the device),
a selection policy that picks the resident set every `tau` decode steps, and a small learned
indexer that predicts which chunks the next tokens will need.
"""

from .config import ConfigError, LSAConfig
from .models.loader import Backbone, BackboneError, load_backbone
from .policies import BudgetError, SelectionPolicy, make_policy, policy_names, register_policy
from .runtime.cache import ContextLengthError, LSACache
from .runtime.engine import GenerationReport, GenerationResult, LSAEngine, Prefill, PromptError

__version__ = "0.1.0"

__all__ = ["LSAConfig", "ConfigError", "Backbone", "BackboneError", "load_backbone", "BudgetError",
           "SelectionPolicy", "make_policy", "policy_names", "register_policy", "ContextLengthError", "LSACache",
           "GenerationReport", "GenerationResult", "LSAEngine", "Prefill", "PromptError"]
