"""Training configuration: one dataclass, loaded from a recipe's YAML, overridable as `key=value` args.

    accelerate launch recipes/joint3.py                          # recipes/joint3.yaml
    accelerate launch recipes/joint3.py --config my.yaml epochs=1 model=deberta-v3-base
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    # data
    envs: list[str] = field(default_factory=lambda: ["alfworld", "webshop", "scienceworld"])
    eval_envs: list[str] | None = None  # None: all three environments (cross-environment transfer)
    data_dir: str | None = None  # None: the dataset bundled inside the package
    negatives: str = "sampled"  # sampled (paper) | hard (the state's own admissible actions)
    upsample: dict[str, int] = field(default_factory=lambda: {"alfworld": 6})
    train_fraction: dict[str, float] = field(default_factory=dict)  # few-shot: keep this share of an env's train episodes
    max_train_sets: int | None = None  # cap on training sets after upsampling (seeded sample); None: all
    max_eval_sets: int | None = None  # cap per env and split for evaluation; None: all
    eval_modes: list[str] = field(default_factory=lambda: ["sampled", "hard"])
    # model
    model: str = "minilm"  # preset name (minilm, deberta-v3-base, deberta-v3-large) or a path / hub id
    init_from: str | None = None  # a saved Reranker to start from (few-shot)
    feature_mode: str = "state_action_overlap"
    max_length: int = 256
    # optimisation (paper §4.2)
    epochs: float = 3.0
    max_steps: int | None = None  # stops early when reached (after epochs are converted to steps)
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    max_tokens: int = 8192  # token budget of one packed batch (per process)
    grad_accum: int = 1
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    mixed_precision: str = "auto"  # auto: bf16 on CUDA when supported, else fp32 | no | bf16 | fp16
    margin: float = 0.0
    point_weight: float = 0.5
    packing: str = "packed"  # packed | padded (baseline)
    cpu_threads: int | None = None  # torch threads per process on CPU; None: cores / local processes
    # environment-aware LoRA routing + per-environment gradient projection (paper §5.6; fastrank/routing/).
    # Off by default: with routing=false and grad_projection=none the trainer runs the plain path unchanged.
    routing: bool = False  # 4 LoRA adapter groups (alfworld/scienceworld/webshop + shared) mixed per input by a router
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None  # None: peft's default (BERT query/value, DeBERTa query_proj/value_proj)
    lora_b_init_std: float = 1.0e-3  # 0: peft's B = 0 (the router then gets no gradient while LoRA is frozen)
    router_hidden: int = 128
    router_lr: float | None = None  # None: lr. The paper names lr sensitivity as a suspect for routing collapse
    router_warmup_steps: int = 0  # LoRA frozen for the first N optimizer steps while router + heads train (paper: 250)
    grad_projection: str = "none"  # none | pcgrad | cagrad | sum | mean: per-env losses combined (fastrank.ops)
    cagrad_alpha: float = 0.5
    per_env_forward: bool = False  # per-env gradients from one forward+backward per env sub-batch (same gradients,
    #                                ~1x instead of Tx backward cost) instead of one packed forward + T backwards
    divergence_tol: float = 0.1  # relative loss rise that flags a run diverged (results["diverged"], every run)
    # bookkeeping
    seed: int = 42
    seeds: list[int] | None = None  # several runs (output_dir/seed_N) aggregated as mean ± std
    output_dir: str = "runs/joint3"
    save_every: int = 200  # steps between resumable checkpoints (0: only at the end)
    resume: bool = False
    log_every: int = 10
    tracker: str | None = None  # e.g. tensorboard


def _parse_value(raw: str):
    return yaml.safe_load(raw)  # "3" -> 3, "[a, b]" -> list, "{alfworld: 6}" -> dict, "null" -> None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls=TrainConfig):
    """A config dataclass (`cls`) from YAML plus `key=value` overrides; unknown keys are an error naming the file."""
    data: dict = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        data[key.strip().replace("-", "_")] = _parse_value(raw)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{path or 'overrides'}: unknown config key(s) {unknown}; known: {sorted(known)}")
    for key, value in data.items():
        data[key] = _coerce(key, value, known[key].type, path)
    return cls(**data)


def _coerce(key: str, value, annotation: str, path) -> object:
    """YAML 1.1 reads `1e-4` as a string: turn strings into the number a numeric field expects."""
    if not isinstance(value, str):
        return value
    for name, kind in (("float", float), ("int", int)):
        if annotation.split(" | ")[0] == name:
            try:
                return kind(value)
            except ValueError:
                raise ValueError(f"{path or 'overrides'}: {key} must be a{'n' if name == 'int' else ''} "
                                 f"{name}, got {value!r}") from None
    return value


def recipe_config(recipe_file: str, argv: list[str] | None = None, *, default: str | None = None, cls=TrainConfig):
    """For recipes/X.py: `--config FILE` (default: `default`, else X.yaml, beside the script) then key=value."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg_path = Path(recipe_file).with_name(default) if default else Path(recipe_file).with_suffix(".yaml")
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ValueError("--config needs a file")
        cfg_path = Path(argv[i + 1])
        del argv[i:i + 2]
    return load_config(cfg_path, argv, cls)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
