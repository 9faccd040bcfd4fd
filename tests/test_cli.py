"""`flashmemory generate` end to end on the default model."""

from __future__ import annotations

import json

from flashmemory.cli.main import main


def test_generate_json(tmp_path, capsys, essays):
    f = tmp_path / "prompt.txt"
    f.write_text(essays[:6000] + "\n\nSummarize the text above in one sentence.")
    code = main(["generate", "--prompt-file", str(f), "--policy", "quest", "--budget", "0.3",
                 "--max-new-tokens", "70", "--chat", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)
    assert data["text"] and len(data["token_ids"]) == 70 or data["token_ids"][-1] in (2, 0)
    report = data["report"]
    assert 0 < report["resident_fraction_mean"] <= 0.3
    assert 0 < report["device_kv_bytes_peak"] <= 0.3 * report["full_kv_bytes"]
    assert report["transfers"]["recalls"] > 0 and report["cycles"] >= 1


def test_generate_text_report(tmp_path, capsys):
    f = tmp_path / "prompt.txt"
    f.write_text("The capital of France is")
    code = main(["generate", "--prompt-file", str(f), "--policy", "full", "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert code == 0 and "memory report (full)" in out and "transfers:" in out


def test_help_lists_the_options(capsys):
    try:
        main(["generate", "--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    for option in ("--prompt-file", "--model", "--policy", "--budget", "--max-new-tokens", "--chat", "--json"):
        assert option in out


def test_help_states_each_default_once(capsys):
    for command in ("generate", "eval", "dump", "train", "layers"):
        try:
            main([command, "--help"])
        except SystemExit:
            pass
        out = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in out, command  # a default the help already explains
        if command == "train":
            assert "learning rate (default: 0.002)" in out and "(default: 0)" in out
        if command == "eval":
            assert "(default 4096)" in out and "(default: 0.12)" in out


def test_an_output_path_that_cannot_be_created_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "A short document about nothing in particular."}) + "\n")
    code = main(["dump", "--out", str(blocker / "dump"), "--jsonl", str(docs), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "flashmemory: error:" in err and str(blocker) in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder"   # nothing the user stored is touched
