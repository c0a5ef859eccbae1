// Fused AdamW (+ squared grad norms in the same pass) and the MISA momentum flush, multi-tensor.
// fp32 math in single precision throughout (no double promotion); every hyperparameter arrives folded
// (no 1 - beta inside a kernel); 16-byte vector loads when every operand of a chunk is aligned, with a
// scalar tail. kMaster: an fp32 master copy is the value updated and the parameter its rounding.
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
    m = sc.one_minus_beta1 * g;
    v = sc.one_minus_beta2 * g * g;
  } else {
    m = m + sc.one_minus_beta1 * (g - m);
    v = sc.beta2 * v + sc.one_minus_beta2 * g * g;
  }
  const float denom = sqrtf(v) / f.bc2_sqrt + sc.eps;
  p = p * f.decay - f.step_size * (m / denom);
}

// Operands: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 master (kMaster only).
template <typename P, int N, bool kFresh, bool kNorms, bool kMaster, bool kStochastic, int Depth>
__global__ void __launch_bounds__(kThreads) adamw_kernel(TensorTable<Depth> table, AdamScalars sc, uint32_t seed,
                                                         const float* skip, float* workspace) {
  const int slot = table.block_tensor[blockIdx.x];
  const int64_t chunk = table.block_chunk[blockIdx.x];
  const int64_t begin = chunk * kChunk;
  const int64_t len = chunk_length(table.numel[slot], begin);
  P* p = static_cast<P*>(table.addresses[0][slot]) + begin;
  const P* g = static_cast<const P*>(table.addresses[1][slot]) + begin;
  float* m = static_cast<float*>(table.addresses[2][slot]) + begin;
  float* v = static_cast<float*>(table.addresses[3][slot]) + begin;
  float* w = kMaster ? static_cast<float*>(table.addresses[Depth - 1][slot]) + begin : nullptr;
  const uint32_t key = tensor_key(seed, static_cast<uint32_t>(table.index[slot]));
  if (skip != nullptr && *skip != 0.f) {
    // A skipped step writes nothing, except that a fresh one defines zero states (and the master as the
    // weight), so that the next step starts from them as from a fresh step. Uniform per block.
    if (kFresh) {
      for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
        m[i] = 0.f;
        v[i] = 0.f;
        if (kMaster) w[i] = to_float(p[i]);
      }
    }
    if (kNorms && threadIdx.x == 0) workspace[table.partial_base[slot] + chunk] = 0.f;
    return;
  }
  const Folded f = fold(sc);
  float acc = 0.f;
  int64_t vec_end = 0;
  const bool aligned = is_aligned<P, N>(p) && is_aligned<P, N>(g) && is_aligned<float, N>(m) &&
                       is_aligned<float, N>(v) && (!kMaster || is_aligned<float, N>(w));
  if (aligned) {
    vec_end = len / N * N;
    for (int64_t i = int64_t(threadIdx.x) * N; i < vec_end; i += int64_t(blockDim.x) * N) {
      Vec<P, N> pv;
      Vec<float, N> wv;
      if (kMaster && !kFresh) wv = *reinterpret_cast<const Vec<float, N>*>(w + i);
      else pv = *reinterpret_cast<const Vec<P, N>*>(p + i);
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
        float pf = (kMaster && !kFresh) ? wv.v[k] : to_float(pv.v[k]);
        adamw_element<kFresh>(pf, gf, mv.v[k], vv.v[k], sc, f);
        if (kMaster) wv.v[k] = pf;
        pv.v[k] = round_to_param<P, kStochastic>(pf, key, begin + i + k);
      }
      *reinterpret_cast<Vec<P, N>*>(p + i) = pv;
      if (kMaster) *reinterpret_cast<Vec<float, N>*>(w + i) = wv;
      *reinterpret_cast<Vec<float, N>*>(m + i) = mv;
      *reinterpret_cast<Vec<float, N>*>(v + i) = vv;
    }
  }
  for (int64_t i = vec_end + threadIdx.x; i < len; i += blockDim.x) {
    const float gf = to_float(g[i]);
    if (kNorms) acc += gf * gf;
    float pf = (kMaster && !kFresh) ? w[i] : to_float(p[i]);
    float mf = kFresh ? 0.f : m[i];
    float vf = kFresh ? 0.f : v[i];
    adamw_element<kFresh>(pf, gf, mf, vf, sc, f);
    if (kMaster) w[i] = pf;
    p[i] = round_to_param<P, kStochastic>(pf, key, begin + i);
    m[i] = mf;
    v[i] = vf;
  }
  if (kNorms) {
    acc = block_sum(acc);
    if (threadIdx.x == 0) workspace[table.partial_base[slot] + chunk] = acc;
  }
}

// Operands: 0 param, 1 exp_avg, 2 exp_avg_sq, 3 master (kMaster only).
template <typename P, int N, bool kMaster, bool kStochastic, int Depth>
__global__ void __launch_bounds__(kThreads) flush_kernel(TensorTable<Depth> table, AdamScalars sc, uint32_t seed) {
  const int slot = table.block_tensor[blockIdx.x];
  const int64_t begin = int64_t(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t len = chunk_length(table.numel[slot], begin);
  P* p = static_cast<P*>(table.addresses[0][slot]) + begin;
  const float* m = static_cast<const float*>(table.addresses[1][slot]) + begin;
  const float* v = static_cast<const float*>(table.addresses[2][slot]) + begin;
  float* w = kMaster ? static_cast<float*>(table.addresses[Depth - 1][slot]) + begin : nullptr;
  const uint32_t key = tensor_key(seed, static_cast<uint32_t>(table.index[slot]));
  const Folded f = fold(sc);
  int64_t vec_end = 0;
  if (is_aligned<P, N>(p) && is_aligned<float, N>(m) && is_aligned<float, N>(v) &&
      (!kMaster || is_aligned<float, N>(w))) {
    vec_end = len / N * N;
    for (int64_t i = int64_t(threadIdx.x) * N; i < vec_end; i += int64_t(blockDim.x) * N) {
      Vec<P, N> pv;
      Vec<float, N> wv;
      if (kMaster) wv = *reinterpret_cast<const Vec<float, N>*>(w + i);
      else pv = *reinterpret_cast<const Vec<P, N>*>(p + i);
      const Vec<float, N> mv = *reinterpret_cast<const Vec<float, N>*>(m + i);
      const Vec<float, N> vv = *reinterpret_cast<const Vec<float, N>*>(v + i);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float old = kMaster ? wv.v[k] : to_float(pv.v[k]);
        const float pf = old - f.step_size * (mv.v[k] / (sqrtf(vv.v[k]) / f.bc2_sqrt + sc.eps));
        if (kMaster) wv.v[k] = pf;
        pv.v[k] = round_to_param<P, kStochastic>(pf, key, begin + i + k);
      }
      *reinterpret_cast<Vec<P, N>*>(p + i) = pv;
      if (kMaster) *reinterpret_cast<Vec<float, N>*>(w + i) = wv;
    }
  }
  for (int64_t i = vec_end + threadIdx.x; i < len; i += blockDim.x) {
    const float old = kMaster ? w[i] : to_float(p[i]);
    const float pf = old - f.step_size * (m[i] / (sqrtf(v[i]) / f.bc2_sqrt + sc.eps));
    if (kMaster) w[i] = pf;
    p[i] = round_to_param<P, kStochastic>(pf, key, begin + i);
  }
}

template <typename P, bool kFresh, bool kNorms, bool kMaster, bool kStochastic>
void launch_adamw(int n, void* const* const* lists, const int64_t* numels, const AdamScalars& sc, uint32_t seed,
                  const float* skip, float* workspace, cudaStream_t stream) {
  // 16-byte vectors of the parameter type (8 bf16/fp16 or 4 fp32 elements).
  constexpr int N = 16 / sizeof(P);
  constexpr int Depth = kMaster ? 5 : 4;
  multi_tensor_apply<Depth>(n, lists, numels, [&](const TensorTable<Depth>& table, int blocks) {
    adamw_kernel<P, N, kFresh, kNorms, kMaster, kStochastic, Depth>
        <<<blocks, kThreads, 0, stream>>>(table, sc, seed, skip, workspace);
  });
}

template <typename P, bool kMaster, bool kStochastic>
void launch_adamw_flags(int n, void* const* const* lists, const int64_t* numels, const AdamScalars& sc, bool fresh,
                        uint32_t seed, const float* skip, float* workspace, cudaStream_t stream) {
  const bool norms = workspace != nullptr;
  if (fresh && norms) launch_adamw<P, true, true, kMaster, kStochastic>(n, lists, numels, sc, seed, skip, workspace, stream);
  else if (fresh) launch_adamw<P, true, false, kMaster, kStochastic>(n, lists, numels, sc, seed, skip, workspace, stream);
  else if (norms) launch_adamw<P, false, true, kMaster, kStochastic>(n, lists, numels, sc, seed, skip, workspace, stream);
  else launch_adamw<P, false, false, kMaster, kStochastic>(n, lists, numels, sc, seed, skip, workspace, stream);
}

template <typename P, bool kMaster, bool kStochastic>
void launch_flush(int n, void* const* const* lists, const int64_t* numels, const AdamScalars& sc, uint32_t seed,
                  cudaStream_t stream) {
  constexpr int N = 16 / sizeof(P);
  constexpr int Depth = kMaster ? 4 : 3;
  multi_tensor_apply<Depth>(n, lists, numels, [&](const TensorTable<Depth>& table, int blocks) {
    flush_kernel<P, N, kMaster, kStochastic, Depth><<<blocks, kThreads, 0, stream>>>(table, sc, seed);
  });
}

// Low-precision parameters pick master/stochastic variants; fp32 parameters never need either.
template <typename P>
void dispatch_adamw(int n, void* const* const* lists, const int64_t* numels, const AdamScalars& sc, bool fresh,
                    const Rounding& r, float* workspace, cudaStream_t stream) {
  const bool master = r.master != nullptr;
  const float* k = r.skip;
  if constexpr (std::is_same_v<P, float>) {
    launch_adamw_flags<P, false, false>(n, lists, numels, sc, fresh, r.seed, k, workspace, stream);
  } else if constexpr (std::is_same_v<P, __nv_bfloat16>) {
    if (master && r.stochastic) launch_adamw_flags<P, true, true>(n, lists, numels, sc, fresh, r.seed, k, workspace, stream);
    else if (master) launch_adamw_flags<P, true, false>(n, lists, numels, sc, fresh, r.seed, k, workspace, stream);
    else if (r.stochastic) launch_adamw_flags<P, false, true>(n, lists, numels, sc, fresh, r.seed, k, workspace, stream);
    else launch_adamw_flags<P, false, false>(n, lists, numels, sc, fresh, r.seed, k, workspace, stream);
  } else {
    if (master) launch_adamw_flags<P, true, false>(n, lists, numels, sc, fresh, r.seed, k, workspace, stream);
    else launch_adamw_flags<P, false, false>(n, lists, numels, sc, fresh, r.seed, k, workspace, stream);
  }
}

template <typename P>
void dispatch_flush(int n, void* const* const* lists, const int64_t* numels, const AdamScalars& sc,
                    const Rounding& r, cudaStream_t stream) {
  const bool master = r.master != nullptr;
  if constexpr (std::is_same_v<P, float>) {
    launch_flush<P, false, false>(n, lists, numels, sc, r.seed, stream);
  } else if constexpr (std::is_same_v<P, __nv_bfloat16>) {
    if (master && r.stochastic) launch_flush<P, true, true>(n, lists, numels, sc, r.seed, stream);
    else if (master) launch_flush<P, true, false>(n, lists, numels, sc, r.seed, stream);
    else if (r.stochastic) launch_flush<P, false, true>(n, lists, numels, sc, r.seed, stream);
    else launch_flush<P, false, false>(n, lists, numels, sc, r.seed, stream);
  } else {
    if (master) launch_flush<P, true, false>(n, lists, numels, sc, r.seed, stream);
    else launch_flush<P, false, false>(n, lists, numels, sc, r.seed, stream);
  }
}

}  // namespace

cudaError_t adamw_step(int n_tensors, void* const* params, const void* const* grads, float* const* exp_avgs,
                       float* const* exp_avg_sqs, const int64_t* numels, DType dtype, AdamScalars scalars, bool fresh,
                       Rounding rounding, float* grad_sq_norms, float* workspace, cudaStream_t stream) {
  void* const* lists[5] = {params, const_cast<void* const*>(grads), reinterpret_cast<void* const*>(exp_avgs),
                           reinterpret_cast<void* const*>(exp_avg_sqs),
                           reinterpret_cast<void* const*>(rounding.master)};
  float* ws = grad_sq_norms != nullptr ? workspace : nullptr;
  switch (dtype) {
    case DType::kFloat32: dispatch_adamw<float>(n_tensors, lists, numels, scalars, fresh, rounding, ws, stream); break;
    case DType::kBFloat16:
      dispatch_adamw<__nv_bfloat16>(n_tensors, lists, numels, scalars, fresh, rounding, ws, stream);
      break;
    case DType::kFloat16: dispatch_adamw<__half>(n_tensors, lists, numels, scalars, fresh, rounding, ws, stream); break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || grad_sq_norms == nullptr) return err;
  return reduce_partials(n_tensors, numels, workspace, grad_sq_norms, stream);
}

cudaError_t momentum_flush(int n_tensors, void* const* params, const float* const* exp_avgs,
                           const float* const* exp_avg_sqs, const int64_t* numels, DType dtype, AdamScalars scalars,
                           Rounding rounding, cudaStream_t stream) {
  void* const* lists[4] = {params, reinterpret_cast<void* const*>(const_cast<float* const*>(exp_avgs)),
                           reinterpret_cast<void* const*>(const_cast<float* const*>(exp_avg_sqs)),
                           reinterpret_cast<void* const*>(rounding.master)};
  switch (dtype) {
    case DType::kFloat32: dispatch_flush<float>(n_tensors, lists, numels, scalars, rounding, stream); break;
    case DType::kBFloat16: dispatch_flush<__nv_bfloat16>(n_tensors, lists, numels, scalars, rounding, stream); break;
    case DType::kFloat16: dispatch_flush<__half>(n_tensors, lists, numels, scalars, rounding, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace misa
