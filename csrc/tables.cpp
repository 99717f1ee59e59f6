// patch_tables: the slot map, the visible patch ids and the (N, 3, 3) neighbour table,
// built from the patch mask once per batch (entry point, CPU loop, registration).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "index_math.h"
#include "kernels.h"

namespace ctssl {
namespace cpu {

void patch_tables(const at::Tensor& active, at::Tensor& slot, at::Tensor& patch_ids, at::Tensor& neighbours) {
  const int64_t h = active.size(1), w = active.size(2), total = active.numel();
  const int64_t N = patch_ids.size(0);
  const bool* a = active.data_ptr<bool>();
  int32_t* s = slot.data_ptr<int32_t>();
  int64_t* ids = patch_ids.data_ptr<int64_t>();
  int32_t* nbr = neighbours.data_ptr<int32_t>();
  int64_t next = 0;
  for (int64_t f = 0; f < total; ++f) {
    if (a[f] && next < N) {
      s[f] = static_cast<int32_t>(next);
      ids[next++] = f;
    } else {
      s[f] = kInactive;
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    const GridPos g = grid_pos(ids[n], h, w);
    for (int d = 0; d < 9; ++d) nbr[n * 9 + d] = neighbour_entry(s, g.b, g.i, g.j, d / 3, d % 3, h, w);
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

}  // namespace

TORCH_LIBRARY_IMPL(ctssl, CPU, m) { m.impl("patch_tables", TORCH_FN(patch_tables_entry)); }
TORCH_LIBRARY_IMPL(ctssl, CUDA, m) { m.impl("patch_tables", TORCH_FN(patch_tables_entry)); }

}  // namespace ctssl
