"""The open_clip flag table covers every flag of the installed open_clip trainer and agrees with our parser."""

import argparse
import types

import pytest

from dissect_fast.config import option_strings
from dissect_fast.openclip_flags import (
    DIFFERS,
    MAPPED,
    MAPPED_TO,
    OPENCLIP_FLAGS,
    REFUSED,
    STATUSES,
    TAKEN,
    check_unsupported,
    flag_table_markdown,
)

pytest.importorskip("open_clip_train.params")


def openclip_option_strings() -> list[str]:
    """The option strings of the installed open_clip trainer's parser (``open_clip_train.params.parse_args``),
    in its order, without ``-h/--help``. Builds the parser without parsing: ``parse_args`` is stopped at
    its ``parser.parse_args`` call through a stand-in for the ``argparse`` module it uses."""
    from open_clip_train import params

    class _Built(Exception):
        pass

    class _Capture(argparse.ArgumentParser):
        def parse_args(self, *args, **kwargs):
            raise _Built(self)

    shim = types.SimpleNamespace(**{k: getattr(argparse, k) for k in dir(argparse) if not k.startswith("__")})
    shim.ArgumentParser = _Capture
    real, params.argparse = params.argparse, shim
    try:
        params.parse_args([])
    except _Built as built:
        parser: argparse.ArgumentParser = built.args[0]
    else:
        raise RuntimeError("open_clip_train.params.parse_args did not build an argparse parser")
    finally:
        params.argparse = real
    return [s for a in parser._actions if not isinstance(a, argparse._HelpAction) for s in a.option_strings]


def test_table_covers_every_openclip_flag():
    theirs = openclip_option_strings()
    assert len(theirs) > 50 and "--horovod" in theirs and "--help" not in theirs
    missing = [f for f in theirs if f not in OPENCLIP_FLAGS]
    assert not missing, f"open_clip has flags the table lacks (add them to OPENCLIP_FLAGS): {missing}"
    gone = [f for f in OPENCLIP_FLAGS if f not in theirs]
    assert not gone, f"the table lists flags the installed open_clip no longer has: {gone}"


def test_table_agrees_with_our_parser():
    ours = option_strings()
    assert all(status in STATUSES and isinstance(note, str) for status, note in OPENCLIP_FLAGS.values())
    for flag, (status, note) in OPENCLIP_FLAGS.items():
        if status in (TAKEN, DIFFERS):
            assert flag in ours, f"{flag} is marked {status} but dissect_fast's parser lacks it"
        elif status == MAPPED:
            assert MAPPED_TO[flag] in ours, f"{flag} maps to {MAPPED_TO[flag]}, which dissect_fast's parser lacks"
            assert flag in ours, f"{flag} is mapped: our parser takes it as an alias of {MAPPED_TO[flag]}"
        elif status == REFUSED:
            assert flag not in ours, f"{flag} is refused but dissect_fast's parser takes it: mark it taken"
            assert note.strip(), f"{flag}: a refused flag needs a reason"
    assert set(MAPPED_TO) == {f for f, (s, _) in OPENCLIP_FLAGS.items() if s == MAPPED}


def test_check_unsupported_messages():
    ours = option_strings()
    assert check_unsupported(["--horovod"], ours) == (
        "--horovod is an open_clip flag dissect_fast does not take: not supported: use torchrun or srun"
    )
    assert check_unsupported(["--model", "RN50", "--torchcompile"], ours) is None  # an alias of --compile
    assert "CoCa is not supported" in check_unsupported(["--coca-caption-loss-weight=1.0"], ours)
    assert "dissect-fast shards" in check_unsupported(["--csv-img-key", "filepath"], ours)
    # known flags, values, unknown non-open_clip flags and anything after `--` are left to argparse
    assert check_unsupported(["--model", "RN50", "--epochs", "2", "--not-a-flag"], ours) is None
    assert check_unsupported(["--", "--horovod"], ours) is None
    # a planned flag: "not yet" until our parser has it, then accepted
    # a flag of the table that our parser lacks is refused with its note (the table never changes the parser)
    assert (
        check_unsupported(["--siglip"], set())
        == "--siglip is an open_clip flag dissect_fast does not take: " + (OPENCLIP_FLAGS["--siglip"][1])
    )
    assert check_unsupported(["--val-frequency"], set()).endswith(
        "use --val-every (" + OPENCLIP_FLAGS["--val-frequency"][1] + ")"
    )


def test_table_rows():
    table = flag_table_markdown()
    assert table.count("\n") == len(OPENCLIP_FLAGS) + 2
    assert "| `--torchcompile` | `--compile` |" in table and "| `--horovod` | no |" in table
    assert "| `--momentum` | **differs** |" in table and "| `--lr` | same |" in table


@pytest.mark.parametrize(
    "typo,meant",
    [("ViT-B32", "ViT-B-32"), ("rn50", "RN50"), ("vit-b-16", "ViT-B-16"), ("micro_rn", "micro-rn"), ("RN5O", "RN50")],
)
def test_misspelled_model_suggests_the_name(typo, meant):
    from dissect_fast.model import model_name_for

    with pytest.raises(ValueError) as e:
        model_name_for(typo, None)
    assert f"did you mean {meant}?" in str(e.value) and "is not an open_clip model name" in str(e.value)
    assert model_name_for(meant, None) == meant  # names are case-sensitive: only the exact one is accepted


def test_unknown_model_without_a_close_name():
    from dissect_fast.model import model_name_for

    with pytest.raises(ValueError) as e:
        model_name_for("qqqqqq", None)
    assert "did you mean" not in str(e.value) and "open_clip.list_models()" in str(e.value)


def test_misspelled_subcommand(capsys):
    from dissect_fast.cli import main

    assert main(["trian", "--epochs", "1"]) == 2
    assert capsys.readouterr().err.strip() == "dissect-fast: unknown command 'trian'; did you mean 'train'?"
    assert main(["select_subset"]) == 2
    assert "did you mean 'select-subset'?" in capsys.readouterr().err
    assert main(["zzzz"]) == 2
    assert "the commands are synth, shards, train" in capsys.readouterr().err
    assert main(["--train-data", "x"]) == 2
    assert "expected a command before the flags" in capsys.readouterr().err


def test_docs_table_is_current():
    """docs/openclip-flags.md holds the generated table (regenerate it from flag_table_markdown())."""
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "openclip-flags.md")
    with open(path) as f:
        text = f.read()
    assert flag_table_markdown() in text
