// Multi-tensor launches: one launch covers every chunk of every tensor of a call. The chunk table is
// built and cached on the host by misa_kernels/tables.py and lives in device memory, so a launch holds
// any number of tensors and its grid is all chunks at once (no parameter-space table, no launch per
// 320 blocks, no partial tail wave per launch). Block b handles chunk b.
//
// Table layout (int64, one buffer): chunk_tensor[n_chunks] | chunk_start[n_chunks] | numel[n_tensors] |
// chunk_begin[n_tensors + 1] | address[n_operands][n_tensors].
#pragma once

#include <cstdint>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.h"

namespace misa {

constexpr int kThreads = 512;

struct Chunk {
  int64_t tensor;  // index among the call's (non-empty) tensors
  int64_t begin;   // first element
  int64_t len;     // elements in this chunk
};

__host__ __device__ __forceinline__ Chunk chunk_of(const ChunkTable& t, int64_t id) {
  const int64_t tensor = t.data[id];
  const int64_t begin = t.data[t.n_chunks + id];
  const int64_t numel = t.data[2 * t.n_chunks + tensor];
  return {tensor, begin, numel - begin < t.chunk ? numel - begin : t.chunk};
}

__host__ __device__ __forceinline__ const int64_t* chunk_begins(const ChunkTable& t) {
  return t.data + 2 * t.n_chunks + t.n_tensors;
}

// Operand `which` (0 = param, ...) of the chunk's tensor, offset to the chunk's first element.
template <typename T>
__host__ __device__ __forceinline__ T* operand(const ChunkTable& t, int which, const Chunk& c) {
  const int64_t* addresses = t.data + 2 * t.n_chunks + 2 * t.n_tensors + 1;
  T* p = reinterpret_cast<T*>(addresses[which * t.n_tensors + c.tensor]) + c.begin;
#ifdef __CUDA_ARCH__
  // An address read from memory is generic to the compiler; saying it is global memory gets
  // ld.global/st.global (no address-space check per access), as for a pointer passed as a parameter.
  __builtin_assume(__isGlobal(p));
#endif
  return p;
}

// ---- element access: fp32 math whatever the storage type ----
template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// lowbias32 (C. Wellons): the hash misa_kernels/scalars.py and the Triton kernels use, so that every
// backend makes the same stochastic rounding decisions.
__host__ __device__ __forceinline__ uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

__host__ __device__ __forceinline__ uint32_t tensor_key(uint32_t seed, uint32_t tensor_index) {
  return hash32(seed + tensor_index * 0x9E3779B9u);
}

// fp32 -> bf16 rounding up with probability equal to the distance from the lower neighbour.
__device__ __forceinline__ __nv_bfloat16 stochastic_bf16(float x, uint32_t key, int64_t element) {
  if (x != x) return __float2bfloat16_rn(x);
  const uint32_t noise = hash32(static_cast<uint32_t>(element) ^ key) & 0xFFFFu;
  const uint32_t bits = (__float_as_uint(x) + noise) & 0xFFFF0000u;
  return __ushort_as_bfloat16(static_cast<unsigned short>(bits >> 16));
}

// The parameter's value for an fp32 result: nearest-even, or stochastic (bf16 only).
template <typename T, bool kStochastic>
__device__ __forceinline__ T round_to_param(float x, uint32_t key, int64_t element) {
  if constexpr (kStochastic && std::is_same_v<T, __nv_bfloat16>) {
    return stochastic_bf16(x, key, element);
  } else {
    return from_float<T>(x);
  }
}

// N elements moved as one aligned vector (16 bytes for N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0;
}

// Deterministic block sum: fixed shuffle tree within warps, then over warps.
__device__ __forceinline__ float block_sum(float x) {
  __shared__ float warp_sums[32];
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  x = (threadIdx.x < n_warps) ? warp_sums[threadIdx.x] : 0.f;
  if (warp == 0)
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  __syncthreads();  // warp_sums may be reused by a following call
  return x;  // valid in thread 0
}

// out[t] += the sum of tensor t's per-chunk partials, in chunk order (one launch, a block per tensor).
cudaError_t reduce_partials(const ChunkTable& table, const float* partials, float* out, cudaStream_t stream);

}  // namespace misa
