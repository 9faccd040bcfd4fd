"""The release-form DeepSeek-V4 indexer: formula, RoPE/YaRN, Hadamard, fp8 keys, checkpoint formats, convert CLI."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from flashmemory.cli.main import main
from flashmemory.indexer import (CheckpointError, Fp8KeyStore, IndexerConfigError, LightningConfig, LightningIndexer,
                                 convert_checkpoint, hadamard_matrix, load_indexer, load_lightning_indexer,
                                 load_release_checkpoint, pack_fp8_keys, save_indexer, save_lightning_indexer,
                                 save_release_checkpoint, unpack_fp8_keys, yarn_inv_freq)
from flashmemory.indexer.lightning import apply_rope

PARTS = ("wq_a.weight", "wq_b.weight", "q_norm_weight", "weights_proj.weight")


def tiny_config(**changes) -> LightningConfig:
    values = dict(d_model=32, q_rank=16, n_heads=4, head_dim=16, rope_dim=8, rope_original_max_position=256)
    values.update(changes)
    return LightningConfig(**values)


def release_state(layers=(10, 12, 20), d=32, rank=16, heads=4, dim=16, seed=0, dtype=torch.float32) -> dict:
    """A synthetic checkpoint in the published key layout (weights scaled so logits are O(1))."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for L in layers:
        state[f"retrievers.l{L}.wq_a.weight"] = (torch.randn(rank, d, generator=g) / d ** 0.5).to(dtype)
        state[f"retrievers.l{L}.wq_b.weight"] = (torch.randn(heads * dim, rank, generator=g) / rank ** 0.5).to(dtype)
        state[f"retrievers.l{L}.q_norm_weight"] = (1 + 0.1 * torch.randn(rank, generator=g)).to(dtype)
        state[f"retrievers.l{L}.weights_proj.weight"] = (torch.randn(heads, d, generator=g)).to(dtype)
    return state


# ---------------------------------------------------------------------------------------------
# an independent, plain reference of the formula (float64, loops)

def ref_inv_freq(cfg: LightningConfig) -> list[float]:
    """YaRN as in DeepSeek's reference: keep pairs that turn > beta_fast times over the original
    context, divide by `factor` those that turn < beta_slow times, blend linearly between."""
    half = cfg.rope_dim // 2
    base = [cfg.rope_theta ** (-(2 * i) / cfg.rope_dim) for i in range(half)]
    if cfg.rope_factor == 1:
        return base

    def index_for(turns):
        return cfg.rope_dim * math.log(cfg.rope_original_max_position / (turns * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low = max(math.floor(index_for(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(index_for(cfg.rope_beta_slow)), cfg.rope_dim - 1)
    out = []
    for i, f in enumerate(base):
        t = 0.0 if i < low else 1.0 if i >= high else (i - low) / max(high - low, 1)
        out.append(f * (1 - t) + (f / cfg.rope_factor) * t)
    return out


def ref_hadamard(n: int) -> list[list[float]]:
    """H[i][j] = (-1)^popcount(i & j) / sqrt(n), the Sylvester matrix by its closed form."""
    return [[(-1) ** bin(i & j).count("1") / math.sqrt(n) for j in range(n)] for i in range(n)]


def ref_scores(state: dict, cfg: LightningConfig, hidden, keys, positions, ensemble: str):
    """Scores [B][N] and logits [L][B][N] computed plainly from the formula."""
    inv = ref_inv_freq(cfg)
    had = ref_hadamard(cfg.head_dim) if cfg.hadamard else None
    H, D, R = cfg.n_heads, cfg.head_dim, cfg.rope_dim
    B, N = hidden.shape[0], keys.shape[1]
    logits = []
    for li, L in enumerate(cfg.layers):
        wq_a = state[f"retrievers.l{L}.wq_a.weight"].double()
        wq_b = state[f"retrievers.l{L}.wq_b.weight"].double()
        qn = state[f"retrievers.l{L}.q_norm_weight"].double()
        wp = state[f"retrievers.l{L}.weights_proj.weight"].double()
        per_b = []
        for b in range(B):
            x = hidden[b, li].double()
            a = wq_a @ x
            a = a / math.sqrt(float((a * a).mean()) + cfg.rms_norm_eps) * qn
            qf = (wq_b @ a).tolist()
            q = [qf[h * D:(h + 1) * D] for h in range(H)]
            pos = float(positions[b])
            for h in range(H):
                for i in range(R // 2):
                    j = D - R + 2 * i
                    c, s = math.cos(pos * inv[i]), math.sin(pos * inv[i])
                    x0, x1 = q[h][j], q[h][j + 1]
                    q[h][j], q[h][j + 1] = x0 * c - x1 * s, x0 * s + x1 * c
                if had is not None:
                    q[h] = [sum(q[h][m] * had[m][n] for m in range(D)) for n in range(D)]
            w = (wp @ x).tolist()
            row = []
            for n in range(N):
                k = keys[li, n].double().tolist()
                total = 0.0
                for h in range(H):
                    dot = sum(q[h][m] * k[m] for m in range(D))
                    total += w[h] * D ** -0.5 * H ** -0.5 * max(dot, 0.0)
                row.append(total)
            per_b.append(row)
        logits.append(per_b)
    logits = torch.tensor(logits, dtype=torch.float64)
    probs = torch.sigmoid(logits)
    return (probs.amax(0) if ensemble == "max" else probs.mean(0)), logits


def inputs(cfg: LightningConfig, B=3, N=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, len(cfg.layers), cfg.d_model, generator=g)
    keys = torch.randn(len(cfg.layers), N, cfg.head_dim, generator=g)
    positions = torch.tensor([5, 300, 70000][:B])   # beyond the original context: YaRN matters
    return hidden, keys, positions


# ---------------------------------------------------------------------------------------------
# the formula

@pytest.mark.parametrize("ensemble,hadamard,factor", [("max", True, 16.0), ("mean", True, 16.0), ("max", False, 1.0)])
def test_scores_equal_the_plain_reference(tmp_path, ensemble, hadamard, factor):
    cfg = tiny_config(ensemble=ensemble, hadamard=hadamard, rope_factor=factor)
    state = release_state()
    ix = LightningIndexer(cfg)
    ix.load_state_dict(state)
    hidden, keys, positions = inputs(cfg)
    want_scores, want_logits = ref_scores(state, cfg, hidden, keys, positions, ensemble)
    with torch.no_grad():
        logits = ix.layer_logits(hidden, keys, positions)
        scores = ix(hidden, keys, positions)
    assert logits.abs().max() > 0.5  # not a degenerate all-zero case
    torch.testing.assert_close(logits.double(), want_logits, rtol=1e-3, atol=1e-3 * float(want_logits.abs().max()))
    torch.testing.assert_close(scores.double(), want_scores, rtol=1e-3, atol=1e-6)
    assert torch.equal(ix.select(scores), scores > 0.5)


def test_yarn_frequencies_match_hugging_face_deepseek_v4_and_the_reference():
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    for rope_dim, factor in ((64, 16.0), (8, 4.0)):
        hf = DeepseekV4Config(num_hidden_layers=3, hidden_size=64, head_dim=rope_dim * 2, partial_rotary_factor=0.5,
                              max_position_embeddings=65536 * int(factor),
                              rope_parameters={"rope_type": "yarn", "factor": factor,
                                               "original_max_position_embeddings": 65536, "beta_fast": 32,
                                               "beta_slow": 1})
        theirs = DeepseekV4RotaryEmbedding(hf).compress_inv_freq
        cfg = LightningConfig(rope_dim=rope_dim, rope_factor=factor)
        torch.testing.assert_close(yarn_inv_freq(cfg), theirs, rtol=1e-6, atol=0)
        torch.testing.assert_close(yarn_inv_freq(cfg), torch.tensor(ref_inv_freq(cfg), dtype=torch.float32),
                                   rtol=1e-6, atol=0)
    # the published constants: YaRN blends pairs 15..25 of 32
    inv = yarn_inv_freq(LightningConfig())
    base = 160000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert torch.allclose(inv[:15].double(), base[:15], rtol=1e-6)
    assert torch.allclose(inv[25:].double(), base[25:] / 16, rtol=1e-6)


def test_rope_uses_deepseek_v4_interleaved_pairs_on_the_last_dims():
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb

    cfg = tiny_config()
    inv = yarn_inv_freq(cfg)
    q = torch.randn(3, 4, 16)
    positions = torch.tensor([0, 17, 9000])
    angles = positions.float()[:, None] * inv
    theirs = apply_rotary_pos_emb(q.unsqueeze(2), angles.cos()[:, None], angles.sin()[:, None], unsqueeze_dim=1)
    ours = apply_rope(q, positions, inv)
    torch.testing.assert_close(ours, theirs.squeeze(2), rtol=1e-5, atol=1e-6)
    assert torch.equal(ours[..., :8], q[..., :8])   # the leading head_dim - rope_dim dims are not rotated


def test_hadamard_matrix_is_the_normalised_sylvester_matrix():
    for n in (1, 2, 16, 128):
        h = hadamard_matrix(n)
        torch.testing.assert_close(h, torch.tensor(ref_hadamard(n), dtype=torch.float32))
        torch.testing.assert_close(h @ h.T, torch.eye(n), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(12)
    # keys from a backbone that does not rotate them: rotating both sides keeps q.k
    ix = LightningIndexer(tiny_config())
    q, k = torch.randn(5, 16), torch.randn(7, 16)
    torch.testing.assert_close((q @ ix.rotation) @ ix.rotate_keys(k).T, q @ k.T, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# the fp8 key store

def test_fp8_keys_are_132_bytes_and_score_like_fp32_keys():
    cfg = tiny_config(head_dim=128, rope_dim=64)
    ix = LightningIndexer(cfg)
    ix.load_state_dict(release_state(dim=128))
    g = torch.Generator().manual_seed(3)
    keys = ix.rotate_keys(torch.randn(3, 500, 128, generator=g))
    store = Fp8KeyStore(n_layers=3, head_dim=128)
    store.append(keys[:, :200])
    store.append(keys[:, 200:])
    assert store.n_entries == 500
    assert store.packed().shape == (3, 500, 132) and store.packed().dtype == torch.uint8
    assert store.nbytes == 3 * 500 * 132                  # 132 bytes per entry per target layer
    # the release's decoding: 128 fp8 e4m3 bytes, then one fp32 scale
    packed = store.packed()
    decoded = packed[..., :128].contiguous().view(torch.float8_e4m3fn).float() * \
        packed[..., 128:].contiguous().view(torch.float32)
    torch.testing.assert_close(store.keys(), decoded)
    assert (store.keys() - keys).abs().max() <= 0.07 * keys.abs().amax(-1, keepdim=True).max()
    hidden = torch.randn(4, 3, cfg.d_model, generator=g)
    positions = torch.tensor([100, 2000, 2001, 70000])
    with torch.no_grad():
        exact = ix.layer_logits(hidden, keys, positions).flatten()
        fp8 = ix.layer_logits(hidden, store.packed(), positions).flatten()
    pearson = torch.corrcoef(torch.stack([exact, fp8]))[0, 1]
    assert pearson >= 0.99, pearson
    torch.testing.assert_close(unpack_fp8_keys(pack_fp8_keys(keys)), store.keys())


def test_key_store_rejects_wrong_shapes():
    store = Fp8KeyStore(n_layers=3, head_dim=16)
    with pytest.raises(ValueError, match=r"expected \[3, n, 16\] keys"):
        store.append(torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match=r"uint8 \[3, n, 20\]"):
        store.append_packed(torch.zeros(3, 4, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="holds 0 entries, 2 requested"):
        store.keys(2)
    assert store.nbytes == 0


# ---------------------------------------------------------------------------------------------
# the config

@pytest.mark.parametrize("changes,message", [
    ({"n_heads": 0}, "n_heads must be a positive integer"),
    ({"rope_dim": 7}, "rope_dim must be even"),
    ({"rope_dim": 32}, "at most head_dim"),
    ({"head_dim": 24, "rope_dim": 8}, "power-of-two head_dim"),
    ({"rope_factor": 0.5}, "rope_factor must be >= 1"),
    ({"rope_beta_fast": 1.0}, "must exceed rope_beta_slow"),
    ({"layers": []}, "non-empty list"),
    ({"layers": [10, 10]}, "must not repeat"),
    ({"ensemble": "min"}, "ensemble must be 'max' or 'mean'"),
    ({"threshold": 1.0}, "threshold must be a probability"),
])
def test_config_is_validated(changes, message):
    with pytest.raises(IndexerConfigError, match=message):
        tiny_config(**changes)


def test_config_round_trips_and_reads_a_deepseek_v4_config():
    from transformers import DeepseekV4Config

    cfg = tiny_config(layers=[1, 2], fingerprint="x")
    assert cfg.layers == (1, 2)
    assert LightningConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(IndexerConfigError, match="unknown lightning indexer config fields: nope"):
        LightningConfig.from_dict({**cfg.to_dict(), "nope": 1})
    hf = tiny_backbone_config()
    got = LightningConfig.from_hf_config(hf)
    assert (got.d_model, got.head_dim, got.n_heads, got.q_rank, got.rope_dim) == (32, 16, 2, 8, 8)
    assert (got.rope_theta, got.rope_factor, got.rope_original_max_position) == (160000.0, 16.0, 65536)
    assert got.layers == (10, 12, 20) and got.fingerprint.startswith("deepseek_v4-21L-")
    with pytest.raises(IndexerConfigError, match=r"target layers \[11\] are not compressed-sparse-attention"):
        LightningConfig.from_hf_config(hf, layers=[10, 11])
    plain = DeepseekV4Config(num_hidden_layers=2, layer_types=["compressed_sparse_attention"] * 2)
    assert LightningConfig.from_hf_config(plain, layers=[1]).rope_factor == 1.0


def tiny_backbone_config(hidden_size: int = 32):
    """A DeepSeek-V4 config (no weights) whose CSA layers include 10, 12 and 20."""
    from transformers import DeepseekV4Config

    types = ["heavily_compressed_attention"] * 21
    for L in (2, 4, 10, 12, 20):
        types[L] = "compressed_sparse_attention"
    return DeepseekV4Config(num_hidden_layers=21, hidden_size=hidden_size, head_dim=16, partial_rotary_factor=0.5,
                            index_head_dim=16, index_n_heads=2, q_lora_rank=8, layer_types=types,
                            rope_parameters={"rope_type": "yarn", "factor": 16.0,
                                             "original_max_position_embeddings": 65536, "beta_fast": 32,
                                             "beta_slow": 1})


# ---------------------------------------------------------------------------------------------
# checkpoints

def rope_table(cfg: LightningConfig, rows: int = 300) -> torch.Tensor:
    angles = torch.outer(torch.arange(rows, dtype=torch.float64), torch.tensor(ref_inv_freq(cfg), dtype=torch.float64))
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def test_published_layout_loads_with_weights_only(tmp_path, monkeypatch):
    state = release_state(dtype=torch.bfloat16)
    cfg = LightningConfig(rope_dim=8)           # the published RoPE constants, tiny rope_dim
    for L in (10, 12, 20):                      # the release trainer also saves its RoPE table
        state[f"retrievers.l{L}.freqs_cis"] = rope_table(cfg)
    torch.save(state, tmp_path / "indexer.pt")
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    published_rope = dict(rope_dim=8, rope_original_max_position=65536)
    ix = load_release_checkpoint(tmp_path / "indexer.pt", tiny_config(**published_rope))
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert ix.layers == [10, 12, 20]
    assert (ix.cfg.d_model, ix.cfg.q_rank, ix.cfg.n_heads, ix.cfg.head_dim) == (32, 16, 4, 16)
    for key, value in ix.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, state[key].float())
    # without a config: the release's constants (RoPE on the last 64 dims) and every layer in the file
    full = release_state(layers=(10, 20), dim=64)
    full["retrievers.l20.freqs_cis"] = rope_table(LightningConfig(), rows=4096)
    torch.save(full, tmp_path / "full.pt")
    assert load_release_checkpoint(tmp_path / "full.pt").cfg == LightningConfig(
        d_model=32, q_rank=16, n_heads=4, head_dim=64, layers=(10, 20))
    # the release trainer's per-epoch file wraps the weights under "model_state"
    torch.save({"epoch": 3, "model_state": release_state(), "avg_loss": 0.1}, tmp_path / "epoch.pt")
    assert load_release_checkpoint(tmp_path / "epoch.pt", tiny_config()).layers == [10, 12, 20]
    # a config with fewer target layers loads only those
    assert load_release_checkpoint(tmp_path / "indexer.pt", tiny_config(layers=[12], **published_rope)).layers == [12]


def test_a_rope_table_that_disagrees_with_the_config_is_refused(tmp_path):
    state = release_state()
    state["retrievers.l10.freqs_cis"] = rope_table(LightningConfig(rope_dim=8, rope_theta=10000.0))
    torch.save(state, tmp_path / "indexer.pt")
    with pytest.raises(CheckpointError, match="RoPE table saved with layer 10 does not match"):
        load_release_checkpoint(tmp_path / "indexer.pt", tiny_config(rope_dim=8))


def test_convert_round_trip_is_lossless(tmp_path):
    state = release_state()
    torch.save(state, tmp_path / "src.pt")
    ix = convert_checkpoint(tmp_path / "src.pt", tmp_path / "ours", config=tiny_config())
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["indexer.json", "indexer.safetensors"]
    ours = load_lightning_indexer(tmp_path / "ours")
    assert ours.cfg == ix.cfg
    convert_checkpoint(tmp_path / "ours", tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert not list(tmp_path.glob("**/*.tmp"))                      # temporary files were renamed into place
    hidden, keys, positions = inputs(ix.cfg)
    with torch.no_grad():
        assert torch.equal(ours(hidden, keys, positions), ix(hidden, keys, positions))
    with pytest.raises(CheckpointError, match="exists; pass --force"):
        convert_checkpoint(tmp_path / "ours", tmp_path / "back.pt")
    convert_checkpoint(tmp_path / "ours", tmp_path / "back.pt", force=True)
    save_release_checkpoint(ours, tmp_path / "again.pt")
    assert (tmp_path / "again.pt").read_bytes() != b""


def write(tmp_path, state, name="bad.pt"):
    torch.save(state, tmp_path / name)
    return tmp_path / name


def _without(state, key):
    return {k: v for k, v in state.items() if k != key}


def _with(state, key, value):
    return {**state, key: value}


@pytest.mark.parametrize("make,message", [
    (lambda s: _without(s, "retrievers.l12.q_norm_weight"), "layer 12 lacks retrievers.l12.q_norm_weight"),
    (lambda s: _with(s, "retrievers.l10.q_norm_weight", torch.ones(15)), "q_norm_weight has 15 entries, expected q rank 16"),
    (lambda s: _with(s, "retrievers.l10.wq_b.weight", torch.ones(63, 16)), r"wq_b.weight has shape \[63, 16\]"),
    (lambda s: _with(s, "retrievers.l10.weights_proj.weight", torch.ones(4, 31)), "weights_proj.weight has shape"),
    (lambda s: _with(s, "retrievers.l10.wq_a.weight", torch.ones(16)), "expected a non-empty 2-D tensor"),
    (lambda s: _with(s, "retrievers.l20.wq_a.weight", torch.ones(16, 33)), r"retrievers.l20.wq_a.weight .* has shape \[16, 33\]"),
    (lambda s: _with(s, "retrievers.l10.wq_a.weight", torch.full((16, 32), float("nan"))), "NaN or infinite"),
    (lambda s: _with(s, "retrievers.l10.bias", torch.ones(2)), "outside the published layout: retrievers.l10.bias"),
    (lambda s: {"model.embed.weight": torch.ones(2)}, "no retrievers.l{L}"),
    (lambda s: [torch.ones(2)], "does not hold a plain state dict"),
    (lambda s: _with(s, "retrievers.l10.wq_a.weight", [1.0, 2.0]), "does not hold a plain state dict"),
])
def test_bad_release_files_get_clear_errors(tmp_path, make, message):
    path = write(tmp_path, make(release_state()))
    with pytest.raises(CheckpointError, match=message):
        load_release_checkpoint(path, tiny_config())


PWNED = []


def _pwn():
    PWNED.append(True)
    return {}


class _Evil:
    def __reduce__(self):  # would run _pwn if unpickled without weights_only
        return (_pwn, ())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_objects_are_refused_without_running_them(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"retrievers.l10.wq_a.weight": _Evil()}, f)
    with pytest.raises(CheckpointError, match="weights-only") as info:
        load_release_checkpoint(tmp_path / "evil.pt")
    assert "\n" not in str(info.value) and not PWNED
    (tmp_path / "junk.pt").write_bytes(b"\x00not a pickle at all")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_release_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_release_checkpoint(tmp_path / "missing.pt")


def test_another_backbone_gets_a_clear_error(tmp_path):
    path = write(tmp_path, release_state(), "ix.pt")
    with pytest.raises(CheckpointError, match="made for another backbone: its d_model is 32, this backbone's is 64"):
        load_release_checkpoint(path, tiny_config(d_model=64))
    with pytest.raises(CheckpointError, match=r"no weights for target layer\(s\) \[14\]"):
        load_release_checkpoint(path, tiny_config(layers=[10, 14]))
    ix = load_release_checkpoint(path, tiny_config(fingerprint="deepseek_v4-43L-aaaa"))
    save_lightning_indexer(ix, tmp_path / "ours")
    assert load_lightning_indexer(tmp_path / "ours", fingerprint="deepseek_v4-43L-aaaa").cfg.fingerprint == \
        "deepseek_v4-43L-aaaa"
    with pytest.raises(CheckpointError, match="made for backbone deepseek_v4-43L-aaaa, but the loaded backbone is "
                                              "deepseek_v4-6L-bbbb"):
        load_lightning_indexer(tmp_path / "ours", fingerprint="deepseek_v4-6L-bbbb")


def test_damaged_or_foreign_folders_get_clear_errors(tmp_path):
    ix = load_release_checkpoint(write(tmp_path, release_state(), "ix.pt"), tiny_config())
    folder = save_lightning_indexer(ix, tmp_path / "ours")
    weights = folder / "indexer.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="corrupt.*checksum"):
        load_lightning_indexer(folder)
    with pytest.raises(CheckpointError, match="DeepSeek-V4 lightning indexer.*load_lightning_indexer"):
        load_indexer(folder)
    from flashmemory.indexer import IndexerConfig, NeuralIndexer
    other = save_indexer(NeuralIndexer(IndexerConfig(d_model=8, key_dim=4, rope_dim=4, layers=[0], n_heads=1,
                                                     q_rank=2, chunk_size=32, key_block=32)), tmp_path / "llama")
    with pytest.raises(CheckpointError, match="ordinary attention backbones"):
        load_lightning_indexer(other)
    with pytest.raises(CheckpointError, match="not a lightning indexer checkpoint"):
        load_lightning_indexer(tmp_path)


# ---------------------------------------------------------------------------------------------
# the CLI

def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_converts_both_ways(tmp_path, capsys):
    state = release_state()
    torch.save(state, tmp_path / "src.pt")
    model = tmp_path / "model"
    tiny_backbone_config().save_pretrained(model)
    code, out, _ = cli(capsys, "indexer", "convert", tmp_path / "src.pt", tmp_path / "ours", "--model", model)
    assert code == 0 and "layers 10, 12, 20" in out and "bound to deepseek_v4-21L-" in out
    assert load_lightning_indexer(tmp_path / "ours").cfg.rope_dim == 8
    code, out, _ = cli(capsys, "indexer", "convert", tmp_path / "ours", tmp_path / "back.pt")
    assert code == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert all(torch.equal(back[k], state[k]) for k in state)
    torch.save(release_state(dim=64), tmp_path / "src64.pt")   # no --model: the release's constants, unbound
    code, out, _ = cli(capsys, "indexer", "convert", tmp_path / "src64.pt", tmp_path / "ours2", "--to", "safetensors")
    assert code == 0 and "not bound to a backbone" in out
    assert load_lightning_indexer(tmp_path / "ours2").cfg.fingerprint is None
    wide = tmp_path / "wide"
    tiny_backbone_config(hidden_size=64).save_pretrained(wide)
    code, _, err = cli(capsys, "indexer", "convert", tmp_path / "ours", tmp_path / "x.pt", "--model", wide)
    assert code == 2 and "was made for backbone deepseek_v4-21L-" in err      # bound to the 32-wide config
    code, _, err = cli(capsys, "indexer", "convert", tmp_path / "ours2", tmp_path / "x.pt", "--model", wide)
    assert code == 2 and "made for another backbone: its d_model is 32" in err   # unbound, but the sizes differ


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_cli_bad_inputs_are_one_line_errors(tmp_path, capsys):
    torch.save(release_state(), tmp_path / "src.pt")
    (tmp_path / "taken.pt").write_bytes(b"keep me")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    wide = tmp_path / "wide"
    tiny_backbone_config(hidden_size=64).save_pretrained(wide)
    cases = [
        ((tmp_path / "missing.pt", tmp_path / "out"), "not found"),
        ((tmp_path / "src.pt", tmp_path / "taken.pt", "--to", "release"), "exists; pass --force"),
        ((tmp_path / "evil.pt", tmp_path / "out"), "weights-only"),
        ((tmp_path / "src.pt", tmp_path / "out", "--model", tmp_path / "nowhere"), "model folder not found"),
        ((tmp_path / "src.pt", tmp_path / "out", "--model", wide), "made for another backbone"),
        ((tmp_path / "src.pt", tmp_path, "--to", "release", "--force"), "is a folder"),
    ]
    for argv, message in cases:
        code, out, err = cli(capsys, "indexer", "convert", *argv)
        assert code == 2, argv
        assert err.startswith("flashmemory: error:") and message in err and err.count("\n") == 1, err
    assert (tmp_path / "taken.pt").read_bytes() == b"keep me" and not (tmp_path / "out").exists() and not PWNED
    with pytest.raises(SystemExit) as info:
        main(["indexer", "convert", str(tmp_path / "src.pt"), str(tmp_path / "o"), "--to", "onnx"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert main(["indexer"]) == 2 and "convert" in capsys.readouterr().out
