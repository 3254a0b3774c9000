// CPU launchers of channel_attention (CAM): the symmetric tile-pair kernel of
// channel_attention_tiles.h, OpenMP over (sample, part) work items, no C x C buffer.
//
//   channel_attention_symm_fwd(x3, gamma) -> (out, att, lse)
//   channel_attention_symm_bwd(dout, x3, gamma, att, lse) -> (dx, dgamma)
//
// x3 (B, C, N) float32 / float64 (any strides; packed here); gamma one element (read once).
// out = gamma * O + x3, att = O (B, C, N); lse (B, C) logsumexp_j(-x_i . x_j); dx (B, C, N) =
// dout + gamma * (dx of O); dgamma () = sum_i dout_i . O_i. The same contract as every fused
// backend (concept_kernels/ops/channel_attention/function.py).
//
// Work split: each sample's tile pairs (I <= J) are cut into `parts` ranges of row blocks with
// balanced pair counts; parts = 1 when the samples already keep every thread busy (B a multiple
// of the thread count, or B >= 4 threads). Each item (sample, part) owns its accumulators (online
// softmax state / dx in row and column form, O(C N) each); a last pass per sample merges the parts
// in part order. No atomics, no shared writes: the result depends on the thread count only
// through `parts`, and is bitwise reproducible for a given thread count.
#include "channel_attention/channel_attention_tiles.h"

#include "common/checks.h"
#include "common/threads.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace concept_kernels {
namespace {

using cam::kTile;
constexpr const char* kOp = "channel_attention";

// ---- work plan ----------------------------------------------------------------------------------

struct Plan {
  int64_t B;
  int C, N, Cp, Np, nb, parts;
  std::vector<int> rows;  // part p covers row blocks [rows[p], rows[p + 1]), pairs (I, J >= I)
  int64_t items() const { return B * parts; }
};

Plan make_plan(int64_t B, int C, int N, int lanes, int64_t threads) {
  Plan p;
  p.B = B;
  p.C = C;
  p.N = N;
  p.nb = (C + kTile - 1) / kTile;
  p.Cp = p.nb * kTile;
  p.Np = (N + lanes - 1) / lanes * lanes;
  int64_t parts = 1;
  if (B % threads != 0 && B < 4 * threads) parts = (4 * threads + B - 1) / B;
  p.parts = static_cast<int>(std::min<int64_t>(parts, p.nb));
  // row block I holds nb - I pairs: cut the cumulative count at multiples of total / parts
  const int64_t total = static_cast<int64_t>(p.nb) * (p.nb + 1) / 2;
  p.rows.assign(1, 0);
  int64_t seen = 0;
  for (int I = 0; I < p.nb; ++I) {
    seen += p.nb - I;
    if (seen * p.parts >= total * static_cast<int64_t>(p.rows.size()) && static_cast<int>(p.rows.size()) < p.parts)
      p.rows.push_back(I + 1);
  }
  while (static_cast<int>(p.rows.size()) <= p.parts) p.rows.push_back(p.nb);
  return p;
}

// ---- packing and the workers --------------------------------------------------------------------

// x (C, N) -> xT (Cp / kTile, N, kTile) panels and xr (Cp, Np), zero padded.
template <typename T>
void pack(const T* x, int C, int N, int Cp, int Np, T* xT, T* xr) {
  std::fill(xT, xT + static_cast<int64_t>(N) * Cp, T(0));
  std::fill(xr, xr + static_cast<int64_t>(Cp) * Np, T(0));
  for (int c = 0; c < C; ++c)
    for (int n = 0; n < N; ++n) {
      const T v = x[static_cast<int64_t>(c) * N + n];
      xr[static_cast<int64_t>(c) * Np + n] = v;
      xT[static_cast<int64_t>(c - c % kTile) * N + static_cast<int64_t>(n) * kTile + c % kTile] = v;
    }
}

template <typename T>
inline void fwd_part(const cam::SampleView<T>& s, const cam::FwdState<T>& st, int I0, int I1) {
  cam::Scratch<T> w;
  const int nb = s.Cp / kTile;
  for (int I = I0; I < I1; ++I)
    for (int J = I; J < nb; ++J) cam::PairMath<T>::fwd_pair(s, st, w, I * kTile, J * kTile);
}

template <typename T>
inline void bwd_part(const cam::SampleView<T>& s, const T* lse, const T* delta, const cam::BwdState<T>& st, int I0,
                     int I1) {
  cam::Scratch<T> w;
  const int nb = s.Cp / kTile;
  for (int I = I0; I < I1; ++I)
    for (int J = I; J < nb; ++J) cam::PairMath<T>::bwd_pair(s, lse, delta, st, w, I * kTile, J * kTile);
}

// Plain worker functions (CK_CPU_WORKER): one per dtype and direction, reached through the run_*
// overloads.
#define CK_CAM_WORKERS(T, SUFFIX)                                                                      \
  CK_CPU_WORKER void fwd_part_##SUFFIX(const cam::SampleView<T>& s, const cam::FwdState<T>& st, int I0, \
                                       int I1) {                                                        \
    fwd_part(s, st, I0, I1);                                                                            \
  }                                                                                                     \
  CK_CPU_WORKER void bwd_part_##SUFFIX(const cam::SampleView<T>& s, const T* lse, const T* delta,       \
                                       const cam::BwdState<T>& st, int I0, int I1) {                    \
    bwd_part(s, lse, delta, st, I0, I1);                                                                \
  }                                                                                                     \
  inline void run_fwd_part(const cam::SampleView<T>& s, const cam::FwdState<T>& st, int I0, int I1) {    \
    fwd_part_##SUFFIX(s, st, I0, I1);                                                                   \
  }                                                                                                     \
  inline void run_bwd_part(const cam::SampleView<T>& s, const T* lse, const T* delta,                   \
                           const cam::BwdState<T>& st, int I0, int I1) {                                \
    bwd_part_##SUFFIX(s, lse, delta, st, I0, I1);                                                       \
  }
CK_CAM_WORKERS(float, f32)
CK_CAM_WORKERS(double, f64)
#undef CK_CAM_WORKERS

// ---- forward --------------------------------------------------------------------------------------

template <typename T>
void run_fwd(const Plan& p, const T* x, T gamma, T* out, T* att, T* lse) {
  const int C = p.C, N = p.N, Cp = p.Cp, Np = p.Np;
  const int64_t pack_sz = static_cast<int64_t>(N) * Cp + static_cast<int64_t>(Cp) * Np;
  const int64_t state_sz = 2 * static_cast<int64_t>(Cp) + static_cast<int64_t>(Cp) * Np + static_cast<int64_t>(N) * Cp;
  std::vector<T> packs(p.B * pack_sz), states(p.items() * state_sz);
  auto view = [&](int64_t b) {
    const T* base = packs.data() + b * pack_sz;
    return cam::SampleView<T>{C, N, Cp, Np, base, base + static_cast<int64_t>(N) * Cp, nullptr, nullptr};
  };
  auto state = [&](int64_t item) {
    T* base = states.data() + item * state_sz;
    return cam::FwdState<T>{base, base + Cp, base + 2 * Cp, base + 2 * Cp + static_cast<int64_t>(Cp) * Np};
  };
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < p.B; ++b) {
      T* base = packs.data() + b * pack_sz;
      pack(x + b * C * N, C, N, Cp, Np, base, base + static_cast<int64_t>(N) * Cp);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < p.items(); ++item) {
      const cam::FwdState<T> st = state(item);
      std::fill(st.m, st.m + Cp, T(-INFINITY));
      std::fill(st.l, st.l + state_sz - Cp, T(0));
      const int part = static_cast<int>(item % p.parts);
      run_fwd_part(view(item / p.parts), st, p.rows[part], p.rows[part + 1]);
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < p.B; ++b) {
      const cam::SampleView<T> sv = view(b);
      std::vector<T> o(N);
      for (int c = 0; c < C; ++c) {
        T mx = T(-INFINITY), den = T(0);
        for (int q = 0; q < p.parts; ++q) mx = std::max(mx, state(b * p.parts + q).m[c]);
        std::fill(o.begin(), o.end(), T(0));
        for (int q = 0; q < p.parts; ++q) {
          const cam::FwdState<T> st = state(b * p.parts + q);
          const T wq = st.l[c] > T(0) ? std::exp(st.m[c] - mx) : T(0);
          den += wq * st.l[c];
          for (int n = 0; n < N; ++n)
            o[n] += wq * (st.orow[static_cast<int64_t>(c) * Np + n] + st.ocol[sv.tpos(c, n)]);
        }
        const int64_t r = (b * C + c) * N;
        for (int n = 0; n < N; ++n) {
          att[r + n] = o[n] / den;
          out[r + n] = gamma * att[r + n] + x[r + n];
        }
        lse[b * C + c] = mx + std::log(den);
      }
    }
  }
}

// ---- backward -------------------------------------------------------------------------------------

template <typename T>
T run_bwd(const Plan& p, const T* dout, const T* x, T gamma, const T* att, const T* lse, T* dx) {
  const int C = p.C, N = p.N, Cp = p.Cp, Np = p.Np;
  const int64_t half = static_cast<int64_t>(N) * Cp + static_cast<int64_t>(Cp) * Np;
  const int64_t pack_sz = 2 * half + 2 * static_cast<int64_t>(Cp);  // x, dout, lse, delta
  std::vector<T> packs(p.B * pack_sz), states(p.items() * half);
  std::vector<double> dsum(p.B);  // dgamma = sum of B C N products: accumulated in double
  auto view = [&](int64_t b) {
    const T* base = packs.data() + b * pack_sz;
    const int64_t nc = static_cast<int64_t>(N) * Cp;
    return cam::SampleView<T>{C, N, Cp, Np, base, base + nc, base + half, base + half + nc};
  };
  auto state = [&](int64_t item) {
    T* base = states.data() + item * half;
    return cam::BwdState<T>{base, base + static_cast<int64_t>(Cp) * Np};
  };
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < p.B; ++b) {
      T* base = packs.data() + b * pack_sz;
      const int64_t nc = static_cast<int64_t>(N) * Cp;
      pack(x + b * C * N, C, N, Cp, Np, base, base + nc);
      pack(dout + b * C * N, C, N, Cp, Np, base + half, base + half + nc);
      T* lse_p = base + 2 * half;
      T* delta = lse_p + Cp;
      std::fill(lse_p, lse_p + 2 * Cp, T(0));  // padded channels: lse = delta = 0 (masked anyway)
      double total = 0.0;
      for (int c = 0; c < C; ++c) {
        const int64_t r = (b * C + c) * N;
        double d = 0.0;
        for (int n = 0; n < N; ++n) d += static_cast<double>(dout[r + n]) * att[r + n];
        delta[c] = static_cast<T>(d);
        lse_p[c] = lse[b * C + c];
        total += d;
      }
      dsum[b] = total;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < p.items(); ++item) {
      const cam::BwdState<T> st = state(item);
      std::fill(st.drow, st.drow + half, T(0));
      const int64_t b = item / p.parts;
      const int part = static_cast<int>(item % p.parts);
      const T* lse_p = packs.data() + b * pack_sz + 2 * half;
      run_bwd_part(view(b), lse_p, lse_p + Cp, st, p.rows[part], p.rows[part + 1]);
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < p.B; ++b)
      for (int c = 0; c < C; ++c) {
        const cam::SampleView<T> sv = view(b);
        const int64_t r = (b * C + c) * N;
        for (int n = 0; n < N; ++n) {
          T g = T(0);
          for (int q = 0; q < p.parts; ++q) {
            const cam::BwdState<T> st = state(b * p.parts + q);
            g += st.drow[static_cast<int64_t>(c) * Np + n] + st.dcol[sv.tpos(c, n)];
          }
          dx[r + n] = dout[r + n] + gamma * g;
        }
      }
  }
  double total = 0.0;
  for (int64_t b = 0; b < p.B; ++b) total += dsum[b];
  return static_cast<T>(total);
}

// ---- ops ------------------------------------------------------------------------------------------

void check_x3(const at::Tensor& x3) {
  check_device(x3, c10::DeviceType::CPU, kOp, "x3");
  check_dim(x3, 3, kOp, "x3");
  check_dtype(x3, {at::kFloat, at::kDouble}, kOp, "x3");
  TORCH_CHECK(x3.size(1) >= 1 && x3.size(2) >= 1, kOp, ": x3 (B, C, N) needs C >= 1 and N >= 1, got shape ",
              x3.sizes());
  TORCH_CHECK(x3.size(1) * x3.size(2) < (int64_t(1) << 31), kOp, ": x3 is too large (C * N >= 2^31), got shape ",
              x3.sizes());
}

// gamma: one element on the CPU, any float dtype; returned as a T scalar.
template <typename T>
T gamma_value(const at::Tensor& gamma) {
  check_device(gamma, c10::DeviceType::CPU, kOp, "gamma");
  TORCH_CHECK(gamma.numel() == 1, kOp, ": gamma must have one element, got shape ", gamma.sizes());
  TORCH_CHECK(gamma.is_floating_point(), kOp, ": gamma must be a floating tensor, got ", gamma.scalar_type());
  return gamma.reshape({}).to(c10::CppTypeToScalarType<T>::value).template item<T>();
}

// The plan for torch's thread count, which use_torch_threads() also gives this thread's OpenMP
// regions (the parts, and so the rounding, depend on it).
template <typename T>
Plan plan_for(const at::Tensor& x3) {
#ifdef _OPENMP
  const int64_t threads = use_torch_threads();
#else
  const int64_t threads = 1;
#endif
  return make_plan(x3.size(0), static_cast<int>(x3.size(1)), static_cast<int>(x3.size(2)), cam::Simd<T>::kLanes,
                   threads);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_attention_symm_fwd_cpu(const at::Tensor& x3_in,
                                                                              const at::Tensor& gamma) {
  check_x3(x3_in);
  const at::Tensor x3 = x3_in.contiguous();
  at::Tensor out = at::empty(x3.sizes(), x3.options());
  at::Tensor att = at::empty(x3.sizes(), x3.options());
  at::Tensor lse = at::empty({x3.size(0), x3.size(1)}, x3.options());
  if (x3.size(0) == 0) return {out, att, lse};
  AT_DISPATCH_FLOATING_TYPES(x3.scalar_type(), "channel_attention_symm_fwd_cpu", [&] {
    run_fwd<scalar_t>(plan_for<scalar_t>(x3), x3.data_ptr<scalar_t>(), gamma_value<scalar_t>(gamma),
                      out.data_ptr<scalar_t>(), att.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
  });
  return {out, att, lse};
}

std::tuple<at::Tensor, at::Tensor> channel_attention_symm_bwd_cpu(const at::Tensor& dout_in, const at::Tensor& x3_in,
                                                                  const at::Tensor& gamma, const at::Tensor& att_in,
                                                                  const at::Tensor& lse_in) {
  check_x3(x3_in);
  for (auto [t, name] : {std::pair{&dout_in, "dout"}, std::pair{&att_in, "att"}}) {
    check_device(*t, c10::DeviceType::CPU, kOp, name);
    TORCH_CHECK(t->sizes() == x3_in.sizes(), kOp, ": ", name, " must have x3's shape ", x3_in.sizes(), ", got ",
                t->sizes());
  }
  check_device(lse_in, c10::DeviceType::CPU, kOp, "lse");
  check_dim(lse_in, 2, kOp, "lse");
  check_size(lse_in, 0, x3_in.size(0), kOp, "lse");
  check_size(lse_in, 1, x3_in.size(1), kOp, "lse");
  const at::Tensor x3 = x3_in.contiguous();
  const at::Tensor dout = dout_in.to(x3.scalar_type()).contiguous();
  const at::Tensor att = att_in.to(x3.scalar_type()).contiguous();
  const at::Tensor lse = lse_in.to(x3.scalar_type()).contiguous();
  at::Tensor dx = at::empty(x3.sizes(), x3.options());
  at::Tensor dgamma = at::zeros({}, x3.options());
  if (x3.size(0) == 0) return {dx, dgamma};
  AT_DISPATCH_FLOATING_TYPES(x3.scalar_type(), "channel_attention_symm_bwd_cpu", [&] {
    dgamma.fill_(run_bwd<scalar_t>(plan_for<scalar_t>(x3), dout.data_ptr<scalar_t>(), x3.data_ptr<scalar_t>(),
                                   gamma_value<scalar_t>(gamma), att.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                                   dx.data_ptr<scalar_t>()));
  });
  return {dx, dgamma};
}

}  // namespace
}  // namespace concept_kernels

TORCH_LIBRARY_IMPL(concept_kernels, CPU, m) {
  m.impl("channel_attention_symm_fwd", &concept_kernels::channel_attention_symm_fwd_cpu);
  m.impl("channel_attention_symm_bwd", &concept_kernels::channel_attention_symm_bwd_cpu);
}
