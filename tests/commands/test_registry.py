"""A command is a config dataclass and a function: registered anywhere, run by `moekit`."""

from dataclasses import dataclass

import pytest

from moekit import cli
from moekit.commands import argument, command, command_spec, commands, option


@dataclass
class Echo:
    """Prints its words (a command defined outside moekit)."""

    words: str = argument("what to print")
    times: int = option(1, "how often")
    loud: bool = option(False, "upper case")
    tag: list[str] | None = option(None, "a tag (repeatable)", repeat=True)

    def __post_init__(self) -> None:
        if self.times < 1:
            raise ValueError(f"--times={self.times} must be >= 1")


@command("test-echo", Echo, help="Print the words.")
def echo(cfg: Echo) -> None:
    text = cfg.words.upper() if cfg.loud else cfg.words
    print(" ".join([text] * cfg.times), *(cfg.tag or ()))


def refuse(cfg: Echo) -> None:
    raise FileExistsError(f"{cfg.words} exists")


command("test-refuse", Echo, help="Refuse by name.", refusals=(FileExistsError,))(refuse)


def test_a_command_registered_outside_runs_with_its_options(capsys):
    argv = ["test-echo", "hi", "--times", "2", "--loud", "--tag", "a", "--tag", "b"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == "HI HI a b\n"


def test_a_bad_value_is_one_line_naming_the_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["test-echo", "hi", "--times", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "moekit: error: --times=0 must be >= 1\n"


def test_a_refusal_names_its_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["test-refuse", "out"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "moekit test-refuse: error: out exists\n"


def test_help_lists_every_registered_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    listed = capsys.readouterr().out
    for spec in commands():
        assert spec.name.split()[0] in listed
    for name in ("demo", "layer-demo", "train", "serve", "sweep", "profile", "bench", "finance"):
        assert name in listed


def test_a_name_taken_by_another_function_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        command("test-echo", Echo, help="again")(refuse)
    with pytest.raises(ValueError, match="not one of"):
        command_spec("no-such-command")
