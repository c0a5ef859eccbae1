// The per-element AdamW arithmetic shared by the fp32-state and 8-bit-state kernels, so that both
// formats update a value in exactly the same fp32 operations.
#pragma once

#include "kernels.h"

namespace misa {

struct Folded {
  float step_size, bc2_sqrt, decay;
};

__device__ __forceinline__ Folded fold(const AdamScalars& sc, int64_t tensor) {
  if (sc.device != nullptr) {
    const float* row = sc.device + sc.device_stride * tensor;
    return {row[0], row[1], row[2]};
  }
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

}  // namespace misa
