"""Mistakes a user makes end a recipe or `fastrank` run with one line and exit code 2; --help lists the keys.

The recipe tests run the scripts as a user does (subprocess, from the checkout). None of them gets as far
as importing torch (the config is read first), so each takes well under a second.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastrank.cli import build_parser, main
from fastrank.config import CHOICES, ConfigError, TrainConfig, field_help, load_config
from fastrank.gcd.config import GCDConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.py"))
# The config class each recipe reads (fewshot: TrainConfig in its two blocks). A recipe not listed here is
# still checked for a working --help and one-line errors.
CONFIG_OF = {"fewshot": TrainConfig, "joint2": TrainConfig, "joint3": TrainConfig, "router_pcgrad": TrainConfig,
             "single": TrainConfig, "gcd_qwen": GCDConfig}


def _run(*args: str, debug_env: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FASTRANK_DEBUG"}
    if debug_env is not None:
        env["FASTRANK_DEBUG"] = debug_env
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastrank: error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_help_lists_every_key_with_default_and_meaning(recipe):
    proc = _run(f"recipes/{recipe}.py", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("usage: ") and "--config FILE" in out and "--debug" in out and "config keys" in out
    if recipe not in CONFIG_OF:
        return
    cls = CONFIG_OF[recipe]
    meanings = field_help(cls)
    keys = out[out.index("config keys"):].splitlines()  # fewshot lists its own top-level keys before these
    for f in dataclasses.fields(cls):
        line = next((ln for ln in keys if ln.split()[:1] == [f.name]), None)
        assert line is not None, f"{recipe} --help does not list {f.name}"
        assert "(default " in line and meanings[f.name] in line, line


@pytest.mark.parametrize("cls", [TrainConfig, GCDConfig])
def test_every_config_key_has_a_one_line_meaning(cls):
    """The comment after a field is its --help text: a field without one is undocumented."""
    meanings = field_help(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not meanings.get(f.name)]
    assert not missing, f"{cls.__name__}: give these fields a trailing comment saying what they mean: {missing}"


@pytest.mark.parametrize("recipe, args, expect", [
    ("joint3", ["bogus_key=1"], "recipes/joint3.yaml: unknown config key 'bogus_key' (on the command line)"),
    ("joint3", ["epoch=1"], "did you mean 'epochs'?"),
    ("joint3", ["lr=fast"], "recipes/joint3.yaml: lr must be a float, got 'fast'"),
    ("joint3", ["negatives=hardest"], "negatives must be 'sampled' or 'hard', got 'hardest'"),
    ("joint3", ["envs=[alfworld, minecraft]"], "envs: unknown ['minecraft']"),
    ("joint3", ["init_from=/nonexistent/model"], "init_from: no such saved model '/nonexistent/model'"),
    ("joint3", ["data_dir=/nonexistent/data"], "data_dir: no such dataset folder"),
    ("single", ["model=./no/such/model"], "model: no such model folder './no/such/model'"),
    ("joint2", ["--config", "recipes/nope.yaml"], "recipes/nope.yaml: no such config file"),
    ("joint3", ["epochs"], "override 'epochs' is not key=value"),
    ("router_pcgrad", ["grad_projection=pcgard"], "grad_projection must be 'none' or 'pcgrad'"),
    ("gcd_qwen", ["method=bogus"], "recipes/gcd.yaml: method must be one of"),
    ("gcd_qwen", ["group_sise=4"], "did you mean 'group_size'?"),
    ("fewshot", ["targt=webshop"], "unknown key 'targt'; did you mean 'target'?"),
    ("fewshot", ["finetune.lrr=1"], "recipes/fewshot.yaml: finetune: unknown config key 'lrr'; did you mean 'lr'"),
])
def test_recipe_user_error_is_one_line(recipe, args, expect):
    line = _one_error_line(_run(f"recipes/{recipe}.py", *args))
    assert expect in line, line


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_rejects_an_unknown_key_in_one_line(recipe):
    """Each script ends through fastrank.entry.run_entry (see recipes/joint3.py for the four lines)."""
    line = _one_error_line(_run(f"recipes/{recipe}.py", "bogus_key=1"))
    assert "unknown" in line and "'bogus_key'" in line, line


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how):
    proc = _run("recipes/joint3.py", "bogus_key=1", *(["--debug"] if how == "flag" else []),
                debug_env="1" if how == "env" else None)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr and "bogus_key" in proc.stderr


def test_unknown_keys_in_a_file_say_the_file_not_the_command_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 1\nlearnin_rate: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, ["seed=1"])
    msg = str(err.value)
    assert msg.startswith(f"{bad}: unknown config keys 'epoch' (did you mean 'epochs'?), 'learnin_rate'")
    assert "command line" not in msg


def test_grad_projection_choices_match_the_train_step():
    from fastrank.routing.train_step import PROJECTIONS

    assert CHOICES["grad_projection"] == PROJECTIONS


# ------------------------------------------------------------------------------------------ `fastrank`

def _parsers(parser: argparse.ArgumentParser, name: str = "fastrank"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_subcommand_option_has_a_meaning_and_shows_defaults():
    undocumented = [f"{name} {a.option_strings or a.dest}" for name, p in _parsers(build_parser())
                    for a in p._actions
                    if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert not undocumented, undocumented
    stats = dict(_parsers(build_parser()))["fastrank data stats"]
    assert "(default: 20)" in stats.format_help()


def test_gcd_train_help_lists_the_gcd_config_keys():
    text = dict(_parsers(build_parser()))["fastrank gcd train"].format_help()
    for f in dataclasses.fields(GCDConfig):
        assert f"\n  {f.name} " in text, f.name


def test_cli_user_errors_are_one_line_and_debug_raises(tmp_path, capsys):
    assert main(["gcd", "train", "--config", "recipes/gcd_tiny.yaml", "bogus=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastrank: error: ") and "unknown config key 'bogus'" in err and err.count("\n") == 1
    assert main(["agent-eval", "--env", "alfworld", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "not a fastrank checkpoint" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        main(["data", "stats", str(tmp_path / "missing.jsonl.gz"), "--debug"])


def test_cli_error_in_a_subprocess_has_no_traceback():
    line = _one_error_line(_run("-m", "fastrank.cli", "data", "validate", "/nonexistent/x.jsonl.gz"))
    assert "/nonexistent/x.jsonl.gz" in line
