// Masked max pooling on packed rows (entry points, CPU loops, registration): masked taps read 0,
// taps beyond the image are skipped (torch's -inf padding). The forward records the winning tap
// per element (int8), the backward gathers each input pixel's gradient from the windows it won.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "checks.h"
#include "element_ops.h"
#include "kernels.h"

namespace ctssl {
namespace cpu {

void max_pool2d(const at::Tensor& rows, const at::Tensor& nbr, int64_t p, int64_t k, int64_t s, int64_t pad,
                at::Tensor& out, at::Tensor& argmax) {
  const int64_t N = nbr.size(0), C = rows.size(1), q = p / s;
  const int32_t* table = nbr.data_ptr<int32_t>();
  int8_t* arg = argmax.data_ptr<int8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "max_pool2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = rows.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t oy = 0; oy < q; ++oy)
        for (int64_t ox = 0; ox < q; ++ox)
          for (int64_t c = 0; c < C; ++c) {
            const int64_t e = ((n * q + oy) * q + ox) * C + c;
            o[e] = static_cast<scalar_t>(max_pool_window<acc_t>(in, table, N, p, k, s, pad, C, n, oy, ox, c, arg + e));
          }
  });
}

void max_pool2d_backward(const at::Tensor& grad_out, const at::Tensor& argmax, const at::Tensor& nbr, int64_t p,
                         int64_t k, int64_t s, int64_t pad, at::Tensor& grad_rows) {
  const int64_t N = nbr.size(0), C = grad_rows.size(1);
  const int32_t* table = nbr.data_ptr<int32_t>();
  const int8_t* arg = argmax.data_ptr<int8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "max_pool2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    scalar_t* gr = grad_rows.data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t y = 0; y < p; ++y)
        for (int64_t x = 0; x < p; ++x)
          for (int64_t c = 0; c < C; ++c)
            gr[((n * p + y) * p + x) * C + c] =
                static_cast<scalar_t>(max_pool_input_grad<acc_t>(go, arg, table, N, p, k, s, pad, C, n, y, x, c));
  });
}

}  // namespace cpu

namespace {

int64_t check_pool(const at::Tensor& nbr, int64_t p, int64_t k, int64_t s, int64_t pad, const char* op) {
  check_patch_side(p, op);
  TORCH_CHECK(k >= 1 && k * k <= 127, "ctssl.", op, ": kernel_size must be in [1, 11], got ", k);
  TORCH_CHECK(s >= 1 && pad >= 0 && pad <= p && 2 * pad <= k, "ctssl.", op,
              ": need stride >= 1 and 0 <= padding <= min(kernel_size / 2, patch_side), got stride ", s,
              ", padding ", pad);
  TORCH_CHECK(p % s == 0 && (p + 2 * pad - k) / s + 1 == p / s && p + 2 * pad >= k, "ctssl.", op, ": kernel ", k,
              ", stride ", s, ", padding ", pad, " does not map a patch of side ", p, " onto side p / stride");
  if (!nbr.is_cuda() && nbr.numel() > 0) {
    const int64_t lo = nbr.min().item<int64_t>(), hi = nbr.max().item<int64_t>();
    TORCH_CHECK(lo >= kOutside && hi < nbr.size(0), "ctssl.", op, ": argument 'neighbours' must hold slots in [0, ",
                nbr.size(0), ") or -1 / -2, got values in [", lo, ", ", hi, "]");
  }
  return p / s;
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_entry(const at::Tensor& rows, const at::Tensor& nbr, int64_t patch_side,
                                                    int64_t kernel_size, int64_t stride, int64_t padding) {
  const char* op = "max_pool2d";
  check_rows(rows, op, "rows");
  check_neighbours(nbr, rows, op, "rows", 1);
  const int64_t q = check_pool(nbr, patch_side, kernel_size, stride, padding, op);
  check_rows_match_table(rows, nbr.size(0), patch_side, op, "rows");
  const int64_t M = nbr.size(0) * q * q;
  auto out = at::empty({M, rows.size(1)}, rows.options());
  auto argmax = at::empty({M, rows.size(1)}, rows.options().dtype(at::kChar));
  if (out.numel() > 0)
    CTSSL_ON_DEVICE(rows, max_pool2d, rows, nbr, patch_side, kernel_size, stride, padding, out, argmax);
  return {out, argmax};
}

at::Tensor max_pool2d_backward_entry(const at::Tensor& grad_out, const at::Tensor& argmax, const at::Tensor& nbr,
                                     int64_t patch_side, int64_t kernel_size, int64_t stride, int64_t padding) {
  const char* op = "max_pool2d_backward";
  check_rows(grad_out, op, "grad_out");
  check_neighbours(nbr, grad_out, op, "grad_out", 1);
  const int64_t q = check_pool(nbr, patch_side, kernel_size, stride, padding, op);
  check_defined(argmax, op, "argmax");
  check_device(argmax, grad_out, op, "argmax", "grad_out");
  check_dtype(argmax, at::kChar, op, "argmax");
  check_contiguous(argmax, op, "argmax");
  TORCH_CHECK(argmax.sizes() == grad_out.sizes(), "ctssl.max_pool2d_backward: argument 'argmax' must have the shape of ",
              "'grad_out' ", grad_out.sizes(), ", got ", argmax.sizes());
  TORCH_CHECK(grad_out.size(0) == nbr.size(0) * q * q, "ctssl.max_pool2d_backward: argument 'grad_out' has ",
              grad_out.size(0), " rows, expected ", nbr.size(0) * q * q, " (", nbr.size(0), " patches of side ", q, ")");
  auto grad_rows = at::empty({nbr.size(0) * patch_side * patch_side, grad_out.size(1)}, grad_out.options());
  if (grad_rows.numel() > 0)
    CTSSL_ON_DEVICE(grad_out, max_pool2d_backward, grad_out, argmax, nbr, patch_side, kernel_size, stride, padding,
                    grad_rows);
  return grad_rows;
}

}  // namespace

TORCH_LIBRARY_IMPL(ctssl, CPU, m) {
  m.impl("max_pool2d", TORCH_FN(max_pool2d_entry));
  m.impl("max_pool2d_backward", TORCH_FN(max_pool2d_backward_entry));
}
TORCH_LIBRARY_IMPL(ctssl, CUDA, m) {
  m.impl("max_pool2d", TORCH_FN(max_pool2d_entry));
  m.impl("max_pool2d_backward", TORCH_FN(max_pool2d_backward_entry));
}

}  // namespace ctssl
