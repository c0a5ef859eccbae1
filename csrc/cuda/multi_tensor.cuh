// Multi-tensor apply: one launch covers the chunks of many tensors (the pattern of apex's
// multi_tensor_apply.cuh and torch's MultiTensorApply.cuh, written for raw pointers).
//
// Tensor addresses and a block -> (tensor, chunk) map travel in the kernel's parameter space (<= 4 KB),
// so a launch holds at most kMaxTensors tensors and kMaxBlocks blocks; longer lists take several
// launches, a tensor split across two launches being carried into slot 0 of the next table.
#pragma once

#include <cstdint>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels.h"

namespace misa {

constexpr int64_t kChunk = 65536;  // elements per block; a multiple of every vector width below
constexpr int kThreads = 512;
constexpr int kMaxBlocks = 320;

// Fewer slots for deeper lists keep the table under the 4 KB parameter limit.
template <int Depth> struct MaxTensors;
template <> struct MaxTensors<1> { static constexpr int value = 110; };
template <> struct MaxTensors<3> { static constexpr int value = 48; };
template <> struct MaxTensors<4> { static constexpr int value = 36; };
template <> struct MaxTensors<5> { static constexpr int value = 30; };

template <int Depth>
struct TensorTable {
  static constexpr int kMaxTensors = MaxTensors<Depth>::value;
  void* addresses[Depth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t partial_base[kMaxTensors];  // index of the tensor's first chunk in the norm workspace
  int32_t index[kMaxTensors];         // the tensor's position among the call's non-empty tensors
  uint16_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

__device__ __forceinline__ int64_t chunk_length(int64_t numel, int64_t begin) {
  return numel - begin < kChunk ? numel - begin : kChunk;
}

// Calls launch(table, n_blocks) as often as needed to cover every chunk of every non-empty tensor.
// lists[d][i] is operand d of tensor i.
template <int Depth, typename Launch>
void multi_tensor_apply(int n_tensors, void* const* const* lists, const int64_t* numels, Launch launch) {
  TensorTable<Depth> table;
  int last = -1;
  for (int i = 0; i < n_tensors; ++i)
    if (numels[i] > 0) last = i;
  int loc_tensor = 0, loc_block = 0, nonempty = 0;
  int64_t partial_base = 0;
  for (int i = 0; i <= last; ++i) {
    if (numels[i] == 0) continue;
    for (int d = 0; d < Depth; ++d) table.addresses[d][loc_tensor] = lists[d][i];
    table.numel[loc_tensor] = numels[i];
    table.partial_base[loc_tensor] = partial_base;
    table.index[loc_tensor] = nonempty++;
    ++loc_tensor;
    const int64_t chunks = chunks_of(numels[i]);
    for (int64_t c = 0; c < chunks; ++c) {
      table.block_tensor[loc_block] = static_cast<uint16_t>(loc_tensor - 1);
      table.block_chunk[loc_block] = static_cast<int32_t>(c);
      ++loc_block;
      const bool tensor_done = c == chunks - 1;
      const bool tensors_full = loc_tensor == TensorTable<Depth>::kMaxTensors && tensor_done;
      const bool blocks_full = loc_block == kMaxBlocks;
      const bool everything = i == last && tensor_done;
      if (tensors_full || blocks_full || everything) {
        launch(table, loc_block);
        loc_block = 0;
        if (tensor_done) {
          loc_tensor = 0;
        } else {  // the current tensor continues in the next launch, from slot 0
          for (int d = 0; d < Depth; ++d) table.addresses[d][0] = table.addresses[d][loc_tensor - 1];
          table.numel[0] = table.numel[loc_tensor - 1];
          table.partial_base[0] = table.partial_base[loc_tensor - 1];
          table.index[0] = table.index[loc_tensor - 1];
          loc_tensor = 1;
        }
      }
    }
    partial_base += chunks;
  }
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

// Sums each tensor's per-chunk partials in chunk order and adds the result to out[i].
cudaError_t reduce_partials(int n_tensors, const int64_t* numels, const float* workspace, float* out,
                            cudaStream_t stream);

}  // namespace misa
