"""The command line: report and dump on a small preset, and clear errors for bad input."""

import json

import pytest

from gemma4_passes import cli


def test_report_table_matches_expected(capsys):
    rc = cli.main(["report", "--preset", "tiny-31b", "--layers", "2", "--dtype", "bf16", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| post_attn_norm | 2 | 2 | ok |" in out
    assert "| ffn_tail | 2 | 2 | ok |" in out
    assert "| qkv_norm | 2 | 2 | ok |" in out
    assert "MISMATCH" not in out


def test_dump_writes_before_after_per_pass(tmp_path, capsys):
    rc = cli.main(["dump", "--out", str(tmp_path), "--preset", "tiny-31b", "--layers", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    names = [p.name for p in tmp_path.iterdir()]
    for fusion in ("post_attn_norm", "ffn_tail", "qkv_norm"):
        before = [n for n in names if f"gemma4_passes.{fusion}.before" in n]
        after = [n for n in names if f"gemma4_passes.{fusion}.after" in n]
        assert before and after, (fusion, names)
        # the after-graph calls the fused op, the before-graph does not
        a = (tmp_path / after[0]).read_text()
        b = (tmp_path / before[0]).read_text()
        assert "gemma4_passes" in a and a.count("torch.ops.gemma4_passes") > b.count("torch.ops.gemma4_passes")


def test_unknown_fusion_is_a_clear_error(capsys):
    rc = cli.main(["report", "--preset", "tiny-31b", "--fusions", "post_attn_norm,bogus"])
    err = capsys.readouterr().err
    assert rc == 2 and "bogus" in err and "available" in err


def test_unknown_preset_is_a_clear_error(capsys):
    rc = cli.main(["report", "--preset", "gemma-9"])
    err = capsys.readouterr().err
    assert rc == 2 and "gemma-9" in err and "tiny-e2b" in err


def test_checkpoint_that_is_not_gemma4(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rc = cli.main(["report", "--checkpoint", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "llama" in err and str(tmp_path) in err


def test_missing_checkpoint_dir(tmp_path, capsys):
    rc = cli.main(["report", "--checkpoint", str(tmp_path / "nope")])
    assert rc == 2 and "nope" in capsys.readouterr().err


def test_parser_requires_a_command():
    with pytest.raises(SystemExit):
        cli.main([])
