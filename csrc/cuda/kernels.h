// Host entry points of the CUDA kernels; each returns the launch status for the caller to check. Raw pointers and
// plain structs only: no torch headers, so the .cu files compile with nvcc alone, in seconds. csrc/misa_ops.cpp
// checks arguments and calls these.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace misa {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// The chunk table of one call (misa_kernels/tables.py), resident on the device: which tensor and offset
// each chunk covers, each tensor's size, and each operand's address. Launches take it by pointer, so a
// launch covers any number of tensors.
struct ChunkTable {
  const int64_t* data;
  int64_t n_chunks;
  int64_t n_tensors;
  int64_t chunk;  // elements per chunk
};

// Hyperparameters folded on the host in float64 (misa_kernels/scalars.py): a kernel only multiplies
// and adds them, never forms 1 - beta or beta^step itself. When `device` is not null the kernel reads
// [step_size, bias_correction2_sqrt, decay] from it instead (lr/step as device tensors, for CUDA-graph
// capture): at device[0..2] for every tensor (device_stride 0), or at device[3 t..3 t + 2] for tensor t
// (device_stride 3: a step count per tensor, so tensors activated at different steps share one launch).
struct AdamScalars {
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  float step_size;
  float bias_correction2_sqrt;
  float decay;
  const float* device;
  int64_t device_stride = 0;
};

// How the fp32 result is written into a bf16/fp16 parameter. `master`: fp32 master copies (the table's
// last operand) are read and written, and the parameter is their rounded value; on a fresh step the
// master is set from the parameter. `stochastic` (bf16 only): unbiased rounding keyed by
// hash32(seed + tensor_index * golden) ^ element index, the same hash as misa_kernels/scalars.py.
struct Rounding {
  bool master;
  bool stochastic;
  uint32_t seed;
  // A 0-d device flag read by the kernel (null: never skip). Nonzero: the step writes nothing, except
  // that a fresh step defines zero states (and masters as the weights); partial norms are zero.
  const float* skip = nullptr;
  // A bf16 Kahan compensation is the table's last operand instead of a master (bf16/fp16 parameters):
  // the value updated is param + compensation; the parameter gets its nearest rounding, the
  // compensation the rounding error.
  bool kahan = false;
};

// The 8-bit blockwise state format (misa_kernels/quant.py): uint8 codes into a 256-entry map (signed
// for exp_avg, unsigned for exp_avg_sq, device arrays of 256 floats) and one fp32 absmax per block of
// kQuantBlock elements. The table's chunk must be a multiple of kQuantBlock.
constexpr int kQuantBlock = 256;
struct QuantMaps {
  const float* exp_avg;
  const float* exp_avg_sq;
  uint8_t zero_exp_avg;     // the code of 0 in each map: a skipped fresh step writes zero states
  uint8_t zero_exp_avg_sq;
};

// AdamW over the table's tensors (operands: param, grad, exp_avg, exp_avg_sq[, master]); if
// grad_sq_norms is not null, grad_sq_norms[t] += sum(grad_t^2), reduced deterministically through
// `partials` (one float per chunk). Two launches at most, whatever the number of tensors.
cudaError_t adamw_step(const ChunkTable& table, DType dtype, AdamScalars scalars, bool fresh, Rounding rounding,
                       float* grad_sq_norms, float* partials, cudaStream_t stream);

// AdamW with 8-bit states (operands: param, grad, exp_avg codes, exp_avg_sq codes, exp_avg absmax,
// exp_avg_sq absmax[, master or compensation]): dequantize, update in fp32, write the parameter from the
// unquantized new states, then requantize each block to its new absmax (a warp per block).
cudaError_t adamw8bit_step(const ChunkTable& table, DType dtype, AdamScalars scalars, bool fresh, Rounding rounding,
                           QuantMaps maps, float* grad_sq_norms, float* partials, cudaStream_t stream);

// The flush with 8-bit states (operands: param, codes, codes, absmax, absmax[, master or compensation]).
cudaError_t momentum_flush8bit(const ChunkTable& table, DType dtype, AdamScalars scalars, Rounding rounding,
                               QuantMaps maps, cudaStream_t stream);

// out[t] += sum(x_t^2) over the table's tensors (operand: x); `out` must be zeroed by the caller for a
// plain norm.
cudaError_t grad_sq_norms(const ChunkTable& table, DType dtype, float* out, float* partials, cudaStream_t stream);

// p -= step_size * m / (sqrt(v) / bias_correction2_sqrt + eps) (operands: param, exp_avg, exp_avg_sq[,
// master]); states are read only (masters, when given, are updated and the parameters written from them).
cudaError_t momentum_flush(const ChunkTable& table, DType dtype, AdamScalars scalars, Rounding rounding,
                           cudaStream_t stream);

}  // namespace misa
