// Per-token feature kernels: score_tokens (forward and backward),
// nn_uniqueness, frame_normalize (forward and backward).
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include <ATen/ops/mv.h>

#include "native.h"

namespace lookwhen_native {
namespace {

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// Sum of a float row, vectorised.
inline float row_sum(const float* x, int64_t n) {
  return at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, x, n);
}

// 1/sqrt(var + eps), NaN when the variance overflowed float32 (inputs past
// ~1e19): the NaN PyTorch's LayerNorm gives there, not a silent 0.
inline float inverse_std(float var, float eps) {
  return std::isinf(var) ? std::numeric_limits<float>::quiet_NaN() : 1.0f / std::sqrt(var + eps);
}

// Mean and 1/sqrt(var + eps) of a float row (two passes: no E[x^2] - E[x]^2
// cancellation).
inline std::pair<float, float> row_stats(const float* x, int64_t n, float eps) {
  const float mean = row_sum(x, n) / static_cast<float>(n);
  const float m2 = at::vec::map_reduce_all<float>(
      [mean](Vec v) { return (v - Vec(mean)) * (v - Vec(mean)); }, [](Vec a, Vec b) { return a + b; }, x, n);
  return {mean, inverse_std(m2 / static_cast<float>(n), eps)};
}

// ---------------------------------------------------------------------------
// score_tokens: LayerNorm rows into float32 y, one GEMM a = y W1^T + b1 (in
// the input's product dtype: bfloat16 x gives bfloat16 y, W1 and a), then
// one float32 pass per row folds GELU and w2 into the score.

struct Normalised {
  Tensor xhat, y, mean, rstd;  // float32 [R, D], y_dtype [R, D], float32 [R], [R]
};

// y in `y_dtype` (float32, or bfloat16 for a bfloat16 product: written
// directly, not copied into it afterwards). Float32 and bfloat16 rows of x
// are read as they are, converted a row at a time.
Normalised layer_norm_rows(const Tensor& x2d, const Tensor& gamma, const Tensor& beta, float eps, bool keep_xhat,
                           at::ScalarType y_dtype) {
  const int64_t rows = x2d.size(0), dim = x2d.size(1);
  const Tensor xin = x2d.scalar_type() == at::kBFloat16 ? x2d.contiguous() : as_float(x2d);
  const auto floats = xin.options().dtype(at::kFloat);
  Normalised n{keep_xhat ? at::empty({rows, dim}, floats) : Tensor(), at::empty({rows, dim}, floats.dtype(y_dtype)),
               at::empty({rows}, floats), at::empty({rows}, floats)};
  const float* gp = gamma.data_ptr<float>();
  const float* bp = beta.data_ptr<float>();
  const bool reduced_y = y_dtype == at::kBFloat16;
  float* hp = keep_xhat ? n.xhat.data_ptr<float>() : nullptr;
  float* mp = n.mean.data_ptr<float>();
  float* rp = n.rstd.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> in_buf, y_buf(reduced_y ? static_cast<size_t>(dim) : 0);
    for (const auto r : c10::irange(begin, end)) {
      const float* src = float_row(xin, r, in_buf);
      const auto [mean, rstd] = row_stats(src, dim, eps);
      mp[r] = mean;
      rp[r] = rstd;
      float* y = reduced_y ? y_buf.data() : n.y.data_ptr<float>() + r * dim;
      float* xhat = hp ? hp + r * dim : nullptr;
      for (const auto d : c10::irange(dim)) {
        const float h = (src[d] - mean) * rstd;
        if (xhat) xhat[d] = h;
        y[d] = h * gp[d] + bp[d];
      }
      if (reduced_y) at::vec::convert(y, n.y.data_ptr<at::BFloat16>() + r * dim, dim);
    }
  });
  return n;
}

inline Vec gelu_cdf(Vec a) {
  return Vec(0.5f) * (Vec(1.0f) + (a * Vec(kSqrtHalf)).erf());
}

// x [B, N, D] and the head's parameters: LayerNorm (D), w1 [H, D], b1 [H],
// w2 with H values, b2 with one.
void check_score_head(const Tensor& x, const Tensor& norm_weight, const Tensor& norm_bias, const Tensor& w1,
                      const Tensor& b1, const Tensor& w2, const Tensor& b2) {
  constexpr const char* op = "score_tokens";
  for (const auto& [tensor, name] : {std::pair{&x, "x"}, {&norm_weight, "norm_weight"}, {&norm_bias, "norm_bias"},
                                     {&w1, "w1"}, {&b1, "b1"}, {&w2, "w2"}, {&b2, "b2"}}) {
    check_float_tensor(*tensor, op, name);
  }
  LOOKWHEN_CHECK(x.dim() == 3, op, ": x must be [B, N, D], got ", x.sizes());
  LOOKWHEN_CHECK(w1.dim() == 2, op, ": w1 must be [H, D], got ", w1.sizes());
  const int64_t dim = x.size(2), hidden = w1.size(0);
  check_shape(norm_weight, {dim}, op, "norm_weight");
  check_shape(norm_bias, {dim}, op, "norm_bias");
  check_shape(w1, {hidden, dim}, op, "w1");
  check_shape(b1, {hidden}, op, "b1");
  LOOKWHEN_CHECK(w2.numel() == hidden && b2.numel() == 1, op, ": w2 must hold ", hidden, " values and b2 one, got ",
                 w2.sizes(), " and ", b2.sizes());
}

Tensor score_tokens(const Tensor& x, const Tensor& norm_weight, const Tensor& norm_bias, const Tensor& w1,
                    const Tensor& b1, const Tensor& w2, const Tensor& b2, double eps) {
  check_score_head(x, norm_weight, norm_bias, w1, b1, w2, b2);
  const int64_t batch = x.size(0), n_tok = x.size(1), dim = x.size(2), hidden = w1.size(0);
  const int64_t rows = batch * n_tok;
  Tensor out = at::empty({batch, n_tok}, x.options().dtype(at::kFloat));
  if (rows == 0) return out;
  const auto pd = product_dtype(x.scalar_type());
  const Normalised n = layer_norm_rows(x.reshape({rows, dim}), as_float(norm_weight), as_float(norm_bias),
                                       static_cast<float>(eps), false, pd);
  const Tensor a = matmul_nt(n.y, as_operand(w1, pd), as_operand(b1, pd));
  const Tensor w2f = as_float(w2).reshape({hidden});
  const float* wp = w2f.data_ptr<float>();
  const float bias = as_float(b2).data_ptr<float>()[0];
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (const auto r : c10::irange(begin, end)) {
      const float* row = float_row(a, r, buf);
      Vec acc(0.0f);
      int64_t h = 0;
      for (; h + Vec::size() <= hidden; h += Vec::size()) {
        const Vec v = Vec::loadu(row + h);
        acc = at::vec::fmadd(v * gelu_cdf(v), Vec::loadu(wp + h), acc);
      }
      if (h < hidden) {
        const Vec v = Vec::loadu(row + h, hidden - h);
        acc = at::vec::fmadd(v * gelu_cdf(v), Vec::loadu(wp + h, hidden - h), acc);
      }
      op[r] = at::vec::vec_reduce_all<float>([](Vec p, Vec q) { return p + q; }, acc) + bias;
    }
  });
  return out;
}

// Column sums of two [R, D] products accumulated per thread, then added:
// sum_r u[r] * v[r] and sum_r u[r].
struct ColumnSums {
  std::vector<float> partial;
  int64_t dim;
  explicit ColumnSums(int64_t d) : partial(static_cast<size_t>(2 * d * at::get_num_threads()), 0.0f), dim(d) {}
  float* slot() { return partial.data() + 2 * dim * at::get_thread_num(); }
  void total(float* product_sum, float* plain_sum) const {
    for (const auto d : c10::irange(dim)) product_sum[d] = plain_sum[d] = 0.0f;
    for (size_t t = 0; t < partial.size() / (2 * dim); ++t) {
      const float* s = partial.data() + 2 * dim * t;
      for (const auto d : c10::irange(dim)) {
        product_sum[d] += s[d];
        plain_sum[d] += s[dim + d];
      }
    }
  }
};

std::vector<Tensor> score_tokens_backward(const Tensor& grad, const Tensor& x, const Tensor& norm_weight,
                                          const Tensor& norm_bias, const Tensor& w1, const Tensor& b1,
                                          const Tensor& w2, const Tensor& b2, double eps) {
  check_score_head(x, norm_weight, norm_bias, w1, b1, w2, b2);
  check_float_tensor(grad, "score_tokens_backward", "grad");
  check_shape(grad, {x.size(0), x.size(1)}, "score_tokens_backward", "grad");
  const int64_t dim = x.size(2), hidden = w1.size(0), rows = x.size(0) * x.size(1);
  const Tensor gamma = as_float(norm_weight), w2f = as_float(w2).reshape({hidden});
  const Tensor g = as_float(grad).reshape({rows});
  const auto pd = product_dtype(x.scalar_type());
  const Normalised n = layer_norm_rows(x.reshape({rows, dim}), gamma, as_float(norm_bias),
                                       static_cast<float>(eps), true, pd);
  const Tensor& y = n.y;
  const Tensor w1p = as_operand(w1, pd);
  // The pre-activation a (product dtype); gelu(a) = a * cdf(a) (float32, for
  // d_w2) and d_a (product dtype, for the two GEMMs) follow from it per row.
  const Tensor a = matmul_nt(y, w1p, as_operand(b1, pd));
  Tensor act = at::empty({rows, hidden}, n.xhat.options());
  Tensor d_a = at::empty({rows, hidden}, a.options());
  float* ap = act.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float* wp = w2f.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf, drow(static_cast<size_t>(hidden));
    for (const auto r : c10::irange(begin, end)) {
      const float* pre = float_row(a, r, buf);
      float* row = ap + r * hidden;
      const Vec gr(gp[r]);
      auto step = [&](int64_t h, int64_t count) {
        const Vec v = Vec::loadu(pre + h, count);
        const Vec cdf = gelu_cdf(v);
        const Vec pdf = (Vec(-0.5f) * v * v).exp() * Vec(kInvSqrt2Pi);
        (gr * Vec::loadu(wp + h, count) * (cdf + v * pdf)).store(drow.data() + h, count);
        (v * cdf).store(row + h, count);
      };
      int64_t h = 0;
      for (; h + Vec::size() <= hidden; h += Vec::size()) step(h, Vec::size());
      if (h < hidden) step(h, hidden - h);
      if (pd == at::kFloat) {
        std::copy(drow.begin(), drow.end(), d_a.data_ptr<float>() + r * hidden);
      } else {
        at::vec::convert(drow.data(), d_a.data_ptr<at::BFloat16>() + r * hidden, hidden);
      }
    }
  });
  const Tensor d_w2 = at::mv(act.t(), g);
  const Tensor d_b1 = d_a.sum(0, false, at::kFloat);
  const Tensor d_w1 = matmul_nt(d_a.t(), y.t());
  const Tensor d_y = matmul_nt(d_a, w1p.t());

  Tensor dx = at::empty({rows, dim}, n.xhat.options());
  ColumnSums sums(dim);
  const float* hp = n.xhat.data_ptr<float>();
  const float* rp = n.rstd.data_ptr<float>();
  const float* gam = gamma.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    float* mine = sums.slot();
    std::vector<float> buf;
    for (const auto r : c10::irange(begin, end)) {
      const float* dy = float_row(d_y, r, buf);
      const float* xhat = hp + r * dim;
      float* out = dxp + r * dim;
      float mean_d = 0.0f, mean_dx = 0.0f;
      for (const auto d : c10::irange(dim)) {
        const float dxhat = dy[d] * gam[d];
        out[d] = dxhat;
        mean_d += dxhat;
        mean_dx += dxhat * xhat[d];
        mine[d] += dy[d] * xhat[d];
        mine[dim + d] += dy[d];
      }
      mean_d /= static_cast<float>(dim);
      mean_dx /= static_cast<float>(dim);
      for (const auto d : c10::irange(dim)) out[d] = rp[r] * (out[d] - mean_d - xhat[d] * mean_dx);
    }
  });
  Tensor d_gamma = at::empty({dim}, dx.options()), d_beta = at::empty({dim}, dx.options());
  sums.total(d_gamma.data_ptr<float>(), d_beta.data_ptr<float>());
  return {dx.reshape(x.sizes()).to(x.scalar_type()),       d_gamma.to(norm_weight.scalar_type()),
          d_beta.to(norm_bias.scalar_type()),              d_w1.to(w1.scalar_type()),
          d_b1.to(b1.scalar_type()),                       d_w2.reshape(w2.sizes()).to(w2.scalar_type()),
          g.sum().reshape(b2.sizes()).to(b2.scalar_type())};
}

// ---------------------------------------------------------------------------
// nn_uniqueness: per clip, a strip of QUERY_BLOCK queries against the keys
// from the strip's first query on is one GEMM (the product is symmetric, so
// the strips together cover the upper triangle and half the N x N work).
// One pass over a strip updates its queries' running minima (with the
// argument) over those keys, another the keys' beyond the strip over the
// strip's queries. Every token thus meets its candidates in ascending id
// order (earlier strips' columns, then its own row), so a strict < keeps the
// first minimum, as argmin does. Memory is QUERY_BLOCK x N floats, never
// N x N. The chosen neighbour's distance is then measured directly, as the
// reference does.
// The products stay float32 for bfloat16 inputs: a bfloat16 product is
// rounded to 8 bits, coarser than the gap between a token's nearest
// candidates (a few ulps of |x|^2), so the neighbour found would be noise,
// and CPU PyTorch has no bfloat16 product with a float32 result to call.

constexpr int64_t QUERY_BLOCK = 256;
constexpr float COSINE_EPS = 1e-12f;

Tensor nn_uniqueness(const Tensor& x, c10::string_view metric) {
  const bool cosine = metric == "cosine";
  LOOKWHEN_CHECK(cosine || metric == "l2", "nn_uniqueness: metric is l2 or cosine");
  check_float_tensor(x, "nn_uniqueness", "x");
  LOOKWHEN_CHECK(x.dim() == 3, "nn_uniqueness: x must be [B, N, D], got ", x.sizes());
  const int64_t batch = x.size(0), n_tok = x.size(1), dim = x.size(2);
  Tensor out = at::empty({batch, n_tok}, x.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  if (n_tok <= 1) {
    for (const auto i : c10::irange(out.numel())) op[i] = std::numeric_limits<float>::infinity();
    return out;
  }
  const Tensor raw = as_float(x);
  Tensor sq = at::empty({batch, n_tok}, raw.options());
  const float* xp = raw.data_ptr<float>();
  float* sqp = sq.data_ptr<float>();
  at::parallel_for(0, batch * n_tok, 64, [&](int64_t begin, int64_t end) {
    for (const auto r : c10::irange(begin, end)) {
      sqp[r] = at::vec::map_reduce_all<float>([](Vec v) { return v * v; }, [](Vec a, Vec b) { return a + b; },
                                              xp + r * dim, dim);
    }
  });
  // Cosine compares F.normalize's unit vectors: x / max(|x|, eps).
  Tensor feats = raw;
  if (cosine) {
    feats = at::empty_like(raw);
    float* fp = feats.data_ptr<float>();
    at::parallel_for(0, batch * n_tok, 64, [&](int64_t begin, int64_t end) {
      for (const auto r : c10::irange(begin, end)) {
        const float norm = std::max(std::sqrt(sqp[r]), COSINE_EPS);
        for (const auto d : c10::irange(dim)) fp[r * dim + d] = xp[r * dim + d] / norm;
      }
    });
  }
  const float* fp = feats.data_ptr<float>();
  std::vector<int64_t> nearest(static_cast<size_t>(n_tok));
  std::vector<float> best(static_cast<size_t>(n_tok));
  for (const auto b : c10::irange(batch)) {
    const Tensor clip = feats[b];
    const float* csq = sqp + b * n_tok;
    // The pair (i, j) compares (|x_i|^2 + |x_j|^2) - 2 x_i.x_j, as the
    // reference; cosine the negated similarity of the unit vectors.
    auto score = [&](float dot, int64_t i, int64_t j) { return cosine ? -dot : (csq[i] + csq[j]) - 2.0f * dot; };
    for (const auto q : c10::irange(n_tok)) {
      best[q] = std::numeric_limits<float>::infinity();
      nearest[q] = q;
    }
    for (int64_t q0 = 0; q0 < n_tok; q0 += QUERY_BLOCK) {
      const int64_t count = std::min(QUERY_BLOCK, n_tok - q0), width = n_tok - q0;
      const Tensor dots = matmul_nt(clip.narrow(0, q0, count), clip.narrow(0, q0, width));
      const float* dp = dots.data_ptr<float>();
      at::parallel_for(0, count, 8, [&](int64_t begin, int64_t end) {
        for (const auto i : c10::irange(begin, end)) {
          const int64_t q = q0 + i;
          const float* row = dp + i * width;
          for (const auto c : c10::irange(width)) {
            const float s = score(row[c], q, q0 + c);
            if (s < best[q] && c != i) {
              best[q] = s;
              nearest[q] = q0 + c;
            }
          }
        }
      });
      at::parallel_for(count, width, 64, [&](int64_t begin, int64_t end) {
        for (const auto i : c10::irange(count)) {
          const float* row = dp + i * width;
          for (const auto c : c10::irange(begin, end)) {
            const int64_t key = q0 + c;
            const float s = score(row[c], key, q0 + i);
            if (s < best[key]) {
              best[key] = s;
              nearest[key] = q0 + i;
            }
          }
        }
      });
    }
    const float* cf = fp + b * n_tok * dim;
    at::parallel_for(0, n_tok, 64, [&](int64_t begin, int64_t end) {
      for (const auto q : c10::irange(begin, end)) {
        // A token with a NaN feature has no distance; one whose every score
        // is NaN or inf (squares past float32) has no neighbour.
        if (std::isnan(csq[q]) || !(best[q] < std::numeric_limits<float>::infinity())) {
          op[b * n_tok + q] = std::isnan(csq[q]) ? std::numeric_limits<float>::quiet_NaN()
                                                 : std::numeric_limits<float>::infinity();
          continue;
        }
        const int64_t j = nearest[q];
        const float* u = cf + q * dim;
        const float* v = cf + j * dim;
        float d2 = 0.0f;
        for (const auto d : c10::irange(dim)) d2 += (u[d] - v[d]) * (u[d] - v[d]);
        if (cosine) {
          // 1 - u.v = (|u - v|^2 + (1 - |u|^2) + (1 - |v|^2)) / 2; the last
          // two terms are exactly 0 unless |x| < eps.
          const float eps2 = COSINE_EPS * COSINE_EPS;
          const float short_q = 1.0f - std::min(csq[q] / eps2, 1.0f);
          const float short_n = 1.0f - std::min(csq[j] / eps2, 1.0f);
          op[b * n_tok + q] = 0.5f * (d2 + short_q + short_n);
        } else {
          op[b * n_tok + q] = std::sqrt(d2);
        }
      }
    });
  }
  return out;
}

// ---------------------------------------------------------------------------
// frame_normalize: one work item is a frame's block of CHANNEL_BLOCK
// channels; its tokens are streamed for the mean, again for the centred
// second moment, and once more to write (the backward adds one pass for
// its two sums). Every pass runs along contiguous channels.

constexpr int64_t CHANNEL_BLOCK = 64;

template <typename scalar_t>
void frame_stats(const scalar_t* x, int64_t n_tok, int64_t channels, int64_t width, float eps, float* mean,
                 float* rstd) {
  for (const auto c : c10::irange(width)) mean[c] = rstd[c] = 0.0f;
  for (const auto t : c10::irange(n_tok)) {
    for (const auto c : c10::irange(width)) mean[c] += to_float(x[t * channels + c]);
  }
  for (const auto c : c10::irange(width)) mean[c] /= static_cast<float>(n_tok);
  for (const auto t : c10::irange(n_tok)) {
    for (const auto c : c10::irange(width)) {
      const float centred = to_float(x[t * channels + c]) - mean[c];
      rstd[c] += centred * centred;
    }
  }
  for (const auto c : c10::irange(width)) rstd[c] = inverse_std(rstd[c] / static_cast<float>(n_tok), eps);
}

// Calls body(frame base offset, first channel, block width) for every item.
template <typename Body>
void for_frame_blocks(const Tensor& x, Body body) {
  const int64_t frames = x.size(0) * x.size(1), n_tok = x.size(2), channels = x.size(3);
  const int64_t blocks = (channels + CHANNEL_BLOCK - 1) / CHANNEL_BLOCK;
  at::parallel_for(0, frames * blocks, 1, [&](int64_t begin, int64_t end) {
    for (const auto item : c10::irange(begin, end)) {
      const int64_t c0 = (item % blocks) * CHANNEL_BLOCK;
      body((item / blocks) * n_tok * channels + c0, std::min(CHANNEL_BLOCK, channels - c0));
    }
  });
}

Tensor frame_normalize(const Tensor& x, double eps) {
  check_float_tensor(x, "frame_normalize", "x");
  LOOKWHEN_CHECK(x.dim() == 4 && x.is_contiguous(), "frame_normalize: x must be [B, T, n, D], contiguous");
  Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const int64_t n_tok = x.size(2), channels = x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "frame_normalize", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_frame_blocks(x, [&](int64_t base, int64_t width) {
      float mean[CHANNEL_BLOCK], rstd[CHANNEL_BLOCK];
      frame_stats(xp + base, n_tok, channels, width, static_cast<float>(eps), mean, rstd);
      for (const auto t : c10::irange(n_tok)) {
        const scalar_t* src = xp + base + t * channels;
        scalar_t* dst = op + base + t * channels;
        for (const auto c : c10::irange(width)) dst[c] = static_cast<scalar_t>((to_float(src[c]) - mean[c]) * rstd[c]);
      }
    });
  });
  return out;
}

Tensor frame_normalize_backward(const Tensor& grad, const Tensor& x, double eps) {
  check_float_tensor(x, "frame_normalize_backward", "x");
  check_float_tensor(grad, "frame_normalize_backward", "grad");
  LOOKWHEN_CHECK(x.dim() == 4 && x.is_contiguous(), "frame_normalize_backward: x must be [B, T, n, D], contiguous");
  check_shape(grad, x.sizes(), "frame_normalize_backward", "grad");
  const Tensor g = grad.to(x.scalar_type()).contiguous();
  Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  const int64_t n_tok = x.size(2), channels = x.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "frame_normalize_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    for_frame_blocks(x, [&](int64_t base, int64_t width) {
      float mean[CHANNEL_BLOCK], rstd[CHANNEL_BLOCK], mean_g[CHANNEL_BLOCK], mean_gx[CHANNEL_BLOCK];
      frame_stats(xp + base, n_tok, channels, width, static_cast<float>(eps), mean, rstd);
      for (const auto c : c10::irange(width)) mean_g[c] = mean_gx[c] = 0.0f;
      for (const auto t : c10::irange(n_tok)) {
        const int64_t row = base + t * channels;
        for (const auto c : c10::irange(width)) {
          const float gv = to_float(gp[row + c]);
          mean_g[c] += gv;
          mean_gx[c] += gv * (to_float(xp[row + c]) - mean[c]) * rstd[c];
        }
      }
      for (const auto c : c10::irange(width)) {
        mean_g[c] /= static_cast<float>(n_tok);
        mean_gx[c] /= static_cast<float>(n_tok);
      }
      for (const auto t : c10::irange(n_tok)) {
        const int64_t row = base + t * channels;
        for (const auto c : c10::irange(width)) {
          const float xhat = (to_float(xp[row + c]) - mean[c]) * rstd[c];
          dp[row + c] = static_cast<scalar_t>(rstd[c] * (to_float(gp[row + c]) - mean_g[c] - xhat * mean_gx[c]));
        }
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lookwhen_native, m) {
  m.def("score_tokens(Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor w1, Tensor b1, Tensor w2, "
        "Tensor b2, float eps) -> Tensor");
  m.def("score_tokens_backward(Tensor grad, Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor w1, "
        "Tensor b1, Tensor w2, Tensor b2, float eps) -> Tensor[]");
  m.def("nn_uniqueness(Tensor x, str metric) -> Tensor");
  m.def("frame_normalize(Tensor x, float eps) -> Tensor");
  m.def("frame_normalize_backward(Tensor grad, Tensor x, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(lookwhen_native, CPU, m) {
  m.impl("score_tokens", &score_tokens);
  m.impl("score_tokens_backward", &score_tokens_backward);
  m.impl("nn_uniqueness", &nn_uniqueness);
  m.impl("frame_normalize", &frame_normalize);
  m.impl("frame_normalize_backward", &frame_normalize_backward);
}

}  // namespace lookwhen_native
