"""The command tree generated from the configs: one flag style across commands, real defaults in
help, old spellings kept as hidden aliases, bad values refused with one clear message."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from bae.cli import app
from bae.common.errors import BaeError

COMMAND = typer.main.get_command(app)


def is_option(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "option"


def leaf_commands(group: Any = COMMAND, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every command that runs, by its path (typer ships its own click: duck typing, not isinstance)."""
    out: dict[tuple[str, ...], Any] = {}
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            if any(is_option(p) and p.name != "help" for p in cmd.params):
                out[(*path, name)] = cmd  # a group that runs by itself too (bae entropy)
            out.update(leaf_commands(cmd, (*path, name)))
        else:
            out[(*path, name)] = cmd
    return out


def options(cmd: Any) -> dict[str, list[str]]:
    """Each option's long flag -> all its spellings (visible ones only)."""
    return {p.opts[0]: [*p.opts, *p.secondary_opts] for p in cmd.params if is_option(p) and not p.hidden}


def test_the_tree_is_seen() -> None:
    commands = leaf_commands()
    assert {("entropy",), ("entropy", "calibrate"), ("features", "compare"), ("store", "import")} <= set(
        commands
    )
    assert options(commands[("entropy",)])["--store"] == ["--store", "-s"]


@pytest.mark.parametrize("path", sorted(leaf_commands()), ids=" ".join)
def test_flags_mean_the_same_everywhere(path: tuple[str, ...]) -> None:
    opts = options(leaf_commands()[path])
    shorts = {s: long for long, spellings in opts.items() for s in spellings if not s.startswith("--")}
    expected = {
        "-o": {"--out"},
        "-s": {"--store"},
        "-a": {"--checkpoint"},
        "-m": {"--model"},
        "-l": {"--layer", "--layers"},  # harvest takes several layers
        "-c": {"--config"},
    }
    for short, long in shorts.items():
        if short in expected:
            assert long in expected[short], (
                f"{' '.join(path)}: {short} is {long}, elsewhere {expected[short]}"
            )
    for long, short in (("--out", "-o"), ("--store", "-s"), ("--checkpoint", "-a")):
        if long in opts:
            assert short in opts[long], f"{' '.join(path)}: {long} lacks {short}"
    assert "--output" not in opts  # the old harvest spelling is a hidden alias, not a second flag


def test_help_shows_real_defaults() -> None:
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    line = next(ln for ln in result.output.splitlines() if "--steps" in ln)
    assert "[default: 10000]" in line and "None" not in line


def test_hidden_output_alias_still_sets_the_store_path() -> None:
    from bae.common.command import field_flags, flag_values
    from bae.pipeline.harvest.config import HarvestConfig

    flags = field_flags(HarvestConfig)
    given = {"out__alias0": "old.zarr"}
    assert HarvestConfig(**flag_values(flags, given)).out == "old.zarr"
    given["out"] = "new.zarr"  # the visible flag wins
    assert HarvestConfig(**flag_values(flags, given)).out == "new.zarr"


@pytest.mark.parametrize(
    "args, message",
    [
        (["entropy", "--store", "s", "--checkpoint", "c", "--positions", "9-3"], "positions '9-3'"),
        (["entropy", "--store", "s", "--checkpoint", "c", "--positions", "last"], "positions 'last'"),
        (
            ["train", "--store", "s", "--layer", "1", "--out", "o", "--steps", "5", "--tokens", "9"],
            "either steps",
        ),
        (["features", "frequency", "--dense-thresholds", "0.1,2"], "dense_thresholds"),
    ],
)
def test_bad_values_are_one_clear_error(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, BaeError), result.output
    assert message in str(result.exception) and "\n" not in str(result.exception)


def test_one_positions_syntax() -> None:
    from bae.common.selection import parse_positions

    assert parse_positions("0-3,8") == [0, 1, 2, 3, 8]
    assert parse_positions([5, 1, 5]) == [1, 5]
    assert parse_positions("all") == "all" and parse_positions("last") == "last"
    with pytest.raises(BaeError, match="expected all, or integers"):
        parse_positions("last", allow_last=False)


def test_old_spellings_in_config_files_still_load(tmp_path) -> None:
    from bae.common.configs import load_config
    from bae.pipeline.harvest.config import HarvestConfig
    from bae.trainer.config import TrainConfig

    path = tmp_path / "harvest.yaml"
    path.write_text("output: old.zarr\n")
    assert load_config(HarvestConfig, path, {}).out == "old.zarr"
    tokens = TrainConfig(store="s", layer=1, out="o", tokens=1000)
    assert TrainConfig.model_validate(tokens.model_dump()).tokens == 1000  # a recorded config reloads
    before = {**tokens.recorded(), "positions": None, "steps": None}  # as an earlier bae recorded them
    assert TrainConfig.as_recorded_today(before) == tokens.recorded()
    # an earlier bae's boolean standardize, in a config file or a recorded paper-objective run
    assert (
        TrainConfig.model_validate({"store": "s", "layer": 1, "out": "o", "standardize": True}).standardize
        == "dimension"
    )
    paper = TrainConfig(store="s", layer=1, out="o", objective="paper", standardize="dimension")
    old = {k: v for k, v in paper.recorded().items() if k not in ("objective", "beta", "gamma", "target_fvu")}
    assert TrainConfig.as_recorded_today({**old, "standardize": True}) == paper.recorded()


@pytest.mark.parametrize("flag", ["--bootstrap-seed", "--sample-seed", "--split-seed"])
def test_negative_seeds_are_refused(flag: str) -> None:
    result = CliRunner().invoke(app, ["entropy", "--store", "s", "--checkpoint", "c", flag, "-1"])
    assert isinstance(result.exception, BaeError) and "greater than or equal to 0" in str(result.exception)
