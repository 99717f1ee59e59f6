// Per-element bodies of the ops, shared verbatim by the CPU loops and the CUDA kernels.
//
// Each function computes one output element from raw pointers; the CPU implementation
// loops over elements, the CUDA kernel maps a thread to each. The CPU tests against the
// dense reference therefore exercise exactly the arithmetic and indexing the GPU runs.
// Accumulation is in acc_t (float for fp32/fp16/bf16 storage, double for fp64).
#pragma once

#include <cstdint>
#include <limits>

#include "index_math.h"

namespace ctssl {

// ---- halo gather --------------------------------------------------------------------------

// Packed row that halo pixel (Y, X) of patch n reads, or a negative value (reads 0: masked,
// or outside, since the conv's zero padding and a masked patch read the same 0). `nbr` is the
// radius-r table (N, 2r+1, 2r+1); halo <= r * p.
CTSSL_HD int64_t halo_source_row(const int32_t* nbr, int64_t n, int64_t N, int64_t p, int64_t r, int64_t halo,
                                 int64_t Y, int64_t X) {
  const int64_t S = 2 * r + 1;
  const int64_t row = tap_row(nbr + S * S * n, n, p, r, Y - halo, X - halo);
  return row < N * p * p ? row : kInactive;  // a slot past the rows (bad table) reads 0
}

// Adjoint of the halo gather for element (n, y, x, c): the sum over every halo copy of that
// pixel (its own interior plus the rings of the up to (2r+1)^2 - 1 neighbours that read it),
// in a fixed order: deterministic, no atomics.
template <typename acc_t, typename scalar_t>
CTSSL_HD acc_t halo_adjoint(const scalar_t* grad_halo, const int32_t* nbr, int64_t N, int64_t p, int64_t r,
                            int64_t halo, int64_t C, int64_t n, int64_t y, int64_t x, int64_t c) {
  const int64_t P = halo_side(p, halo), S = 2 * r + 1;
  acc_t acc = acc_t(0);
  for (int64_t oy = -r; oy <= r; ++oy) {
    const int64_t Y = halo + coord_in_neighbour(y, oy, p);
    if (Y < 0 || Y >= P) continue;
    for (int64_t ox = -r; ox <= r; ++ox) {
      const int64_t X = halo + coord_in_neighbour(x, ox, p);
      if (X < 0 || X >= P) continue;
      const int64_t m = (oy == 0 && ox == 0) ? n : static_cast<int64_t>(nbr[S * S * n + (oy + r) * S + (ox + r)]);
      if (m < 0 || m >= N) continue;
      acc += static_cast<acc_t>(grad_halo[((m * P + Y) * P + X) * C + c]);
    }
  }
  return acc;
}

// ---- max pool -----------------------------------------------------------------------------

// Max over the k x k window of output pixel (n, oy, ox), channel c, with torch's rules:
// taps beyond the image are skipped (-inf padding), masked taps read 0, the first maximum in
// row-major tap order wins, a NaN wins, and the window starts at its first in-image tap.
template <typename acc_t, typename scalar_t>
CTSSL_HD acc_t max_pool_window(const scalar_t* rows, const int32_t* nbr, int64_t N, int64_t p, int64_t k, int64_t s,
                               int64_t pad, int64_t C, int64_t n, int64_t oy, int64_t ox, int64_t c, int8_t* arg) {
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  int best_tap = -1;
  for (int64_t ky = 0; ky < k; ++ky) {
    for (int64_t kx = 0; kx < k; ++kx) {
      const int64_t row = tap_row(nbr + 9 * n, n, p, 1, s * oy + ky - pad, s * ox + kx - pad);
      if (row == kOutside) continue;
      const acc_t v = (row >= 0 && row < N * p * p) ? static_cast<acc_t>(rows[row * C + c]) : acc_t(0);
      const int tap = static_cast<int>(ky * k + kx);
      if (best_tap < 0) best_tap = tap;
      if (v > best || v != v) {
        best = v;
        best_tap = tap;
      }
    }
  }
  *arg = static_cast<int8_t>(best_tap);
  return best;
}

// Gradient of input element (n, y, x, c): the output gradients of every window (in n and its
// neighbours) whose winning tap is this pixel.
template <typename acc_t, typename scalar_t>
CTSSL_HD acc_t max_pool_input_grad(const scalar_t* grad_out, const int8_t* argmax, const int32_t* nbr, int64_t N,
                                   int64_t p, int64_t k, int64_t s, int64_t pad, int64_t C, int64_t n, int64_t y,
                                   int64_t x, int64_t c) {
  const int64_t q = p / s;
  const int64_t lo = -pad, hi = s * (q - 1) + k - 1 - pad;  // local coordinates any window reads
  acc_t acc = acc_t(0);
  for (int64_t gy = -1; gy <= 1; ++gy) {  // the radius-1 table: pooling windows reach <= p away
    const int64_t Yc = coord_in_neighbour(y, gy, p);
    if (Yc < lo || Yc > hi) continue;
    for (int64_t gx = -1; gx <= 1; ++gx) {
      const int64_t Xc = coord_in_neighbour(x, gx, p);
      if (Xc < lo || Xc > hi) continue;
      const int64_t m = (gy == 0 && gx == 0) ? n : static_cast<int64_t>(nbr[9 * n + (gy + 1) * 3 + (gx + 1)]);
      if (m < 0 || m >= N) continue;
      for (int64_t ky = 0; ky < k; ++ky) {
        const int64_t oy = window_output(Yc, ky, s, pad, q);
        if (oy < 0) continue;
        for (int64_t kx = 0; kx < k; ++kx) {
          const int64_t ox = window_output(Xc, kx, s, pad, q);
          if (ox < 0) continue;
          const int64_t o = ((m * q + oy) * q + ox) * C + c;
          if (argmax[o] == static_cast<int8_t>(ky * k + kx)) acc += static_cast<acc_t>(grad_out[o]);
        }
      }
    }
  }
  return acc;
}

// ---- batch norm ---------------------------------------------------------------------------

// y = act((x - mean) * invstd * weight + bias + residual); weight/bias/residual optional.
template <typename acc_t>
CTSSL_HD acc_t bn_forward_element(acc_t x, acc_t mean, acc_t invstd, acc_t weight, acc_t bias, acc_t residual,
                                  int64_t act) {
  return activate<acc_t>((x - mean) * invstd * weight + bias + residual, act);
}

// Gradient of the pre-activation z from dy and the saved output y.
template <typename acc_t>
CTSSL_HD acc_t bn_grad_z(acc_t dy, acc_t y, int64_t act) {
  return activation_passes<acc_t>(y, act) ? dy : acc_t(0);
}

// dx from dz: batch statistics subtract the mean terms, running statistics do not.
template <typename acc_t>
CTSSL_HD acc_t bn_grad_x(acc_t dz, acc_t x, acc_t mean, acc_t invstd, acc_t weight, acc_t mean_dz,
                         acc_t mean_dz_xhat, bool batch_stats) {
  if (!batch_stats) return dz * invstd * weight;
  const acc_t xhat = (x - mean) * invstd;
  return (dz - mean_dz - xhat * mean_dz_xhat) * invstd * weight;
}

}  // namespace ctssl
