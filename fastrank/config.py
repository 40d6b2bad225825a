"""Training configuration: one dataclass, loaded from a recipe's YAML, overridable as `key=value` args.

    accelerate launch recipes/joint3.py                          # recipes/joint3.yaml
    accelerate launch recipes/joint3.py --config my.yaml epochs=1 model=deberta-v3-base
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config the user wrote is wrong (unknown key, bad value, missing file or folder): entry points
    (`fastrank.entry`) print it as one line instead of a traceback."""


# Values a TrainConfig field may take, checked when the config is built so that a typo fails before a
# model is loaded. grad_projection's list is also fastrank.routing.train_step.PROJECTIONS (a test keeps them equal).
CHOICES = {
    "negatives": ("sampled", "hard"),
    "packing": ("packed", "padded"),
    "optimizer": ("adamw", "adamw8bit"),
    "mixed_precision": ("auto", "no", "bf16", "fp16"),
    "grad_projection": ("none", "pcgrad", "cagrad", "sum", "mean"),
}


@dataclass
class TrainConfig:
    # data
    envs: list[str] = field(default_factory=lambda: ["alfworld", "webshop", "scienceworld"])  # environments trained on
    eval_envs: list[str] | None = None  # evaluated on; None: all three environments (cross-environment transfer)
    data_dir: str | None = None  # `fastrank data build` output; None: the dataset bundled inside the package
    negatives: str = "sampled"  # sampled (paper) | hard (the state's own admissible actions)
    upsample: dict[str, int] = field(default_factory=lambda: {"alfworld": 6})  # env -> copies of each training set
    train_fraction: dict[str, float] = field(default_factory=dict)  # few-shot: keep this share of an env's train episodes
    max_train_sets: int | None = None  # cap on training sets after upsampling (seeded sample); None: all
    max_eval_sets: int | None = None  # cap per env and split for evaluation; None: all
    eval_modes: list[str] = field(default_factory=lambda: ["sampled", "hard"])  # candidate sets evaluated: sampled and/or hard negatives
    # model
    model: str = "minilm"  # preset name (minilm, deberta-v3-base, deberta-v3-large) or a path / hub id
    init_from: str | None = None  # a saved Reranker to start from (few-shot)
    feature_mode: str = "state_action_overlap"  # encoder input text: state_action_overlap | state_action | history | state_action_overlap_compact
    max_length: int = 256  # tokens per (state, candidate) input; longer ones are truncated
    layout: str = "pairs"  # pairs (the paper: one state+action sequence per candidate) | shared_prefix (fastrank/prefix.py:
    #                        the state once per set, max_length its tokens, each candidate attending to it)
    max_action_tokens: int = 32  # layout=shared_prefix: a candidate's token budget
    attention_dropout: float | None = None  # null: the encoder's own (MiniLM/DeBERTa 0.1); 0 trains faster on CPU
    # optimisation (paper §4.2)
    epochs: float = 3.0  # passes over the training sets (a fraction is allowed)
    max_steps: int | None = None  # stops early when reached (after epochs are converted to steps)
    lr: float = 5e-5  # peak learning rate (linear warmup, then linear decay)
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_ratio: float = 0.05  # share of the optimizer steps spent warming the learning rate up
    grad_clip: float = 1.0  # max gradient norm per optimizer step
    max_tokens: int = 8192  # token budget of one packed batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    mixed_precision: str = "auto"  # auto: bf16 on CUDA when supported, else fp32 | no | bf16 | fp16
    loss: str = "pairwise"  # pairwise (paper eq. 5-7: margin, point_weight) | listwise (softmax CE per set)
    margin: float = 0.0  # pair term softplus(margin - s_expert + s_other)
    point_weight: float = 0.5  # loss=pairwise only
    temperature: float = 1.0  # loss=listwise: softmax temperature
    list_mix_pairwise: float = 0.0  # loss=listwise: weight of the paper's pair term added to the softmax CE
    list_mix_point: float = 0.0  # loss=listwise: weight of the BCE term added
    packing: str = "packed"  # packed | padded (baseline)
    cpu_threads: int | None = None  # torch threads per process on CPU; None: cores / local processes
    # environment-aware LoRA routing + per-environment gradient projection (paper §5.6; fastrank/routing/).
    # Off by default: with routing=false and grad_projection=none the trainer runs the plain path unchanged.
    routing: bool = False  # 4 LoRA adapter groups (alfworld/scienceworld/webshop + shared) mixed per input by a router
    lora_r: int = 8  # routing: LoRA rank of each adapter
    lora_alpha: float = 16.0  # routing: LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = 0.0  # routing: dropout on the LoRA input
    lora_target_modules: list[str] | None = None  # LoRA targets; None: peft's default (BERT query/value, DeBERTa query_proj/value_proj)
    lora_b_init_std: float = 1.0e-3  # std of LoRA B at init; 0: peft's B = 0 (the router then gets no gradient while LoRA is frozen)
    router_hidden: int = 128  # routing: hidden width of the router MLP
    router_lr: float | None = None  # router learning rate; None: lr. The paper names lr sensitivity as a suspect for routing collapse
    router_warmup_steps: int = 0  # LoRA frozen for the first N optimizer steps while router + heads train (paper: 250)
    grad_projection: str = "none"  # none | pcgrad | cagrad | sum | mean: per-env losses combined (fastrank.ops)
    cagrad_alpha: float = 0.5  # grad_projection=cagrad: how far the update may move from the mean gradient
    per_env_forward: bool = False  # per-env gradients from one forward+backward per env sub-batch (same gradients,
    #                                ~1x instead of Tx backward cost) instead of one packed forward + T backwards
    divergence_tol: float = 0.1  # relative loss rise that flags a run diverged (results["diverged"], every run)
    # bookkeeping
    seed: int = 42  # seeds sampling, initialisation and batch order
    seeds: list[int] | None = None  # several runs (output_dir/seed_N) aggregated as mean ± std
    output_dir: str = "runs/joint3"  # where the model, report.md, results.json and checkpoints go
    save_every: int = 200  # steps between resumable checkpoints (0: only at the end)
    resume: bool = False  # continue from output_dir/checkpoint when one is there
    log_every: int = 10  # optimizer steps between log lines
    tracker: str | None = None  # an Accelerate tracker (e.g. tensorboard); None: none

    def __post_init__(self):
        from fastrank.data.negatives import MODES
        from fastrank.data.record import ENVS

        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be {' or '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        for name, allowed in (("envs", ENVS), ("eval_envs", ENVS), ("eval_modes", MODES)):
            bad = [v for v in getattr(self, name) or () if v not in allowed]
            if bad:
                raise ConfigError(f"{name}: unknown {bad}; expected some of {list(allowed)}")


def _parse_value(raw: str):
    return yaml.safe_load(raw)  # "3" -> 3, "[a, b]" -> list, "{alfworld: 6}" -> dict, "null" -> None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls=TrainConfig, *,
                source: str | None = None):
    """A config dataclass (`cls`) from YAML plus `key=value` overrides.

    Every mistake a user can make here (no such file, not YAML, unknown key, a value of the wrong type or
    outside a field's choices) is a `ConfigError` naming the file (or `source`) and the key."""
    where = source or (display_path(path) if path is not None else "overrides")
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    from_cli = set()
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (--help lists the keys)")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        try:
            data[key] = _parse_value(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
        if path is not None:  # only worth saying when a file was read too
            from_cli.add(key)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(_unknown_keys_message(where, unknown, sorted(known), from_cli))
    for key, value in data.items():
        data[key] = _coerce(key, value, known[key].type, where)
    try:
        return cls(**data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (ValueError, TypeError) as exc:  # a dataclass's own __post_init__ checks (GCDConfig) say what is wrong
        raise ConfigError(f"{where}: {exc}") from None


def _unknown_keys_message(where: str, unknown: list[str], known: list[str], from_cli: set[str]) -> str:
    def guess(key: str) -> str:
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        return f"did you mean {' or '.join(map(repr, close))}?" if close else ""

    origin = " (on the command line)" if set(unknown) <= from_cli else ""
    if len(unknown) == 1:
        hint = guess(unknown[0])
        return f"{where}: unknown config key {unknown[0]!r}{origin}; {hint or '--help lists the keys'}"
    listed = ", ".join(f"{k!r} ({guess(k)})" if guess(k) else repr(k) for k in unknown)
    return f"{where}: unknown config keys {listed}{origin}; --help lists the keys"


def display_path(path) -> str:
    """`path` relative to the working directory when it is inside it (scripts get an absolute __file__)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve())) if p.is_absolute() else str(p)
    except ValueError:
        return str(p)


def _coerce(key: str, value, annotation: str, where) -> object:
    """YAML 1.1 reads `1e-4` as a string: turn strings into the number a numeric field expects."""
    if not isinstance(value, str):
        return value
    for name, kind in (("float", float), ("int", int)):
        if annotation.split(" | ")[0] == name:
            try:
                return kind(value)
            except ValueError:
                raise ConfigError(f"{where}: {key} must be a{'n' if name == 'int' else ''} "
                                  f"{name}, got {value!r}") from None
    return value


# ------------------------------------------------------------------------------------------ recipes

# Checked where a user starts a run (not in the dataclass: tests and recipes build configs for folders
# that a later step writes). "model" fields may also name a preset or a hub id.
_PATH_FIELDS = {"data_dir": "dataset folder", "init_from": "saved model", "games": "ALFWorld games",
                "model": "model folder"}


def check_paths(cfg, where: str) -> None:
    """A `ConfigError` for a path field that names nothing on disk."""
    for name, what in _PATH_FIELDS.items():
        value = getattr(cfg, name, None)
        if not isinstance(value, str) or not value:
            continue
        if name == "model" and not _looks_like_path(value):
            continue  # a preset (minilm, tiny, ...) or a hub id (org/name)
        if not Path(value).expanduser().exists():
            raise ConfigError(f"{where}: {name}: no such {what} {value!r}")


def _looks_like_path(value: str) -> bool:
    # Hub ids are "name" or "org/name"; anything with more parts, or rooted, or relative, is a folder.
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or Path(value).exists()


def recipe_config(recipe_file: str, argv: list[str] | None = None, *, default: str | None = None, cls=TrainConfig,
                  flags: dict[str, str] | None = None):
    """For recipes/X.py: `--config FILE` (default: `default`, else X.yaml, beside the script) then key=value.

    `--help` / `-h` prints the recipe's docstring and every config key with its default, the recipe
    file's value and its meaning, then exits. `flags`: the recipe's own flags (already removed from `argv`
    by the recipe), listed in the help. `--debug` is left to `fastrank.entry` and ignored here."""
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--debug"]
    cfg_path = Path(recipe_file).with_name(default) if default else Path(recipe_file).with_suffix(".yaml")
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a file")
        cfg_path = Path(argv[i + 1])
        del argv[i:i + 2]
    if "--help" in argv or "-h" in argv:
        print(recipe_help(recipe_file, cfg_path, cls, flags))
        raise SystemExit(0)
    cfg = load_config(cfg_path, argv, cls)
    check_paths(cfg, display_path(cfg_path))
    return cfg


def recipe_help(recipe_file: str, cfg_path: Path, cls=TrainConfig, flags: dict[str, str] | None = None) -> str:
    name = Path(recipe_file).name
    lines = [f"usage: {name} [--config FILE] [--debug] [key=value ...]" + "".join(f" [{f}]" for f in flags or {}),
             ""]
    doc = _module_doc(recipe_file)
    if doc:
        lines += [doc, ""]
    lines += ["options:",
              f"  --config FILE  a YAML file of config keys (default: {display_path(cfg_path)})",
              "  --debug        show the Python traceback of an error (also: FASTRANK_DEBUG=1)"]
    lines += [f"  {f:<13}  {meaning}" for f, meaning in (flags or {}).items()]
    values = None
    try:
        values = yaml.safe_load(Path(cfg_path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        pass
    lines += ["", config_help(cls, values if isinstance(values, dict) else None, Path(cfg_path).name)]
    return "\n".join(lines)


def _module_doc(path: str) -> str | None:
    import ast

    try:
        return ast.get_docstring(ast.parse(Path(path).read_text()))
    except (OSError, SyntaxError):
        return None


def config_help(cls=TrainConfig, values: dict | None = None, source: str | None = None) -> str:
    """Every key of `cls`, one line each: name, meaning, default (and `source`'s value where it differs)."""
    meanings = field_help(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = f"default {default!r}"
        if values is not None and f.name in values and values[f.name] != default:
            shown += f"; {source}: {values[f.name]!r}"
        rows.append((f.name, meanings.get(f.name, ""), shown))
    width = max(len(r[0]) for r in rows)
    head = "config keys (key=value on the command line, or in the YAML file):"
    return "\n".join([head] + [f"  {n:<{width}}  {m + '  ' if m else ''}({d})" for n, m, d in rows])


def field_help(cls) -> dict[str, str]:
    """field name -> its one-line meaning: the comment after the field in the class's source, with any
    comment lines continuing it. Read from the source so that comment stays the one place a key is explained."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (frozen app): the help still lists keys and defaults
        return {}
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, whole line is a comment)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string[1:], not tok.line[:tok.start[1]].strip())
    out = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text, alone = comments.get(node.end_lineno, ("", True))
        if alone:
            continue
        parts, line = [text.strip()], node.end_lineno + 1
        # a continuation is a comment-only line indented past the "#" (a section header is not)
        while line in comments and comments[line][1] and comments[line][0].startswith("  "):
            parts.append(comments[line][0].strip())
            line += 1
        out[node.target.id] = " ".join(parts)
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
