"""Environment-aware LoRA routing with per-environment gradient projection (paper §5.6 and Limitations).

Read in data-flow order:

- `model.py` -- `RoutedReranker`: a `Reranker` whose encoder carries four router-mixed LoRA adapter groups
  (one per environment + one shared), the router reading the input, never the environment label.
- `train_step.py` -- `RoutedTrainStep`: one packed forward, per-environment losses that sum to the fused loss,
  per-environment gradients combined by `fastrank.ops.project_gradients` (PCGrad / CAGrad), diagnostics.
- `divergence.py` -- flags a run whose loss rises, so it is reported rather than silently kept.
- `compare.py` -- routed vs plain joint training over the paper's seeds, mean ± std.
"""
from fastrank.routing.model import (
    ADAPTERS, RoutedReranker, Router, RoutingConfig, build_model, routed_lora_linear_class,
    routing_enabled,
)
from fastrank.routing.train_step import (
    GradientProjector, RoutedTrainStep, batch_totals, cosine_from_gram, env_task_losses, pcgrad_fire_count,
    split_by_env,
)
from fastrank.routing.divergence import detect_divergence, report_divergence
from fastrank.routing.compare import run_comparison

__all__ = ["ADAPTERS", "RoutingConfig", "routed_lora_linear_class", "Router", "RoutedReranker",
           "env_task_losses", "batch_totals", "split_by_env", "GradientProjector", "RoutedTrainStep",
           "detect_divergence", "report_divergence", "cosine_from_gram", "pcgrad_fire_count", "build_model",
           "routing_enabled", "run_comparison"]
