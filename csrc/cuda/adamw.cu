// Fused AdamW (+ squared grad norms in the same pass) and the MISA momentum flush, multi-tensor.
// fp32 math in single precision throughout (no double promotion); 16-byte vector loads when every
// operand of a chunk is aligned, with a scalar tail.
#include <algorithm>

#include "multi_tensor.cuh"

namespace misa {
namespace {

struct Folded {
  float step_size, bc2_sqrt, decay;
};

__device__ __forceinline__ Folded fold(const AdamScalars& sc) {
  if (sc.device != nullptr) return {sc.device[0], sc.device[1], sc.device[2]};
  return {sc.step_size, sc.bias_correction2_sqrt, sc.decay};
}

// The update of torch.optim.AdamW (lerp form of the first moment), one element.
template <bool kFresh>
__device__ __forceinline__ void adamw_element(float& p, float g, float& m, float& v, const AdamScalars& sc,
                                              const Folded& f) {
  if (kFresh) {
    m = (1.f - sc.beta1) * g;
    v = (1.f - sc.beta2) * g * g;
  } else {
    m = m + (1.f - sc.beta1) * (g - m);
    v = sc.beta2 * v + (1.f - sc.beta2) * g * g;
  }
  const float denom = sqrtf(v) / f.bc2_sqrt + sc.eps;
  p = p * f.decay - f.step_size * (m / denom);
}

template <typename P, int N, bool kFresh, bool kNorms>
__global__ void __launch_bounds__(kThreads) adamw_kernel(TensorTable<4> table, AdamScalars sc, float* workspace) {
  const int slot = table.block_tensor[blockIdx.x];
  const int64_t chunk = table.block_chunk[blockIdx.x];
  const int64_t begin = chunk * kChunk;
  const int64_t len = chunk_length(table.numel[slot], begin);
  P* p = static_cast<P*>(table.addresses[0][slot]) + begin;
  const P* g = static_cast<const P*>(table.addresses[1][slot]) + begin;
  float* m = static_cast<float*>(table.addresses[2][slot]) + begin;
  float* v = static_cast<float*>(table.addresses[3][slot]) + begin;
  const Folded f = fold(sc);
  float acc = 0.f;
  int64_t vec_end = 0;
  if (is_aligned<P, N>(p) && is_aligned<P, N>(g) && is_aligned<float, N>(m) && is_aligned<float, N>(v)) {
    vec_end = len / N * N;
    for (int64_t i = int64_t(threadIdx.x) * N; i < vec_end; i += int64_t(blockDim.x) * N) {
      Vec<P, N> pv = *reinterpret_cast<const Vec<P, N>*>(p + i);
      const Vec<P, N> gv = *reinterpret_cast<const Vec<P, N>*>(g + i);
      Vec<float, N> mv, vv;
      if (!kFresh) {
        mv = *reinterpret_cast<const Vec<float, N>*>(m + i);
        vv = *reinterpret_cast<const Vec<float, N>*>(v + i);
      }
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float gf = to_float(gv.v[k]);
        if (kNorms) acc += gf * gf;
        float pf = to_float(pv.v[k]);
        adamw_element<kFresh>(pf, gf, mv.v[k], vv.v[k], sc, f);
        pv.v[k] = from_float<P>(pf);
      }
      *reinterpret_cast<Vec<P, N>*>(p + i) = pv;
      *reinterpret_cast<Vec<float, N>*>(m + i) = mv;
      *reinterpret_cast<Vec<float, N>*>(v + i) = vv;
    }
  }
  for (int64_t i = vec_end + threadIdx.x; i < len; i += blockDim.x) {
    const float gf = to_float(g[i]);
    if (kNorms) acc += gf * gf;
    float pf = to_float(p[i]);
    float mf = kFresh ? 0.f : m[i];
    float vf = kFresh ? 0.f : v[i];
    adamw_element<kFresh>(pf, gf, mf, vf, sc, f);
    p[i] = from_float<P>(pf);
    m[i] = mf;
    v[i] = vf;
  }
  if (kNorms) {
    acc = block_sum(acc);
    if (threadIdx.x == 0) workspace[table.partial_base[slot] + chunk] = acc;
  }
}

template <typename P, int N>
__global__ void __launch_bounds__(kThreads) flush_kernel(TensorTable<3> table, AdamScalars sc) {
  const int slot = table.block_tensor[blockIdx.x];
  const int64_t begin = int64_t(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t len = chunk_length(table.numel[slot], begin);
  P* p = static_cast<P*>(table.addresses[0][slot]) + begin;
  const float* m = static_cast<const float*>(table.addresses[1][slot]) + begin;
  const float* v = static_cast<const float*>(table.addresses[2][slot]) + begin;
  const Folded f = fold(sc);
  int64_t vec_end = 0;
  if (is_aligned<P, N>(p) && is_aligned<float, N>(m) && is_aligned<float, N>(v)) {
    vec_end = len / N * N;
    for (int64_t i = int64_t(threadIdx.x) * N; i < vec_end; i += int64_t(blockDim.x) * N) {
      Vec<P, N> pv = *reinterpret_cast<const Vec<P, N>*>(p + i);
      const Vec<float, N> mv = *reinterpret_cast<const Vec<float, N>*>(m + i);
      const Vec<float, N> vv = *reinterpret_cast<const Vec<float, N>*>(v + i);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float pf = to_float(pv.v[k]) - f.step_size * (mv.v[k] / (sqrtf(vv.v[k]) / f.bc2_sqrt + sc.eps));
        pv.v[k] = from_float<P>(pf);
      }
      *reinterpret_cast<Vec<P, N>*>(p + i) = pv;
    }
  }
  for (int64_t i = vec_end + threadIdx.x; i < len; i += blockDim.x) {
    const float pf = to_float(p[i]) - f.step_size * (m[i] / (sqrtf(v[i]) / f.bc2_sqrt + sc.eps));
    p[i] = from_float<P>(pf);
  }
}

template <typename P, bool kFresh, bool kNorms>
void launch_adamw(int n, void* const* const* lists, const int64_t* numels, const AdamScalars& sc, float* workspace,
                  cudaStream_t stream) {
  // 16-byte vectors of the parameter type (8 bf16/fp16 or 4 fp32 elements).
  constexpr int N = 16 / sizeof(P);
  multi_tensor_apply<4>(n, lists, numels, [&](const TensorTable<4>& table, int blocks) {
    adamw_kernel<P, N, kFresh, kNorms><<<blocks, kThreads, 0, stream>>>(table, sc, workspace);
  });
}

template <typename P>
void launch_adamw_flags(int n, void* const* const* lists, const int64_t* numels, const AdamScalars& sc, bool fresh,
                        float* workspace, cudaStream_t stream) {
  const bool norms = workspace != nullptr;
  if (fresh && norms) launch_adamw<P, true, true>(n, lists, numels, sc, workspace, stream);
  else if (fresh) launch_adamw<P, true, false>(n, lists, numels, sc, workspace, stream);
  else if (norms) launch_adamw<P, false, true>(n, lists, numels, sc, workspace, stream);
  else launch_adamw<P, false, false>(n, lists, numels, sc, workspace, stream);
}

template <typename P>
void launch_flush(int n, void* const* const* lists, const int64_t* numels, const AdamScalars& sc,
                  cudaStream_t stream) {
  constexpr int N = 16 / sizeof(P);
  multi_tensor_apply<3>(n, lists, numels, [&](const TensorTable<3>& table, int blocks) {
    flush_kernel<P, N><<<blocks, kThreads, 0, stream>>>(table, sc);
  });
}

}  // namespace

cudaError_t adamw_step(int n_tensors, void* const* params, const void* const* grads, float* const* exp_avgs,
                       float* const* exp_avg_sqs, const int64_t* numels, DType dtype, AdamScalars scalars, bool fresh,
                       float* grad_sq_norms, float* workspace, cudaStream_t stream) {
  void* const* lists[4] = {params, const_cast<void* const*>(grads), reinterpret_cast<void* const*>(exp_avgs),
                           reinterpret_cast<void* const*>(exp_avg_sqs)};
  float* ws = grad_sq_norms != nullptr ? workspace : nullptr;
  switch (dtype) {
    case DType::kFloat32: launch_adamw_flags<float>(n_tensors, lists, numels, scalars, fresh, ws, stream); break;
    case DType::kBFloat16:
      launch_adamw_flags<__nv_bfloat16>(n_tensors, lists, numels, scalars, fresh, ws, stream);
      break;
    case DType::kFloat16: launch_adamw_flags<__half>(n_tensors, lists, numels, scalars, fresh, ws, stream); break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || grad_sq_norms == nullptr) return err;
  return reduce_partials(n_tensors, numels, workspace, grad_sq_norms, stream);
}

cudaError_t momentum_flush(int n_tensors, void* const* params, const float* const* exp_avgs,
                           const float* const* exp_avg_sqs, const int64_t* numels, DType dtype, AdamScalars scalars,
                           cudaStream_t stream) {
  void* const* lists[3] = {params, reinterpret_cast<void* const*>(const_cast<float* const*>(exp_avgs)),
                           reinterpret_cast<void* const*>(const_cast<float* const*>(exp_avg_sqs))};
  switch (dtype) {
    case DType::kFloat32: launch_flush<float>(n_tensors, lists, numels, scalars, stream); break;
    case DType::kBFloat16: launch_flush<__nv_bfloat16>(n_tensors, lists, numels, scalars, stream); break;
    case DType::kFloat16: launch_flush<__half>(n_tensors, lists, numels, scalars, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace misa
