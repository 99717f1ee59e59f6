// Input checks shared by every C++ entry point: a clear message naming the op and the
// argument, raised before any kernel can read out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <string>

namespace ctssl {

inline void check_defined(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), "ctssl.", op, ": argument '", name, "' is undefined");
}

// Same device as the reference argument (the op's main input).
inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                         const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "ctssl.", op, ": argument '", name, "' is on ", t.device(),
              " but '", ref_name, "' is on ", ref.device(), "; move both to the same device");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name, const char* shape) {
  TORCH_CHECK(t.dim() == dim, "ctssl.", op, ": argument '", name, "' must have shape ", shape, ", got ",
              t.sizes());
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "ctssl.", op, ": argument '", name,
              "' must be contiguous (call .contiguous() first), got strides ", t.strides());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, "ctssl.", op, ": argument '", name, "' must have dtype ", dtype,
              ", got ", t.scalar_type());
}

inline void check_float_storage(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, "ctssl.", op,
              ": argument '", name, "' must be float32, float16, bfloat16 or float64, got ", s);
}

// Rows (M, C) of the packed layout: contiguous, floating, 2-D.
inline void check_rows(const at::Tensor& t, const char* op, const char* name) {
  check_defined(t, op, name);
  check_dim(t, 2, op, name, "(rows, channels)");
  check_float_storage(t, op, name);
  check_contiguous(t, op, name);
}

// Radius r of a checked (N, 2r+1, 2r+1) neighbour table.
inline int64_t table_radius(const at::Tensor& nbr) { return (nbr.size(1) - 1) / 2; }

// The (N, 2r+1, 2r+1) int32 neighbour table, on the rows' device; `radius` >= 0 demands that
// radius (an op whose windows read only the 3x3 neighbourhood: 1). Returns the table's radius.
inline int64_t check_neighbours(const at::Tensor& nbr, const at::Tensor& ref, const char* op, const char* ref_name,
                                int64_t radius = -1) {
  check_defined(nbr, op, "neighbours");
  check_device(nbr, ref, op, "neighbours", ref_name);
  check_dtype(nbr, at::kInt, op, "neighbours");
  if (radius >= 0) {
    const int64_t S = 2 * radius + 1;
    TORCH_CHECK(nbr.dim() == 3 && nbr.size(1) == S && nbr.size(2) == S, "ctssl.", op,
                ": argument 'neighbours' must have shape (N, ", S, ", ", S, ") (the table of radius ", radius,
                "), got ", nbr.sizes());
  } else {
    TORCH_CHECK(nbr.dim() == 3 && nbr.size(1) == nbr.size(2) && nbr.size(1) % 2 == 1, "ctssl.", op,
                ": argument 'neighbours' must have shape (N, 2r+1, 2r+1) (a neighbour table of radius r), got ",
                nbr.sizes());
  }
  check_contiguous(nbr, op, "neighbours");
  return table_radius(nbr);
}

// A tensor with exactly the same shape, dtype and device as `ref`, contiguous.
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  check_defined(t, op, name);
  check_device(t, ref, op, name, ref_name);
  TORCH_CHECK(t.sizes() == ref.sizes(), "ctssl.", op, ": argument '", name, "' must have the shape of '",
              ref_name, "' ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "ctssl.", op, ": argument '", name,
              "' must have the dtype of '", ref_name, "' (", ref.scalar_type(), "), got ", t.scalar_type());
  check_contiguous(t, op, name);
}

// A per-channel vector (C,) of any floating dtype on `ref`'s device.
inline void check_channel_vector(const at::Tensor& t, int64_t C, const at::Tensor& ref, const char* op,
                                 const char* name) {
  check_defined(t, op, name);
  check_device(t, ref, op, name, "rows");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "ctssl.", op, ": argument '", name, "' must have shape (", C,
              ",) to match the channels of 'rows', got ", t.sizes());
  check_float_storage(t, op, name);
}

inline void check_patch_side(int64_t p, const char* op) {
  TORCH_CHECK(p >= 1 && p <= 4096, "ctssl.", op, ": patch_side must be in [1, 4096], got ", p);
}

// rows.size(0) must equal N * p * p for the table's N.
inline void check_rows_match_table(const at::Tensor& rows, int64_t N, int64_t p, const char* op,
                                   const char* name) {
  TORCH_CHECK(rows.size(0) == N * p * p, "ctssl.", op, ": argument '", name, "' has ", rows.size(0),
              " rows but the neighbour table has ", N, " patches of side ", p, " (expected ", N * p * p, ")");
}

}  // namespace ctssl
