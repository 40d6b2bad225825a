"""Fused ops. Each op lives in its own file with its Triton kernel, autograd.Function and PyTorch reference."""
from fastrank.ops.listwise_rank_loss import listwise_rank_loss, listwise_rank_loss_reference
from fastrank.ops.pairwise_rank_loss import RankLossOutput, pairwise_rank_loss, pairwise_rank_loss_reference
from fastrank.ops.project_gradients import gram_matrix, project_gradients, task_weights
from fastrank.ops.project_gradients_reference import project_gradients_reference
from fastrank.ops.task_grad_buffer import TaskGradBuffer, all_reduce_task_grads, grads_to_params

__all__ = [
    "RankLossOutput",
    "TaskGradBuffer",
    "all_reduce_task_grads",
    "gram_matrix",
    "grads_to_params",
    "listwise_rank_loss",
    "listwise_rank_loss_reference",
    "pairwise_rank_loss",
    "pairwise_rank_loss_reference",
    "project_gradients",
    "project_gradients_reference",
    "task_weights",
]
