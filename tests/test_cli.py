"""The ``open-clip-starft`` dispatcher and the conventions every subcommand shares: a module with
``build_parser()`` and ``main(argv)``, one-line errors, ``--device`` cuda when available, no file
written unless ``--out``/``--docs`` says where, and the old names kept as aliases."""
import importlib

import pytest
import torch

from open_clip_starft.bench import cli as bench_cli
from open_clip_starft.cli import COMMANDS, main

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(argv, capsys):
    """``open-clip-starft ARGV`` in this process: (exit status, stdout, stderr); argparse's exits included."""
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def _help_names(module):
    """What ``--help`` must show for a subcommand module: every visible flag of its own ``build_parser()``,
    or for a command with subcommands (``SUBCOMMANDS``) each subcommand's name."""
    if hasattr(module, "SUBCOMMANDS"):
        return set(module.SUBCOMMANDS)
    return _options(module.build_parser()) - {"-h", "--help"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_answers_help_with_its_own_parser_and_refuses_an_unknown_flag(name, capsys):
    """The dispatcher reaches the module the table names: its ``--help`` is that module's parser's (every
    flag listed, exit 0), and a flag it does not have is an argparse error (exit 2) naming the flag or the
    missing required ones, never a traceback."""
    module = importlib.import_module(COMMANDS[name][0])
    status, out, err = _run([name, "--help"], capsys)
    expected = _help_names(module)
    assert status == 0 and expected and not [flag for flag in expected if flag not in out], (name, out[-2000:])
    status, out, err = _run([name, "--no-such-flag"], capsys)
    assert status == 2 and "Traceback" not in err, (name, err[-2000:])
    last = err.strip().splitlines()[-1]
    assert "error: " in last and ("--no-such-flag" in last or "are required: " in last), (name, last)


@pytest.mark.parametrize("name", sorted(bench_cli.SUBCOMMANDS))
def test_every_bench_subcommand_answers_help_with_its_own_parser(name, capsys):
    module = importlib.import_module(bench_cli.SUBCOMMANDS[name][0])
    status, out, _ = _run(["bench", name, "--help"], capsys)
    expected = _help_names(module)
    assert status == 0 and expected and not [flag for flag in expected if flag not in out], (name, out[-2000:])
    assert f"usage: open-clip-starft bench {name}" in out


def test_a_refused_training_flag_is_one_line_before_any_data_is_read(tmp_path, capsys):
    """``open-clip-starft train`` refuses a bad StarFT flag in one line (exit 2) before upstream starts:
    the training data named does not exist and nothing is written under --logs."""
    argv = ["train", "--starft-lambda", "-1", "--train-data", str(tmp_path / "none-{0..3}.tar"),
            "--logs", str(tmp_path / "logs")]
    status, _, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("open-clip-starft: error: --starft-lambda -1 "), err
    assert "≥ 0" in lines[0]
    assert not (tmp_path / "logs").exists()


def test_help_lists_every_command_and_unknown_ones_are_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["benchh"]) == 2
    err = capsys.readouterr().err
    assert "error: unknown command 'benchh'" in err


def test_renamed_commands_keep_their_old_names_and_the_studies_are_not_commands(capsys):
    # eval-bench is bench eval; the accuracy studies left the installed package for the checkout's studies/
    assert COMMANDS["eval-bench"][0] == bench_cli.SUBCOMMANDS["eval"][0]
    for argv in (["eval-bench", "--help"], ["bench", "eval", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0 and "eval throughput" in capsys.readouterr().out
    assert not any(module.startswith("studies") for module, _ in [*COMMANDS.values(), *bench_cli.SUBCOMMANDS.values()])
    for argv in (["waterbirds-lite", "--help"], ["demo-study"], ["demo", "--study"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "python -m studies." in err[0], err


def test_the_studies_run_from_a_checkout(capsys):
    from studies.waterbirds_lite.cli import main as wbl_main
    assert wbl_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "accuracy study" in out and all(stage in out for stage in ("build", "pretrain", "run", "report"))
    with pytest.raises(SystemExit) as e:
        wbl_main(["pretrain", "--help"])
    assert e.value.code == 0 and "--pretrain-epochs" in capsys.readouterr().out


def test_bench_defaults_device_and_writes_nothing_without_out():
    from open_clip_starft.bench import data, eval_throughput, step
    from studies.waterbirds_lite import cli as wbl

    assert step.build_parser().parse_args([]).device == DEVICE
    assert eval_throughput.build_parser().parse_args([]).device == DEVICE
    assert step.build_parser().parse_args([]).out is None
    assert data.build_parser().parse_args(["--shards", "x.tar"]).out is None
    assert eval_throughput.build_parser().parse_args([]).out is None
    assert wbl.build_parser("report").parse_args([]).docs is None  # the report goes under --out


def test_bench_errors_are_one_line(capsys):
    assert main(["bench", "step", "--batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "open-clip-starft: error: --batch-size, --steps and --accum-freq must be ≥ 1"
    if not torch.cuda.is_available():
        assert main(["bench", "step", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_waterbirds_lite_stage_out_of_order_is_one_line(tmp_path, capsys):
    from studies.waterbirds_lite.cli import main as wbl_main
    assert wbl_main(["report", "--out", str(tmp_path / "wbl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run the build stage first" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wbl"]  # nothing written outside --out


def _options(parser):
    """Every visible option string of ``parser`` and its subparsers' (argparse's own structure)."""
    import argparse
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
        elif action.help != argparse.SUPPRESS:
            found |= set(action.option_strings)
    return found


def _all_parsers():
    from open_clip_starft.tools.descriptors import cli as descriptors
    parsers = {name: importlib.import_module(module).build_parser() for name, (module, _) in COMMANDS.items()
               if name not in ("train", "eval-bench")}
    parsers.update({f"bench {name}": importlib.import_module(module).build_parser()
                    for name, (module, _) in bench_cli.SUBCOMMANDS.items()})
    parsers.update({f"descriptors {name}": fn() for name, fn in (
        ("generate", descriptors._generate_parser), ("show", descriptors._show_parser),
        ("validate", descriptors._validate_parser), ("stats", descriptors._stats_parser))})
    return parsers


def test_one_vocabulary_across_subcommands():
    """The same flag for the same thing: the descriptor set is --concepts (--starft-concepts in training's
    own group), output paths --out, a language model --llm-model; the old names are hidden aliases."""
    from open_clip_starft.host.params import build_parser as training_parser
    assert "--starft-concepts" in _options(training_parser())
    with_concepts = set()
    for name, parser in _all_parsers().items():
        options = _options(parser)
        assert not options & {"--descriptors", "--concept", "--json", "--output", "--out-dir", "--output-dir"}, name
        if "--concepts" in options:
            with_concepts.add(name)
    assert {"sweep", "descriptors generate", "descriptors show", "descriptors stats"} <= with_concepts
    assert "--llm-model" in _options(_all_parsers()["descriptors generate"])
