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
misa::AdamScalars make_scalars(const c10::optional<at::Tensor>& device_scalars, double one_minus_beta1, double beta2,
                               double one_minus_beta2, double eps, double step_size, double bc2_sqrt, double decay,
                               const at::Device& dev) {
  const float* dev_ptr = nullptr;
  if (device_scalars.has_value()) {
    const at::Tensor& s = *device_scalars;
    CHECK_DEVICE(s, dev);
    CHECK_DTYPE(s, at::kFloat);
    CHECK_NUMEL(s, 3);
    CHECK_CONTIGUOUS(s);
    dev_ptr = s.data_ptr<float>();
  }
  return {static_cast<float>(one_minus_beta1), static_cast<float>(beta2), static_cast<float>(one_minus_beta2),
          static_cast<float>(eps),          static_cast<float>(step_size), static_cast<float>(bc2_sqrt),
          static_cast<float>(decay),        dev_ptr};
}

misa::Rounding make_rounding(DType dtype, bool master, bool stochastic, int64_t seed,
                             const c10::optional<at::Tensor>& skip, const at::Device& dev) {
  TORCH_CHECK(seed >= 0 && seed < (int64_t(1) << 31), "seed must lie in [0, 2**31), got ", seed);
  TORCH_CHECK(!master || dtype != DType::kFloat32, "float32 parameters take no master_params");
  TORCH_CHECK(!stochastic || dtype == DType::kBFloat16, "stochastic rounding supports bfloat16 parameters only");
  misa::Rounding r{master, stochastic, static_cast<uint32_t>(seed)};
  if (skip.has_value()) {
    CHECK_DEVICE(*skip, dev);
    CHECK_DTYPE(*skip, at::kFloat);
    CHECK_NUMEL(*skip, 1);
    r.skip = skip->data_ptr<float>();
  }
  return r;
}

// The launchers take the chunk table, not tensor lists: misa_kernels/cuda.py validated the tensors
// (misa_kernels/checks.py) and built the table, so a call costs one table lookup and a launch however
// many tensors it covers. These checks guard the table's shape, not the tensors behind its addresses.
void adamw_step_(const at::Tensor& table, int64_t n_chunks, int64_t n_tensors, int64_t chunk, int64_t dtype_code,
                 const c10::optional<at::Tensor>& grad_sq_norms, const c10::optional<at::Tensor>& partials,
                 const c10::optional<at::Tensor>& device_scalars, double one_minus_beta1, double beta2,
                 double one_minus_beta2, double eps, double step_size, double bc2_sqrt, double decay, bool fresh,
                 bool master, bool stochastic, int64_t seed, const c10::optional<at::Tensor>& skip) {
  const misa::ChunkTable t = check_table(table, n_chunks, n_tensors, chunk, master ? 5 : 4);
  const at::Device dev = table.device();
  const DType dtype = to_dtype(dtype_code);
  const c10::cuda::CUDAGuard guard(dev);
  float* norms = norms_pointer(grad_sq_norms, partials, table, n_chunks, n_tensors);
  const auto rounding = make_rounding(dtype, master, stochastic, seed, skip, dev);
  const auto sc = make_scalars(device_scalars, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt,
                               decay, dev);
  C10_CUDA_CHECK(misa::adamw_step(t, dtype, sc, fresh, rounding, norms,
                                  norms ? partials->data_ptr<float>() : nullptr, c10::cuda::getCurrentCUDAStream()));
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
                     bool master, bool stochastic, int64_t seed) {
  const misa::ChunkTable t = check_table(table, n_chunks, n_tensors, chunk, master ? 4 : 3);
  const at::Device dev = table.device();
  const DType dtype = to_dtype(dtype_code);
  const c10::cuda::CUDAGuard guard(dev);
  const auto rounding = make_rounding(dtype, master, stochastic, seed, c10::nullopt, dev);
  const auto sc = make_scalars(device_scalars, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt,
                               decay, dev);
  C10_CUDA_CHECK(misa::momentum_flush(t, dtype, sc, rounding, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "misa_kernels CUDA backend: fused multi-tensor AdamW, squared grad norms, momentum flush";
  m.def("adamw_step_", &adamw_step_, "Fused AdamW + squared grad norms over a chunk table's tensors");
  m.def("grad_sq_norms", &grad_sq_norms, "Squared L2 norm of every tensor of a chunk table, added to out");
  m.def("momentum_flush_", &momentum_flush_, "MISA end-of-period momentum flush over a chunk table's tensors");
}
