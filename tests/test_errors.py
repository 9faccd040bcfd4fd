"""Bad input gets one clear message, through the API and the CLI."""

from __future__ import annotations

import json

import pytest

from flashmemory import BackboneError, ConfigError, LSAConfig, LSAEngine, PromptError, load_backbone, make_policy
from flashmemory.cli.main import main


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def engine(backbone):
    return LSAEngine(backbone, LSAConfig(budget=0.15))


def test_prompt_longer_than_context(engine):
    with pytest.raises(PromptError, match="exceeds the model's context of 8192"):
        engine.generate(list(range(8190)), max_new_tokens=8)


def test_empty_prompt(engine, tmp_path, capsys):
    with pytest.raises(PromptError, match="empty"):
        engine.generate("   ")
    f = tmp_path / "empty.txt"
    f.write_text("")
    code, _, err = cli(capsys, "generate", "--prompt-file", str(f), "--policy", "full")
    assert code == 2 and "prompt is empty" in err


def test_unknown_policy(capsys, tmp_path):
    with pytest.raises(ValueError, match="unknown policy 'nope'; choose one of: .*quest"):
        make_policy("nope")
    f = tmp_path / "p.txt"
    f.write_text("hello")
    code, _, err = cli(capsys, "generate", "--prompt-file", str(f), "--policy", "nope")
    assert code == 2 and "unknown policy" in err


def test_a_budget_below_sink_and_tail_keeps_the_working_set(engine, essays):
    ids = engine.tokenizer(essays)["input_ids"][:1500]
    config = LSAConfig(budget=0.05)
    result = engine.generate(ids, policy="quest", max_new_tokens=4, config=config)
    working_set = config.min_pages * config.page_size  # sink + tail + one cycle
    assert config.budget_tokens(1500) == working_set
    assert 0.05 < result.report.resident_fraction_max <= working_set / 1500
    with pytest.raises(ConfigError, match="smaller than sink \\+ tail"):  # a fixed page cap cannot be floored
        LSAConfig(budget=None, max_pages=3)


def test_inconsistent_chunk_and_page(capsys, tmp_path):
    with pytest.raises(ConfigError, match="multiple of chunk_size"):
        LSAConfig(chunk_size=32, page_size=48)
    f = tmp_path / "p.txt"
    f.write_text("hello")
    code, _, err = cli(capsys, "generate", "--prompt-file", str(f), "--chunk-size", "32", "--page-size", "48")
    assert code == 2 and "multiple of chunk_size" in err


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.1"])
def test_budget_out_of_range(capsys, tmp_path, bad):
    f = tmp_path / "p.txt"
    f.write_text("hello")
    code, _, err = cli(capsys, "generate", "--prompt-file", str(f), "--budget", bad)
    assert code == 2 and "budget must be a fraction" in err


def test_missing_model_folder(tmp_path, capsys):
    with pytest.raises(BackboneError, match="model folder not found"):
        load_backbone(tmp_path / "nowhere")
    f = tmp_path / "p.txt"
    f.write_text("hello")
    code, _, err = cli(capsys, "generate", "--prompt-file", str(f), "--model", str(tmp_path / "nowhere"), "--policy", "full")
    assert code == 2 and "model folder not found" in err


def test_folder_that_is_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(BackboneError, match="unsupported architecture .*BertForMaskedLM.*LlamaForCausalLM"):
        load_backbone(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BackboneError, match="no config.json"):
        load_backbone(empty)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(BackboneError, match="cannot read the model config"):
        load_backbone(tmp_path / "bad")


def test_missing_prompt_file(capsys, tmp_path):
    code, _, err = cli(capsys, "generate", "--prompt-file", str(tmp_path / "missing.txt"))
    assert code == 2 and "prompt file not found" in err


def test_damaged_dump_part_is_named(tmp_path):
    from flashmemory.traces.dump import DumpError, dump_seconds

    (tmp_path / "part-000000.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DumpError, match="part-000000.safetensors.*delete it and resume"):
        dump_seconds(tmp_path)
