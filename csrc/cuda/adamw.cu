// Fused AdamW (+ squared grad norms in the same pass) and the MISA momentum flush, multi-tensor: one
// launch per call, a block per chunk of the device-side chunk table (multi_tensor.cuh).
// fp32 math in single precision throughout (no double promotion); every hyperparameter arrives folded
// (no 1 - beta inside a kernel); 16-byte vector loads when every operand of a chunk is aligned, with a
// scalar tail. kMaster: an fp32 master copy is the value updated and the parameter its rounding.
// kKahan: a bf16 compensation c instead; the value updated is p + c, the parameter is written as its
// nearest rounding and c as the rounding error.
#include <algorithm>

#include "adam_element.cuh"
#include "multi_tensor.cuh"

namespace misa {
namespace {

// Operands: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 master (kMaster) or compensation (kKahan).
template <typename P, int N, bool kFresh, bool kNorms, bool kMaster, bool kStochastic, bool kKahan = false>
__global__ void __launch_bounds__(kThreads) adamw_kernel(ChunkTable table, AdamScalars sc, uint32_t seed,
                                                         const float* skip, float* partials) {
  const Chunk c = chunk_of(table, blockIdx.x);
  const int64_t begin = c.begin, len = c.len;
  P* p = operand<P>(table, 0, c);
  const P* g = operand<const P>(table, 1, c);
  float* m = operand<float>(table, 2, c);
  float* v = operand<float>(table, 3, c);
  float* w = kMaster ? operand<float>(table, 4, c) : nullptr;
  __nv_bfloat16* comp = kKahan ? operand<__nv_bfloat16>(table, 4, c) : nullptr;
  const uint32_t key = tensor_key(seed, static_cast<uint32_t>(c.tensor));
  if (skip != nullptr && *skip != 0.f) {
    // A skipped step writes nothing, except that a fresh one defines zero states (and the master as the
    // weight, the compensation as zero), so that the next step starts from them as from a fresh step.
    // Uniform per block.
    if (kFresh) {
      for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
        m[i] = 0.f;
        v[i] = 0.f;
        if (kMaster) w[i] = to_float(p[i]);
        if (kKahan) comp[i] = __float2bfloat16_rn(0.f);
      }
    }
    if (kNorms && threadIdx.x == 0) partials[blockIdx.x] = 0.f;
    return;
  }
  const Folded f = fold(sc, c.tensor);
  float acc = 0.f;
  int64_t vec_end = 0;
  const bool aligned = is_aligned<P, N>(p) && is_aligned<P, N>(g) && is_aligned<float, N>(m) &&
                       is_aligned<float, N>(v) && (!kMaster || is_aligned<float, N>(w)) &&
                       (!kKahan || is_aligned<__nv_bfloat16, N>(comp));
  if (aligned) {
    vec_end = len / N * N;
    for (int64_t i = int64_t(threadIdx.x) * N; i < vec_end; i += int64_t(blockDim.x) * N) {
      Vec<P, N> pv;
      Vec<float, N> wv;
      Vec<__nv_bfloat16, N> cv;
      if (kMaster && !kFresh) wv = *reinterpret_cast<const Vec<float, N>*>(w + i);
      else pv = *reinterpret_cast<const Vec<P, N>*>(p + i);
      if (kKahan && !kFresh) cv = *reinterpret_cast<const Vec<__nv_bfloat16, N>*>(comp + i);
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
        if (kKahan && !kFresh) pf += __bfloat162float(cv.v[k]);
        adamw_element<kFresh>(pf, gf, mv.v[k], vv.v[k], sc, f);
        if (kMaster) wv.v[k] = pf;
        pv.v[k] = round_to_param<P, kStochastic>(pf, key, begin + i + k);
        if (kKahan) cv.v[k] = __float2bfloat16_rn(pf - to_float(pv.v[k]));
      }
      *reinterpret_cast<Vec<P, N>*>(p + i) = pv;
      if (kMaster) *reinterpret_cast<Vec<float, N>*>(w + i) = wv;
      if (kKahan) *reinterpret_cast<Vec<__nv_bfloat16, N>*>(comp + i) = cv;
      *reinterpret_cast<Vec<float, N>*>(m + i) = mv;
      *reinterpret_cast<Vec<float, N>*>(v + i) = vv;
    }
  }
  for (int64_t i = vec_end + threadIdx.x; i < len; i += blockDim.x) {
    const float gf = to_float(g[i]);
    if (kNorms) acc += gf * gf;
    float pf = (kMaster && !kFresh) ? w[i] : to_float(p[i]);
    if (kKahan && !kFresh) pf += __bfloat162float(comp[i]);
    float mf = kFresh ? 0.f : m[i];
    float vf = kFresh ? 0.f : v[i];
    adamw_element<kFresh>(pf, gf, mf, vf, sc, f);
    if (kMaster) w[i] = pf;
    const P rounded = round_to_param<P, kStochastic>(pf, key, begin + i);
    p[i] = rounded;
    if (kKahan) comp[i] = __float2bfloat16_rn(pf - to_float(rounded));
    m[i] = mf;
    v[i] = vf;
  }
  if (kNorms) {
    acc = block_sum(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
  }
}

// Operands: 0 param, 1 exp_avg, 2 exp_avg_sq, 3 master (kMaster) or compensation (kKahan).
template <typename P, int N, bool kMaster, bool kStochastic, bool kKahan = false>
__global__ void __launch_bounds__(kThreads) flush_kernel(ChunkTable table, AdamScalars sc, uint32_t seed) {
  const Chunk c = chunk_of(table, blockIdx.x);
  const int64_t begin = c.begin, len = c.len;
  P* p = operand<P>(table, 0, c);
  const float* m = operand<const float>(table, 1, c);
  const float* v = operand<const float>(table, 2, c);
  float* w = kMaster ? operand<float>(table, 3, c) : nullptr;
  __nv_bfloat16* comp = kKahan ? operand<__nv_bfloat16>(table, 3, c) : nullptr;
  const uint32_t key = tensor_key(seed, static_cast<uint32_t>(c.tensor));
  const Folded f = fold(sc, c.tensor);
  int64_t vec_end = 0;
  if (!kKahan && is_aligned<P, N>(p) && is_aligned<float, N>(m) && is_aligned<float, N>(v) &&
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
  // (The Kahan flush, once per period, takes the scalar loop.)
  for (int64_t i = vec_end + threadIdx.x; i < len; i += blockDim.x) {
    float old = kMaster ? w[i] : to_float(p[i]);
    if (kKahan) old += __bfloat162float(comp[i]);
    const float pf = old - f.step_size * (m[i] / (sqrtf(v[i]) / f.bc2_sqrt + sc.eps));
    if (kMaster) w[i] = pf;
    const P rounded = round_to_param<P, kStochastic>(pf, key, begin + i);
    p[i] = rounded;
    if (kKahan) comp[i] = __float2bfloat16_rn(pf - to_float(rounded));
  }
}

// One launch: a block per chunk of the table.
template <typename P, bool kFresh, bool kNorms, bool kMaster, bool kStochastic, bool kKahan>
void launch_adamw(const ChunkTable& t, const AdamScalars& sc, uint32_t seed, const float* skip, float* partials,
                  cudaStream_t stream) {
  // 16-byte vectors of the parameter type (8 bf16/fp16 or 4 fp32 elements).
  constexpr int N = 16 / sizeof(P);
  adamw_kernel<P, N, kFresh, kNorms, kMaster, kStochastic, kKahan>
      <<<static_cast<unsigned>(t.n_chunks), kThreads, 0, stream>>>(t, sc, seed, skip, partials);
}

template <typename P, bool kMaster, bool kStochastic, bool kKahan = false>
void launch_adamw_flags(const ChunkTable& t, const AdamScalars& sc, bool fresh, uint32_t seed, const float* skip,
                        float* partials, cudaStream_t stream) {
  const bool norms = partials != nullptr;
  if (fresh && norms) launch_adamw<P, true, true, kMaster, kStochastic, kKahan>(t, sc, seed, skip, partials, stream);
  else if (fresh) launch_adamw<P, true, false, kMaster, kStochastic, kKahan>(t, sc, seed, skip, partials, stream);
  else if (norms) launch_adamw<P, false, true, kMaster, kStochastic, kKahan>(t, sc, seed, skip, partials, stream);
  else launch_adamw<P, false, false, kMaster, kStochastic, kKahan>(t, sc, seed, skip, partials, stream);
}

template <typename P, bool kMaster, bool kStochastic, bool kKahan = false>
void launch_flush(const ChunkTable& t, const AdamScalars& sc, uint32_t seed, cudaStream_t stream) {
  constexpr int N = 16 / sizeof(P);
  flush_kernel<P, N, kMaster, kStochastic, kKahan>
      <<<static_cast<unsigned>(t.n_chunks), kThreads, 0, stream>>>(t, sc, seed);
}

// Low-precision parameters pick master/stochastic variants; fp32 parameters never need either.
template <typename P>
void dispatch_adamw(const ChunkTable& t, const AdamScalars& sc, bool fresh, const Rounding& r, float* partials,
                    cudaStream_t stream) {
  const float* k = r.skip;
  if constexpr (std::is_same_v<P, float>) {
    launch_adamw_flags<P, false, false>(t, sc, fresh, r.seed, k, partials, stream);
  } else if constexpr (std::is_same_v<P, __nv_bfloat16>) {
    if (r.master && r.stochastic) launch_adamw_flags<P, true, true>(t, sc, fresh, r.seed, k, partials, stream);
    else if (r.master) launch_adamw_flags<P, true, false>(t, sc, fresh, r.seed, k, partials, stream);
    else if (r.kahan) launch_adamw_flags<P, false, false, true>(t, sc, fresh, r.seed, k, partials, stream);
    else if (r.stochastic) launch_adamw_flags<P, false, true>(t, sc, fresh, r.seed, k, partials, stream);
    else launch_adamw_flags<P, false, false>(t, sc, fresh, r.seed, k, partials, stream);
  } else {
    if (r.master) launch_adamw_flags<P, true, false>(t, sc, fresh, r.seed, k, partials, stream);
    else if (r.kahan) launch_adamw_flags<P, false, false, true>(t, sc, fresh, r.seed, k, partials, stream);
    else launch_adamw_flags<P, false, false>(t, sc, fresh, r.seed, k, partials, stream);
  }
}

template <typename P>
void dispatch_flush(const ChunkTable& t, const AdamScalars& sc, const Rounding& r, cudaStream_t stream) {
  if constexpr (std::is_same_v<P, float>) {
    launch_flush<P, false, false>(t, sc, r.seed, stream);
  } else if constexpr (std::is_same_v<P, __nv_bfloat16>) {
    if (r.master && r.stochastic) launch_flush<P, true, true>(t, sc, r.seed, stream);
    else if (r.master) launch_flush<P, true, false>(t, sc, r.seed, stream);
    else if (r.kahan) launch_flush<P, false, false, true>(t, sc, r.seed, stream);
    else if (r.stochastic) launch_flush<P, false, true>(t, sc, r.seed, stream);
    else launch_flush<P, false, false>(t, sc, r.seed, stream);
  } else {
    if (r.master) launch_flush<P, true, false>(t, sc, r.seed, stream);
    else if (r.kahan) launch_flush<P, false, false, true>(t, sc, r.seed, stream);
    else launch_flush<P, false, false>(t, sc, r.seed, stream);
  }
}

}  // namespace

cudaError_t adamw_step(const ChunkTable& table, DType dtype, AdamScalars scalars, bool fresh, Rounding rounding,
                       float* grad_sq_norms, float* partials, cudaStream_t stream) {
  if (table.n_chunks == 0) return cudaSuccess;
  float* parts = grad_sq_norms != nullptr ? partials : nullptr;
  switch (dtype) {
    case DType::kFloat32: dispatch_adamw<float>(table, scalars, fresh, rounding, parts, stream); break;
    case DType::kBFloat16: dispatch_adamw<__nv_bfloat16>(table, scalars, fresh, rounding, parts, stream); break;
    case DType::kFloat16: dispatch_adamw<__half>(table, scalars, fresh, rounding, parts, stream); break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || grad_sq_norms == nullptr) return err;
  return reduce_partials(table, partials, grad_sq_norms, stream);
}

cudaError_t momentum_flush(const ChunkTable& table, DType dtype, AdamScalars scalars, Rounding rounding,
                           cudaStream_t stream) {
  if (table.n_chunks == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: dispatch_flush<float>(table, scalars, rounding, stream); break;
    case DType::kBFloat16: dispatch_flush<__nv_bfloat16>(table, scalars, rounding, stream); break;
    case DType::kFloat16: dispatch_flush<__half>(table, scalars, rounding, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace misa
