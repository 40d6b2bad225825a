"""Recipes as a user runs them, on a tiny encoder and a slice of the bundled data."""
import importlib.util
import json

import pytest
import torch
import yaml

from test_train import ROOT, _cfg, small_data, tiny_encoder  # noqa: F401  (pytest fixtures)

from fastrank.train import run_recipe, train


def _load_recipe(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_recipe_config_loads():
    from fastrank.config import load_config

    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        if path.stem == "fewshot" or path.stem.startswith(("gcd", "agent")):
            continue  # not TrainConfig files: read by their own recipe scripts (tests/test_user_errors.py runs them)
        cfg = load_config(path)
        assert cfg.envs and cfg.output_dir, path


def test_fewshot_recipe(tiny_encoder, small_data, tmp_path):
    common = {"model": tiny_encoder, "data_dir": small_data, "max_tokens": 3000, "max_length": 96,
              "eval_modes": ["sampled"], "lr": 1e-3}
    spec = {"target": "webshop", "fractions": [0.0, 0.5, 1.0], "output_dir": str(tmp_path / "fs"),
            "pretrain": {**common, "envs": ["alfworld"], "eval_envs": ["alfworld"], "upsample": {}, "epochs": 1},
            "finetune": {**common, "epochs": 1}}
    cfg_path = tmp_path / "fewshot.yaml"
    cfg_path.write_text(yaml.safe_dump(spec))
    # key=value overrides, top level and inside a block, as on the command line
    _load_recipe("fewshot").main(cfg_path, ["fractions=[0.0, 0.5, 1.0]", "finetune.max_length=96"])
    rows = json.loads((tmp_path / "fs" / "results.json").read_text())
    assert [r[0] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0][1] == 0 and 0 < rows[1][1] < rows[2][1] == 24  # training sets at 0 %, 50 %, 100 %
    report = (tmp_path / "fs" / "report.md").read_text()
    assert "| 50.0% |" in report and "% of full" in report
    from fastrank.lexical_floor import floor_for_run
    floor = floor_for_run(json.loads((tmp_path / "fs" / "frac_1" / "results.json").read_text())["config"])
    assert f"| lexical floor (no training) | 0 | {floor['sampled']['webshop']['net_gain']:+.3f} |" in report
    # the 0 % row evaluates the pretrained model unchanged
    assert (tmp_path / "fs" / "frac_0" / "model" / "model.safetensors").is_file()
    # a second target reuses the pretrained model instead of training it again
    _load_recipe("fewshot").main(cfg_path, [f"pretrained={tmp_path / 'fs' / 'pretrain' / 'model'}",
                                            f"output_dir={tmp_path / 'fs2'}", "fractions=[0.0]"])
    assert not (tmp_path / "fs2" / "pretrain").exists()
    assert json.loads((tmp_path / "fs2" / "results.json").read_text())[0][2] == rows[0][2]  # same model, same score


def test_fewshot_overrides():
    recipe = _load_recipe("fewshot")
    apply = recipe.apply_overrides
    spec = apply({"target": "webshop", "finetune": {"lr": 5e-5}},
                 ["target=scienceworld", "finetune.lr=3e-5", "pretrain.max_train_sets=null", "fractions=[0, 1]"])
    assert spec["target"] == "scienceworld" and spec["fractions"] == [0, 1]
    assert recipe.block_config(spec, "finetune").lr == 3e-5  # YAML 1.1 reads 3e-5 as a string: typed here
    assert recipe.block_config(spec, "pretrain").max_train_sets is None
    for bad in ("target", "a.b.c=1", "other.lr=1"):
        with pytest.raises(SystemExit):
            apply({}, [bad])


def test_multi_seed_runner_aggregates(tiny_encoder, small_data, tmp_path):
    cfg = _cfg(tiny_encoder, small_data, tmp_path / "ms", "max_steps=2", "eval_modes=[sampled]", "seeds=[1, 2]")
    res = run_recipe(cfg)
    agg = res["aggregate"]["sampled"]["combined"]
    assert agg["runs"] == 2 and len(agg["values"]) == 2
    assert abs(agg["net_gain_mean"] - sum(agg["values"]) / 2) < 1e-12
    assert "± " in (tmp_path / "ms" / "report.md").read_text()


def test_adamw8bit_option(tiny_encoder, small_data, tmp_path):
    res = train(_cfg(tiny_encoder, small_data, tmp_path / "b", "max_steps=2", "eval_modes=[]", "optimizer=adamw8bit"))
    assert res["steps"] == 2 and all(torch.isfinite(torch.tensor(res["history"]["loss"])))
