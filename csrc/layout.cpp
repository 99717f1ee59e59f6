// Layout conversion between dense maps and packed rows (entry points, CPU loops, registration):
// pack_patches gathers the visible patches of an image batch; densify writes rows back into a
// dense (B, C, H, W) map (channels-last memory) with masked positions 0 or a per-channel token.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstring>

#include "checks.h"
#include "index_math.h"
#include "kernels.h"

namespace ctssl {
namespace cpu {

void pack_patches(const at::Tensor& images, const at::Tensor& patch_ids, int64_t h, int64_t w, int64_t p,
                  at::Tensor& rows) {
  const int64_t N = patch_ids.size(0), C = images.size(1);
  const int64_t sB = images.stride(0), sC = images.stride(1), sH = images.stride(2), sW = images.stride(3);
  const int64_t* ids = patch_ids.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "pack_patches_cpu", [&] {
    const scalar_t* img = images.data_ptr<scalar_t>();
    scalar_t* out = rows.data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n) {
      const GridPos g = grid_pos(ids[n], h, w);
      for (int64_t y = 0; y < p; ++y)
        for (int64_t x = 0; x < p; ++x)
          for (int64_t c = 0; c < C; ++c)
            out[((n * p + y) * p + x) * C + c] = img[g.b * sB + c * sC + (g.i * p + y) * sH + (g.j * p + x) * sW];
    }
  });
}

void densify(const at::Tensor& rows, const at::Tensor& slot, int64_t p, const at::Tensor& token, at::Tensor& dense) {
  const int64_t B = slot.size(0), h = slot.size(1), w = slot.size(2), C = rows.size(1);
  const int64_t H = h * p, W = w * p;
  const int32_t* s = slot.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "densify_cpu", [&] {
    const scalar_t* in = rows.data_ptr<scalar_t>();
    const scalar_t* tok = token.defined() ? token.data_ptr<scalar_t>() : nullptr;
    scalar_t* out = dense.data_ptr<scalar_t>();  // channels-last: (b, Y, X, c)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t Y = 0; Y < H; ++Y)
        for (int64_t X = 0; X < W; ++X) {
          const int64_t n = s[(b * h + Y / p) * w + X / p];
          scalar_t* dst = out + ((b * H + Y) * W + X) * C;
          if (n >= 0) {
            std::memcpy(dst, in + ((n * p + Y % p) * p + X % p) * C, C * sizeof(scalar_t));
          } else {
            for (int64_t c = 0; c < C; ++c) dst[c] = tok ? tok[c] : scalar_t(0);
          }
        }
  });
}

}  // namespace cpu

namespace {

at::Tensor pack_patches_entry(const at::Tensor& images, const at::Tensor& patch_ids, int64_t grid_h, int64_t grid_w) {
  const char* op = "pack_patches";
  check_defined(images, op, "images");
  check_dim(images, 4, op, "images", "(B, C, H, W)");
  check_float_storage(images, op, "images");
  check_defined(patch_ids, op, "patch_ids");
  check_device(patch_ids, images, op, "patch_ids", "images");
  check_dtype(patch_ids, at::kLong, op, "patch_ids");
  check_dim(patch_ids, 1, op, "patch_ids", "(N,)");
  check_contiguous(patch_ids, op, "patch_ids");
  TORCH_CHECK(grid_h >= 1 && grid_w >= 1, "ctssl.pack_patches: grid_h and grid_w must be positive, got ", grid_h, "x",
              grid_w);
  const int64_t B = images.size(0), H = images.size(2), W = images.size(3);
  TORCH_CHECK(H % grid_h == 0 && W % grid_w == 0 && H / grid_h == W / grid_w && H > 0,
              "ctssl.pack_patches: argument 'images' of size ", H, "x", W, " does not split into a ", grid_h, "x",
              grid_w, " grid of square patches");
  const int64_t p = H / grid_h, N = patch_ids.size(0);
  if (!images.is_cuda() && N > 0) {
    const int64_t lo = patch_ids.min().item<int64_t>(), hi = patch_ids.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < B * grid_h * grid_w, "ctssl.pack_patches: argument 'patch_ids' must lie in [0, ",
                B * grid_h * grid_w, "), got values in [", lo, ", ", hi, "]");
  }
  auto rows = at::empty({N * p * p, images.size(1)}, images.options().memory_format(at::MemoryFormat::Contiguous));
  if (rows.numel() > 0) CTSSL_ON_DEVICE(images, pack_patches, images, patch_ids, grid_h, grid_w, p, rows);
  return rows;
}

at::Tensor densify_entry(const at::Tensor& rows, const at::Tensor& slot, int64_t patch_side,
                         const c10::optional<at::Tensor>& token) {
  const char* op = "densify";
  check_rows(rows, op, "rows");
  check_patch_side(patch_side, op);
  check_defined(slot, op, "slot");
  check_device(slot, rows, op, "slot", "rows");
  check_dtype(slot, at::kInt, op, "slot");
  check_dim(slot, 3, op, "slot", "(B, h, w)");
  check_contiguous(slot, op, "slot");
  const int64_t p = patch_side, C = rows.size(1);
  TORCH_CHECK(rows.size(0) % (p * p) == 0, "ctssl.densify: argument 'rows' has ", rows.size(0),
              " rows, not a multiple of patch_side^2 = ", p * p);
  const int64_t N = rows.size(0) / (p * p);
  at::Tensor tok;
  if (token.has_value() && token->defined()) {
    tok = *token;
    check_device(tok, rows, op, "token", "rows");
    TORCH_CHECK(tok.dim() == 1 && tok.size(0) == C, "ctssl.densify: argument 'token' must have shape (", C, ",), got ",
                tok.sizes());
    check_dtype(tok, rows.scalar_type(), op, "token");
    check_contiguous(tok, op, "token");
  }
  if (!rows.is_cuda() && slot.numel() > 0) {
    const int64_t hi = slot.max().item<int64_t>();
    TORCH_CHECK(hi < N, "ctssl.densify: argument 'slot' refers to slot ", hi, " but 'rows' holds only ", N,
                " patches of side ", p);
  }
  auto dense = at::empty({slot.size(0), C, slot.size(1) * p, slot.size(2) * p},
                         rows.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (dense.numel() > 0) CTSSL_ON_DEVICE(rows, densify, rows, slot, p, tok, dense);
  return dense;
}

}  // namespace

TORCH_LIBRARY_IMPL(ctssl, CPU, m) {
  m.impl("pack_patches", TORCH_FN(pack_patches_entry));
  m.impl("densify", TORCH_FN(densify_entry));
}
TORCH_LIBRARY_IMPL(ctssl, CUDA, m) {
  m.impl("pack_patches", TORCH_FN(pack_patches_entry));
  m.impl("densify", TORCH_FN(densify_entry));
}

}  // namespace ctssl
