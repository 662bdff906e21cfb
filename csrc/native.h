// Shared by the native CPU kernels: the few ATen headers they need (the
// per-operator headers, not ATen.h, keep each translation unit quick to
// build) and the conversions every kernel makes.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/util/irange.h>
#include <torch/library.h>

namespace lookwhen_native {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;

// Reduced-precision inputs are read as float; every kernel computes in fp32
// (float64 stays float64 where a kernel accepts it).
template <typename scalar_t>
inline float to_float(scalar_t v) {
  return static_cast<float>(v);
}

// A float32 copy of a (small or once-read) tensor, contiguous.
inline Tensor as_float(const Tensor& t) {
  return t.to(at::kFloat).contiguous();
}

}  // namespace lookwhen_native
