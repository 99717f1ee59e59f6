// patch_tables: the slot map, the visible patch ids and the (N, 3, 3) neighbour table, built from
// the patch mask once per batch; neighbour_table: the (N, 2r+1, 2r+1) table of any radius r from
// the slot map and patch ids, once per batch and radius (entry points, CPU loops, registration).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "index_math.h"
#include "kernels.h"

namespace ctssl {
namespace cpu {

void patch_tables(const at::Tensor& active, at::Tensor& slot, at::Tensor& patch_ids, at::Tensor& neighbours) {
  const int64_t total = active.numel(), N = patch_ids.size(0);
  const bool* a = active.data_ptr<bool>();
  int32_t* s = slot.data_ptr<int32_t>();
  int64_t* ids = patch_ids.data_ptr<int64_t>();
  int64_t next = 0;
  for (int64_t f = 0; f < total; ++f) {
    if (a[f] && next < N) {
      s[f] = static_cast<int32_t>(next);
      ids[next++] = f;
    } else {
      s[f] = kInactive;
    }
  }
  neighbour_table(slot, patch_ids, 1, neighbours);
}

void neighbour_table(const at::Tensor& slot, const at::Tensor& patch_ids, int64_t r, at::Tensor& neighbours) {
  const int64_t h = slot.size(1), w = slot.size(2), N = patch_ids.size(0), S = 2 * r + 1;
  const int32_t* s = slot.data_ptr<int32_t>();
  const int64_t* ids = patch_ids.data_ptr<int64_t>();
  int32_t* nbr = neighbours.data_ptr<int32_t>();
  for (int64_t n = 0; n < N; ++n) {
    const GridPos g = grid_pos(ids[n], h, w);
    for (int64_t d = 0; d < S * S; ++d)
      nbr[n * S * S + d] = neighbour_entry(s, g.b, g.i, g.j, d / S - r, d % S - r, h, w);
  }
}

}  // namespace cpu

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_tables_entry(const at::Tensor& active, int64_t num_patches) {
  const char* op = "patch_tables";
  check_defined(active, op, "active");
  check_dtype(active, at::kBool, op, "active");
  check_dim(active, 3, op, "active", "(B, h, w)");
  TORCH_CHECK(num_patches >= 0 && num_patches <= active.numel(), "ctssl.patch_tables: argument 'num_patches' must be in [0, ",
              active.numel(), "], got ", num_patches);
  TORCH_CHECK(active.numel() < (int64_t(1) << 31), "ctssl.patch_tables: argument 'active' has more than 2^31 patches");
  const at::Tensor a = active.contiguous();
  if (!a.is_cuda()) {  // on the GPU this check would cost a device sync: the kernel guards instead
    const int64_t visible = a.sum().item<int64_t>();
    TORCH_CHECK(visible == num_patches, "ctssl.patch_tables: argument 'num_patches' is ", num_patches, " but 'active' has ",
                visible, " visible patches");
  }
  auto slot = at::empty(a.sizes(), a.options().dtype(at::kInt));
  auto ids = at::empty({num_patches}, a.options().dtype(at::kLong));
  auto nbr = at::empty({num_patches, 3, 3}, a.options().dtype(at::kInt));
  CTSSL_ON_DEVICE(a, patch_tables, a, slot, ids, nbr);
  return {slot, ids, nbr};
}

constexpr int64_t kMaxRadius = 64;  // a 129 x 129 table per patch: far beyond any window of a real network

at::Tensor neighbour_table_entry(const at::Tensor& slot, const at::Tensor& patch_ids, int64_t radius) {
  const char* op = "neighbour_table";
  check_defined(slot, op, "slot");
  check_dtype(slot, at::kInt, op, "slot");
  check_dim(slot, 3, op, "slot", "(B, h, w)");
  check_contiguous(slot, op, "slot");
  check_defined(patch_ids, op, "patch_ids");
  check_device(patch_ids, slot, op, "patch_ids", "slot");
  check_dtype(patch_ids, at::kLong, op, "patch_ids");
  check_dim(patch_ids, 1, op, "patch_ids", "(N,)");
  check_contiguous(patch_ids, op, "patch_ids");
  TORCH_CHECK(radius >= 0 && radius <= kMaxRadius, "ctssl.neighbour_table: argument 'radius' must be in [0, ",
              kMaxRadius, "], got ", radius);
  if (!slot.is_cuda() && patch_ids.numel() > 0) {  // on the GPU this check would cost a device sync
    const int64_t lo = patch_ids.min().item<int64_t>(), hi = patch_ids.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < slot.numel(), "ctssl.neighbour_table: argument 'patch_ids' must lie in [0, ",
                slot.numel(), ") (the positions of 'slot'), got values in [", lo, ", ", hi, "]");
  }
  const int64_t S = 2 * radius + 1;
  auto nbr = at::empty({patch_ids.size(0), S, S}, slot.options());
  if (nbr.numel() > 0) CTSSL_ON_DEVICE(slot, neighbour_table, slot, patch_ids, radius, nbr);
  return nbr;
}

}  // namespace

TORCH_LIBRARY_IMPL(ctssl, CPU, m) {
  m.impl("patch_tables", TORCH_FN(patch_tables_entry));
  m.impl("neighbour_table", TORCH_FN(neighbour_table_entry));
}
TORCH_LIBRARY_IMPL(ctssl, CUDA, m) {
  m.impl("patch_tables", TORCH_FN(patch_tables_entry));
  m.impl("neighbour_table", TORCH_FN(neighbour_table_entry));
}

}  // namespace ctssl
