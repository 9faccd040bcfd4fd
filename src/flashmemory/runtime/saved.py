"""Saved contexts: a prefilled prompt written to one `.fmkv` file and read back without prefilling again.

File layout (format version 1), integers little-endian:

    b"FMKV"        magic
    uint32         format version
    uint64         header length H
    H bytes        header: UTF-8 JSON
    payload        the tensors of the header's list, back to back, raw bytes in that order
    32 bytes       sha256 of everything before it

The header names the backbone (`models.loader.fingerprint`), the LSA config (its chunk and page
sizes bind the file; the rest is recorded), the KV shape and dtype, the prompt's length, the room
reserved for new tokens (`max_new_tokens`) and each tensor's name, dtype and shape. The tensors:
  - "prompt_ids": the prompt's token ids (int64);
  - "k", "v": the host mirror's first `length` tokens [layers, kv_heads, length, head_dim] in the model's dtype;
  - "logits": the next-token logits after the prompt [vocab] (float32);
  - "inputs.{i}", "cos.{i}", "sin.{i}": the attention input and rotary cos/sin of the prompt's last
    token at layer i (what `capture.Activations` holds; its modules are the loading engine's).
  - "window.k", "window.v" (hybrid models only): the sliding layers' rings of the last `window` tokens.

Not stored: the policies' chunk indexes (lsa's key store, quest's key bounds). A sequence builds its
index at its first cycle from the host mirror's keys, so a loaded context gets the same index a fresh
prefill would; at 8K tokens lsa's store takes a few milliseconds to build
(benchmarks/results/saved_context.md).

Writing goes to a temporary file in the destination's folder, fsynced, then linked into place
(renamed over an existing file only with `force`): a crash or SIGKILL never leaves a partial file
under the real name, and a left-over temporary file fails the checksum. Reading checks the magic,
the version, the checksum, the backbone, the config and the shapes before it trusts anything, and
raises `SavedContextError` saying what is wrong.

A saved context is usually a document that questions are appended to (`context_ids`,
`question_ids`): the document is the first part of a prompt whose second part is "\\n\\n" and the
question. With `chat`, both parts are one user turn: the document follows the chat template's
opening (system prompt, user header), and the question part ends the turn and opens the
assistant's, so document + question tokenize as `encode(document + "\\n\\n" + question, chat=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator

import torch

from ..memory.pools import HostMirror
from .capture import Activations

if TYPE_CHECKING:
    from .engine import LSAEngine, Prefill

MAGIC = b"FMKV"
VERSION = 1
FORMAT = "flashmemory-saved-context"
SUFFIX = ".fmkv"
BOUND_CONFIG = ("chunk_size", "page_size")  # LSAConfig fields a saved context must share with the loading engine
_PREAMBLE = struct.Struct("<4sIQ")           # magic, version, header length
_DIGEST = 32                                 # bytes of the sha256 trailer
_DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "int64")}
_BLOCK = 1 << 22


class SavedContextError(ValueError):
    """A saved context that cannot be written or read: it exists, is damaged, or was made for another
    backbone, config or format version."""


# ---------------------------------------------------------------------- documents and questions
def _chat_parts(engine: "LSAEngine") -> tuple[str, str]:
    """The chat template's text before and after a user message (the assistant's turn opened)."""
    from .engine import PromptError

    if not getattr(engine.tokenizer, "chat_template", None):
        raise PromptError("this model has no chat template; run without --chat")
    mark = "\x00FLASHMEMORY-DOCUMENT\x00"
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": mark}], add_generation_prompt=True,
                                                tokenize=False)
    if text.count(mark) != 1:
        raise PromptError("the model's chat template does not place the user message once; run without --chat")
    before, after = text.split(mark)
    return before, after


def _tokenizer(engine: "LSAEngine"):
    from .engine import PromptError

    if engine.tokenizer is None:
        raise PromptError("this engine has no tokenizer: pass token ids, or LSAEngine(model, tokenizer=...)")
    return engine.tokenizer


def context_ids(engine: "LSAEngine", document: str, chat: bool = False) -> list[int]:
    """Token ids of a document that questions will be appended to (see `question_ids`).

    Raw text: the document as `encode` tokenizes it. With `chat`: the chat template's opening and the
    document, the user turn left open. Trailing whitespace is dropped (the question part starts with it).
    """
    from .engine import PromptError

    if not isinstance(document, str) or not document.strip():
        raise PromptError("the document is empty")
    tokenizer = _tokenizer(engine)
    if chat:
        before, _ = _chat_parts(engine)
        return tokenizer(before + document.rstrip(), add_special_tokens=False)["input_ids"]
    return tokenizer(document.rstrip(), add_special_tokens=True)["input_ids"]


def question_ids(engine: "LSAEngine", context: "Prefill", question: str, chat: bool = False) -> list[int]:
    """Token ids that append a question to a context made from `context_ids`: "\\n\\n" and the question,
    and with `chat` the end of the user turn and the opening of the assistant's.

    Raises PromptError when `chat` differs from how the context was made.
    """
    from .engine import PromptError

    if not isinstance(question, str) or not question.strip():
        raise PromptError("the question is empty")
    tokenizer = _tokenizer(engine)
    opened = False
    if getattr(tokenizer, "chat_template", None):
        before, after = _chat_parts(engine)
        head = tokenizer(before, add_special_tokens=False)["input_ids"]
        opened = context.prompt_ids[:len(head)] == head
    if chat and not opened:
        raise PromptError("this context was not prefilled with --chat (chat=True); ask without --chat")
    if not chat and opened:
        raise PromptError("this context was prefilled with --chat (chat=True); ask with --chat")
    text = "\n\n" + question.strip() + (after if chat else "")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------- writing
def check_destination(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse a destination that exists (without `force`) or whose folder does not, before any work."""
    path = Path(path)
    if path.suffix != SUFFIX:
        raise SavedContextError(f"a saved context's name ends with {SUFFIX}: {path}")
    if path.is_dir():
        raise SavedContextError(f"{path} is a folder; give a file name ending with {SUFFIX}")
    if path.exists() and not force:
        raise SavedContextError(f"{path} exists; overwrite it with force=True (--force on the command line)")
    if not path.parent.is_dir():
        raise SavedContextError(f"the folder of {path} does not exist")
    return path


def _fingerprint(engine: "LSAEngine") -> str:
    from ..models.loader import fingerprint

    cfg = engine.model.config
    return fingerprint(cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, sharing its memory (so a read fills the tensor)."""
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def _tensors(prefill: "Prefill") -> list[tuple[str, torch.Tensor]]:
    n = len(prefill.prompt_ids)
    acts = prefill.activations
    small = [("prompt_ids", torch.tensor(prefill.prompt_ids, dtype=torch.int64)), ("logits", prefill.logits.float())]
    for i in range(len(acts.inputs)):
        small += [(f"inputs.{i}", acts.inputs[i]), (f"cos.{i}", acts.cos[i]), (f"sin.{i}", acts.sin[i])]
    if prefill.window is not None:  # hybrid models: the sliding layers' rings
        small += [("window.k", prefill.window[0]), ("window.v", prefill.window[1])]
    small = [(name, t.detach().cpu().contiguous()) for name, t in small]
    return [("k", prefill.host.k[:, :, :n]), ("v", prefill.host.v[:, :, :n])] + small


def _pieces(t: torch.Tensor) -> Iterator[memoryview]:
    """A tensor's bytes in row-major order; a KV slice [layers, kv_heads, n, head_dim] one (layer, head) at a time."""
    if t.dim() == 4:
        for layer in range(t.shape[0]):
            for head in range(t.shape[1]):
                yield _raw(t[layer, head])
    else:
        yield _raw(t)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_context(prefill: "Prefill", path: str | os.PathLike, engine: "LSAEngine", force: bool = False) -> Path:
    """Write `prefill` (made by `engine`) to `path` atomically; an existing file is replaced only with `force`."""
    path = check_destination(path, force)
    tensors = _tensors(prefill)
    shape = prefill.host.shape
    header = {
        "format": FORMAT, "fingerprint": _fingerprint(engine), "config": engine.config.to_dict(),
        "kv": {"layers": shape.layers, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
               "dtype": _dtype_name(shape.dtype)},
        "length": len(prefill.prompt_ids), "max_new_tokens": prefill.max_new_tokens,
        "prefill_seconds": prefill.seconds, "dense_device_peak": prefill.dense_device_peak,
        "tensors": [{"name": name, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for name, t in tensors],
    }
    blob = json.dumps(header).encode()
    digest = hashlib.sha256()
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the user's umask applies, as for any new file
    try:
        with os.fdopen(fd, "wb") as f:
            for part in [_PREAMBLE.pack(MAGIC, VERSION, len(blob)), blob]:
                digest.update(part)
                f.write(part)
            for _, t in tensors:
                for piece in _pieces(t):
                    digest.update(piece)
                    f.write(piece)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if a file appeared meanwhile: never overwrites
            except FileExistsError:
                raise SavedContextError(f"{path} exists; overwrite it with force=True (--force on the command "
                                        "line)") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_folder(path.parent)
    return path


# ---------------------------------------------------------------------- reading
def read_header(path: str | os.PathLike) -> dict:
    """A saved context's header, after checking its magic, format version and checksum."""
    path = Path(path)
    if not path.is_file():
        raise SavedContextError(f"saved context not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        preamble = f.read(_PREAMBLE.size)
        if len(preamble) < 4 or preamble[:4] != MAGIC:
            raise SavedContextError(f"{path} is not a flashmemory saved context; make one with `flashmemory "
                                    "prefill --save`")
        if len(preamble) < _PREAMBLE.size:
            raise SavedContextError(f"{path} is truncated; prefill and save it again")
        _, version, header_len = _PREAMBLE.unpack(preamble)
        if version != VERSION:
            raise SavedContextError(f"{path} has format version {version}; this flashmemory reads version "
                                    f"{VERSION}; prefill and save it again")
        if _PREAMBLE.size + header_len + _DIGEST > size:
            raise SavedContextError(f"{path} is truncated; prefill and save it again")
        digest = hashlib.sha256(preamble)
        remaining = size - _DIGEST - _PREAMBLE.size
        while remaining:
            block = f.read(min(_BLOCK, remaining))
            if not block:
                raise SavedContextError(f"{path} is truncated; prefill and save it again")
            digest.update(block)
            remaining -= len(block)
        if f.read(_DIGEST) != digest.digest():
            raise SavedContextError(f"{path} is damaged or truncated (its checksum does not match); prefill and "
                                    "save it again")
        f.seek(_PREAMBLE.size)
        blob = f.read(header_len)
    try:
        header = json.loads(blob)
        payload = 0
        for spec in header["tensors"]:
            count = 1
            for dim in spec["shape"]:
                count *= int(dim)
            payload += count * torch.empty((), dtype=_DTYPES[spec["dtype"]]).element_size()
        if header["format"] != FORMAT:
            raise ValueError(f"format {header['format']!r}")
        for key, kind in (("fingerprint", str), ("config", dict), ("kv", dict), ("length", int),
                          ("max_new_tokens", int), ("dense_device_peak", int)):
            if not isinstance(header[key], kind):
                raise ValueError(f"{key} is not a {kind.__name__}")
    except (ValueError, KeyError, TypeError) as exc:
        raise SavedContextError(f"{path} has a bad header ({exc}); prefill and save it again") from None
    if _PREAMBLE.size + header_len + payload + _DIGEST != size:
        raise SavedContextError(f"{path} has a bad header (its tensors do not fill the file); prefill and save it "
                                "again")
    header["payload_offset"] = _PREAMBLE.size + header_len
    return header


def _check_binding(header: dict, engine: "LSAEngine", path: Path) -> None:
    """The file must come from this engine's backbone, chunk/page sizes and KV shape."""
    mine = _fingerprint(engine)
    if header["fingerprint"] != mine:
        raise SavedContextError(f"{path} was saved from backbone {header['fingerprint']}, but this engine's backbone "
                                f"is {mine}; load it with the model that made it (--model), or prefill again")
    for name in BOUND_CONFIG:
        saved, ours = header["config"].get(name), getattr(engine.config, name)
        if saved != ours:
            raise SavedContextError(f"{path} was saved with {name}={saved}, this engine uses {name}={ours}; use "
                                    f"the same (--{name.replace('_', '-')} {saved}), or prefill again")
    shape, kv = engine.shape, header["kv"]
    ours = {"layers": shape.layers, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
            "dtype": _dtype_name(shape.dtype)}
    if kv != ours:
        raise SavedContextError(f"{path} holds KV of shape {kv}, this engine's model has {ours} (another dtype?); "
                                "load it with the model and dtype that made it, or prefill again")


def _read_into(f: BinaryIO, t: torch.Tensor) -> None:
    for piece in _pieces(t):
        if f.readinto(piece) != len(piece):
            raise EOFError


def load_context(path: str | os.PathLike, engine: "LSAEngine", max_new_tokens: int | None = None) -> "Prefill":
    """Read a saved context into a `Prefill` for `engine`, with room for `max_new_tokens` new tokens
    (default: the room it was saved with)."""
    from .engine import Prefill

    t0 = time.perf_counter()
    path = Path(path)
    header = read_header(path)
    _check_binding(header, engine, path)
    n = int(header["length"])
    max_new = int(header["max_new_tokens"]) if max_new_tokens is None else max_new_tokens
    engine._check_length(n, max_new)
    host = HostMirror(engine.shape, engine._room(n, max_new, lookahead=True), pin=engine.device.type == "cuda")
    tensors = {}
    with open(path, "rb") as f:
        f.seek(header["payload_offset"])
        for spec in header["tensors"]:
            name, size = spec["name"], spec["shape"]
            if name in ("k", "v"):
                if size != [engine.shape.layers, engine.shape.kv_heads, n, engine.shape.head_dim]:
                    raise SavedContextError(f"{path} has a bad header ({name} has shape {size})")
                target = getattr(host, name)[:, :, :n]
            else:
                target = tensors[name] = torch.empty(size, dtype=_DTYPES[spec["dtype"]])
            try:
                _read_into(f, target)
            except EOFError:
                raise SavedContextError(f"{path} changed while it was read; load it again") from None
    host.length = n
    layers = len(engine.recorder.modules)
    try:
        ids = tensors["prompt_ids"].tolist()
        logits = tensors["logits"].to(engine.device)
        acts = [[tensors[f"{kind}.{i}"].to(engine.device) for i in range(layers)] for kind in ("inputs", "cos", "sin")]
    except KeyError as exc:
        raise SavedContextError(f"{path} has a bad header (no tensor {exc})") from None
    if len(ids) != n:
        raise SavedContextError(f"{path} has a bad header ({len(ids)} prompt ids for {n} tokens)")
    window = None
    if engine.window_pool is not None:
        ring = [engine.window_pool.shape.layers, engine.window_pool.shape.kv_heads, engine.layout.window,
                engine.window_pool.shape.head_dim]
        if any(name not in tensors or list(tensors[name].shape) != ring for name in ("window.k", "window.v")):
            raise SavedContextError(f"{path} has no sliding-window rings of shape {ring} for this hybrid model")
        window = (tensors["window.k"].to(engine.device), tensors["window.v"].to(engine.device))
    return Prefill(host, ids, logits, Activations(engine.recorder.modules, *acts), time.perf_counter() - t0,
                   max_new, int(header["dense_device_peak"]), window)


__all__ = ["SavedContextError", "save_context", "load_context", "read_header", "check_destination", "context_ids",
           "question_ids", "SUFFIX", "VERSION"]
