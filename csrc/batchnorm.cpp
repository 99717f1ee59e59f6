// BatchNorm over packed rows (entry points, CPU loops, registration).
//
// bn_stats: per-channel mean and biased variance (Welford, accumulation dtype).
// bn_apply: y = act((x - mean) * invstd * weight + bias + residual), act in {none, relu, relu6}.
// bn_backward_reduce: sum(dz), sum(dz * xhat) with dz = dy masked by the activation's derivative.
// bn_backward_apply: dx (batch or running statistics) and, if asked, dz (the residual's gradient).
// Statistics, parameters and sums are in the accumulation dtype (float32; float64 for float64).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "element_ops.h"
#include "kernels.h"

namespace ctssl {
namespace cpu {
namespace {

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

void bn_stats(const at::Tensor& rows, at::Tensor& mean, at::Tensor& var) {
  const int64_t M = rows.size(0), C = rows.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "bn_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = rows.data_ptr<scalar_t>();
    std::vector<acc_t> n(C, 0), mu(C, 0), m2(C, 0);
    for (int64_t r = 0; r < M; ++r)
      for (int64_t c = 0; c < C; ++c)  // Welford as one-element merges: the same rule the GPU combines with
        welford_merge<acc_t>(n[c], mu[c], m2[c], acc_t(1), static_cast<acc_t>(x[r * C + c]), acc_t(0));
    acc_t* mo = mean.data_ptr<acc_t>();
    acc_t* vo = var.data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      mo[c] = mu[c];
      vo[c] = n[c] > 0 ? m2[c] / n[c] : acc_t(0);
    }
  });
}

void bn_apply(const at::Tensor& rows, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
              const at::Tensor& bias, const at::Tensor& residual, int64_t act, at::Tensor& out) {
  const int64_t M = rows.size(0), C = rows.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "bn_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = rows.data_ptr<scalar_t>();
    const scalar_t* res = ptr_or_null<scalar_t>(residual);
    const acc_t *mu = mean.data_ptr<acc_t>(), *is = invstd.data_ptr<acc_t>();
    const acc_t *w = ptr_or_null<acc_t>(weight), *b = ptr_or_null<acc_t>(bias);
    scalar_t* y = out.data_ptr<scalar_t>();
    for (int64_t r = 0; r < M; ++r)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t e = r * C + c;
        y[e] = static_cast<scalar_t>(bn_forward_element<acc_t>(
            static_cast<acc_t>(x[e]), mu[c], is[c], w ? w[c] : acc_t(1), b ? b[c] : acc_t(0),
            res ? static_cast<acc_t>(res[e]) : acc_t(0), act));
      }
  });
}

void bn_backward_reduce(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& rows, const at::Tensor& mean,
                        const at::Tensor& invstd, int64_t act, at::Tensor& sum_dz, at::Tensor& sum_dz_xhat) {
  const int64_t M = rows.size(0), C = rows.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "bn_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *dy = grad_y.data_ptr<scalar_t>(), *x = rows.data_ptr<scalar_t>();
    const scalar_t* yo = ptr_or_null<scalar_t>(y);
    const acc_t *mu = mean.data_ptr<acc_t>(), *is = invstd.data_ptr<acc_t>();
    std::vector<acc_t> s1(C, 0), s2(C, 0);
    for (int64_t r = 0; r < M; ++r)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t e = r * C + c;
        const acc_t dz = bn_grad_z<acc_t>(static_cast<acc_t>(dy[e]), yo ? static_cast<acc_t>(yo[e]) : acc_t(0), act);
        s1[c] += dz;
        s2[c] += dz * (static_cast<acc_t>(x[e]) - mu[c]) * is[c];
      }
    for (int64_t c = 0; c < C; ++c) {
      sum_dz.data_ptr<acc_t>()[c] = s1[c];
      sum_dz_xhat.data_ptr<acc_t>()[c] = s2[c];
    }
  });
}

void bn_backward_apply(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& rows, const at::Tensor& mean,
                       const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& sum_dz,
                       const at::Tensor& sum_dz_xhat, double count, bool batch_stats, int64_t act, at::Tensor& grad_rows,
                       at::Tensor& grad_z) {
  const int64_t M = rows.size(0), C = rows.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "bn_backward_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *dy = grad_y.data_ptr<scalar_t>(), *x = rows.data_ptr<scalar_t>();
    const scalar_t* yo = ptr_or_null<scalar_t>(y);
    const acc_t *mu = mean.data_ptr<acc_t>(), *is = invstd.data_ptr<acc_t>(), *w = ptr_or_null<acc_t>(weight);
    const acc_t *s1 = sum_dz.data_ptr<acc_t>(), *s2 = sum_dz_xhat.data_ptr<acc_t>();
    scalar_t* dx = grad_rows.data_ptr<scalar_t>();
    scalar_t* dzo = grad_z.defined() ? grad_z.data_ptr<scalar_t>() : nullptr;
    const acc_t inv_count = count > 0 ? acc_t(1.0 / count) : acc_t(0);
    for (int64_t r = 0; r < M; ++r)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t e = r * C + c;
        const acc_t dz = bn_grad_z<acc_t>(static_cast<acc_t>(dy[e]), yo ? static_cast<acc_t>(yo[e]) : acc_t(0), act);
        dx[e] = static_cast<scalar_t>(bn_grad_x<acc_t>(dz, static_cast<acc_t>(x[e]), mu[c], is[c], w ? w[c] : acc_t(1),
                                                      s1[c] * inv_count, s2[c] * inv_count, batch_stats));
        if (dzo) dzo[e] = static_cast<scalar_t>(dz);
      }
  });
}

}  // namespace cpu

namespace {

at::ScalarType acc_dtype(const at::Tensor& rows) { return rows.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// A per-channel vector converted to the accumulation dtype (undefined stays undefined).
at::Tensor channel_param(const c10::optional<at::Tensor>& t, const at::Tensor& rows, const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_channel_vector(*t, rows.size(1), rows, op, name);
  return t->to(acc_dtype(rows)).contiguous();
}

at::Tensor channel_param(const at::Tensor& t, const at::Tensor& rows, const char* op, const char* name) {
  check_channel_vector(t, rows.size(1), rows, op, name);
  return t.to(acc_dtype(rows)).contiguous();
}

void check_activation(int64_t act, const char* op) {
  TORCH_CHECK(act == kNone || act == kReLU || act == kReLU6, "ctssl.", op,
              ": activation must be 0 (none), 1 (relu) or 2 (relu6), got ", act);
}

// The saved output y: required when an activation was fused (its derivative is read off y).
at::Tensor activation_output(const c10::optional<at::Tensor>& y, const at::Tensor& rows, int64_t act, const char* op) {
  if (act == kNone) return at::Tensor();
  TORCH_CHECK(y.has_value() && y->defined(), "ctssl.", op, ": argument 'y' (the forward output) is required with activation ",
              act);
  check_like(*y, rows, op, "y", "rows");
  return *y;
}

std::tuple<at::Tensor, at::Tensor> bn_stats_entry(const at::Tensor& rows) {
  check_rows(rows, "bn_stats", "rows");
  auto mean = at::zeros({rows.size(1)}, rows.options().dtype(acc_dtype(rows)));
  auto var = at::zeros({rows.size(1)}, rows.options().dtype(acc_dtype(rows)));
  if (rows.numel() > 0) CTSSL_ON_DEVICE(rows, bn_stats, rows, mean, var);
  return {mean, var};
}

at::Tensor bn_apply_entry(const at::Tensor& rows, const at::Tensor& mean, const at::Tensor& invstd,
                          const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& residual, int64_t activation) {
  const char* op = "bn_apply";
  check_rows(rows, op, "rows");
  check_activation(activation, op);
  const at::Tensor mu = channel_param(mean, rows, op, "mean"), is = channel_param(invstd, rows, op, "invstd");
  const at::Tensor w = channel_param(weight, rows, op, "weight"), b = channel_param(bias, rows, op, "bias");
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    res = *residual;
    check_like(res, rows, op, "residual", "rows");
  }
  auto out = at::empty_like(rows);
  if (rows.numel() > 0) CTSSL_ON_DEVICE(rows, bn_apply, rows, mu, is, w, b, res, activation, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_entry(const at::Tensor& grad_y, const c10::optional<at::Tensor>& y,
                                                            const at::Tensor& rows, const at::Tensor& mean,
                                                            const at::Tensor& invstd, int64_t activation) {
  const char* op = "bn_backward_reduce";
  check_rows(rows, op, "rows");
  check_activation(activation, op);
  check_like(grad_y, rows, op, "grad_y", "rows");
  const at::Tensor yo = activation_output(y, rows, activation, op);
  const at::Tensor mu = channel_param(mean, rows, op, "mean"), is = channel_param(invstd, rows, op, "invstd");
  auto sum_dz = at::zeros({rows.size(1)}, rows.options().dtype(acc_dtype(rows)));
  auto sum_dz_xhat = at::zeros({rows.size(1)}, rows.options().dtype(acc_dtype(rows)));
  if (rows.numel() > 0) CTSSL_ON_DEVICE(rows, bn_backward_reduce, grad_y, yo, rows, mu, is, activation, sum_dz, sum_dz_xhat);
  return {sum_dz, sum_dz_xhat};
}

std::tuple<at::Tensor, at::Tensor> bn_backward_apply_entry(const at::Tensor& grad_y, const c10::optional<at::Tensor>& y,
                                                           const at::Tensor& rows, const at::Tensor& mean,
                                                           const at::Tensor& invstd,
                                                           const c10::optional<at::Tensor>& weight,
                                                           const at::Tensor& sum_dz, const at::Tensor& sum_dz_xhat,
                                                           double count, bool batch_stats, int64_t activation,
                                                           bool need_grad_z) {
  const char* op = "bn_backward_apply";
  check_rows(rows, op, "rows");
  check_activation(activation, op);
  check_like(grad_y, rows, op, "grad_y", "rows");
  const at::Tensor yo = activation_output(y, rows, activation, op);
  const at::Tensor mu = channel_param(mean, rows, op, "mean"), is = channel_param(invstd, rows, op, "invstd");
  const at::Tensor w = channel_param(weight, rows, op, "weight");
  const at::Tensor s1 = channel_param(sum_dz, rows, op, "sum_dz"), s2 = channel_param(sum_dz_xhat, rows, op, "sum_dz_xhat");
  TORCH_CHECK(!batch_stats || count > 0 || rows.size(0) == 0, "ctssl.bn_backward_apply: argument 'count' must be > 0 ",
              "with batch statistics, got ", count);
  auto grad_rows = at::empty_like(rows);
  at::Tensor grad_z = need_grad_z ? at::empty_like(rows) : at::Tensor();
  if (rows.numel() > 0)
    CTSSL_ON_DEVICE(rows, bn_backward_apply, grad_y, yo, rows, mu, is, w, s1, s2, count, batch_stats, activation,
                    grad_rows, grad_z);
  return {grad_rows, grad_z};
}

}  // namespace

TORCH_LIBRARY_IMPL(ctssl, CPU, m) {
  m.impl("bn_stats", TORCH_FN(bn_stats_entry));
  m.impl("bn_apply", TORCH_FN(bn_apply_entry));
  m.impl("bn_backward_reduce", TORCH_FN(bn_backward_reduce_entry));
  m.impl("bn_backward_apply", TORCH_FN(bn_backward_apply_entry));
}
TORCH_LIBRARY_IMPL(ctssl, CUDA, m) {
  m.impl("bn_stats", TORCH_FN(bn_stats_entry));
  m.impl("bn_apply", TORCH_FN(bn_apply_entry));
  m.impl("bn_backward_reduce", TORCH_FN(bn_backward_reduce_entry));
  m.impl("bn_backward_apply", TORCH_FN(bn_backward_apply_entry));
}

}  // namespace ctssl
