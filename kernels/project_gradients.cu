// The two passes over the (T, P) task-gradient buffer of project_gradients (fastrank/ops/project_gradients.py):
//   gram_matrix_cuda: G = grads @ grads.T, (T, T) fp32, one read of T*P;
//   combine_cuda:     out = w @ grads, (P,) in the dtype of grads, one read of T*P and one write of P.
// The T x T PCGrad / CAGrad solve between them stays in torch.
//
// Launch layout: both are grid-stride loops over the P columns, 256 threads per block, as many blocks as fit on the
// device at once (occupancy query): each thread handles whole columns, reading the T values of a column (one per
// task row; a warp reads 32 consecutive columns of a row, so every row access is coalesced, and any row stride
// works) into registers. T <= 16 is compiled in through buckets MAXT = 2, 4, 8, 16 (register arrays need a
// compile-time size; rows >= T read as 0), which keeps the instantiations to 4 per dtype.
// Gram: each thread accumulates the MAXT(MAXT+1)/2 upper-triangle products of its columns with fp32 FMAs; stage one
// reduces them per block (warp butterflies, then the 8 warps in order, in shared memory) into a (blocks, T, T)
// partial buffer; stage two (one block, one thread per entry of G) sums the partials in block order. No atomics:
// the result is bit-reproducible for a given GPU and T, and exactly symmetric (G[i,j] and G[j,i] are the same sum).
// Combine: w (fp32) in registers, sum over tasks in task order per column, rounded once to the output dtype.
// Precision: bf16/fp16 input is widened to fp32 before any product; nothing is accumulated in reduced precision.
//
// Status: as of the session that wrote it, this file has been compiled (nvcc 13.0, sm_80 and sm_90, against the
// torch 2.13 headers) but never run on a GPU; tests/test_cuda_ext.py holds the GPU tests that have not run yet.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common.cuh"
#include "fastrank_cuda.h"

namespace fastrank {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

// Position of (i, j), i <= j, in the row-major upper triangle of an n x n matrix; constant-folded when unrolled.
__host__ __device__ constexpr int tri(int i, int j, int n) { return i * n - i * (i - 1) / 2 + (j - i); }

template <typename scalar_t, int MAXT>
__global__ void __launch_bounds__(kThreads) gram_partial_kernel(
    const scalar_t* __restrict__ grads, int64_t row_stride, int T, int64_t P, float* __restrict__ partials) {
  constexpr int kPairs = MAXT * (MAXT + 1) / 2;
  float acc[kPairs];
#pragma unroll
  for (int k = 0; k < kPairs; ++k) acc[k] = 0.f;

  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < P; c += step) {
    float x[MAXT];
#pragma unroll
    for (int i = 0; i < MAXT; ++i) x[i] = i < T ? static_cast<float>(grads[i * row_stride + c]) : 0.f;
#pragma unroll
    for (int i = 0; i < MAXT; ++i) {
#pragma unroll
      for (int j = i; j < MAXT; ++j) acc[tri(i, j, MAXT)] = fmaf(x[i], x[j], acc[tri(i, j, MAXT)]);
    }
  }

  __shared__ float warp_partial[kWarps][kPairs];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int k = 0; k < kPairs; ++k) {
    const float v = warp_sum(acc[k]);
    if (lane == 0) warp_partial[warp][k] = v;
  }
  __syncthreads();
  for (int k = threadIdx.x; k < kPairs; k += kThreads) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += warp_partial[w][k];
    int i = 0, r = k;
    while (r >= MAXT - i) r -= MAXT - i++;
    const int j = i + r;
    // only the upper triangle of each (T, T) partial is written; stage two reads nothing else
    if (j < T) partials[static_cast<int64_t>(blockIdx.x) * T * T + i * T + j] = v;
  }
}

__global__ void __launch_bounds__(kMaxTasks * kMaxTasks) gram_finalize_kernel(
    const float* __restrict__ partials, int64_t num_partials, int T, float* __restrict__ gram) {
  const int e = threadIdx.x;
  if (e >= T * T) return;
  const int i = e / T, j = e % T, a = min(i, j), b = max(i, j);
  float v = 0.f;
  for (int64_t p = 0; p < num_partials; ++p) v += partials[p * T * T + a * T + b];
  gram[e] = v;
}

template <typename scalar_t, int MAXT>
__global__ void __launch_bounds__(kThreads) combine_kernel(
    const scalar_t* __restrict__ grads, int64_t row_stride, int T, int64_t P, const float* __restrict__ weights,
    scalar_t* __restrict__ out) {
  float w[MAXT];
#pragma unroll
  for (int i = 0; i < MAXT; ++i) w[i] = i < T ? weights[i] : 0.f;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < P; c += step) {
    float x[MAXT];  // all T loads issued before the first FMA: T requests in flight per thread
#pragma unroll
    for (int i = 0; i < MAXT; ++i) x[i] = i < T ? static_cast<float>(grads[i * row_stride + c]) : 0.f;
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < MAXT; ++i) acc = fmaf(w[i], x[i], acc);
    out[c] = static_cast<scalar_t>(acc);
  }
}

template <typename F>
void with_max_tasks(int64_t T, F&& f) {
  if (T <= 2) {
    f(std::integral_constant<int, 2>{});
  } else if (T <= 4) {
    f(std::integral_constant<int, 4>{});
  } else if (T <= 8) {
    f(std::integral_constant<int, 8>{});
  } else {
    f(std::integral_constant<int, 16>{});
  }
}

// Enough blocks to fill the device once (more only add partials to sum), never more than there are columns.
int64_t grid_size(const void* kernel, int device, int64_t P) {
  int per_sm = 0, sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(P, kThreads), int64_t{std::max(per_sm, 1)} * sms));
}

}  // namespace

at::Tensor gram_matrix_cuda(const at::Tensor& grads) {
  const c10::cuda::CUDAGuard device_guard(grads.device());
  const int64_t T = grads.size(0), P = grads.size(1);
  const auto fp32 = grads.options().dtype(at::kFloat);
  if (P == 0) return at::zeros({T, T}, fp32);
  at::Tensor gram = at::empty({T, T}, fp32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int device = grads.device().index();
  FASTRANK_DISPATCH_FLOATS(grads.scalar_type(), "fastrank_gram_matrix", [&] {
    with_max_tasks(T, [&](auto max_tasks) {
      constexpr int MAXT = decltype(max_tasks)::value;
      const auto kernel = gram_partial_kernel<scalar_t, MAXT>;
      const int64_t blocks = grid_size(reinterpret_cast<const void*>(kernel), device, P);
      at::Tensor partials = at::empty({blocks, T, T}, fp32);
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          grads.data_ptr<scalar_t>(), grads.stride(0), static_cast<int>(T), P, partials.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      gram_finalize_kernel<<<1, kMaxTasks * kMaxTasks, 0, stream>>>(partials.data_ptr<float>(), blocks,
                                                                     static_cast<int>(T), gram.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // freeing partials before the kernels have run is safe: the caching allocator hands its block out again
      // only to work queued after them on this stream
    });
  });
  return gram;
}

at::Tensor combine_cuda(const at::Tensor& grads, const at::Tensor& weights) {
  const c10::cuda::CUDAGuard device_guard(grads.device());
  const int64_t T = grads.size(0), P = grads.size(1);
  at::Tensor out = at::empty({P}, grads.options());
  if (P == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int device = grads.device().index();
  FASTRANK_DISPATCH_FLOATS(grads.scalar_type(), "fastrank_combine", [&] {
    with_max_tasks(T, [&](auto max_tasks) {
      constexpr int MAXT = decltype(max_tasks)::value;
      const auto kernel = combine_kernel<scalar_t, MAXT>;
      const int64_t blocks = grid_size(reinterpret_cast<const void*>(kernel), device, P);
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          grads.data_ptr<scalar_t>(), grads.stride(0), static_cast<int>(T), P, weights.data_ptr<float>(),
          out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace fastrank
