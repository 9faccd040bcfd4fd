"""Saved contexts on the real default model: a loaded context decodes exactly like the prefill that made it,
questions append to it without prefilling it again, and every bad file is a clear error."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flashmemory import LSAConfig, LSAEngine, PromptError, load_backbone
from flashmemory.cli.main import main
from flashmemory.runtime.saved import SavedContextError, context_ids, question_ids
from tiny import tiny_model

CONFIG = LSAConfig(budget=0.3)      # short contexts: room for sink + tail + a cycle, and a real selection
NEW = 80                            # more than tau: the second cycle selects again
QUESTION = "What is the secret passcode for the blue door? Answer with the number only."


@pytest.fixture(scope="module")
def engine(backbone):
    with LSAEngine(backbone, CONFIG) as e:
        yield e


@pytest.fixture(scope="module")
def document(backbone, essays) -> str:
    tok = backbone.tokenizer
    hay = tok.decode(tok(essays)["input_ids"][:900])
    cut = len(hay) // 3
    return hay[:cut] + " The secret passcode for the blue door is 4817. " + hay[cut:]


@pytest.fixture(scope="module")
def saved(engine, document, tmp_path_factory):
    prefill = engine.prefill(context_ids(engine, document, chat=True), max_new_tokens=NEW)
    return prefill, engine.save(prefill, tmp_path_factory.mktemp("saved") / "doc.fmkv")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_restores_the_prefill(engine, saved):
    prefill, path = saved
    loaded = engine.load(path)
    n = len(prefill.prompt_ids)
    assert loaded.prompt_ids == prefill.prompt_ids and loaded.host.length == n
    assert loaded.max_new_tokens == NEW and loaded.host.capacity == prefill.host.capacity
    assert torch.equal(loaded.host.k[:, :, :n], prefill.host.k[:, :, :n])
    assert torch.equal(loaded.host.v[:, :, :n], prefill.host.v[:, :, :n])
    assert torch.equal(loaded.logits, prefill.logits)
    for mine, theirs in zip(loaded.activations.queries(), prefill.activations.queries()):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("policy", ["full", "lsa"])
def test_save_load_decode_equals_prefill_decode(engine, saved, policy):
    prefill, path = saved
    fresh = engine.decode(prefill, policy, NEW, stop_at_eos=False)
    loaded = engine.decode(engine.load(path), policy, NEW, stop_at_eos=False)
    assert loaded.token_ids == fresh.token_ids and len(loaded.token_ids) == NEW
    assert loaded.report.cycles == fresh.report.cycles >= 2
    if policy == "lsa":  # the selection was real: the same part of the history stayed off the device
        assert loaded.report.resident_pages_per_cycle == fresh.report.resident_pages_per_cycle
        assert loaded.report.resident_fraction_max <= CONFIG.budget


def test_the_loader_reserves_new_room(engine, saved):
    prefill, path = saved
    loaded = engine.load(path, max_new_tokens=300)
    assert loaded.max_new_tokens == 300
    assert loaded.host.capacity == len(prefill.prompt_ids) + 300 + CONFIG.tau


def test_a_question_appends_like_one_prompt(engine, document, saved):
    prefill, _ = saved
    ids = question_ids(engine, prefill, QUESTION, chat=True)
    assert prefill.prompt_ids + ids == engine.encode(document.rstrip() + "\n\n" + QUESTION, chat=True)
    raw = context_ids(engine, document)
    assert raw == engine.encode(document.rstrip())
    with pytest.raises(PromptError, match="prefilled with --chat"):
        question_ids(engine, prefill, QUESTION, chat=False)


def test_extend_equals_one_prefill(engine, saved):
    prefill, _ = saved
    ids = question_ids(engine, prefill, QUESTION, chat=True)
    capacity = prefill.host.capacity
    extended = engine.extend(prefill, ids, max_new_tokens=16)
    whole = engine.prefill(prefill.prompt_ids + ids, max_new_tokens=16)
    assert extended.prompt_ids == whole.prompt_ids and extended.host.capacity == whole.host.capacity
    torch.testing.assert_close(extended.logits, whole.logits, atol=1e-4, rtol=1e-4)
    assert engine.decode(extended, "full").token_ids == engine.decode(whole, "full").token_ids
    assert prefill.host.capacity == capacity  # the context itself is left as it was, for other questions


def test_ask_answers_from_a_loaded_context(engine, saved):
    _, path = saved
    result = engine.ask(engine.load(path), QUESTION, "full", chat=True, max_new_tokens=16)
    assert "4817" in result.text
    assert result.report.prompt_tokens > len(engine.load(path).prompt_ids)


# ---------------------------------------------------------------------- bad files
def _damaged(tmp_path: Path, source: Path, edit) -> Path:
    data = bytearray(source.read_bytes())
    out = tmp_path / "damaged.fmkv"
    out.write_bytes(bytes(edit(data)))
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda d: d[: len(d) // 2], "damaged or truncated"),
    (lambda d: d[:-1], "damaged or truncated"),
    (lambda d: d[:10], "truncated"),
    (lambda d: d[:-40] + bytes([d[-40] ^ 0xFF]) + d[-39:], "checksum"),         # a byte of the KV
    (lambda d: d[:20] + bytes([d[20] ^ 0x01]) + d[21:], "checksum"),            # a byte of the header
    (lambda d: d[:4] + (2).to_bytes(4, "little") + d[8:], "format version 2"),
    (lambda d: b"not a saved context at all", "not a flashmemory saved context"),
])
def test_a_bad_file_is_a_clear_error(engine, saved, tmp_path, edit, message):
    _, path = saved
    with pytest.raises(SavedContextError, match=message):
        engine.load(_damaged(tmp_path, path, edit))


def test_a_file_from_another_backbone_is_refused(saved):
    _, path = saved
    with LSAEngine(tiny_model("llama"), CONFIG) as other:
        with pytest.raises(SavedContextError, match="saved from backbone llama-30L-.* this engine's backbone is "
                                                    "llama-3L-"):
            other.load(path)


def test_another_dtype_of_the_backbone_is_refused(saved):
    _, path = saved
    with LSAEngine(load_backbone(None, dtype=torch.bfloat16), CONFIG) as other:
        with pytest.raises(SavedContextError, match="bfloat16"):
            other.load(path)


def test_another_config_is_refused(backbone, saved):
    _, path = saved
    with LSAEngine(backbone, CONFIG.with_(chunk_size=64, page_size=64)) as other:
        with pytest.raises(SavedContextError, match="chunk_size=32, this engine uses chunk_size=64"):
            other.load(path)


def test_an_existing_file_is_kept_without_force(engine, saved):
    prefill, path = saved
    before = _sha(path)
    with pytest.raises(SavedContextError, match="exists; overwrite it with force=True"):
        engine.save(prefill, path)
    assert _sha(path) == before
    engine.save(prefill, path, force=True)
    assert engine.load(path).prompt_ids == prefill.prompt_ids
    assert not [f for f in path.parent.iterdir() if f.name.endswith(".tmp")]


def test_a_killed_prefill_save_leaves_no_valid_file(engine, document, tmp_path):
    source = tmp_path / "doc.txt"
    source.write_text(document)
    out = tmp_path / "doc.fmkv"
    proc = subprocess.Popen([sys.executable, "-m", "flashmemory.cli.main", "prefill", "--prompt-file", str(source),
                             "--save", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    try:
        while not list(tmp_path.glob(".doc.fmkv.*.tmp")):  # the temporary file appears when writing starts
            assert proc.poll() is None, "the prefill ended before it started writing"
            assert time.monotonic() < deadline, "the prefill did not start writing in time"
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = list(tmp_path.glob(".doc.fmkv.*.tmp"))
    assert leftovers
    for leftover in leftovers:
        with pytest.raises(SavedContextError):
            engine.load(leftover)


# ---------------------------------------------------------------------- command line
def test_cli_prefill_then_generate_with_the_context(document, tmp_path, capsys):
    source, question, out = tmp_path / "doc.txt", tmp_path / "question.txt", tmp_path / "doc.fmkv"
    source.write_text(document)
    question.write_text(QUESTION)
    assert main(["prefill", "--prompt-file", str(source), "--save", str(out), "--chat"]) == 0
    assert "saved" in capsys.readouterr().out and out.is_file()

    code = main(["generate", "--context", str(out), "--prompt-file", str(question), "--chat", "--policy", "full",
                 "--max-new-tokens", "16"])
    captured = capsys.readouterr()
    assert code == 0 and "4817" in captured.out.split("--- memory report")[0]

    assert main(["prefill", "--prompt-file", str(source), "--save", str(out)]) == 2  # before loading a model
    assert capsys.readouterr().err.strip().endswith("(--force on the command line)")
    assert main(["generate", "--context", str(out), "--prompt-file", str(question)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the weights' loading bar
    assert last.startswith("flashmemory: error: this context was prefilled with --chat")
    assert main(["generate", "--context", str(out), "--prompt-file", str(question), "--chat",
                 "--chunk-size", "64", "--page-size", "64"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("flashmemory: error: ") and "saved with chunk_size=32" in last
