// Selection-path kernels: topk_tokens and gather_patch_embed.
#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include <ATen/ops/zeros.h>

#include "native.h"

namespace lookwhen_native {
namespace {

// One axis of F.interpolate(mode="bilinear", align_corners=False), with
// ATen's source-index rule in float: per output position the two source
// positions and their weights.
struct Axis {
  std::vector<int64_t> lo, hi;
  std::vector<float> w_lo, w_hi;
};

Axis bilinear_axis(int64_t in, int64_t out) {
  Axis a;
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (const auto d : c10::irange(out)) {
    const float real = std::max(scale * (static_cast<float>(d) + 0.5f) - 0.5f, 0.0f);
    const int64_t i = std::min<int64_t>(static_cast<int64_t>(real), in - 1);
    const float lambda = std::min(std::max(real - static_cast<float>(i), 0.0f), 1.0f);
    a.lo.push_back(i);
    a.hi.push_back(i + (i < in - 1 ? 1 : 0));
    a.w_lo.push_back(1.0f - lambda);
    a.w_hi.push_back(lambda);
  }
  return a;
}

// A 64-bit key whose unsigned order is the selection order: the score's
// order-preserving bit image above, the complemented id below, so that of
// two equal scores the lower id has the larger key. -0.0 is folded into
// +0.0 first so the two tie, as floats compare.
inline uint64_t rank_key(float score, uint32_t id) {
  if (score == 0.0f) score = 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &score, sizeof(bits));
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(bits) << 32) | static_cast<uint32_t>(~id);
}

struct Geometry {
  int64_t frames, h, w, out_h, out_w;
  bool upsample;
};

// The grids, checked against the scores they describe.
Geometry geometry(const Tensor& scores, at::IntArrayRef grid, at::IntArrayRef out_grid) {
  check_float_tensor(scores, "topk_tokens", "scores");
  LOOKWHEN_CHECK(scores.dim() == 2 && scores.is_contiguous(), "topk_tokens: scores must be [B, N], contiguous");
  LOOKWHEN_CHECK(grid.size() == 3 && out_grid.size() == 3, "topk_tokens: grids are (T, h, w)");
  for (const auto d : c10::irange(3)) {
    LOOKWHEN_CHECK(grid[d] >= 1 && out_grid[d] >= 1, "topk_tokens: grid sizes must be positive, got ", grid,
                   " and ", out_grid);
  }
  LOOKWHEN_CHECK(out_grid[0] == grid[0], "topk_tokens: out_grid keeps the grid's T, got ", grid, " and ", out_grid);
  LOOKWHEN_CHECK(scores.size(1) == grid[0] * grid[1] * grid[2], "topk_tokens: ", scores.size(1),
                 " scores per clip, but the grid ", grid, " holds ", grid[0] * grid[1] * grid[2]);
  const int64_t n_out = out_grid[0] * out_grid[1] * out_grid[2];
  LOOKWHEN_CHECK(n_out <= std::numeric_limits<int32_t>::max(), "topk_tokens: ", n_out, " tokens past int32 ids");
  return {grid[0], grid[1], grid[2], out_grid[1], out_grid[2],
          grid[1] != out_grid[1] || grid[2] != out_grid[2]};
}

// Writes the ascending ids of clip `row`'s top `k` into `out`: keys in
// O(N), an nth_element partition (O(N)), then a sort of the K kept ids.
template <typename scalar_t>
void select_clip(const scalar_t* scores, const Geometry& g, const Axis& ys, const Axis& xs, int64_t k,
                 int32_t* out, std::vector<uint64_t>& keys) {
  const int64_t plane = g.out_h * g.out_w;
  const int64_t n_out = g.frames * plane;
  keys.resize(n_out);
  if (g.upsample) {
    for (const auto t : c10::irange(g.frames)) {
      const scalar_t* frame = scores + t * g.h * g.w;
      for (const auto r : c10::irange(g.out_h)) {
        const scalar_t* row_lo = frame + ys.lo[r] * g.w;
        const scalar_t* row_hi = frame + ys.hi[r] * g.w;
        for (const auto c : c10::irange(g.out_w)) {
          const int64_t x0 = xs.lo[c], x1 = xs.hi[c];
          const float top = xs.w_lo[c] * to_float(row_lo[x0]) + xs.w_hi[c] * to_float(row_lo[x1]);
          const float bottom = xs.w_lo[c] * to_float(row_hi[x0]) + xs.w_hi[c] * to_float(row_hi[x1]);
          const int64_t id = t * plane + r * g.out_w + c;
          keys[id] = rank_key(ys.w_lo[r] * top + ys.w_hi[r] * bottom, static_cast<uint32_t>(id));
        }
      }
    }
  } else {
    for (const auto id : c10::irange(n_out)) {
      keys[id] = rank_key(to_float(scores[id]), static_cast<uint32_t>(id));
    }
  }
  if (k < n_out) {
    std::nth_element(keys.begin(), keys.begin() + k, keys.end(), std::greater<uint64_t>());
  }
  for (const auto i : c10::irange(k)) {
    out[i] = static_cast<int32_t>(~static_cast<uint32_t>(keys[i]));
  }
  std::sort(out, out + k);
}

// `offset(b)` and `budget(b)`: where clip b's ids go and how many.
template <typename Offset, typename Budget>
void select_all(const Tensor& scores, const Geometry& g, Offset offset, Budget budget, int32_t* out) {
  const Axis ys = bilinear_axis(g.h, g.out_h), xs = bilinear_axis(g.w, g.out_w);
  const int64_t n_in = scores.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "topk_tokens", [&] {
    const scalar_t* base = scores.data_ptr<scalar_t>();
    at::parallel_for(0, scores.size(0), 1, [&](int64_t begin, int64_t end) {
      std::vector<uint64_t> keys;
      for (const auto b : c10::irange(begin, end)) {
        select_clip(base + b * n_in, g, ys, xs, budget(b), out + offset(b), keys);
      }
    });
  });
}

Tensor topk_tokens(const Tensor& scores, int64_t k, at::IntArrayRef grid, at::IntArrayRef out_grid) {
  const Geometry g = geometry(scores, grid, out_grid);
  LOOKWHEN_CHECK(k >= 0 && k <= g.frames * g.out_h * g.out_w, "topk_tokens: k must lie in [0, ",
                 g.frames * g.out_h * g.out_w, "], got ", k);
  Tensor out = at::empty({scores.size(0), k}, scores.options().dtype(at::kInt));
  select_all(scores, g, [k](int64_t b) { return b * k; }, [k](int64_t) { return k; }, out.data_ptr<int32_t>());
  return out;
}

Tensor topk_tokens_budgets(const Tensor& scores, const Tensor& budgets, const Tensor& cu_seqlens, int64_t total,
                           at::IntArrayRef grid, at::IntArrayRef out_grid) {
  const Geometry g = geometry(scores, grid, out_grid);
  const int64_t batch = scores.size(0), n_out = g.frames * g.out_h * g.out_w;
  const Tensor budget = host_int32(budgets, batch, "topk_tokens_budgets", "budgets");
  const Tensor offsets = host_int32(cu_seqlens, batch + 1, "topk_tokens_budgets", "cu_seqlens");
  const int32_t* bp = budget.data_ptr<int32_t>();
  const int32_t* op = offsets.data_ptr<int32_t>();
  LOOKWHEN_CHECK(total >= 0, "topk_tokens_budgets: total must be >= 0, got ", total);
  check_offsets(op, batch, total, "topk_tokens_budgets");
  for (const auto b : c10::irange(batch)) {
    LOOKWHEN_CHECK(bp[b] >= 0 && bp[b] <= n_out, "topk_tokens_budgets: budget ", bp[b], " of clip ", b,
                   " outside [0, ", n_out, "]");
    LOOKWHEN_CHECK(op[b + 1] - op[b] == bp[b], "topk_tokens_budgets: cu_seqlens gives clip ", b, " ",
                   op[b + 1] - op[b], " slots for a budget of ", bp[b]);
  }
  Tensor out = at::empty({total}, scores.options().dtype(at::kInt));
  select_all(scores, g, [op](int64_t b) { return int64_t{op[b]}; }, [bp](int64_t b) { return int64_t{bp[b]}; },
             out.data_ptr<int32_t>());
  return out;
}

// gather_patch_embed: every output row's normalised patch is written
// straight into the packed GEMM operand A [rows, 3*p*p] (the layout of
// weight.reshape(D, -1)), one GEMM A @ W^T + bias follows (in the weight's
// product dtype: bfloat16 on the matrix units for a bfloat16 weight), and
// one float32 epilogue pass adds the token's position row and converts to
// the weight's dtype. The backward rebuilds A the same way for its one GEMM,
// grad^T @ A.

struct Patches {
  Tensor a;                        // [rows, 3*p*p] in the product dtype of `rounding`
  std::vector<int64_t> row_token;  // token id of every row
  int64_t n_tokens;
};

// One patch of the clip window at `origin` into dst (channel, row, column
// order), each value the byte sum of its DS x DS block times the channel's
// scale plus its offset. Per patch row the DS clip rows are first added
// into one contiguous run (a vector loop), so only the column pairs and the
// channel split remain scalar.
template <int DS>
void patch_row_major(const uint8_t* origin, int64_t row_bytes, int64_t p, const float* scale, const float* offset,
                     int32_t* line, float* dst) {
  const int64_t run = 3 * p * DS;
  for (const auto py : c10::irange(p)) {
    const uint8_t* top = origin + py * DS * row_bytes;
    for (const auto i : c10::irange(run)) line[i] = top[i];
    for (int dy = 1; dy < DS; ++dy) {
      const uint8_t* next = top + dy * row_bytes;
      for (const auto i : c10::irange(run)) line[i] += next[i];
    }
    for (const auto c : c10::irange(3)) {
      float* out = dst + (c * p + py) * p;
      const float sc = scale[c], off = offset[c];
      for (const auto px : c10::irange(p)) {
        const int32_t* cell = line + px * DS * 3 + c;
        int32_t sum = cell[0];
        for (int dx = 1; dx < DS; ++dx) sum += cell[dx * 3];
        out[px] = static_cast<float>(sum) * sc + off;
      }
    }
  }
}

Patches gather_patches(const Tensor& clip, const std::optional<Tensor>& indices,
                       const std::optional<Tensor>& cu_seqlens, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                       int64_t patch_size, int64_t downsample, at::ScalarType rounding) {
  constexpr const char* op = "gather_patch_embed";
  LOOKWHEN_CHECK(clip.device().is_cpu() && clip.scalar_type() == at::kByte && clip.dim() == 5 &&
                 clip.size(4) == 3 && clip.is_contiguous(), op, ": clip must be uint8 [B, T, H, W, 3], contiguous");
  LOOKWHEN_CHECK(mean.size() == 3 && std.size() == 3, op, ": mean, std: 3 values");
  LOOKWHEN_CHECK(downsample == 1 || downsample == 2, op, ": downsample: 1 or 2");
  LOOKWHEN_CHECK(patch_size >= 1, op, ": patch_size must be positive, got ", patch_size);
  const int64_t batch = clip.size(0), frames = clip.size(1), height = clip.size(2), width = clip.size(3);
  const int64_t p = patch_size, ds = downsample, window = ds * p;
  const int64_t grid_h = height / window, grid_w = width / window, grid_hw = grid_h * grid_w;
  const int64_t depth = 3 * p * p;
  Patches out{Tensor(), {}, frames * grid_hw};

  std::vector<int64_t> row_clip;
  if (!indices.has_value()) {
    for (const auto b : c10::irange(batch)) {
      for (const auto n : c10::irange(out.n_tokens)) {
        row_clip.push_back(b);
        out.row_token.push_back(n);
      }
    }
  } else {
    LOOKWHEN_CHECK(indices->device().is_cpu() && indices->scalar_type() == at::kInt &&
                   (indices->dim() == 1 || indices->dim() == 2), op, ": indices must be int32 [B, K] or [total]");
    const Tensor ids = indices->contiguous();
    const int32_t* idp = ids.data_ptr<int32_t>();
    const int64_t total = ids.numel();
    for (const auto r : c10::irange(total)) {
      LOOKWHEN_CHECK(idp[r] >= 0 && idp[r] < out.n_tokens, op, ": token id ", idp[r], " at ", r, " outside [0, ",
                     out.n_tokens, ")");
    }
    out.row_token.assign(idp, idp + total);
    if (ids.dim() == 2) {
      LOOKWHEN_CHECK(ids.size(0) == batch, op, ": indices hold ", ids.size(0), " clips, the clip batch ", batch);
      for (const auto r : c10::irange(total)) row_clip.push_back(r / ids.size(1));
    } else {
      LOOKWHEN_CHECK(cu_seqlens.has_value(), op, ": cu_seqlens is required with packed indices");
      const Tensor cu = host_int32(*cu_seqlens, batch + 1, op, "cu_seqlens");
      const int32_t* cp = cu.data_ptr<int32_t>();
      check_offsets(cp, batch, total, op);
      for (const auto b : c10::irange(batch)) {
        for (int64_t r = cp[b]; r < cp[b + 1]; ++r) row_clip.push_back(b);
      }
    }
  }
  const int64_t rows = static_cast<int64_t>(out.row_token.size());
  // A bfloat16 product reads A in bfloat16: the rows are written in it
  // directly, not as float32 rounded in place and copied again.
  const bool reduced_a = product_dtype(rounding) == at::kBFloat16;
  out.a = at::empty({rows, depth}, clip.options().dtype(product_dtype(rounding)));

  // timm's (x / 255 - mean) / std as ``sum * scale + offset`` over a pooling
  // window's byte sum, with the reference's float32 constants.
  float scale[3], offset[3];
  for (const auto c : c10::irange(3)) {
    const float s = static_cast<float>(std[c]);
    scale[c] = 1.0f / (static_cast<float>(255 * ds * ds) * s);
    offset[c] = -static_cast<float>(mean[c]) / s;
  }
  const uint8_t* pixels = clip.data_ptr<uint8_t>();
  const int64_t row_bytes = width * 3;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> line(static_cast<size_t>(3 * p * ds));
    std::vector<float> patch(reduced_a ? static_cast<size_t>(depth) : 0);
    for (const auto r : c10::irange(begin, end)) {
      const int64_t token = out.row_token[r];
      const int64_t t = token / grid_hw, rest = token % grid_hw;
      const uint8_t* origin = pixels + (((row_clip[r] * frames + t) * height + (rest / grid_w) * window) * width +
                                        (rest % grid_w) * window) * 3;
      float* dst = reduced_a ? patch.data() : out.a.data_ptr<float>() + r * depth;
      if (ds == 1) {
        patch_row_major<1>(origin, row_bytes, p, scale, offset, line.data(), dst);
      } else {
        patch_row_major<2>(origin, row_bytes, p, scale, offset, line.data(), dst);
      }
      if (reduced_a) {
        at::vec::convert(dst, out.a.data_ptr<at::BFloat16>() + r * depth, depth);
      } else if (rounding != at::kFloat) {
        // The reference rounds the patches to the weight's (the gradient's)
        // dtype, as tensor cores read them, before its float32 GEMM.
        AT_DISPATCH_REDUCED_FLOATING_TYPES(rounding, "gather_patches_round", [&] {
          for (const auto i : c10::irange(depth)) dst[i] = static_cast<float>(static_cast<scalar_t>(dst[i]));
        });
      }
    }
  });
  return out;
}

Tensor gather_patch_embed(const Tensor& clip, const std::optional<Tensor>& indices, const Tensor& weight,
                          const Tensor& bias, const Tensor& pos_embed, at::ArrayRef<double> mean,
                          at::ArrayRef<double> std, const std::optional<Tensor>& cu_seqlens, int64_t patch_size,
                          int64_t downsample) {
  constexpr const char* op = "gather_patch_embed";
  for (const auto& [tensor, name] : {std::pair{&weight, "weight"}, {&bias, "bias"}, {&pos_embed, "pos_embed"}}) {
    check_float_tensor(*tensor, op, name);
  }
  LOOKWHEN_CHECK(weight.dim() == 4, op, ": weight must be [D, 3, p, p], got ", weight.sizes());
  const int64_t dim = weight.size(0);
  check_shape(weight, {dim, 3, patch_size, patch_size}, op, "weight");
  check_shape(bias, {dim}, op, "bias");
  const Patches patches =
      gather_patches(clip, indices, cu_seqlens, mean, std, patch_size, downsample, weight.scalar_type());
  check_shape(pos_embed, {patches.n_tokens, dim}, op, "pos_embed");
  const int64_t rows = patches.a.size(0);
  Tensor out = at::empty({rows, dim}, weight.options());
  if (rows == 0) return out;
  // A holds values already in (or rounded to) the weight's product dtype.
  const auto pd = product_dtype(weight.scalar_type());
  const Tensor product = matmul_nt(as_operand(patches.a, pd), as_operand(weight.reshape({dim, patches.a.size(1)}), pd),
                                   as_operand(bias, pd));
  // Each row reads its token's position row in the table's own dtype,
  // converted on the fly: a sparse selection touches a few rows, and a
  // float32 copy of a bfloat16 table would be a full conversion per call.
  const Tensor pos = pos_embed.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "gather_patch_embed", [&] {
    using out_t = scalar_t;
    out_t* op = out.data_ptr<out_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pos.scalar_type(), "gather_patch_embed_pos", [&] {
      const scalar_t* pp = pos.data_ptr<scalar_t>();
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        std::vector<float> buf;
        for (const auto r : c10::irange(begin, end)) {
          const scalar_t* pos_row = pp + patches.row_token[r] * dim;
          const float* src = float_row(product, r, buf);
          out_t* dst = op + r * dim;
          for (const auto d : c10::irange(dim)) {
            dst[d] = static_cast<out_t>(src[d] + static_cast<float>(pos_row[d]));
          }
        }
      });
    });
  });
  return out;
}

// Gradients for (weight, bias, pos_embed): grad^T @ A, the column sums of
// grad, and grad's rows added up per token id (in row order: deterministic).
std::vector<Tensor> gather_patch_embed_backward(const Tensor& grad, const Tensor& clip,
                                                const std::optional<Tensor>& indices, at::ArrayRef<double> mean,
                                                at::ArrayRef<double> std, const std::optional<Tensor>& cu_seqlens,
                                                int64_t patch_size, int64_t downsample) {
  const Patches patches =
      gather_patches(clip, indices, cu_seqlens, mean, std, patch_size, downsample, grad.scalar_type());
  check_float_tensor(grad, "gather_patch_embed_backward", "grad");
  LOOKWHEN_CHECK(grad.dim() == 2 && grad.size(0) == patches.a.size(0), "gather_patch_embed_backward: grad must be [",
                 patches.a.size(0), ", D], got ", grad.sizes());
  const Tensor g = as_float(grad);
  const int64_t rows = g.size(0), dim = g.size(1);
  const auto pd = product_dtype(grad.scalar_type());
  const Tensor d_weight = rows ? matmul_nt(as_operand(grad, pd).t(), as_operand(patches.a, pd).t())
                               : at::zeros({dim, patches.a.size(1)}, g.options());
  Tensor d_pos = at::zeros({patches.n_tokens, dim}, g.options());
  const float* gp = g.data_ptr<float>();
  float* dp = d_pos.data_ptr<float>();
  // Parallel over channel blocks, rows in order within each.
  at::parallel_for(0, dim, 64, [&](int64_t begin, int64_t end) {
    for (const auto r : c10::irange(rows)) {
      float* dst = dp + patches.row_token[r] * dim;
      const float* src = gp + r * dim;
      for (const auto d : c10::irange(begin, end)) dst[d] += src[d];
    }
  });
  return {d_weight.reshape({dim, 3, patch_size, patch_size}).to(grad.scalar_type()),
          g.sum(0).to(grad.scalar_type()), d_pos.to(grad.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lookwhen_native, m) {
  m.def("topk_tokens(Tensor scores, int k, int[] grid, int[] out_grid) -> Tensor");
  m.def("topk_tokens_budgets(Tensor scores, Tensor budgets, Tensor cu_seqlens, int total, int[] grid, "
        "int[] out_grid) -> Tensor");
  m.def("gather_patch_embed(Tensor clip, Tensor? indices, Tensor weight, Tensor bias, Tensor pos_embed, "
        "float[] mean, float[] std, Tensor? cu_seqlens, int patch_size, int downsample) -> Tensor");
  m.def("gather_patch_embed_backward(Tensor grad, Tensor clip, Tensor? indices, float[] mean, float[] std, "
        "Tensor? cu_seqlens, int patch_size, int downsample) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(lookwhen_native, CPU, m) {
  m.impl("topk_tokens", &topk_tokens);
  m.impl("topk_tokens_budgets", &topk_tokens_budgets);
  m.impl("gather_patch_embed", &gather_patch_embed);
  m.impl("gather_patch_embed_backward", &gather_patch_embed_backward);
}

}  // namespace lookwhen_native
