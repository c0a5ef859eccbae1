// Squared L2 norms of many tensors in one multi-tensor launch, reduced deterministically:
// one fp32 partial per chunk, then a per-tensor sum over its partials in chunk order.
#include <algorithm>

#include "multi_tensor.cuh"

namespace misa {
namespace {

constexpr int kReduceThreads = 256;
constexpr int kReducePerLaunch = 128;

struct ReduceTable {
  int64_t base[kReducePerLaunch];
  int32_t count[kReducePerLaunch];
  int32_t out_index[kReducePerLaunch];
};

__global__ void __launch_bounds__(kReduceThreads) reduce_partials_kernel(ReduceTable table, const float* workspace,
                                                                         float* out) {
  const int j = blockIdx.x;
  const float* partials = workspace + table.base[j];
  float acc = 0.f;
  for (int k = threadIdx.x; k < table.count[j]; k += blockDim.x) acc += partials[k];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[table.out_index[j]] += acc;
}

template <typename T, int N>
__global__ void __launch_bounds__(kThreads) sq_norm_kernel(TensorTable<1> table, float* workspace) {
  const int slot = table.block_tensor[blockIdx.x];
  const int64_t chunk = table.block_chunk[blockIdx.x];
  const int64_t begin = chunk * kChunk;
  const int64_t len = chunk_length(table.numel[slot], begin);
  const T* x = static_cast<const T*>(table.addresses[0][slot]) + begin;
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
  if (threadIdx.x == 0) workspace[table.partial_base[slot] + chunk] = acc;
}

template <typename T>
void launch_sq_norms(int n, const void* const* tensors, const int64_t* numels, float* workspace,
                     cudaStream_t stream) {
  constexpr int N = 16 / sizeof(T);
  void* const* lists[1] = {const_cast<void* const*>(tensors)};
  multi_tensor_apply<1>(n, lists, numels, [&](const TensorTable<1>& table, int blocks) {
    sq_norm_kernel<T, N><<<blocks, kThreads, 0, stream>>>(table, workspace);
  });
}

}  // namespace

int64_t norm_workspace_size(int n_tensors, const int64_t* numels) {
  int64_t total = 0;
  for (int i = 0; i < n_tensors; ++i) total += chunks_of(numels[i]);
  return std::max<int64_t>(total, 1);
}

cudaError_t reduce_partials(int n_tensors, const int64_t* numels, const float* workspace, float* out,
                            cudaStream_t stream) {
  ReduceTable table;
  int loc = 0;
  int64_t base = 0;
  for (int i = 0; i < n_tensors; ++i) {
    const int64_t chunks = chunks_of(numels[i]);
    if (chunks > 0) {
      table.base[loc] = base;
      table.count[loc] = static_cast<int32_t>(chunks);
      table.out_index[loc] = i;
      ++loc;
    }
    base += chunks;
    if (loc == kReducePerLaunch || (i == n_tensors - 1 && loc > 0)) {
      reduce_partials_kernel<<<loc, kReduceThreads, 0, stream>>>(table, workspace, out);
      loc = 0;
    }
  }
  return cudaGetLastError();
}

cudaError_t grad_sq_norms(int n_tensors, const void* const* tensors, const int64_t* numels, DType dtype, float* out,
                          float* workspace, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: launch_sq_norms<float>(n_tensors, tensors, numels, workspace, stream); break;
    case DType::kBFloat16: launch_sq_norms<__nv_bfloat16>(n_tensors, tensors, numels, workspace, stream); break;
    case DType::kFloat16: launch_sq_norms<__half>(n_tensors, tensors, numels, workspace, stream); break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return reduce_partials(n_tensors, numels, workspace, out, stream);
}

}  // namespace misa
