// CUDA kernels of the masked max pool: one thread per output (forward) or input (backward)
// element, channel fastest so that a warp reads consecutive channels of one pixel.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "cuda_utils.cuh"
#include "element_ops.h"
#include "kernels.h"

namespace ctssl {
namespace cuda {
namespace {

template <typename scalar_t>
__global__ void max_pool_kernel(const scalar_t* rows, const int32_t* nbr, int64_t N, int64_t p, int64_t k, int64_t s,
                                int64_t pad, int64_t C, scalar_t* out, int8_t* argmax) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t q = p / s, total = N * q * q * C;
  CTSSL_KERNEL_LOOP(e, total) {
    const int64_t c = e % C, r = e / C;
    const int64_t ox = r % q, oy = (r / q) % q, n = r / (q * q);
    int8_t arg;
    out[e] = static_cast<scalar_t>(max_pool_window<acc_t>(rows, nbr, N, p, k, s, pad, C, n, oy, ox, c, &arg));
    argmax[e] = arg;
  }
}

template <typename scalar_t>
__global__ void max_pool_backward_kernel(const scalar_t* grad_out, const int8_t* argmax, const int32_t* nbr, int64_t N,
                                         int64_t p, int64_t k, int64_t s, int64_t pad, int64_t C, scalar_t* grad_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = N * p * p * C;
  CTSSL_KERNEL_LOOP(e, total) {
    const int64_t c = e % C, r = e / C;
    const int64_t x = r % p, y = (r / p) % p, n = r / (p * p);
    grad_rows[e] = static_cast<scalar_t>(max_pool_input_grad<acc_t>(grad_out, argmax, nbr, N, p, k, s, pad, C, n, y, x, c));
  }
}

}  // namespace

void max_pool2d(const at::Tensor& rows, const at::Tensor& nbr, int64_t p, int64_t k, int64_t s, int64_t pad,
                at::Tensor& out, at::Tensor& argmax) {
  const c10::cuda::CUDAGuard guard(rows.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "max_pool2d_cuda", [&] {
    max_pool_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, stream()>>>(
        rows.data_ptr<scalar_t>(), nbr.data_ptr<int32_t>(), nbr.size(0), p, k, s, pad, rows.size(1),
        out.data_ptr<scalar_t>(), argmax.data_ptr<int8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void max_pool2d_backward(const at::Tensor& grad_out, const at::Tensor& argmax, const at::Tensor& nbr, int64_t p,
                         int64_t k, int64_t s, int64_t pad, at::Tensor& grad_rows) {
  const c10::cuda::CUDAGuard guard(grad_out.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "max_pool2d_backward_cuda", [&] {
    max_pool_backward_kernel<scalar_t><<<blocks_for(grad_rows.numel()), kThreads, 0, stream()>>>(
        grad_out.data_ptr<scalar_t>(), argmax.data_ptr<int8_t>(), nbr.data_ptr<int32_t>(), nbr.size(0), p, k, s, pad,
        grad_rows.size(1), grad_rows.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace ctssl
