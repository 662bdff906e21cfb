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
#include <ATen/ops/addmm.h>
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

// ``a [M, K] @ b [N, K]^T (+ bias [N])`` in float32. oneDNN's product
// (``mkldnn::_linear_pointwise``, what lookwhen.prepack_linears runs) where
// PyTorch has it: on the AMD CPUs we measure, ATen's MKL path runs these
// shapes 2-4x slower. at::mm otherwise.
inline Tensor matmul_nt(const Tensor& a, const Tensor& b, const std::optional<Tensor>& bias = std::nullopt) {
  using Signature = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, c10::string_view,
                           c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>);
  static const auto onednn = []() -> std::optional<c10::TypedOperatorHandle<Signature>> {
    const auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!handle.has_value()) return std::nullopt;
    try {
      return handle->typed<Signature>();
    } catch (const c10::Error&) {
      return std::nullopt;
    }
  }();
  if (onednn.has_value() && a.numel() > 0 && b.numel() > 0) {
    return onednn->call(a.contiguous(), b.contiguous(), bias, "none", c10::List<std::optional<c10::Scalar>>(),
                        std::nullopt);
  }
  return bias.has_value() ? at::addmm(*bias, a, b.t()) : at::mm(a, b.t());
}

}  // namespace lookwhen_native
