// Host entry points of the optional compiled extension `fastrank._cuda` (see setup.py, FASTRANK_BUILD_CUDA=1).
//
// The launchers assume checked input: bindings.cpp validates device, dtype, shape and layout first, so that every
// error a Python caller can trigger carries a message there rather than a CUDA fault here.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace fastrank {

// project_gradients' T limit (fastrank/ops/project_gradients.py, MAX_TASKS): the kernels keep one row value per
// task in registers, so the bound is compiled in.
constexpr int64_t kMaxTasks = 16;

// (loss fp32 0-d, hits (G,) bool, d loss / d scores (N,) in the dtype of scores), like the Triton kernel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_rank_loss_cuda(
    const at::Tensor& scores, const at::Tensor& labels, const at::Tensor& offsets, double margin,
    double point_weight);

// (T, T) fp32 grads @ grads.T of a (T, P) buffer with unit column stride (any row stride).
at::Tensor gram_matrix_cuda(const at::Tensor& grads);

// (P,) weights @ grads in the dtype of grads, weights (T,) fp32.
at::Tensor combine_cuda(const at::Tensor& grads, const at::Tensor& weights);

}  // namespace fastrank
