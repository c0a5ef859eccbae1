// The only translation unit that includes torch headers: checks arguments, gathers raw pointers and
// calls the kernels declared in cuda/kernels.h. Python-side checks (misa_kernels/checks.py) already
// ran; these guard the extension when it is called directly.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "cuda/kernels.h"

#define CHECK_DEVICE(x, dev) TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), ", got ", (x).device())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_DTYPE(x, dt) TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())
#define CHECK_NUMEL(x, n) TORCH_CHECK((x).numel() == (n), #x " must have ", (n), " elements, got ", (x).numel())

namespace {

using misa::DType;

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "unsupported parameter dtype ", t, "; expected float32, bfloat16 or float16");
  }
}

void check_params(const std::vector<at::Tensor>& params, const at::Device& dev) {
  TORCH_CHECK(dev.is_cuda(), "params must be CUDA tensors, got ", dev);
  for (const auto& p : params) {
    CHECK_DEVICE(p, dev);
    CHECK_CONTIGUOUS(p);
    CHECK_DTYPE(p, params[0].scalar_type());
  }
}

void check_like(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& params, at::ScalarType dtype,
                const char* name) {
  TORCH_CHECK(xs.size() == params.size(), name, " must have ", params.size(), " tensors, got ", xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK(xs[i].device() == params[i].device(), name, "[", i, "] is on the wrong device");
    TORCH_CHECK(xs[i].is_contiguous(), name, "[", i, "] must be contiguous");
    TORCH_CHECK(xs[i].scalar_type() == dtype, name, "[", i, "] must have dtype ", dtype);
    TORCH_CHECK(xs[i].numel() == params[i].numel(), name, "[", i, "] must match the parameter's size");
  }
}

std::vector<void*> pointers(const std::vector<at::Tensor>& xs) {
  std::vector<void*> out;
  out.reserve(xs.size());
  for (const auto& x : xs) out.push_back(x.data_ptr());
  return out;
}

std::vector<int64_t> numels(const std::vector<at::Tensor>& xs) {
  std::vector<int64_t> out;
  out.reserve(xs.size());
  for (const auto& x : xs) out.push_back(x.numel());
  return out;
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

// Master copies (fp32, one per low-precision parameter) or none; `pointers` keeps them alive.
misa::Rounding make_rounding(const std::vector<at::Tensor>& masters, const std::vector<at::Tensor>& params,
                             std::vector<void*>& pointers, bool stochastic, int64_t seed) {
  TORCH_CHECK(seed >= 0 && seed < (int64_t(1) << 31), "seed must lie in [0, 2**31), got ", seed);
  misa::Rounding r{nullptr, stochastic, static_cast<uint32_t>(seed)};
  if (!masters.empty()) {
    TORCH_CHECK(params[0].scalar_type() != at::kFloat, "float32 parameters take no master_params");
    check_like(masters, params, at::kFloat, "master_params");
    for (const auto& w : masters) pointers.push_back(w.data_ptr());
    r.master = reinterpret_cast<float* const*>(pointers.data());
  }
  TORCH_CHECK(!stochastic || params[0].scalar_type() == at::kBFloat16,
              "stochastic rounding supports bfloat16 parameters only");
  return r;
}

void adamw_step_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                 const c10::optional<at::Tensor>& grad_sq_norms, const std::vector<at::Tensor>& master_params,
                 const c10::optional<at::Tensor>& device_scalars, double one_minus_beta1, double beta2,
                 double one_minus_beta2, double eps, double step_size, double bc2_sqrt, double decay, bool fresh,
                 bool stochastic, int64_t seed, const c10::optional<at::Tensor>& skip) {
  if (params.empty()) return;
  const at::Device dev = params[0].device();
  check_params(params, dev);
  check_like(grads, params, params[0].scalar_type(), "grads");
  check_like(exp_avgs, params, at::kFloat, "exp_avgs");
  check_like(exp_avg_sqs, params, at::kFloat, "exp_avg_sqs");
  const c10::cuda::CUDAGuard guard(dev);
  const int n = static_cast<int>(params.size());
  const auto sizes = numels(params);
  float* norms_ptr = nullptr;
  at::Tensor workspace;
  if (grad_sq_norms.has_value()) {
    CHECK_DEVICE(*grad_sq_norms, dev);
    CHECK_DTYPE(*grad_sq_norms, at::kFloat);
    CHECK_NUMEL(*grad_sq_norms, n);
    CHECK_CONTIGUOUS(*grad_sq_norms);
    norms_ptr = grad_sq_norms->data_ptr<float>();
    workspace = at::empty({misa::norm_workspace_size(n, sizes.data())}, params[0].options().dtype(at::kFloat));
  }
  auto p = pointers(params), g = pointers(grads), m = pointers(exp_avgs), v = pointers(exp_avg_sqs);
  std::vector<void*> w;
  auto rounding = make_rounding(master_params, params, w, stochastic, seed);
  if (skip.has_value()) {
    CHECK_DEVICE(*skip, dev);
    CHECK_DTYPE(*skip, at::kFloat);
    CHECK_NUMEL(*skip, 1);
    rounding.skip = skip->data_ptr<float>();
  }
  const auto sc = make_scalars(device_scalars, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt,
                               decay, dev);
  C10_CUDA_CHECK(misa::adamw_step(n, p.data(), const_cast<const void* const*>(g.data()),
                                  reinterpret_cast<float* const*>(m.data()), reinterpret_cast<float* const*>(v.data()),
                                  sizes.data(), to_dtype(params[0].scalar_type()), sc, fresh, rounding, norms_ptr,
                                  norms_ptr ? workspace.data_ptr<float>() : nullptr,
                                  c10::cuda::getCurrentCUDAStream()));
}

at::Tensor grad_sq_norms(const std::vector<at::Tensor>& tensors) {
  TORCH_CHECK(!tensors.empty(), "tensors must not be empty");
  const at::Device dev = tensors[0].device();
  check_params(tensors, dev);
  const c10::cuda::CUDAGuard guard(dev);
  const int n = static_cast<int>(tensors.size());
  const auto sizes = numels(tensors);
  at::Tensor out = at::zeros({n}, tensors[0].options().dtype(at::kFloat));
  at::Tensor workspace = at::empty({misa::norm_workspace_size(n, sizes.data())}, out.options());
  auto x = pointers(tensors);
  C10_CUDA_CHECK(misa::grad_sq_norms(n, const_cast<const void* const*>(x.data()), sizes.data(),
                                     to_dtype(tensors[0].scalar_type()), out.data_ptr<float>(),
                                     workspace.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

void momentum_flush_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& exp_avgs,
                     const std::vector<at::Tensor>& exp_avg_sqs, const std::vector<at::Tensor>& master_params,
                     const c10::optional<at::Tensor>& device_scalars, double one_minus_beta1, double beta2,
                     double one_minus_beta2, double eps, double step_size, double bc2_sqrt, double decay,
                     bool stochastic, int64_t seed) {
  if (params.empty()) return;
  const at::Device dev = params[0].device();
  check_params(params, dev);
  check_like(exp_avgs, params, at::kFloat, "exp_avgs");
  check_like(exp_avg_sqs, params, at::kFloat, "exp_avg_sqs");
  const c10::cuda::CUDAGuard guard(dev);
  const auto sizes = numels(params);
  auto p = pointers(params), m = pointers(exp_avgs), v = pointers(exp_avg_sqs);
  std::vector<void*> w;
  const auto rounding = make_rounding(master_params, params, w, stochastic, seed);
  const auto sc = make_scalars(device_scalars, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt,
                               decay, dev);
  C10_CUDA_CHECK(misa::momentum_flush(static_cast<int>(params.size()), p.data(),
                                      reinterpret_cast<const float* const*>(m.data()),
                                      reinterpret_cast<const float* const*>(v.data()), sizes.data(),
                                      to_dtype(params[0].scalar_type()), sc, rounding,
                                      c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "misa_kernels CUDA backend: fused multi-tensor AdamW, squared grad norms, momentum flush";
  m.def("adamw_step_", &adamw_step_, "Fused AdamW + squared grad norms over a list of tensors");
  m.def("grad_sq_norms", &grad_sq_norms, "Squared L2 norm of every tensor, fp32");
  m.def("momentum_flush_", &momentum_flush_, "MISA end-of-period momentum flush");
}
