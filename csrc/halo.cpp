// Halo gather, its adjoint, and the masked convolution built on them (entry points, CPU loops,
// registration).
//
// masked_conv2d: a k x k conv gathers every visible patch with a ring of `padding` pixels read
// from its neighbours (masked neighbours and the image border read 0) and runs the framework's
// conv (cuDNN on the GPU) with padding 0 on the (N, C, P, P) channels-last buffer; a 1x1 conv
// without padding is a GEMM on the rows (cuBLAS). The backward recomputes the halo instead of
// saving it, runs the framework's conv backward, and folds the halo gradient back onto the rows
// with halo_scatter (a gather over the <= 9 copies of each pixel: no atomics, deterministic).
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <array>
#include <cstring>

#include "checks.h"
#include "element_ops.h"
#include "index_math.h"
#include "kernels.h"

namespace ctssl {
namespace cpu {

void halo_gather(const at::Tensor& rows, const at::Tensor& nbr, int64_t p, int64_t halo, at::Tensor& out) {
  const int64_t N = nbr.size(0), C = rows.size(1), P = halo_side(p, halo), r = table_radius(nbr);
  const int64_t bytes = C * rows.element_size();
  const char* in = static_cast<const char*>(rows.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int32_t* table = nbr.data_ptr<int32_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t Y = 0; Y < P; ++Y)
      for (int64_t X = 0; X < P; ++X, dst += bytes) {
        const int64_t src = halo_source_row(table, n, N, p, r, halo, Y, X);
        if (src >= 0) {
          std::memcpy(dst, in + src * bytes, bytes);
        } else {
          std::memset(dst, 0, bytes);  // all-zero bytes are 0 in every float format
        }
      }
}

void halo_scatter(const at::Tensor& grad_halo, const at::Tensor& nbr, int64_t p, int64_t halo, at::Tensor& grad_rows) {
  const int64_t N = nbr.size(0), C = grad_rows.size(1), r = table_radius(nbr);
  const int32_t* table = nbr.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_halo.scalar_type(), "halo_scatter_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gh = grad_halo.data_ptr<scalar_t>();
    scalar_t* out = grad_rows.data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t y = 0; y < p; ++y)
        for (int64_t x = 0; x < p; ++x)
          for (int64_t c = 0; c < C; ++c)
            out[((n * p + y) * p + x) * C + c] =
                static_cast<scalar_t>(halo_adjoint<acc_t>(gh, table, N, p, r, halo, C, n, y, x, c));
  });
}

}  // namespace cpu

namespace {

void check_halo(int64_t p, int64_t halo, int64_t r, const char* op) {
  check_patch_side(p, op);
  TORCH_CHECK(halo >= 0 && halo <= r * p, "ctssl.", op, ": halo (padding) must be in [0, radius * patch_side = ", r,
              " * ", p, "]: a neighbour table of radius ", r, " reads patches up to ", r,
              " away (pass the table of radius ceil(halo / patch_side)); got ", halo);
}

// CPU only (a GPU check would sync): every table entry is a slot < N or -1/-2.
void check_table_values(const at::Tensor& nbr, const char* op) {
  if (nbr.is_cuda() || nbr.numel() == 0) return;
  const int64_t lo = nbr.min().item<int64_t>(), hi = nbr.max().item<int64_t>();
  TORCH_CHECK(lo >= kOutside && hi < nbr.size(0), "ctssl.", op, ": argument 'neighbours' must hold slots in [0, ",
              nbr.size(0), ") or -1 (masked) / -2 (outside), got values in [", lo, ", ", hi, "]");
}

at::Tensor gather(const at::Tensor& rows, const at::Tensor& nbr, int64_t p, int64_t halo) {
  const int64_t N = nbr.size(0), P = halo_side(p, halo);
  auto out = at::empty({N, P, P, rows.size(1)}, rows.options());
  if (out.numel() > 0) CTSSL_ON_DEVICE(rows, halo_gather, rows, nbr, p, halo, out);
  return out;
}

at::Tensor scatter(const at::Tensor& grad_halo, const at::Tensor& nbr, int64_t p, int64_t halo) {
  auto out = at::empty({nbr.size(0) * p * p, grad_halo.size(3)}, grad_halo.options());
  if (out.numel() > 0) CTSSL_ON_DEVICE(grad_halo, halo_scatter, grad_halo, nbr, p, halo, out);
  return out;
}

at::Tensor halo_gather_entry(const at::Tensor& rows, const at::Tensor& nbr, int64_t patch_side, int64_t halo) {
  const char* op = "halo_gather";
  check_rows(rows, op, "rows");
  const int64_t r = check_neighbours(nbr, rows, op, "rows");
  check_halo(patch_side, halo, r, op);
  check_rows_match_table(rows, nbr.size(0), patch_side, op, "rows");
  check_table_values(nbr, op);
  return gather(rows, nbr, patch_side, halo);
}

at::Tensor halo_scatter_entry(const at::Tensor& grad_halo, const at::Tensor& nbr, int64_t patch_side, int64_t halo) {
  const char* op = "halo_scatter";
  check_defined(grad_halo, op, "grad_halo");
  check_dim(grad_halo, 4, op, "grad_halo", "(N, P, P, C)");
  check_float_storage(grad_halo, op, "grad_halo");
  check_contiguous(grad_halo, op, "grad_halo");
  const int64_t r = check_neighbours(nbr, grad_halo, op, "grad_halo");
  check_halo(patch_side, halo, r, op);
  const int64_t P = halo_side(patch_side, halo);
  TORCH_CHECK(grad_halo.size(0) == nbr.size(0) && grad_halo.size(1) == P && grad_halo.size(2) == P,
              "ctssl.halo_scatter: argument 'grad_halo' must have shape (", nbr.size(0), ", ", P, ", ", P,
              ", C) for ", nbr.size(0), " patches of side ", patch_side, " with halo ", halo, ", got ",
              grad_halo.sizes());
  check_table_values(nbr, op);
  return scatter(grad_halo, nbr, patch_side, halo);
}

// ---- masked conv ------------------------------------------------------------------------------

struct ConvGeometry {
  int64_t N, p, q, C, Cout, k, s, pad, d, groups;
  bool gemm;  // 1x1, no padding, one group: a matmul on (subsampled) rows
};

ConvGeometry check_conv(const at::Tensor& rows, const at::Tensor& nbr, const at::Tensor& weight, int64_t p, int64_t s,
                        int64_t pad, int64_t d, int64_t groups, const char* op) {
  check_rows(rows, op, "rows");
  const int64_t r = check_neighbours(nbr, rows, op, "rows");
  check_patch_side(p, op);
  check_rows_match_table(rows, nbr.size(0), p, op, "rows");
  check_defined(weight, op, "weight");
  check_device(weight, rows, op, "weight", "rows");
  check_dtype(weight, rows.scalar_type(), op, "weight");
  check_dim(weight, 4, op, "weight", "(C_out, C_in / groups, k, k)");
  TORCH_CHECK(weight.size(2) == weight.size(3), "ctssl.", op, ": argument 'weight' must have a square kernel, got ",
              weight.sizes());
  TORCH_CHECK(groups >= 1 && rows.size(1) % groups == 0 && weight.size(0) % groups == 0 &&
                  weight.size(1) * groups == rows.size(1),
              "ctssl.", op, ": argument 'weight' ", weight.sizes(), " with groups=", groups, " does not match ",
              rows.size(1), " input channels");
  TORCH_CHECK(s >= 1 && d >= 1 && pad >= 0, "ctssl.", op, ": stride and dilation must be >= 1 and padding >= 0, got ",
              s, ", ", d, ", ", pad);
  check_halo(p, pad, r, op);
  const int64_t k = weight.size(2);
  const int64_t out = (p + 2 * pad - d * (k - 1) - 1) / s + 1;
  TORCH_CHECK(p % s == 0 && out == p / s, "ctssl.", op, ": kernel ", k, ", stride ", s, ", padding ", pad,
              ", dilation ", d, " does not map a patch of side ", p, " onto side p / stride");
  check_table_values(nbr, op);
  ConvGeometry g{nbr.size(0), p, p / s, rows.size(1), weight.size(0), k, s, pad, d, groups, false};
  g.gemm = k == 1 && pad == 0 && groups == 1;
  return g;
}

// (N, P, P, C) halo buffer (or the rows themselves when there is no halo) as an NCHW view.
at::Tensor conv_input(const at::Tensor& rows, const at::Tensor& nbr, const ConvGeometry& g) {
  const at::Tensor h = g.pad > 0 ? gather(rows, nbr, g.p, g.pad) : rows.view({g.N, g.p, g.p, g.C});
  return h.permute({0, 3, 1, 2});
}

// Rows of the pixels a strided 1x1 conv reads: (N * q * q, C).
at::Tensor strided_rows(const at::Tensor& rows, const ConvGeometry& g) {
  if (g.s == 1) return rows;
  return rows.view({g.N, g.p, g.p, g.C}).slice(1, 0, g.p, g.s).slice(2, 0, g.p, g.s).reshape({-1, g.C});
}

at::Tensor masked_conv2d_entry(const at::Tensor& rows, const at::Tensor& nbr, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias_opt, int64_t patch_side, int64_t stride,
                               int64_t padding, int64_t dilation, int64_t groups) {
  const char* op = "masked_conv2d";
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // storage dtype rules
  const ConvGeometry g = check_conv(rows, nbr, weight, patch_side, stride, padding, dilation, groups, op);
  at::Tensor bias;
  if (bias_opt.has_value() && bias_opt->defined()) {
    bias = *bias_opt;
    check_device(bias, rows, op, "bias", "rows");
    check_dtype(bias, rows.scalar_type(), op, "bias");
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == g.Cout, "ctssl.masked_conv2d: argument 'bias' must have shape (",
                g.Cout, ",), got ", bias.sizes());
  }
  if (g.N == 0) return at::zeros({0, g.Cout}, rows.options());
  if (g.gemm) {
    const at::Tensor w2 = weight.reshape({g.Cout, g.C});
    const at::Tensor x = strided_rows(rows, g);
    return bias.defined() ? at::addmm(bias, x, w2.t()) : at::mm(x, w2.t());
  }
  const at::Tensor y = at::convolution(conv_input(rows, nbr, g), weight, bias, {g.s, g.s}, {0, 0}, {g.d, g.d}, false,
                                       {0, 0}, g.groups);
  return y.permute({0, 2, 3, 1}).reshape({-1, g.Cout}).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_entry(
    const at::Tensor& grad_out, const at::Tensor& rows, const at::Tensor& nbr, const at::Tensor& weight,
    int64_t patch_side, int64_t stride, int64_t padding, int64_t dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const char* op = "masked_conv2d_backward";
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const ConvGeometry g = check_conv(rows, nbr, weight, patch_side, stride, padding, dilation, groups, op);
  check_rows(grad_out, op, "grad_out");
  check_device(grad_out, rows, op, "grad_out", "rows");
  check_dtype(grad_out, rows.scalar_type(), op, "grad_out");
  TORCH_CHECK(grad_out.size(0) == g.N * g.q * g.q && grad_out.size(1) == g.Cout,
              "ctssl.masked_conv2d_backward: argument 'grad_out' must have shape (", g.N * g.q * g.q, ", ", g.Cout,
              "), got ", grad_out.sizes());
  at::Tensor grad_rows, grad_weight, grad_bias;
  if (g.N == 0) {
    if (output_mask[0]) grad_rows = at::zeros_like(rows);
    if (output_mask[1]) grad_weight = at::zeros_like(weight);
    if (output_mask[2]) grad_bias = at::zeros({g.Cout}, rows.options());
    return {grad_rows, grad_weight, grad_bias};
  }
  if (g.gemm) {
    const at::Tensor w2 = weight.reshape({g.Cout, g.C});
    if (output_mask[0]) {
      const at::Tensor gx = at::mm(grad_out, w2);
      if (g.s == 1) {
        grad_rows = gx;
      } else {
        grad_rows = at::zeros_like(rows);
        grad_rows.view({g.N, g.p, g.p, g.C})
            .slice(1, 0, g.p, g.s)
            .slice(2, 0, g.p, g.s)
            .copy_(gx.view({g.N, g.q, g.q, g.C}));
      }
    }
    if (output_mask[1]) grad_weight = at::mm(grad_out.t(), strided_rows(rows, g)).reshape(weight.sizes());
    if (output_mask[2]) grad_bias = grad_out.sum(0);
    return {grad_rows, grad_weight, grad_bias};
  }
  const at::Tensor x = conv_input(rows, nbr, g);
  const at::Tensor go = grad_out.view({g.N, g.q, g.q, g.Cout}).permute({0, 3, 1, 2});
  const std::vector<int64_t> bias_sizes{g.Cout};
  auto grads = at::convolution_backward(go, x, weight, output_mask[2] ? at::OptionalIntArrayRef(bias_sizes) : c10::nullopt,
                                        {g.s, g.s}, {0, 0}, {g.d, g.d}, false, {0, 0}, g.groups, output_mask);
  if (output_mask[0]) {
    const at::Tensor gh = std::get<0>(grads).permute({0, 2, 3, 1}).contiguous();  // (N, P, P, C)
    grad_rows = g.pad > 0 ? scatter(gh, nbr, g.p, g.pad) : gh.view({-1, g.C});
  }
  // Some convolution_backward implementations (CPU mkldnn) compute grad_weight even when it was not
  // requested: return exactly what output_mask asks for, as the gemm path and the fake impl do.
  if (output_mask[1]) grad_weight = std::get<1>(grads);
  if (output_mask[2]) grad_bias = std::get<2>(grads);
  return {grad_rows, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(ctssl, CPU, m) {
  m.impl("halo_gather", TORCH_FN(halo_gather_entry));
  m.impl("halo_scatter", TORCH_FN(halo_scatter_entry));
  m.impl("masked_conv2d", TORCH_FN(masked_conv2d_entry));
  m.impl("masked_conv2d_backward", TORCH_FN(masked_conv2d_backward_entry));
}
TORCH_LIBRARY_IMPL(ctssl, CUDA, m) {
  m.impl("halo_gather", TORCH_FN(halo_gather_entry));
  m.impl("halo_scatter", TORCH_FN(halo_scatter_entry));
  m.impl("masked_conv2d", TORCH_FN(masked_conv2d_entry));
  m.impl("masked_conv2d_backward", TORCH_FN(masked_conv2d_backward_entry));
}

}  // namespace ctssl
