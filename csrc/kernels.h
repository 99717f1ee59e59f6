// The kernels behind every op, one CPU loop and one CUDA launcher each, with identical
// signatures. Entry points (the *.cpp files of each op family) check the arguments,
// allocate the outputs, and call cpu:: or cuda:: by the device of the main input; the
// kernels may assume checked, contiguous inputs.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace ctssl {

#define CTSSL_DECLARE_KERNELS                                                                                  \
  /* tables: slot (B,h,w) int32, patch_ids (N,) int64, neighbours (N,3,3) int32 from active (B,h,w) bool */    \
  void patch_tables(const at::Tensor& active, at::Tensor& slot, at::Tensor& patch_ids, at::Tensor& neighbours);  \
  /* neighbours (N, 2r+1, 2r+1) int32 of radius r from slot (B,h,w) and patch_ids (N,) */                      \
  void neighbour_table(const at::Tensor& slot, const at::Tensor& patch_ids, int64_t r, at::Tensor& neighbours);  \
  /* layout */                                                                                                 \
  void pack_patches(const at::Tensor& images, const at::Tensor& patch_ids, int64_t h, int64_t w, int64_t p,   \
                    at::Tensor& rows);                                                                         \
  void densify(const at::Tensor& rows, const at::Tensor& slot, int64_t p, const at::Tensor& token,             \
               at::Tensor& dense);                                                                             \
  /* halo gather and its adjoint (nbr of any radius) */                                                       \
  void halo_gather(const at::Tensor& rows, const at::Tensor& nbr, int64_t p, int64_t halo, at::Tensor& out);    \
  void halo_scatter(const at::Tensor& grad_halo, const at::Tensor& nbr, int64_t p, int64_t halo,               \
                    at::Tensor& grad_rows);                                                                    \
  /* batch norm (mean, invstd, weight, bias, sums: accumulation dtype, weight/bias may be undefined) */         \
  void bn_stats(const at::Tensor& rows, at::Tensor& mean, at::Tensor& var);                                    \
  void bn_apply(const at::Tensor& rows, const at::Tensor& mean, const at::Tensor& invstd,                      \
                const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& residual, int64_t act,      \
                at::Tensor& out);                                                                              \
  void bn_backward_reduce(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& rows,              \
                          const at::Tensor& mean, const at::Tensor& invstd, int64_t act, at::Tensor& sum_dz,   \
                          at::Tensor& sum_dz_xhat);                                                            \
  void bn_backward_apply(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& rows,               \
                         const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,           \
                         const at::Tensor& sum_dz, const at::Tensor& sum_dz_xhat, double count,                \
                         bool batch_stats, int64_t act, at::Tensor& grad_rows, at::Tensor& grad_z);            \
  /* max pool: argmax holds the winning tap (ky * k + kx) as int8 */                                           \
  void max_pool2d(const at::Tensor& rows, const at::Tensor& nbr, int64_t p, int64_t k, int64_t s, int64_t pad,  \
                  at::Tensor& out, at::Tensor& argmax);                                                        \
  void max_pool2d_backward(const at::Tensor& grad_out, const at::Tensor& argmax, const at::Tensor& nbr,         \
                           int64_t p, int64_t k, int64_t s, int64_t pad, at::Tensor& grad_rows);

namespace cpu {
CTSSL_DECLARE_KERNELS
}  // namespace cpu

namespace cuda {
CTSSL_DECLARE_KERNELS
}  // namespace cuda

#undef CTSSL_DECLARE_KERNELS

// Pick the implementation by device; every entry point calls kernels through this.
#define CTSSL_ON_DEVICE(tensor, fn, ...)  \
  do {                                    \
    if ((tensor).is_cuda()) {             \
      ::ctssl::cuda::fn(__VA_ARGS__);     \
    } else {                              \
      ::ctssl::cpu::fn(__VA_ARGS__);      \
    }                                     \
  } while (0)

}  // namespace ctssl
