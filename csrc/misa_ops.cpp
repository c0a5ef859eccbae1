// The only translation unit that includes torch headers: checks the launch arguments and calls the
// kernels declared in cuda/kernels.h. The tensors were checked in Python (misa_kernels/checks.py) and
// described by a chunk table (misa_kernels/tables.py) that the kernels read on the device.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/kernels.h"

#define CHECK_DEVICE(x, dev) TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), ", got ", (x).device())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_DTYPE(x, dt) TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())
#define CHECK_NUMEL(x, n) TORCH_CHECK((x).numel() == (n), #x " must have ", (n), " elements, got ", (x).numel())

namespace {

using misa::DType;

// The code of 0.0 in each dynamic map (misa_kernels/quant.py zero_code; a test checks they agree).
constexpr uint8_t kZeroCodeSigned = 127;
constexpr uint8_t kZeroCodeUnsigned = 0;

DType to_dtype(int64_t code) {
  TORCH_CHECK(code >= 0 && code <= 2, "dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16), got ", code);
  return static_cast<DType>(code);
}

// The chunk table (misa_kernels/tables.py): its size must match what the kernels will index.
misa::ChunkTable check_table(const at::Tensor& table, int64_t n_chunks, int64_t n_tensors, int64_t chunk,
                             int64_t n_operands) {
  TORCH_CHECK(table.is_cuda(), "table must be a CUDA tensor, got one on ", table.device());
  CHECK_DTYPE(table, at::kLong);
  CHECK_CONTIGUOUS(table);
  TORCH_CHECK(n_chunks >= 0 && n_tensors >= 0 && chunk > 0, "bad table sizes");
  TORCH_CHECK(n_chunks < (int64_t(1) << 31), "n_chunks must fit a grid (< 2**31), got ", n_chunks);
  CHECK_NUMEL(table, 2 * n_chunks + 2 * n_tensors + 1 + n_operands * n_tensors);
  return {table.data_ptr<int64_t>(), n_chunks, n_tensors, chunk};
}

float* norms_pointer(const c10::optional<at::Tensor>& norms, const c10::optional<at::Tensor>& partials,
                     const at::Tensor& table, int64_t n_chunks, int64_t n_tensors) {
  if (!norms.has_value()) return nullptr;
  CHECK_DEVICE(*norms, table.device());
  CHECK_DTYPE(*norms, at::kFloat);
  CHECK_NUMEL(*norms, n_tensors);
  CHECK_CONTIGUOUS(*norms);
  TORCH_CHECK(partials.has_value(), "partials are needed with grad_sq_norms");
  CHECK_DEVICE(*partials, table.device());
  CHECK_DTYPE(*partials, at::kFloat);
  TORCH_CHECK(partials->numel() >= n_chunks, "partials must hold ", n_chunks, " floats, got ", partials->numel());
  return norms->data_ptr<float>();
}

// Every value arrives folded by misa_kernels/scalars.py (float64 on the host, then fp32).
// Device scalars: 3 floats for the call, or (per_tensor_rows) 3 per tensor of the table.
misa::AdamScalars make_scalars(const c10::optional<at::Tensor>& device_scalars, double one_minus_beta1, double beta2,
                               double one_minus_beta2, double eps, double step_size, double bc2_sqrt, double decay,
                               const at::Device& dev, int64_t per_tensor_rows = 0) {
  const float* dev_ptr = nullptr;
  if (device_scalars.has_value()) {
    const at::Tensor& s = *device_scalars;
    CHECK_DEVICE(s, dev);
    CHECK_DTYPE(s, at::kFloat);
    CHECK_NUMEL(s, per_tensor_rows > 0 ? 3 * per_tensor_rows : 3);
    CHECK_CONTIGUOUS(s);
    dev_ptr = s.data_ptr<float>();
  }
  misa::AdamScalars sc{static_cast<float>(one_minus_beta1), static_cast<float>(beta2),
                       static_cast<float>(one_minus_beta2), static_cast<float>(eps), static_cast<float>(step_size),
                       static_cast<float>(bc2_sqrt), static_cast<float>(decay), dev_ptr};
  sc.device_stride = per_tensor_rows > 0 ? 3 : 0;
  return sc;
}

misa::Rounding make_rounding(DType dtype, bool master, bool stochastic, int64_t seed,
                             const c10::optional<at::Tensor>& skip, const at::Device& dev, bool kahan = false) {
  TORCH_CHECK(seed >= 0 && seed < (int64_t(1) << 31), "seed must lie in [0, 2**31), got ", seed);
  TORCH_CHECK(!master || dtype != DType::kFloat32, "float32 parameters take no master_params");
  TORCH_CHECK(!kahan || dtype != DType::kFloat32, "float32 parameters take no compensation");
  TORCH_CHECK(!(kahan && (master || stochastic)), "a compensation excludes master_params and stochastic rounding");
  TORCH_CHECK(!stochastic || dtype == DType::kBFloat16, "stochastic rounding supports bfloat16 parameters only");
  misa::Rounding r{master, stochastic, static_cast<uint32_t>(seed)};
  r.kahan = kahan;
  if (skip.has_value()) {
    CHECK_DEVICE(*skip, dev);
    CHECK_DTYPE(*skip, at::kFloat);
    CHECK_NUMEL(*skip, 1);
    r.skip = skip->data_ptr<float>();
  }
  return r;
}

// The 8-bit format's maps: fp32 [signed 256 | unsigned 256] on the device; the chunk holds whole blocks.
misa::QuantMaps quant_maps(const at::Tensor& maps, int64_t chunk, const at::Device& dev) {
  CHECK_DEVICE(maps, dev);
  CHECK_DTYPE(maps, at::kFloat);
  CHECK_NUMEL(maps, 512);
  CHECK_CONTIGUOUS(maps);
  TORCH_CHECK(chunk % misa::kQuantBlock == 0, "8-bit states need a chunk that is a multiple of ",
              misa::kQuantBlock, ", got ", chunk);
  const float* data = maps.data_ptr<float>();
  return {data, data + 256, kZeroCodeSigned, kZeroCodeUnsigned};
}

// The launchers take the chunk table, not tensor lists: misa_kernels/cuda.py validated the tensors
// (misa_kernels/checks.py) and built the table, so a call costs one table lookup and a launch however
// many tensors it covers. These checks guard the table's shape, not the tensors behind its addresses.
void adamw_step_(const at::Tensor& table, int64_t n_chunks, int64_t n_tensors, int64_t chunk, int64_t dtype_code,
                 const c10::optional<at::Tensor>& grad_sq_norms, const c10::optional<at::Tensor>& partials,
                 const c10::optional<at::Tensor>& device_scalars, double one_minus_beta1, double beta2,
                 double one_minus_beta2, double eps, double step_size, double bc2_sqrt, double decay, bool fresh,
                 bool master, bool stochastic, int64_t seed, const c10::optional<at::Tensor>& skip, bool kahan,
                 const c10::optional<at::Tensor>& maps, bool per_tensor) {
  // With `maps` (the 8-bit format's two 256-entry maps, concatenated) the states are 8-bit: two more
  // operands (the block scales) and the 8-bit kernel.
  const int extra = (master || kahan ? 1 : 0) + (maps.has_value() ? 2 : 0);
  const misa::ChunkTable t = check_table(table, n_chunks, n_tensors, chunk, 4 + extra);
  const at::Device dev = table.device();
  const DType dtype = to_dtype(dtype_code);
  const c10::cuda::CUDAGuard guard(dev);
  float* norms = norms_pointer(grad_sq_norms, partials, table, n_chunks, n_tensors);
  const auto rounding = make_rounding(dtype, master, stochastic, seed, skip, dev, kahan);
  const auto sc = make_scalars(device_scalars, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt,
                               decay, dev, per_tensor ? n_tensors : 0);
  float* parts = norms ? partials->data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (maps.has_value()) {
    C10_CUDA_CHECK(misa::adamw8bit_step(t, dtype, sc, fresh, rounding, quant_maps(*maps, chunk, dev), norms, parts,
                                        stream));
  } else {
    C10_CUDA_CHECK(misa::adamw_step(t, dtype, sc, fresh, rounding, norms, parts, stream));
  }
}

void grad_sq_norms(const at::Tensor& table, int64_t n_chunks, int64_t n_tensors, int64_t chunk, int64_t dtype_code,
                   const at::Tensor& out, const at::Tensor& partials) {
  const misa::ChunkTable t = check_table(table, n_chunks, n_tensors, chunk, 1);
  const c10::cuda::CUDAGuard guard(table.device());
  float* norms = norms_pointer(out, partials, table, n_chunks, n_tensors);
  C10_CUDA_CHECK(misa::grad_sq_norms(t, to_dtype(dtype_code), norms, partials.data_ptr<float>(),
                                     c10::cuda::getCurrentCUDAStream()));
}

void momentum_flush_(const at::Tensor& table, int64_t n_chunks, int64_t n_tensors, int64_t chunk, int64_t dtype_code,
                     const c10::optional<at::Tensor>& device_scalars, double one_minus_beta1, double beta2,
                     double one_minus_beta2, double eps, double step_size, double bc2_sqrt, double decay,
                     bool master, bool stochastic, int64_t seed, bool kahan,
                     const c10::optional<at::Tensor>& maps) {
  const int extra = (master || kahan ? 1 : 0) + (maps.has_value() ? 2 : 0);
  const misa::ChunkTable t = check_table(table, n_chunks, n_tensors, chunk, 3 + extra);
  const at::Device dev = table.device();
  const DType dtype = to_dtype(dtype_code);
  const c10::cuda::CUDAGuard guard(dev);
  const auto rounding = make_rounding(dtype, master, stochastic, seed, c10::nullopt, dev, kahan);
  const auto sc = make_scalars(device_scalars, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt,
                               decay, dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (maps.has_value()) {
    C10_CUDA_CHECK(misa::momentum_flush8bit(t, dtype, sc, rounding, quant_maps(*maps, chunk, dev), stream));
  } else {
    C10_CUDA_CHECK(misa::momentum_flush(t, dtype, sc, rounding, stream));
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "misa_kernels CUDA backend: fused multi-tensor AdamW, squared grad norms, momentum flush";
  m.def("adamw_step_", &adamw_step_, "Fused AdamW + squared grad norms over a chunk table's tensors");
  m.def("grad_sq_norms", &grad_sq_norms, "Squared L2 norm of every tensor of a chunk table, added to out");
  m.def("momentum_flush_", &momentum_flush_, "MISA end-of-period momentum flush over a chunk table's tensors");
}
