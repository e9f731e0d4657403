"""Every option of the commands torchrun launches (datagen, cohen, sequential, certify) passes through
torchrun's own parser (Python 3.11's argparse reads abbreviations even after the script name), so
``torchrun ... --no-python surrogate-cert datagen --samples 3000 ...`` starts; ``--n`` stays an alias
for one-process use. Commands that run as one process refuse torchrun."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from surrogate_cert.cli import build_parser, main

TORCHRUN_COMMANDS = ("datagen", "cohen", "sequential", "certify")


def options(command: str) -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return [action.option_strings[0] for action in sub._actions if action.option_strings and action.dest != "help"]


@pytest.mark.parametrize("command", TORCHRUN_COMMANDS)
def test_torchrun_parser_accepts_every_documented_option(command):
    torchrun = get_args_parser()
    names = options(command)
    assert "--model" in names or "--surrogate" in names
    for name in names:
        args = torchrun.parse_args(["--nproc-per-node=2", "--no-python", "surrogate-cert", command, name, "1"])
        assert args.training_script_args == [command, name, "1"], name


def test_n_is_ambiguous_to_torchrun_and_an_alias_of_samples(capsys):
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--nproc-per-node=2", "--no-python", "surrogate-cert", "datagen", "--n", "3"])
    assert "ambiguous option: --n could match" in capsys.readouterr().err
    parser = build_parser()
    common = ["--dataset", "digits", "--split", "train", "--model", "m.pt", "--sigma", "0.25", "--out", "o.h5"]
    assert parser.parse_args(["datagen", "--n", "3000", *common]).n == 3000
    assert parser.parse_args(["datagen", "--samples", "3000", *common]).n == 3000
    assert "--samples" in options("datagen") and "--samples" in options("cohen")


def test_one_process_commands_refuse_torchrun(monkeypatch, capsys, tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["train-base", "--out", str(tmp_path / "b.pt")]) == 2
    assert "train-base runs as one process: start it without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "b.pt").exists()


REPO = Path(__file__).resolve().parents[1]


def documented_torchrun_commands() -> list[str]:
    """Every torchrun command of the README's and the docs' bash blocks and of the Slurm example, as written."""
    commands = []
    text = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))])
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        commands += [
            line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip().startswith("torchrun")
        ]
    sbatch = (REPO / "examples" / "slurm_datagen.sbatch").read_text().replace("\\\n", " ")
    commands += [line.strip().removeprefix("srun ") for line in sbatch.splitlines() if line.startswith("srun torchrun")]
    return commands


def test_documented_torchrun_commands_parse_as_written():
    commands = documented_torchrun_commands()
    assert len(commands) >= 5
    ours = build_parser()
    for command in commands:
        words = shlex.split(re.sub(r"\$\{?\w+(:-[^}]*)?\}?", "1", command))  # shell variables -> a value
        launched = get_args_parser().parse_args(words[1:])
        assert launched.training_script == ("surrogate_cert" if launched.module else "surrogate-cert"), command
        args = ours.parse_args(launched.training_script_args)
        assert args.command in TORCHRUN_COMMANDS and args.torchrun, command
