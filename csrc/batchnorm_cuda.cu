// CUDA kernels of the row BatchNorm.
//
// Reductions (statistics, backward sums) run in two deterministic passes: blocks of 32 channels
// x 8 row-threads walk a slice of the rows (a warp reads 32 consecutive channels of one row),
// merge their 8 partials in shared memory, and write one partial per (block row, channel); a
// second kernel merges those partials per channel in a fixed order. Elementwise kernels use the
// same 32 x 8 blocks and keep the channel's parameters in registers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "cuda_utils.cuh"
#include "element_ops.h"
#include "kernels.h"

namespace ctssl {
namespace cuda {
namespace {

constexpr int kCh = 32;    // channels per block (threadIdx.x)
constexpr int kRows = 8;   // row-threads per block (threadIdx.y)

// ---- statistics -------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void welford_partial_kernel(const scalar_t* x, int64_t M, int64_t C, acc_t* part) {
  __shared__ acc_t sn[kRows][kCh], smu[kRows][kCh], sm2[kRows][kCh];
  const int64_t c = blockIdx.x * int64_t(kCh) + threadIdx.x;
  acc_t n = 0, mu = 0, m2 = 0;
  if (c < C) {
    for (int64_t r = blockIdx.y * int64_t(kRows) + threadIdx.y; r < M; r += int64_t(gridDim.y) * kRows) {
      welford_merge<acc_t>(n, mu, m2, acc_t(1), static_cast<acc_t>(x[r * C + c]), acc_t(0));
    }
  }
  sn[threadIdx.y][threadIdx.x] = n;
  smu[threadIdx.y][threadIdx.x] = mu;
  sm2[threadIdx.y][threadIdx.x] = m2;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int i = 1; i < kRows; ++i) welford_merge<acc_t>(n, mu, m2, sn[i][threadIdx.x], smu[i][threadIdx.x], sm2[i][threadIdx.x]);
    const int64_t G = gridDim.y, g = blockIdx.y;
    part[(0 * G + g) * C + c] = n;
    part[(1 * G + g) * C + c] = mu;
    part[(2 * G + g) * C + c] = m2;
  }
}

template <typename acc_t>
__global__ void welford_final_kernel(const acc_t* part, int64_t G, int64_t C, acc_t* mean, acc_t* var) {
  CTSSL_KERNEL_LOOP(c, C) {
    acc_t n = 0, mu = 0, m2 = 0;
    for (int64_t g = 0; g < G; ++g) welford_merge<acc_t>(n, mu, m2, part[g * C + c], part[(G + g) * C + c], part[(2 * G + g) * C + c]);
    mean[c] = mu;
    var[c] = n > acc_t(0) ? m2 / n : acc_t(0);
  }
}

// ---- backward sums ----------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void grad_partial_kernel(const scalar_t* dy, const scalar_t* y, const scalar_t* x, const acc_t* mean,
                                    const acc_t* invstd, int64_t act, int64_t M, int64_t C, acc_t* part) {
  __shared__ acc_t s1[kRows][kCh], s2[kRows][kCh];
  const int64_t c = blockIdx.x * int64_t(kCh) + threadIdx.x;
  acc_t a1 = 0, a2 = 0;
  if (c < C) {
    const acc_t mu = mean[c], is = invstd[c];
    for (int64_t r = blockIdx.y * int64_t(kRows) + threadIdx.y; r < M; r += int64_t(gridDim.y) * kRows) {
      const int64_t e = r * C + c;
      const acc_t dz = bn_grad_z<acc_t>(static_cast<acc_t>(dy[e]), y ? static_cast<acc_t>(y[e]) : acc_t(0), act);
      a1 += dz;
      a2 += dz * (static_cast<acc_t>(x[e]) - mu) * is;
    }
  }
  s1[threadIdx.y][threadIdx.x] = a1;
  s2[threadIdx.y][threadIdx.x] = a2;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int i = 1; i < kRows; ++i) {
      a1 += s1[i][threadIdx.x];
      a2 += s2[i][threadIdx.x];
    }
    const int64_t G = gridDim.y, g = blockIdx.y;
    part[g * C + c] = a1;
    part[(G + g) * C + c] = a2;
  }
}

template <typename acc_t>
__global__ void sum_final_kernel(const acc_t* part, int64_t G, int64_t C, acc_t* sum1, acc_t* sum2) {
  CTSSL_KERNEL_LOOP(c, C) {
    acc_t a1 = 0, a2 = 0;
    for (int64_t g = 0; g < G; ++g) {
      a1 += part[g * C + c];
      a2 += part[(G + g) * C + c];
    }
    sum1[c] = a1;
    sum2[c] = a2;
  }
}

// ---- elementwise ------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void bn_apply_kernel(const scalar_t* x, const acc_t* mean, const acc_t* invstd, const acc_t* weight,
                                const acc_t* bias, const scalar_t* residual, int64_t act, int64_t M, int64_t C,
                                scalar_t* out) {
  const int64_t c = blockIdx.x * int64_t(kCh) + threadIdx.x;
  if (c >= C) return;
  const acc_t mu = mean[c], is = invstd[c], w = weight ? weight[c] : acc_t(1), b = bias ? bias[c] : acc_t(0);
  for (int64_t r = blockIdx.y * int64_t(kRows) + threadIdx.y; r < M; r += int64_t(gridDim.y) * kRows) {
    const int64_t e = r * C + c;
    out[e] = static_cast<scalar_t>(bn_forward_element<acc_t>(static_cast<acc_t>(x[e]), mu, is, w, b,
                                                             residual ? static_cast<acc_t>(residual[e]) : acc_t(0), act));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bn_backward_apply_kernel(const scalar_t* dy, const scalar_t* y, const scalar_t* x, const acc_t* mean,
                                         const acc_t* invstd, const acc_t* weight, const acc_t* sum1, const acc_t* sum2,
                                         acc_t inv_count, bool batch_stats, int64_t act, int64_t M, int64_t C,
                                         scalar_t* dx, scalar_t* dz_out) {
  const int64_t c = blockIdx.x * int64_t(kCh) + threadIdx.x;
  if (c >= C) return;
  const acc_t mu = mean[c], is = invstd[c], w = weight ? weight[c] : acc_t(1);
  const acc_t m1 = sum1[c] * inv_count, m2 = sum2[c] * inv_count;
  for (int64_t r = blockIdx.y * int64_t(kRows) + threadIdx.y; r < M; r += int64_t(gridDim.y) * kRows) {
    const int64_t e = r * C + c;
    const acc_t dz = bn_grad_z<acc_t>(static_cast<acc_t>(dy[e]), y ? static_cast<acc_t>(y[e]) : acc_t(0), act);
    dx[e] = static_cast<scalar_t>(bn_grad_x<acc_t>(dz, static_cast<acc_t>(x[e]), mu, is, w, m1, m2, batch_stats));
    if (dz_out) dz_out[e] = static_cast<scalar_t>(dz);
  }
}

// Grid of a reduction: enough (channel block, row slice) blocks to fill the GPU a few times,
// with at least 16 rows per thread.
dim3 reduce_grid(const at::Tensor& rows) {
  const int64_t M = rows.size(0), C = rows.size(1);
  const int64_t gx = (C + kCh - 1) / kCh;
  const int64_t target = 4 * int64_t(multiprocessors(rows));
  const int64_t by_rows = std::max<int64_t>(1, (M + kRows * 16 - 1) / (kRows * 16));
  const int64_t gy = std::max<int64_t>(1, std::min<int64_t>({(target + gx - 1) / gx, by_rows, 65535}));
  return dim3(static_cast<unsigned int>(gx), static_cast<unsigned int>(gy));
}

dim3 elementwise_grid(const at::Tensor& rows) {
  const int64_t M = rows.size(0), C = rows.size(1);
  const int64_t gx = (C + kCh - 1) / kCh;
  const int64_t gy = std::max<int64_t>(1, std::min<int64_t>((M + kRows - 1) / kRows, 65535));
  return dim3(static_cast<unsigned int>(gx), static_cast<unsigned int>(gy));
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

void bn_stats(const at::Tensor& rows, at::Tensor& mean, at::Tensor& var) {
  const c10::cuda::CUDAGuard guard(rows.device());
  const int64_t M = rows.size(0), C = rows.size(1);
  const dim3 grid = reduce_grid(rows), block(kCh, kRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto part = at::empty({3, int64_t(grid.y), C}, mean.options());
    welford_partial_kernel<scalar_t, acc_t><<<grid, block, 0, stream()>>>(rows.data_ptr<scalar_t>(), M, C,
                                                                         part.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    welford_final_kernel<acc_t><<<blocks_for(C), kThreads, 0, stream()>>>(part.data_ptr<acc_t>(), grid.y, C,
                                                                          mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bn_apply(const at::Tensor& rows, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
              const at::Tensor& bias, const at::Tensor& residual, int64_t act, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(rows.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "bn_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bn_apply_kernel<scalar_t, acc_t><<<elementwise_grid(rows), dim3(kCh, kRows), 0, stream()>>>(
        rows.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), data_or_null<acc_t>(weight),
        data_or_null<acc_t>(bias), data_or_null<scalar_t>(residual), act, rows.size(0), rows.size(1),
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bn_backward_reduce(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& rows, const at::Tensor& mean,
                        const at::Tensor& invstd, int64_t act, at::Tensor& sum_dz, at::Tensor& sum_dz_xhat) {
  const c10::cuda::CUDAGuard guard(rows.device());
  const int64_t M = rows.size(0), C = rows.size(1);
  const dim3 grid = reduce_grid(rows), block(kCh, kRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "bn_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto part = at::empty({2, int64_t(grid.y), C}, sum_dz.options());
    grad_partial_kernel<scalar_t, acc_t><<<grid, block, 0, stream()>>>(
        grad_y.data_ptr<scalar_t>(), data_or_null<scalar_t>(y), rows.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(),
        invstd.data_ptr<acc_t>(), act, M, C, part.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_final_kernel<acc_t><<<blocks_for(C), kThreads, 0, stream()>>>(part.data_ptr<acc_t>(), grid.y, C,
                                                                      sum_dz.data_ptr<acc_t>(),
                                                                      sum_dz_xhat.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bn_backward_apply(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& rows, const at::Tensor& mean,
                       const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& sum_dz,
                       const at::Tensor& sum_dz_xhat, double count, bool batch_stats, int64_t act, at::Tensor& grad_rows,
                       at::Tensor& grad_z) {
  const c10::cuda::CUDAGuard guard(rows.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "bn_backward_apply_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_count = count > 0 ? acc_t(1.0 / count) : acc_t(0);
    bn_backward_apply_kernel<scalar_t, acc_t><<<elementwise_grid(rows), dim3(kCh, kRows), 0, stream()>>>(
        grad_y.data_ptr<scalar_t>(), data_or_null<scalar_t>(y), rows.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(),
        invstd.data_ptr<acc_t>(), data_or_null<acc_t>(weight), sum_dz.data_ptr<acc_t>(), sum_dz_xhat.data_ptr<acc_t>(),
        inv_count, batch_stats, act, rows.size(0), rows.size(1), grad_rows.data_ptr<scalar_t>(),
        data_or_null<scalar_t>(grad_z));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace ctssl
