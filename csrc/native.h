// Shared by the native CPU kernels: the few ATen headers they need (the
// per-operator headers, not ATen.h, keep each translation unit quick to
// build) and the conversions every kernel makes.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <vector>

namespace lookwhen_native {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;

// Contract checks. The ops are callable as torch.ops.lookwhen_native.* by
// anyone, and the Python layer skips its value checks under validate=False:
// each op checks what it reads and writes against its own arguments here
// (cheap: the data is on the host), and a broken contract is a ValueError in
// Python, never a read or write out of bounds.
#define LOOKWHEN_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

inline void check_float_tensor(const Tensor& t, const char* op, const char* name) {
  LOOKWHEN_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  LOOKWHEN_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ",
                 t.scalar_type());
}

inline void check_shape(const Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  LOOKWHEN_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

// An int32 vector of n elements, read on the host.
inline Tensor host_int32(const Tensor& t, int64_t n, const char* op, const char* name) {
  LOOKWHEN_CHECK(t.device().is_cpu() && t.scalar_type() == at::kInt && t.dim() == 1 && t.numel() == n, op, ": ",
                 name, " must be an int32 CPU vector of ", n, " elements, got ", t.scalar_type(), " ", t.sizes());
  return t.contiguous();
}

// Offsets of a batch: cu[0] = 0, non-decreasing, cu[B] = total.
inline void check_offsets(const int32_t* cu, int64_t batch, int64_t total, const char* op) {
  LOOKWHEN_CHECK(cu[0] == 0, op, ": cu_seqlens must start at 0, got ", cu[0]);
  for (const auto b : c10::irange(batch)) {
    LOOKWHEN_CHECK(cu[b + 1] >= cu[b], op, ": cu_seqlens must be non-decreasing (", cu[b], " then ", cu[b + 1],
                   " at ", b, ")");
  }
  LOOKWHEN_CHECK(cu[batch] == total, op, ": cu_seqlens ends at ", cu[batch], ", not at the total ", total);
}

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

// The dtype a kernel's matrix products run in, given its input's: bfloat16
// stays bfloat16, so that oneDNN multiplies on the CPU's matrix units (AMX,
// AVX512-BF16; about 8x the float32 rate on AMX) with float32 accumulation
// and one rounding of each product to bfloat16, as autocast's linear does.
// Everything else runs in float32 (float16 products have no fast CPU path
// on the machines we measure).
inline at::ScalarType product_dtype(at::ScalarType input) {
  return input == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
}

// ``t`` as a contiguous matrix-product operand of ``dtype``.
inline Tensor as_operand(const Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

// Row ``r`` of a contiguous float32 or bfloat16 matrix (a product's result)
// as floats: a pointer into it, or into ``buf`` holding its converted copy.
// Epilogues read products through it and keep their math in float32.
inline const float* float_row(const Tensor& m, int64_t r, std::vector<float>& buf) {
  const int64_t cols = m.size(1);
  if (m.scalar_type() == at::kFloat) return m.const_data_ptr<float>() + r * cols;
  buf.resize(static_cast<size_t>(cols));
  at::vec::convert(m.const_data_ptr<at::BFloat16>() + r * cols, buf.data(), cols);
  return buf.data();
}

// ``a [M, K] @ b [N, K]^T (+ bias [N])``, all three of one dtype (float32
// or bfloat16, see product_dtype), the result in it too. oneDNN's product
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
