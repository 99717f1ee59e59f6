// Index math of the packed patch layout, shared by the CPU loops and the CUDA kernels.
//
// Layout (design.md section 3): a feature map at patch side p is rows (N * p * p, C),
// channels last; slot n owns rows [n*p*p, (n+1)*p*p), row-major (y, x) inside the patch.
// The neighbour table of radius r, (N, S, S) int32 with S = 2r + 1, holds for patch n the slot
// of the patch at grid offset (oy, ox) in [-r, r]^2 at entry (oy + r, ox + r), or kInactive
// (masked: reads 0) or kOutside (beyond the image: reads the padding value). r = 1 is the 3x3
// table every 3x3 window reads; a 7x7 depthwise conv at 1-pixel patches reads r = 3. A "local
// coordinate" (ly, lx) is relative to patch n's top-left pixel and may reach r patches into
// any neighbour: -r*p <= ly, lx < (r+1)*p.
//
// Every kernel and every CPU loop goes through these functions, so the CPU tests of the
// loops also test the index math the GPU runs.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define CTSSL_HD __host__ __device__ __forceinline__
#else
#define CTSSL_HD inline
#endif

namespace ctssl {

constexpr int32_t kInactive = -1;  // masked neighbour patch: reads 0
constexpr int32_t kOutside = -2;   // beyond the image border: reads the padding value

// floor(a / b) for b > 0 (C++ division truncates towards 0).
CTSSL_HD int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Grid offset (-r..r) of the neighbour a local coordinate falls into, per axis: floor(v / p), with
// the offsets -1, 0, 1 of every 3x3 window found by comparisons (no 64-bit division per tap).
CTSSL_HD int64_t neighbour_offset(int64_t v, int64_t p) {
  if (v >= 0) return v < p ? 0 : (v < 2 * p ? 1 : v / p);
  return v >= -p ? -1 : floor_div(v, p);
}

// Packed row read at local coordinate (ly, lx) of patch n, or kInactive / kOutside.
// `nbr` points at patch n's (2r+1)^2 table entries; a coordinate beyond the table reads 0.
CTSSL_HD int64_t tap_row(const int32_t* nbr, int64_t n, int64_t p, int64_t r, int64_t ly, int64_t lx) {
  const int64_t oy = neighbour_offset(ly, p), ox = neighbour_offset(lx, p);
  if (oy < -r || oy > r || ox < -r || ox > r) return kInactive;
  const int64_t slot = (oy == 0 && ox == 0) ? n : static_cast<int64_t>(nbr[(oy + r) * (2 * r + 1) + (ox + r)]);
  if (slot < 0) return slot;
  return (slot * p + (ly - oy * p)) * p + (lx - ox * p);
}

// The inverse view: pixel v (one axis) of patch n, seen from n's neighbour m at grid offset o,
// sits at this local coordinate of m (n is m's neighbour at offset -o).
CTSSL_HD int64_t coord_in_neighbour(int64_t v, int64_t o, int64_t p) { return v - o * p; }

// Output pixel o (one axis) of a window op with stride s, padding pad, kernel extent k,
// whose tap t reads local input coordinate c = s*o + t - pad; -1 if no such in-range o.
CTSSL_HD int64_t window_output(int64_t c, int64_t t, int64_t s, int64_t pad, int64_t q) {
  const int64_t u = c + pad - t;
  if (u < 0 || u % s != 0) return -1;
  const int64_t o = u / s;
  return o < q ? o : -1;
}

// Halo-padded patch: side P = p + 2 * halo, halo coordinate Y maps to local Y - halo.
CTSSL_HD int64_t halo_side(int64_t p, int64_t halo) { return p + 2 * halo; }

// Patch grid position of a flat patch id b*h*w + i*w + j.
struct GridPos {
  int64_t b, i, j;
};
CTSSL_HD GridPos grid_pos(int64_t id, int64_t h, int64_t w) {
  GridPos g;
  g.b = id / (h * w);
  g.i = (id / w) % h;
  g.j = id % w;
  return g;
}

// Table entry of patch (b, i, j) towards grid offset (oy, ox) given the slot map (B, h, w).
CTSSL_HD int32_t neighbour_entry(const int32_t* slot, int64_t b, int64_t i, int64_t j, int64_t oy, int64_t ox,
                                 int64_t h, int64_t w) {
  const int64_t ii = i + oy, jj = j + ox;
  if (ii < 0 || ii >= h || jj < 0 || jj >= w) return kOutside;
  return slot[(b * h + ii) * w + jj];
}

// Fused BatchNorm activations.
enum Activation : int64_t { kNone = 0, kReLU = 1, kReLU6 = 2 };

template <typename T>
CTSSL_HD T activate(T z, int64_t act) {
  if (act == kReLU) return z > T(0) ? z : T(0);
  if (act == kReLU6) return z > T(0) ? (z < T(6) ? z : T(6)) : T(0);
  return z;
}

// d act / d z read off the activation's output y (torch's rule: 0 at the kinks).
template <typename T>
CTSSL_HD bool activation_passes(T y, int64_t act) {
  if (act == kReLU) return y > T(0);
  if (act == kReLU6) return y > T(0) && y < T(6);
  return true;
}

// Chan's merge of two Welford partials (count, mean, m2) into the first.
template <typename T>
CTSSL_HD void welford_merge(T& n, T& mean, T& m2, T nb, T meanb, T m2b) {
  const T total = n + nb;
  if (nb == T(0)) return;
  if (n == T(0)) {
    n = nb, mean = meanb, m2 = m2b;
    return;
  }
  const T delta = meanb - mean;
  mean = mean + delta * (nb / total);
  m2 = m2 + m2b + delta * delta * (n * nb / total);
  n = total;
}

}  // namespace ctssl
