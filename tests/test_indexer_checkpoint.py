"""Indexer checkpoints: round trip, backbone binding, corruption, the shipped default.

The published DeepSeek-V4 layout (`retrievers.l{L}.*` in a .pt) is tested with its own indexer in
test_lightning_indexer.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from flashmemory.indexer import CheckpointError, IndexerConfig, NeuralIndexer, load_indexer, read_meta, save_indexer
from flashmemory.indexer.checkpoint import DEFAULT_DIR, default_checkpoint


def make_indexer(fingerprint: str = "llama-2L-abc") -> NeuralIndexer:
    torch.manual_seed(0)
    inv = (1.0 / (1e4 ** (torch.arange(0, 8, 2).float() / 8))).tolist()
    return NeuralIndexer(IndexerConfig(d_model=24, key_dim=16, rope_dim=8, layers=[0, 1], n_heads=2, q_rank=8,
                                       inv_freq=inv, fingerprint=fingerprint, chunk_size=32, key_block=32))


def test_round_trip_gives_the_same_scores(tmp_path):
    ix = make_indexer()
    save_indexer(ix, tmp_path / "ck", extra={"note": "unit test"})
    back = load_indexer(tmp_path / "ck", fingerprint="llama-2L-abc")
    h, k, pos = torch.randn(3, 2, 24), torch.randn(2, 6, 16), torch.tensor([70, 80, 90])
    torch.testing.assert_close(back(h, k, pos), ix(h, k, pos))
    meta = read_meta(tmp_path / "ck")
    assert meta["parameters"] == ix.parameter_count()
    assert meta["config"]["extra"]["note"] == "unit test"
    assert meta["weights_bytes"] == (tmp_path / "ck" / "indexer.safetensors").stat().st_size


def test_another_backbone_gets_a_clear_error(tmp_path):
    save_indexer(make_indexer("llama-2L-abc"), tmp_path / "ck")
    with pytest.raises(CheckpointError, match="trained for backbone llama-2L-abc.*qwen2-28L-xyz"):
        load_indexer(tmp_path / "ck", fingerprint="qwen2-28L-xyz")


def test_corrupt_checkpoints_get_clear_errors(tmp_path):
    folder = save_indexer(make_indexer(), tmp_path / "ck")
    weights = folder / "indexer.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CheckpointError, match="corrupt"):
        load_indexer(folder)
    # a damaged file whose checksum entry was removed still fails cleanly
    meta = json.loads((folder / "indexer.json").read_text())
    meta.pop("sha256")
    (folder / "indexer.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_indexer(folder)
    (folder / "indexer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_indexer(folder)
    with pytest.raises(CheckpointError, match="not found"):
        load_indexer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an indexer checkpoint"):
        load_indexer(tmp_path / "empty")


def test_shipped_default_is_small_and_bound_to_the_default_backbone():
    from transformers import AutoConfig

    from flashmemory.models.loader import default_model_dir, fingerprint

    meta = read_meta(DEFAULT_DIR)
    size = (DEFAULT_DIR / "indexer.safetensors").stat().st_size
    backbone = sum(f.stat().st_size for f in default_model_dir().glob("*.safetensors"))
    # fp16 indexer against 16-bit backbone weights: a few percent (3% today, mostly the frozen queries)
    assert size == meta["weights_bytes"] < 0.05 * backbone
    fp = fingerprint(AutoConfig.from_pretrained(default_model_dir()))
    assert meta["config"]["fingerprint"] == fp
    assert default_checkpoint(fp) == DEFAULT_DIR
    assert load_indexer(DEFAULT_DIR, fingerprint=fp).parameter_count() == meta["parameters"]
    with pytest.raises(CheckpointError, match="no shipped indexer for backbone qwen2-28L-0000"):
        default_checkpoint("qwen2-28L-0000")
