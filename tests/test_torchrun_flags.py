"""Every training flag passes through torchrun's own parser to dissect_fast/train.py.

torchrun parses its options with argparse (allow_abbrev): a script flag that is an ambiguous prefix of
torchrun options stops torchrun, even after the script name. Only dissect_fast/train.py runs under
torchrun; the `dissect-fast` subcommands never do, so their parsers are not checked here.
"""

import argparse

import pytest
from torch.distributed.run import get_args_parser

from dissect_fast.config import build_parser

SCRIPT = "dissect_fast/train.py"


def torchrun_parse(argv: list[str]) -> argparse.Namespace:
    """torchrun's own parse of argv; an argparse error exits (SystemExit)."""
    return get_args_parser().parse_args(argv)


def our_options() -> list[tuple[str, bool]]:
    """(option string, takes a value) for every option of the training parser, -h/--help included."""
    out = []
    for action in build_parser()._actions:
        for opt in action.option_strings:
            out.append((opt, action.nargs != 0))
    return out


@pytest.mark.parametrize("option,takes_value", [o for o in our_options() if o[0] != "--logs"])
def test_torchrun_passes_every_flag_through(option, takes_value, capsys):
    flag = [option, "x"] if takes_value else [option]
    try:
        a = torchrun_parse(["--nproc-per-node", "2", SCRIPT, *flag])
    except SystemExit as e:
        pytest.fail(f"torchrun rejects {option} after the script: {capsys.readouterr().err.strip()} (exit {e.code})")
    assert a.training_script == SCRIPT
    assert a.training_script_args == flag


def test_torchrun_rejects_logs_hence_logs_dir(capsys):
    """Why --logs-dir exists: `--logs` is an ambiguous prefix of torchrun's --logs-specs / --logs_specs. If this
    fails, torchrun accepts --logs now and the --logs help text and the README should say so."""
    for flag in (["--logs", "x"], ["--logs=x"]):
        with pytest.raises(SystemExit):
            torchrun_parse(["--nproc-per-node", "2", SCRIPT, *flag])
        assert "ambiguous option: --logs" in capsys.readouterr().err
    a = build_parser().parse_args(["--train-data", "d", "--logs-dir", "runs"])
    assert a.logs == "runs"  # same destination as --logs
    # `--` before the script also works: torchrun's parser then reads everything after it as positional
    a = torchrun_parse(["--nproc-per-node", "2", "--", SCRIPT, "--logs", "x"])
    assert a.training_script_args == ["--logs", "x"]
