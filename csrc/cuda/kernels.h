// Host entry points of the CUDA kernels; each returns the launch status for the caller to check. Raw pointers and plain structs only: no torch headers, so
// the .cu files compile with nvcc alone, in seconds. csrc/misa_ops.cpp checks arguments and calls these.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace misa {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Hyperparameters folded on the host (misa_kernels/scalars.py). When `device` is not null the kernel
// reads [step_size, bias_correction2_sqrt, decay] from it instead (lr/step as device tensors, for
// CUDA-graph capture).
struct AdamScalars {
  float beta1;
  float beta2;
  float eps;
  float step_size;
  float bias_correction2_sqrt;
  float decay;
  const float* device;
};

// Number of fp32 partial sums the norm-producing launches need as workspace.
int64_t norm_workspace_size(int n_tensors, const int64_t* numels);

// AdamW over n tensors; if grad_sq_norms is not null, grad_sq_norms[i] += sum(grad_i^2), reduced
// deterministically through `workspace` (norm_workspace_size floats).
cudaError_t adamw_step(int n_tensors, void* const* params, const void* const* grads, float* const* exp_avgs,
                float* const* exp_avg_sqs, const int64_t* numels, DType dtype, AdamScalars scalars, bool fresh,
                float* grad_sq_norms, float* workspace, cudaStream_t stream);

// out[i] += sum(x_i^2); `out` must be zeroed by the caller for a plain norm.
cudaError_t grad_sq_norms(int n_tensors, const void* const* tensors, const int64_t* numels, DType dtype, float* out,
                   float* workspace, cudaStream_t stream);

// p -= step_size * m / (sqrt(v) / bias_correction2_sqrt + eps); states are read only.
cudaError_t momentum_flush(int n_tensors, void* const* params, const float* const* exp_avgs,
                    const float* const* exp_avg_sqs, const int64_t* numels, DType dtype, AdamScalars scalars,
                    cudaStream_t stream);

}  // namespace misa
