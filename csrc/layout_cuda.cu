// CUDA kernels of pack_patches and densify: one thread per element, the fastest-moving
// index chosen so that the dense side is read (or written) along contiguous memory.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>

#include "cuda_utils.cuh"
#include "index_math.h"
#include "kernels.h"

namespace ctssl {
namespace cuda {
namespace {

// x_fastest: (n, c, y, x) order, coalesced reads of NCHW images; else (n, y, x, c) for channels-last.
template <typename scalar_t, bool x_fastest>
__global__ void pack_kernel(const scalar_t* img, const int64_t* ids, int64_t N, int64_t C, int64_t p, int64_t h,
                            int64_t w, int64_t B, int64_t sB, int64_t sC, int64_t sH, int64_t sW, scalar_t* rows) {
  const int64_t total = N * C * p * p;
  CTSSL_KERNEL_LOOP(e, total) {
    int64_t n, c, y, x;
    if (x_fastest) {
      x = e % p;
      y = (e / p) % p;
      c = (e / (p * p)) % C;
      n = e / (p * p * C);
    } else {
      c = e % C;
      x = (e / C) % p;
      y = (e / (C * p)) % p;
      n = e / (C * p * p);
    }
    const int64_t id = ids[n];
    scalar_t v = scalar_t(0);
    if (id >= 0 && id < B * h * w) {  // guard: a bad id reads nothing
      const GridPos g = grid_pos(id, h, w);
      v = img[g.b * sB + c * sC + (g.i * p + y) * sH + (g.j * p + x) * sW];
    }
    rows[((n * p + y) * p + x) * C + c] = v;
  }
}

template <typename scalar_t>
__global__ void densify_kernel(const scalar_t* rows, const int32_t* slot, const scalar_t* token, int64_t N, int64_t B,
                               int64_t h, int64_t w, int64_t p, int64_t C, scalar_t* dense) {
  const int64_t W = w * p, H = h * p;
  const int64_t total = B * H * W * C;
  CTSSL_KERNEL_LOOP(e, total) {  // dense is channels-last: e = ((b * H + Y) * W + X) * C + c
    const int64_t c = e % C;
    const int64_t X = (e / C) % W;
    const int64_t Y = (e / (C * W)) % H;
    const int64_t b = e / (C * W * H);
    const int64_t n = slot[(b * h + Y / p) * w + X / p];
    scalar_t v = token != nullptr ? token[c] : scalar_t(0);
    if (n >= 0 && n < N) v = rows[((n * p + Y % p) * p + X % p) * C + c];
    dense[e] = v;
  }
}

}  // namespace

void pack_patches(const at::Tensor& images, const at::Tensor& patch_ids, int64_t h, int64_t w, int64_t p,
                  at::Tensor& rows) {
  const c10::cuda::CUDAGuard guard(images.device());
  const int64_t N = patch_ids.size(0), C = images.size(1), B = images.size(0);
  const int64_t total = N * C * p * p;
  const bool x_fastest = images.stride(3) == 1 && C > 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "pack_patches_cuda", [&] {
    const scalar_t* img = images.data_ptr<scalar_t>();
    const int64_t* ids = patch_ids.data_ptr<int64_t>();
    scalar_t* out = rows.data_ptr<scalar_t>();
    const int64_t sB = images.stride(0), sC = images.stride(1), sH = images.stride(2), sW = images.stride(3);
    if (x_fastest) {
      pack_kernel<scalar_t, true>
          <<<blocks_for(total), kThreads, 0, stream()>>>(img, ids, N, C, p, h, w, B, sB, sC, sH, sW, out);
    } else {
      pack_kernel<scalar_t, false>
          <<<blocks_for(total), kThreads, 0, stream()>>>(img, ids, N, C, p, h, w, B, sB, sC, sH, sW, out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void densify(const at::Tensor& rows, const at::Tensor& slot, int64_t p, const at::Tensor& token, at::Tensor& dense) {
  const c10::cuda::CUDAGuard guard(rows.device());
  const int64_t C = rows.size(1), N = rows.size(0) / (p * p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "densify_cuda", [&] {
    densify_kernel<scalar_t><<<blocks_for(dense.numel()), kThreads, 0, stream()>>>(
        rows.data_ptr<scalar_t>(), slot.data_ptr<int32_t>(), token.defined() ? token.data_ptr<scalar_t>() : nullptr, N,
        slot.size(0), slot.size(1), slot.size(2), p, C, dense.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace ctssl
