// Shared by the kernels: fixed-order reductions and the dtype dispatch.
// No float atomics anywhere: a reduction tree whose shape depends only on the launch configuration gives
// bit-identical results from run to run.
#pragma once

#include <cstdint>

#include <ATen/Dispatch.h>

// fp32 / fp16 / bf16 only: what the Python ops accept (fp64 stays on the torch backend, for gradcheck).
#define FASTRANK_DISPATCH_FLOATS(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace fastrank {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Butterfly (xor) shuffles: every lane ends with the same bits, because each step adds the same two operands in
// every lane of a pair (IEEE addition is commutative), so any lane may use the result.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Sum over a block of kThreads threads; the result is valid in thread 0 only.
template <typename T, int kThreads>
__device__ __forceinline__ T block_sum(T v) {
  static_assert(kThreads % kWarpSize == 0 && kThreads / kWarpSize <= kWarpSize, "one warp must finish the sum");
  __shared__ T partial[kThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T total = T(0);
  if (warp == 0) {
    total = lane < kThreads / kWarpSize ? partial[lane] : T(0);
    total = warp_sum(total);
  }
  return total;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace fastrank
