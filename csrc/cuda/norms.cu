// Squared L2 norms of many tensors in one launch (a block per chunk of the device-side chunk table),
// reduced deterministically: one fp32 partial per chunk, then one launch that sums each tensor's
// partials in chunk order.
#include "multi_tensor.cuh"

namespace misa {
namespace {

constexpr int kReduceThreads = 256;

__global__ void __launch_bounds__(kReduceThreads) reduce_partials_kernel(ChunkTable table, const float* partials,
                                                                         float* out) {
  const int64_t t = blockIdx.x;
  const int64_t* begins = chunk_begins(table);
  const int64_t first = begins[t], last = begins[t + 1];
  float acc = 0.f;
  for (int64_t k = first + threadIdx.x; k < last; k += blockDim.x) acc += partials[k];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[t] += acc;
}

template <typename T, int N>
__global__ void __launch_bounds__(kThreads) sq_norm_kernel(ChunkTable table, float* partials) {
  const Chunk c = chunk_of(table, blockIdx.x);
  const int64_t len = c.len;
  const T* x = operand<const T>(table, 0, c);
  float acc = 0.f;
  int64_t vec_end = 0;
  if (is_aligned<T, N>(x)) {
    vec_end = len / N * N;
    for (int64_t i = int64_t(threadIdx.x) * N; i < vec_end; i += int64_t(blockDim.x) * N) {
      const Vec<T, N> xv = *reinterpret_cast<const Vec<T, N>*>(x + i);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float f = to_float(xv.v[k]);
        acc += f * f;
      }
    }
  }
  for (int64_t i = vec_end + threadIdx.x; i < len; i += blockDim.x) {
    const float f = to_float(x[i]);
    acc += f * f;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

template <typename T>
void launch_sq_norms(const ChunkTable& t, float* partials, cudaStream_t stream) {
  constexpr int N = 16 / sizeof(T);
  sq_norm_kernel<T, N><<<static_cast<unsigned>(t.n_chunks), kThreads, 0, stream>>>(t, partials);
}

}  // namespace

cudaError_t reduce_partials(const ChunkTable& table, const float* partials, float* out, cudaStream_t stream) {
  if (table.n_tensors == 0) return cudaSuccess;
  reduce_partials_kernel<<<static_cast<unsigned>(table.n_tensors), kReduceThreads, 0, stream>>>(table, partials, out);
  return cudaGetLastError();
}

cudaError_t grad_sq_norms(const ChunkTable& table, DType dtype, float* out, float* partials, cudaStream_t stream) {
  if (table.n_chunks == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: launch_sq_norms<float>(table, partials, stream); break;
    case DType::kBFloat16: launch_sq_norms<__nv_bfloat16>(table, partials, stream); break;
    case DType::kFloat16: launch_sq_norms<__half>(table, partials, stream); break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return reduce_partials(table, partials, out, stream);
}

}  // namespace misa
