// Fused pairwise ranking + pointwise BCE loss over packed candidate groups: the CUDA twin of the Triton kernel in
// fastrank/ops/pairwise_rank_loss.py (whose docstring is the contract). For group g = scores[offsets[g]:offsets[g+1]]
// with one positive p and negatives N_g:
//   loss = 1/G' sum_{g: |N_g|>0} 1/|N_g| sum_{n in N_g} softplus(margin - s_p + s_n)
//        + point_weight/N sum_i BCEWithLogits(s_i, y_i),                G' = #{g : |group| > 1}
// In the same pass it writes d loss / d scores (backward only scales it by grad_output) and hits[g] = s_p > max of
// the negatives (strict: a tie is a miss; a singleton group is a hit).
//
// Launch layout: one warp per group, 8 groups per 256-thread block, one launch whatever G is. Each lane walks its
// group with a stride of 32, so a group costs ceil(|group| / 32) iterations and nothing is padded to the longest
// group of the batch. Why a warp: the groups are small (2-20 candidates, mean ~9), a warp covers a typical group in
// one iteration, and its reductions are register shuffles with no shared memory or block barrier.
// Two sweeps, as in the Triton kernel: the first finds the positive and the best negative, the second needs s_p
// for every pair term; it re-reads the group, which is in L1/L2 by then.
// Reductions: per-group sums are warp butterflies; G' and the batch loss are single-block fixed-order sums (two
// tiny launches around the main one). No float atomics: the loss is bit-reproducible on a given GPU.
// Precision: scores (fp32/bf16/fp16) are read into fp32, all arithmetic is fp32 with the overflow-free forms of
// softplus and sigmoid (finite for |s| up to 1e4 and beyond); the gradient is rounded once, to the dtype of scores.
//
// Status: as of the session that wrote it, this file has been compiled (nvcc 13.0, sm_80 and sm_90, against the
// torch 2.13 headers) but never run on a GPU; tests/test_cuda_ext.py holds the GPU tests that have not run yet.
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "fastrank_cuda.h"
#include "common.cuh"

namespace fastrank {
namespace {

constexpr int kGroupsPerBlock = 8;
constexpr int kThreads = kGroupsPerBlock * kWarpSize;
constexpr int kReduceThreads = 1024;

// Labels of any dtype are read in place ("nonzero = positive", compared in fp32 like the Triton kernel) through a
// warp-uniform branch: one kernel per scores dtype instead of one per (scores, labels) pair, and no conversion pass.
enum LabelKind : int { kU8 = 0, kI8, kI16, kI32, kI64, kF16, kBF16, kF32, kF64 };

// An if-chain, commonest kinds first: a switch compiles to an indirect jump that costs a stack frame and spills.
__device__ __forceinline__ bool is_positive(const void* labels, int kind, int64_t i) {
  if (kind == kU8) return static_cast<const uint8_t*>(labels)[i] != 0;
  if (kind == kF32) return static_cast<const float*>(labels)[i] != 0.f;
  if (kind == kI64) return static_cast<const int64_t*>(labels)[i] != 0;
  if (kind == kI32) return static_cast<const int32_t*>(labels)[i] != 0;
  if (kind == kBF16) return static_cast<float>(static_cast<const c10::BFloat16*>(labels)[i]) != 0.f;
  if (kind == kF16) return static_cast<float>(static_cast<const c10::Half*>(labels)[i]) != 0.f;
  if (kind == kI8) return static_cast<const int8_t*>(labels)[i] != 0;
  if (kind == kI16) return static_cast<const int16_t*>(labels)[i] != 0;
  return static_cast<float>(static_cast<const double*>(labels)[i]) != 0.f;
}

__device__ __forceinline__ int64_t load_offset(const void* offsets, bool is64, int64_t g) {
  return is64 ? static_cast<const int64_t*>(offsets)[g] : static_cast<int64_t>(static_cast<const int32_t*>(offsets)[g]);
}

// exp of a non-positive argument only: never overflows, and log1p keeps the small-x tail accurate
__device__ __forceinline__ float softplus(float x) { return fmaxf(x, 0.f) + log1pf(expf(-fabsf(x))); }

__device__ __forceinline__ float sigmoid(float x) {
  const float e = expf(-fabsf(x));
  return x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

// G' on the device, so that the host never waits for it. An integer sum: exact in any order.
__global__ void __launch_bounds__(kReduceThreads)
    count_pair_groups_kernel(const void* __restrict__ offsets, bool offsets64, int64_t G, int64_t* __restrict__ out) {
  long long count = 0;
  for (int64_t g = threadIdx.x; g < G; g += kReduceThreads)
    count += load_offset(offsets, offsets64, g + 1) - load_offset(offsets, offsets64, g) > 1;
  count = block_sum<long long, kReduceThreads>(count);
  if (threadIdx.x == 0) *out = count;
}

// No __launch_bounds__: with it ptxas squeezes the fp16/bf16 variants to 40 registers and spills 8 bytes; without it
// they take 44 and spill nothing (nvcc 13.0, sm_80/sm_90).
template <typename scalar_t>
__global__ void pairwise_rank_loss_kernel(
    const scalar_t* __restrict__ scores, const void* __restrict__ labels, int label_kind,
    const void* __restrict__ offsets, bool offsets64, const int64_t* __restrict__ n_pair_groups,
    float* __restrict__ group_loss, bool* __restrict__ hits, scalar_t* __restrict__ grad, int64_t G, int64_t N,
    float margin, float point_scale) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kGroupsPerBlock + threadIdx.x / kWarpSize;
  if (g >= G) return;  // warp-uniform, so the shuffles below always run on full warps
  const int64_t start = load_offset(offsets, offsets64, g);
  const int64_t length = load_offset(offsets, offsets64, g + 1) - start;
  // Clamped to [0, N): with validate=False malformed offsets give an unspecified result but no stray access.
  const int64_t lo = max(start, int64_t{0}), hi = min(start + length, N);

  // Sweep 1: the positive (its score, position and count: a sum, so a malformed group is still defined) and the
  // best negative.
  float s_pos = 0.f, neg_max = -INFINITY;
  long long pos_idx = 0;
  int n_pos = 0;
  for (int64_t i = lo + lane; i < hi; i += kWarpSize) {
    const float s = static_cast<float>(scores[i]);
    if (is_positive(labels, label_kind, i)) {
      s_pos += s;
      pos_idx += i;
      ++n_pos;
    } else {
      neg_max = fmaxf(neg_max, s);
    }
  }
  s_pos = warp_sum(s_pos);
  pos_idx = warp_sum(pos_idx);
  n_pos = warp_sum(n_pos);
  neg_max = warp_max(neg_max);

  // Same expressions as the Triton kernel: 1 / (n_g G') per pair, 0 for a group without negatives.
  const float n_pair = fmaxf(static_cast<float>(*n_pair_groups), 1.f);
  const float n_neg = static_cast<float>(length - n_pos);
  const float pair_scale = n_neg > 0.f ? 1.f / (fmaxf(n_neg, 1.f) * n_pair) : 0.f;

  // Sweep 2: loss terms and gradients. The positive's pair gradient is minus the sum over all negatives, so it is
  // reduced over the warp and stored last.
  float pair_sum = 0.f, bce_sum = 0.f, sig_sum = 0.f, pos_point_grad = 0.f;
  for (int64_t i = lo + lane; i < hi; i += kWarpSize) {
    const float s = static_cast<float>(scores[i]);
    const bool pos = is_positive(labels, label_kind, i);
    const float y = pos ? 1.f : 0.f;
    bce_sum += softplus(s) - s * y;
    const float d_point = point_scale * (sigmoid(s) - y);
    if (pos) {
      pos_point_grad += d_point;
    } else {
      const float x = margin - s_pos + s;
      const float d_pair = sigmoid(x);
      pair_sum += softplus(x);
      sig_sum += d_pair;
      grad[i] = static_cast<scalar_t>(pair_scale * d_pair + d_point);
    }
  }
  pair_sum = warp_sum(pair_sum);
  bce_sum = warp_sum(bce_sum);
  sig_sum = warp_sum(sig_sum);
  pos_point_grad = warp_sum(pos_point_grad);
  if (lane == 0) {
    // several positives (validate=False only): their slots keep the zeros the caller allocated, as in Triton
    if (n_pos == 1) grad[pos_idx] = static_cast<scalar_t>(pos_point_grad - pair_scale * sig_sum);
    group_loss[g] = pair_scale * pair_sum + point_scale * bce_sum;
    hits[g] = s_pos > neg_max;
  }
}

// Stage two of the loss: per-group terms -> one scalar, in an order fixed by G alone.
__global__ void __launch_bounds__(kReduceThreads)
    sum_group_loss_kernel(const float* __restrict__ group_loss, int64_t G, float* __restrict__ loss) {
  float acc = 0.f;
  for (int64_t g = threadIdx.x; g < G; g += kReduceThreads) acc += group_loss[g];
  acc = block_sum<float, kReduceThreads>(acc);
  if (threadIdx.x == 0) *loss = acc;
}

int label_kind(at::ScalarType t) {
  switch (t) {
    case at::kBool:
    case at::kByte: return kU8;
    case at::kChar: return kI8;
    case at::kShort: return kI16;
    case at::kInt: return kI32;
    case at::kLong: return kI64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    default: TORCH_CHECK(false, "fastrank._cuda: unsupported labels dtype ", t);
  }
  return kU8;  // unreachable
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_rank_loss_cuda(
    const at::Tensor& scores, const at::Tensor& labels, const at::Tensor& offsets, double margin,
    double point_weight) {
  const c10::cuda::CUDAGuard device_guard(scores.device());
  const int64_t N = scores.numel(), G = offsets.numel() - 1;
  const auto fp32 = scores.options().dtype(at::kFloat);
  at::Tensor loss = at::zeros({}, fp32);
  at::Tensor hits = at::empty({G}, scores.options().dtype(at::kBool));
  // zeros, not empty: slots of a malformed group (several positives, validate=False) are never written
  at::Tensor grad = at::zeros_like(scores);
  if (G <= 0) return {loss, hits, grad};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const bool offsets64 = offsets.scalar_type() == at::kLong;
  const int kind = label_kind(labels.scalar_type());
  at::Tensor n_pair_groups = at::empty({}, scores.options().dtype(at::kLong));
  at::Tensor group_loss = at::empty({G}, fp32);

  count_pair_groups_kernel<<<1, kReduceThreads, 0, stream>>>(offsets.data_ptr(), offsets64, G,
                                                              n_pair_groups.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // point_weight / N in double, then fp32: the value the Triton launch receives
  const float point_scale = static_cast<float>(point_weight / static_cast<double>(N > 0 ? N : 1));
  const int64_t blocks = ceil_div(G, kGroupsPerBlock);
  TORCH_CHECK(blocks <= 0x7fffffff, "fastrank._cuda: too many groups (", G, ")");
  FASTRANK_DISPATCH_FLOATS(scores.scalar_type(), "fastrank_pairwise_rank_loss", [&] {
    pairwise_rank_loss_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        scores.data_ptr<scalar_t>(), labels.data_ptr(), kind, offsets.data_ptr(), offsets64,
        n_pair_groups.data_ptr<int64_t>(), group_loss.data_ptr<float>(), hits.data_ptr<bool>(),
        grad.data_ptr<scalar_t>(), G, N, static_cast<float>(margin), point_scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_group_loss_kernel<<<1, kReduceThreads, 0, stream>>>(group_loss.data_ptr<float>(), G, loss.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, hits, grad};
}

}  // namespace fastrank
