// CUDA kernels of patch_tables (slots from a prefix sum of the mask, then the radius-1 neighbour
// table) and of neighbour_table (the table of any radius).
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>

#include "cuda_utils.cuh"
#include "index_math.h"
#include "kernels.h"

namespace ctssl {
namespace cuda {
namespace {

// Slot of every grid position from the inclusive prefix sum; slots >= N (a mask with more
// visible patches than the caller said) are marked inactive so no kernel reads past the rows.
__global__ void slot_kernel(const bool* active, const int32_t* csum, int64_t total, int64_t N, int32_t* slot,
                            int64_t* patch_ids) {
  CTSSL_KERNEL_LOOP(f, total) {
    const int64_t s = int64_t(csum[f]) - 1;
    if (active[f] && s < N) {
      slot[f] = static_cast<int32_t>(s);
      patch_ids[s] = f;
    } else {
      slot[f] = kInactive;
    }
  }
}

// Entry (n, oy + r, ox + r) of the radius-r table: one thread each.
__global__ void neighbour_kernel(const int32_t* slot, const int64_t* patch_ids, int64_t N, int64_t r, int64_t h,
                                 int64_t w, int32_t* nbr) {
  const int64_t S = 2 * r + 1;
  CTSSL_KERNEL_LOOP(e, N * S * S) {
    const int64_t n = e / (S * S), d = e % (S * S);
    const GridPos g = grid_pos(patch_ids[n], h, w);
    nbr[e] = neighbour_entry(slot, g.b, g.i, g.j, d / S - r, d % S - r, h, w);
  }
}

}  // namespace

void patch_tables(const at::Tensor& active, at::Tensor& slot, at::Tensor& patch_ids, at::Tensor& neighbours) {
  const c10::cuda::CUDAGuard guard(active.device());
  const int64_t total = active.numel(), N = patch_ids.size(0);
  if (total == 0) return;
  // patch_ids of a mask with fewer visible patches than N stay defined (they are never read as slots)
  if (N > 0) patch_ids.zero_();
  const at::Tensor csum = at::cumsum(active.reshape({-1}), 0, at::kInt);
  slot_kernel<<<blocks_for(total), kThreads, 0, stream()>>>(active.data_ptr<bool>(), csum.data_ptr<int32_t>(), total,
                                                           N, slot.data_ptr<int32_t>(), patch_ids.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (N == 0) return;
  neighbour_table(slot, patch_ids, 1, neighbours);
}

void neighbour_table(const at::Tensor& slot, const at::Tensor& patch_ids, int64_t r, at::Tensor& neighbours) {
  const c10::cuda::CUDAGuard guard(slot.device());
  const int64_t N = patch_ids.size(0), S = 2 * r + 1;
  if (N == 0) return;
  neighbour_kernel<<<blocks_for(N * S * S), kThreads, 0, stream()>>>(slot.data_ptr<int32_t>(),
                                                                    patch_ids.data_ptr<int64_t>(), N, r, slot.size(1),
                                                                    slot.size(2), neighbours.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace ctssl
