// CUDA kernels of the halo gather (a byte copy in 2..16-byte units, zero where masked or
// outside) and of its adjoint (a gather over each pixel's <= (2r+1)^2 halo copies, no atomics), for a
// neighbour table of any radius r.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "checks.h"
#include "cuda_utils.cuh"
#include "element_ops.h"
#include "kernels.h"

namespace ctssl {
namespace cuda {
namespace {

template <typename U>
__device__ __forceinline__ U zero_unit() {
  return U(0);
}
template <>
__device__ __forceinline__ uint4 zero_unit<uint4>() {
  return make_uint4(0, 0, 0, 0);
}

// out (N, P, P, Cu) in copy units U; rows (N * p * p, Cu).
template <typename U>
__global__ void halo_gather_kernel(const U* rows, const int32_t* nbr, int64_t N, int64_t p, int64_t r, int64_t halo,
                                   int64_t Cu, U* out) {
  const int64_t P = halo_side(p, halo);
  const int64_t total = N * P * P * Cu;
  CTSSL_KERNEL_LOOP(e, total) {
    const int64_t u = e % Cu;
    const int64_t pix = e / Cu;
    const int64_t X = pix % P, Y = (pix / P) % P, n = pix / (P * P);
    const int64_t src = halo_source_row(nbr, n, N, p, r, halo, Y, X);
    out[e] = src >= 0 ? rows[src * Cu + u] : zero_unit<U>();
  }
}

template <typename U>
void launch_gather(const at::Tensor& rows, const at::Tensor& nbr, int64_t p, int64_t halo, at::Tensor& out) {
  const int64_t N = nbr.size(0), P = halo_side(p, halo);
  const int64_t Cu = rows.size(1) * rows.element_size() / static_cast<int64_t>(sizeof(U));
  halo_gather_kernel<U><<<blocks_for(N * P * P * Cu), kThreads, 0, stream()>>>(
      static_cast<const U*>(rows.data_ptr()), nbr.data_ptr<int32_t>(), N, p, table_radius(nbr), halo, Cu,
      static_cast<U*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
__global__ void halo_scatter_kernel(const scalar_t* grad_halo, const int32_t* nbr, int64_t N, int64_t p, int64_t r,
                                    int64_t halo, int64_t C, scalar_t* grad_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = N * p * p * C;
  CTSSL_KERNEL_LOOP(e, total) {
    const int64_t c = e % C, r = e / C;
    const int64_t x = r % p, y = (r / p) % p, n = r / (p * p);
    grad_rows[e] = static_cast<scalar_t>(halo_adjoint<acc_t>(grad_halo, nbr, N, p, r, halo, C, n, y, x, c));
  }
}

// Widest copy unit that divides a row's bytes and both buffers' alignment.
int copy_unit(const at::Tensor& rows, const at::Tensor& out) {
  const int64_t bytes = rows.size(1) * rows.element_size();
  const auto a = reinterpret_cast<uintptr_t>(rows.data_ptr()) | reinterpret_cast<uintptr_t>(out.data_ptr());
  for (int unit : {16, 8, 4}) {
    if (bytes % unit == 0 && a % unit == 0) return unit;
  }
  return 2;
}

}  // namespace

void halo_gather(const at::Tensor& rows, const at::Tensor& nbr, int64_t p, int64_t halo, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(rows.device());
  switch (copy_unit(rows, out)) {
    case 16:
      launch_gather<uint4>(rows, nbr, p, halo, out);
      break;
    case 8:
      launch_gather<uint64_t>(rows, nbr, p, halo, out);
      break;
    case 4:
      launch_gather<uint32_t>(rows, nbr, p, halo, out);
      break;
    default:
      launch_gather<uint16_t>(rows, nbr, p, halo, out);
  }
}

void halo_scatter(const at::Tensor& grad_halo, const at::Tensor& nbr, int64_t p, int64_t halo, at::Tensor& grad_rows) {
  const c10::cuda::CUDAGuard guard(grad_halo.device());
  const int64_t N = nbr.size(0), C = grad_rows.size(1), r = table_radius(nbr);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_halo.scalar_type(), "halo_scatter_cuda", [&] {
    halo_scatter_kernel<scalar_t><<<blocks_for(grad_rows.numel()), kThreads, 0, stream()>>>(
        grad_halo.data_ptr<scalar_t>(), nbr.data_ptr<int32_t>(), N, p, r, halo, C, grad_rows.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace ctssl
