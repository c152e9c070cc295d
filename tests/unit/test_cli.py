"""The CLI: every stage's --help lists its settings; errors become exit code 2."""

import pytest

from gdrt_core.cli import build_parser, main, settings_help


@pytest.mark.parametrize("stage", ["curate", "init-model", "train", "group", "attribute", "evaluate"])
def test_help_lists_every_setting(stage, capsys):
    with pytest.raises(SystemExit) as e:
        main([stage, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "settings (in --config FILE.yaml, or --set key=value):" in out
    assert "out (required)" in out or "out =" in out


def test_settings_help_only_for_stages():
    assert settings_help("recommend") == "" and "tau = 1.0" in settings_help("train")


def test_bad_input_is_exit_code_2(tmp_path, capsys):
    assert main(["evaluate", "--dataset", str(tmp_path / "missing"), "--model", "m", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "gdrt evaluate: error:" in err and "missing" in err
    assert not (tmp_path / "o").exists()


def test_every_subcommand_parses():
    parser = build_parser()
    args = parser.parse_args(["run", "--set", "tau=0.5"])
    assert args.overrides == ["tau=0.5"]
