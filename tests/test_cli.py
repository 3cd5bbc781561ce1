"""The `patchdpo` dispatcher: every registered command imports and answers --help; bad commands fail clearly."""

from __future__ import annotations

import importlib

import pytest

from patchdpo_fast.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name} " in out


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage: patchdpo <command>" in capsys.readouterr().out


def test_unknown_command(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_main_and_help(name, capsys):
    module = importlib.import_module(COMMANDS[name][0])
    assert callable(module.main)
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out
