// Fused AdamW and the momentum flush with 8-bit blockwise states (misa_kernels/quant.py defines the
// format). A block per chunk of the chunk table, as adamw.cu; inside it, a warp per quantization block of
// 256 elements: lane l holds elements l, l + 32, ..., l + 224 (each load instruction of the warp covers 32
// consecutive elements), so the block's new absmax is a warp reduction and no __syncthreads is needed
// between update and requantization. The two 256-entry maps sit in shared memory for the nearest-code
// search. The value update is adam_element.cuh's, the same fp32 operations as the fp32-state kernel.
#include "adam_element.cuh"
#include "multi_tensor.cuh"

namespace misa {
namespace {

constexpr int kPerLane = kQuantBlock / 32;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// The nearest map value's index (ties to the smaller index), as quant.nearest_code: binary search for the
// largest index whose value is <= x (0 below the map), then compare with the upper neighbour.
__device__ __forceinline__ uint8_t nearest_code(float x, const float* qmap) {
  int lo = 0;
#pragma unroll
  for (int step = 128; step > 0; step >>= 1) {
    if (qmap[lo + step] <= x) lo += step;
  }
  const int hi = lo < 255 ? lo + 1 : 255;
  return static_cast<uint8_t>(qmap[hi] - x < x - qmap[lo] ? hi : lo);
}

// Writes the codes and absmax of one quantization block held by a warp (values outside the tensor are 0).
__device__ __forceinline__ void quantize_block(const float (&x)[kPerLane], uint8_t* codes, float* absmax,
                                               const float* qmap, int64_t first, int64_t len, int lane) {
  float local = 0.f;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) local = fmaxf(local, fabsf(x[k]));
  const float scale = warp_max(local);
  if (lane == 0) absmax[first / kQuantBlock] = scale;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t i = first + lane + 32 * k;
    // IEEE division, as the torch reference's: every backend picks the same codes for the same values.
    if (i < len) codes[i] = nearest_code(scale > 0.f ? __fdiv_rn(x[k], scale) : 0.f, qmap);
  }
}

template <typename P, bool kMaster, bool kKahan>
__device__ __forceinline__ float load_value(const P* p, const float* w, const __nv_bfloat16* comp, int64_t i,
                                            bool fresh) {
  if (kMaster && !fresh) return w[i];
  float x = to_float(p[i]);
  if (kKahan && !fresh) x += __bfloat162float(comp[i]);
  return x;
}

template <typename P, bool kMaster, bool kStochastic, bool kKahan>
__device__ __forceinline__ void store_value(P* p, float* w, __nv_bfloat16* comp, int64_t i, float x, uint32_t key,
                                            int64_t element) {
  const P rounded = round_to_param<P, kStochastic>(x, key, element);
  p[i] = rounded;
  if (kMaster) w[i] = x;
  if (kKahan) comp[i] = __float2bfloat16_rn(x - to_float(rounded));
}

__device__ __forceinline__ void load_maps(const QuantMaps& maps, float* shared) {
  for (int i = threadIdx.x; i < 2 * 256; i += blockDim.x) shared[i] = i < 256 ? maps.exp_avg[i] : maps.exp_avg_sq[i - 256];
  __syncthreads();
}

// Operands: 0 param, 1 grad, 2/3 codes of exp_avg/exp_avg_sq, 4/5 their absmax, 6 master or compensation.
template <typename P, bool kFresh, bool kNorms, bool kMaster, bool kStochastic, bool kKahan>
__global__ void __launch_bounds__(kThreads) adamw8bit_kernel(ChunkTable table, AdamScalars sc, QuantMaps maps,
                                                             uint32_t seed, const float* skip, float* partials) {
  __shared__ float qmaps[2 * 256];
  const Chunk c = chunk_of(table, blockIdx.x);
  const int64_t begin = c.begin, len = c.len;
  // Offsets below are within the chunk; the absmax pointers are offset to the chunk's first block.
  P* p = operand<P>(table, 0, c);
  const P* g = operand<const P>(table, 1, c);
  uint8_t* mc = operand<uint8_t>(table, 2, c);
  uint8_t* vc = operand<uint8_t>(table, 3, c);
  const Chunk blocks{c.tensor, c.begin / kQuantBlock, 0};
  float* ma = operand<float>(table, 4, blocks);
  float* va = operand<float>(table, 5, blocks);
  float* w = kMaster ? operand<float>(table, 6, c) : nullptr;
  __nv_bfloat16* comp = kKahan ? operand<__nv_bfloat16>(table, 6, c) : nullptr;
  const uint32_t key = tensor_key(seed, static_cast<uint32_t>(c.tensor));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n_blocks = (len + kQuantBlock - 1) / kQuantBlock;
  if (skip != nullptr && *skip != 0.f) {
    // As adamw.cu: nothing is written, except that a fresh step defines zero states (zero codes, absmax
    // 0), masters as the weights and zero compensation.
    if (kFresh) {
      for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
        mc[i] = maps.zero_exp_avg;
        vc[i] = maps.zero_exp_avg_sq;
        if (kMaster) w[i] = to_float(p[i]);
        if (kKahan) comp[i] = __float2bfloat16_rn(0.f);
      }
      for (int64_t b = threadIdx.x; b < n_blocks; b += blockDim.x) ma[b] = va[b] = 0.f;
    }
    if (kNorms && threadIdx.x == 0) partials[blockIdx.x] = 0.f;
    return;
  }
  load_maps(maps, qmaps);
  const Folded f = fold(sc, c.tensor);
  float acc = 0.f;
  for (int64_t b = warp; b < n_blocks; b += kWarps) {
    const int64_t first = b * kQuantBlock;
    float m[kPerLane], v[kPerLane];
    float am = 0.f, av = 0.f;
    if (!kFresh) {
      am = ma[b];
      av = va[b];
    }
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t i = first + lane + 32 * k;
      m[k] = 0.f;
      v[k] = 0.f;
      if (i >= len) continue;
      const float gf = to_float(g[i]);
      if (kNorms) acc += gf * gf;
      if (!kFresh) {
        m[k] = qmaps[mc[i]] * am;
        v[k] = qmaps[256 + vc[i]] * av;
      }
      float x = load_value<P, kMaster, kKahan>(p, w, comp, i, kFresh);
      adamw_element<kFresh>(x, gf, m[k], v[k], sc, f);
      // The parameter comes from the unquantized new states; only what is stored is quantized.
      store_value<P, kMaster, kStochastic, kKahan>(p, w, comp, i, x, key, begin + i);
    }
    quantize_block(m, mc, ma, qmaps, first, len, lane);
    quantize_block(v, vc, va, qmaps + 256, first, len, lane);
  }
  if (kNorms) {
    acc = block_sum(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
  }
}

// Operands: 0 param, 1/2 codes, 3/4 absmax, 5 master or compensation. States are read only.
template <typename P, bool kMaster, bool kStochastic, bool kKahan>
__global__ void __launch_bounds__(kThreads) flush8bit_kernel(ChunkTable table, AdamScalars sc, QuantMaps maps,
                                                             uint32_t seed) {
  __shared__ float qmaps[2 * 256];
  const Chunk c = chunk_of(table, blockIdx.x);
  const int64_t begin = c.begin, len = c.len;
  P* p = operand<P>(table, 0, c);
  const uint8_t* mc = operand<const uint8_t>(table, 1, c);
  const uint8_t* vc = operand<const uint8_t>(table, 2, c);
  const Chunk blocks{c.tensor, c.begin / kQuantBlock, 0};
  const float* ma = operand<const float>(table, 3, blocks);
  const float* va = operand<const float>(table, 4, blocks);
  float* w = kMaster ? operand<float>(table, 5, c) : nullptr;
  __nv_bfloat16* comp = kKahan ? operand<__nv_bfloat16>(table, 5, c) : nullptr;
  const uint32_t key = tensor_key(seed, static_cast<uint32_t>(c.tensor));
  load_maps(maps, qmaps);
  const Folded f = fold(sc, c.tensor);
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    const float m = qmaps[mc[i]] * ma[i / kQuantBlock];
    const float v = qmaps[256 + vc[i]] * va[i / kQuantBlock];
    const float x = load_value<P, kMaster, kKahan>(p, w, comp, i, false) -
                    f.step_size * (m / (sqrtf(v) / f.bc2_sqrt + sc.eps));
    store_value<P, kMaster, kStochastic, kKahan>(p, w, comp, i, x, key, begin + i);
  }
}

template <typename P, bool kMaster, bool kStochastic, bool kKahan>
void launch_adamw8bit(const ChunkTable& t, const AdamScalars& sc, const QuantMaps& maps, bool fresh, uint32_t seed,
                      const float* skip, float* partials, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(t.n_chunks));
  const bool norms = partials != nullptr;
  if (fresh && norms)
    adamw8bit_kernel<P, true, true, kMaster, kStochastic, kKahan><<<grid, kThreads, 0, stream>>>(t, sc, maps, seed, skip, partials);
  else if (fresh)
    adamw8bit_kernel<P, true, false, kMaster, kStochastic, kKahan><<<grid, kThreads, 0, stream>>>(t, sc, maps, seed, skip, partials);
  else if (norms)
    adamw8bit_kernel<P, false, true, kMaster, kStochastic, kKahan><<<grid, kThreads, 0, stream>>>(t, sc, maps, seed, skip, partials);
  else
    adamw8bit_kernel<P, false, false, kMaster, kStochastic, kKahan><<<grid, kThreads, 0, stream>>>(t, sc, maps, seed, skip, partials);
}

template <typename P, bool kMaster, bool kStochastic, bool kKahan>
void launch_flush8bit(const ChunkTable& t, const AdamScalars& sc, const QuantMaps& maps, uint32_t seed,
                      cudaStream_t stream) {
  flush8bit_kernel<P, kMaster, kStochastic, kKahan>
      <<<static_cast<unsigned>(t.n_chunks), kThreads, 0, stream>>>(t, sc, maps, seed);
}

// One switch over (master, kahan, stochastic) for both ops: fp32 parameters take none of them, fp16 no
// stochastic rounding (checked in Python and in misa_ops.cpp).
template <typename P, typename Launch>
void by_value_mode(const Rounding& r, Launch&& launch) {
  if constexpr (std::is_same_v<P, float>) {
    launch(std::integral_constant<int, 0>{});
  } else {
    if (r.master && r.stochastic && std::is_same_v<P, __nv_bfloat16>) launch(std::integral_constant<int, 1>{});
    else if (r.master) launch(std::integral_constant<int, 2>{});
    else if (r.kahan) launch(std::integral_constant<int, 3>{});
    else if (r.stochastic && std::is_same_v<P, __nv_bfloat16>) launch(std::integral_constant<int, 4>{});
    else launch(std::integral_constant<int, 0>{});
  }
}

// mode: 0 plain, 1 master + stochastic, 2 master, 3 kahan, 4 stochastic.
template <int kMode> constexpr bool kModeMaster = kMode == 1 || kMode == 2;
template <int kMode> constexpr bool kModeStochastic = kMode == 1 || kMode == 4;
template <int kMode> constexpr bool kModeKahan = kMode == 3;

template <typename P>
void dispatch_adamw8bit(const ChunkTable& t, const AdamScalars& sc, const QuantMaps& maps, bool fresh,
                        const Rounding& r, float* partials, cudaStream_t stream) {
  by_value_mode<P>(r, [&](auto mode) {
    constexpr int M = decltype(mode)::value;
    launch_adamw8bit<P, kModeMaster<M>, kModeStochastic<M>, kModeKahan<M>>(t, sc, maps, fresh, r.seed, r.skip,
                                                                            partials, stream);
  });
}

template <typename P>
void dispatch_flush8bit(const ChunkTable& t, const AdamScalars& sc, const QuantMaps& maps, const Rounding& r,
                        cudaStream_t stream) {
  by_value_mode<P>(r, [&](auto mode) {
    constexpr int M = decltype(mode)::value;
    launch_flush8bit<P, kModeMaster<M>, kModeStochastic<M>, kModeKahan<M>>(t, sc, maps, r.seed, stream);
  });
}

}  // namespace

cudaError_t adamw8bit_step(const ChunkTable& table, DType dtype, AdamScalars scalars, bool fresh, Rounding rounding,
                           QuantMaps maps, float* grad_sq_norms, float* partials, cudaStream_t stream) {
  if (table.n_chunks == 0) return cudaSuccess;
  float* parts = grad_sq_norms != nullptr ? partials : nullptr;
  switch (dtype) {
    case DType::kFloat32: dispatch_adamw8bit<float>(table, scalars, maps, fresh, rounding, parts, stream); break;
    case DType::kBFloat16:
      dispatch_adamw8bit<__nv_bfloat16>(table, scalars, maps, fresh, rounding, parts, stream);
      break;
    case DType::kFloat16: dispatch_adamw8bit<__half>(table, scalars, maps, fresh, rounding, parts, stream); break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || grad_sq_norms == nullptr) return err;
  return reduce_partials(table, partials, grad_sq_norms, stream);
}

cudaError_t momentum_flush8bit(const ChunkTable& table, DType dtype, AdamScalars scalars, Rounding rounding,
                               QuantMaps maps, cudaStream_t stream) {
  if (table.n_chunks == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: dispatch_flush8bit<float>(table, scalars, maps, rounding, stream); break;
    case DType::kBFloat16: dispatch_flush8bit<__nv_bfloat16>(table, scalars, maps, rounding, stream); break;
    case DType::kFloat16: dispatch_flush8bit<__half>(table, scalars, maps, rounding, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace misa
