"""FlashMemory: Lookahead Sparse Attention for Hugging Face causal LMs.

A KV cache in two tiers (every chunk in host memory, a budgeted resident set on the device),
a selection policy that picks the resident set every `tau` decode steps, and a small learned
indexer that predicts which chunks the next tokens will need. `LSAEngine` decodes many
sequences together over one shared device pool.
"""

from .config import ConfigError, EngineConfig, LSAConfig
from .models.loader import Backbone, BackboneError, load_backbone
from .policies import DEFAULT_POLICY, BudgetError, SelectionPolicy, make_policy, policy_names, register_policy
from .runtime.cache import ContextLengthError
from .runtime.engine import AdmissionError, LSAEngine, MemoryUsage, Prefill, PromptError
from .runtime.lsa_cache import LSACache
from .runtime.report import GenerationReport, GenerationResult
from .runtime.sampling import GenerationOptionsError, SamplingParams
from .runtime.saved import SavedContextError, context_ids, question_ids
from .runtime.sequence import Sequence, TokenEvent

__version__ = "0.1.0"

__all__ = ["LSAConfig", "EngineConfig", "ConfigError", "Backbone", "BackboneError", "load_backbone",
           "DEFAULT_POLICY", "BudgetError", "SelectionPolicy", "make_policy", "policy_names", "register_policy",
           "ContextLengthError", "LSACache", "LSAEngine", "AdmissionError", "MemoryUsage", "Prefill", "PromptError",
           "GenerationReport", "GenerationResult", "GenerationOptionsError", "SamplingParams", "Sequence",
           "TokenEvent", "SavedContextError", "context_ids", "question_ids"]
