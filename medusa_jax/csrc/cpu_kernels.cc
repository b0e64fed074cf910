// Float32 CPU kernels of decoding (`medusa_jax/panels.py`), called by XLA through its FFI:
//   MedusaPanelsMatmul: x @ w for weights repacked into column panels;
//   MedusaDecodeAttention: softmax attention of a few query rows over the live slots of a KV cache.
//
// w [K, N] is stored as panels [P, K, 16] (P = N / 16 rounded up, zero padded): each panel holds 16 output
// columns for every k, contiguous, so one pass streams the weights in order. For each panel and each block of up
// to 6 input rows, 12 AVX accumulators live in registers over the whole contraction; the panel (K x 64 bytes)
// stays in L1/L2 while later row blocks reuse it; the next lines of the stream are prefetched while the FMAs of
// the current one run. A decoding step (1 row, or a tree of a few) is bound by reading the weights, so extra rows
// cost little until the FMA units fill up (BENCHMARKS.md, "Packed panels").
//
// Every output element is one chain of FMAs over k = 0, 1, ..., K-1 from zero, whatever the number of rows,
// the row block it falls in or the thread that runs it: a row's result is bitwise the same alone or inside a
// tree of many rows. The attention kernel keeps the same property per query row. Greedy Medusa relies on it to
// see the numbers plain greedy decoding sees.
//
// Built on first use by `medusa_jax/native.py` with -mavx2 -mfma; XLA calls it through its FFI.

#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using i64 = int64_t;

namespace {

constexpr i64 kPanel = 16;  // output columns per panel: two 8-float AVX vectors
// Weight lines (k steps of 64 bytes) fetched ahead of use. Without it the FMAs of a few rows and the hardware
// prefetcher's fetches did not overlap: each row past the first added about 10% (BENCHMARKS.md, "Packed panels").
constexpr i64 kPrefetch = 24;
constexpr int kRows = 6;    // input rows per register block: 12 accumulators, 2 weight vectors, 1 broadcast

// out[r, 0:16] = sum over t < T of a[r * lda + t] * b[t * ldb + 0:16], for rows r < R: 16 columns x R rows in
// registers, one chain of FMAs over t = 0, 1, ... per output. The products, the attention scores and the mix of
// values are all this block. Named variables, not arrays: GCC keeps arrays of vectors in memory and stores them
// on every iteration.
#define MEDUSA_FMA(r)                                                   \
  if constexpr (R > r) {                                                \
    const __m256 x = _mm256_broadcast_ss(a + r * lda + t);              \
    lo##r = _mm256_fmadd_ps(x, b0, lo##r);                              \
    hi##r = _mm256_fmadd_ps(x, b1, hi##r);                              \
  }
#define MEDUSA_STORE(r)                                                 \
  if constexpr (R > r) {                                                \
    _mm256_storeu_ps(out + r * ldo, lo##r);                             \
    _mm256_storeu_ps(out + r * ldo + 8, hi##r);                         \
  }

template <int R>
inline void block16(const float* a, i64 lda, const float* b, i64 ldb, i64 T, float* out, i64 ldo) {
  const __m256 z = _mm256_setzero_ps();
  __m256 lo0 = z, hi0 = z, lo1 = z, hi1 = z, lo2 = z, hi2 = z, lo3 = z, hi3 = z, lo4 = z, hi4 = z, lo5 = z, hi5 = z;
  for (i64 t = 0; t < T; ++t) {
    _mm_prefetch(reinterpret_cast<const char*>(b + (t + kPrefetch) * ldb), _MM_HINT_T0);  // never faults
    const __m256 b0 = _mm256_loadu_ps(b + t * ldb), b1 = _mm256_loadu_ps(b + t * ldb + 8);
    MEDUSA_FMA(0) MEDUSA_FMA(1) MEDUSA_FMA(2) MEDUSA_FMA(3) MEDUSA_FMA(4) MEDUSA_FMA(5)
  }
  MEDUSA_STORE(0) MEDUSA_STORE(1) MEDUSA_STORE(2) MEDUSA_STORE(3) MEDUSA_STORE(4) MEDUSA_STORE(5)
}

#undef MEDUSA_FMA
#undef MEDUSA_STORE

// Panels [p0, p1) for all M rows.
void panels(const float* x, i64 M, i64 K, const float* w, i64 P, float* out, i64 p0, i64 p1) {
  const i64 ldo = P * kPanel;
  for (i64 p = p0; p < p1; ++p) {
    const float* panel = w + p * K * kPanel;
    float* o = out + p * kPanel;
    i64 m = 0;
    for (; m + kRows <= M; m += kRows) block16<kRows>(x + m * K, K, panel, kPanel, K, o + m * ldo, ldo);
    switch (M - m) {
      case 5: block16<5>(x + m * K, K, panel, kPanel, K, o + m * ldo, ldo); break;
      case 4: block16<4>(x + m * K, K, panel, kPanel, K, o + m * ldo, ldo); break;
      case 3: block16<3>(x + m * K, K, panel, kPanel, K, o + m * ldo, ldo); break;
      case 2: block16<2>(x + m * K, K, panel, kPanel, K, o + m * ldo, ldo); break;
      case 1: block16<1>(x + m * K, K, panel, kPanel, K, o + m * ldo, ldo); break;
      default: break;
    }
  }
}

// Runs body(0 .. tasks-1) on the calling thread and XLA's intra-op threads, each task claimed by one thread. The
// caller waits only for tasks another thread has claimed (and is running), never for a helper to start: with
// every pool thread busy, or blocked in another such call, the caller runs all tasks itself.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, i64 tasks, const F& body) {
  struct Shared {
    F body;
    i64 tasks;
    std::atomic<i64> next{0}, done{0};
    Shared(const F& b, i64 t) : body(b), tasks(t) {}
    void run() {
      for (i64 i; (i = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
        body(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto shared = std::make_shared<Shared>(body, tasks);  // helpers may start after this call has returned
  const i64 threads = pool.num_threads() > 1 ? pool.num_threads() : 1;
  const i64 helpers = (threads < tasks ? threads : tasks) - 1;
  for (i64 h = 0; h < helpers; ++h) pool.Schedule([shared] { shared->run(); });
  shared->run();
  while (shared->done.load(std::memory_order_acquire) < tasks) _mm_pause();
}

ffi::Error PanelsMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kPanel)
    return ffi::Error::InvalidArgument("medusa panels: x [M, K] and panels [P, K, 16] expected");
  const i64 M = xd[0], K = xd[1], P = wd[0];
  if (wd[1] != K || od.size() != 2 || od[0] != M || od[1] != P * kPanel)
    return ffi::Error::InvalidArgument("medusa panels: shapes do not match");
  if (M == 0 || P == 0) return ffi::Error::Success();
  const i64 threads = pool.num_threads() > 1 ? pool.num_threads() : 1;
  const i64 chunk = (P + 4 * threads - 1) / (4 * threads);  // about 4 chunks of panels per thread, for balance
  const float *xp = x.typed_data(), *wp = w.typed_data();
  float* op = out->typed_data();
  parallel_for(pool, (P + chunk - 1) / chunk, [=](i64 c) {
    panels(xp, M, K, wp, P, op, c * chunk, c * chunk + chunk < P ? c * chunk + chunk : P);
  });
  return ffi::Error::Success();
}

// ---- attention ------------------------------------------------------------------------------------------------

// e^x for x <= 0 to about 2 ulp (Cephes' expf: x = n ln2 + r, a degree-5 polynomial in r, then 2^n).
inline __m256 exp_ps(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline float hsum(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
}

// Scores of R query rows (q [R, D], row stride D) against slots [0, W) of keys [D, S]: p[j * W + s] = q_j . k_s.
template <int R>
void scores(const float* q, const float* keys, float* p, i64 D, i64 S, i64 W) {
  for (i64 s = 0; s < W; s += 16) block16<R>(q, D, keys + s, S, D, p + s, W);  // W is a multiple of 16
}

// out_j [D] = sum over s < W of p[j * W + s] v_s, for values [S, D].
template <int R>
void mix(const float* p, const float* values, float* out, i64 D, i64 W) {
  for (i64 d0 = 0; d0 < D; d0 += 16) block16<R>(p, W, values + d0, D, W, out + d0, D);  // D is a multiple of 16
}

// Scores [W] of one row -> softmax weights in place: scale, mask (where !mask: weight 0, as exp(-1e30 - max) is
// in the XLA path), subtract the max, exp, divide by the sum. A row with no visible slot gets all zeros
// (decoding discards such rows).
void softmax_row(float* p, const bool* mask, i64 W, float scale) {
  const __m256 vscale = _mm256_set1_ps(scale), neg = _mm256_set1_ps(-1e30f);
  __m256 vmax = neg;
  for (i64 s = 0; s < W; s += 8) {
    const __m256i m8 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mask + s)));
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(m8, _mm256_setzero_si256()));
    const __m256 v = _mm256_blendv_ps(neg, _mm256_mul_ps(_mm256_loadu_ps(p + s), vscale), keep);
    _mm256_storeu_ps(p + s, v);
    vmax = _mm256_max_ps(vmax, v);
  }
  const __m256 top = _mm256_set1_ps(hmax(vmax));
  __m256 vsum = _mm256_setzero_ps();
  for (i64 s = 0; s < W; s += 8) {
    const __m256i m8 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mask + s)));
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(m8, _mm256_setzero_si256()));
    const __m256 e = _mm256_and_ps(keep, exp_ps(_mm256_sub_ps(_mm256_loadu_ps(p + s), top)));
    _mm256_storeu_ps(p + s, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  const float total = hsum(vsum);
  const __m256 inv = _mm256_set1_ps(total > 0.0f ? 1.0f / total : 0.0f);
  for (i64 s = 0; s < W; s += 8) _mm256_storeu_ps(p + s, _mm256_mul_ps(_mm256_loadu_ps(p + s), inv));
}

// R query rows q [R, D] (rows i0 .. i0+R-1 of one cache row) -> out [R, D]. masks[j]: row j's mask over S slots.
template <int R>
void attend_rows(const float* q, const float* keys, const float* values, const bool* const* masks, float* out,
                 float* p, i64 D, i64 S, i64 W, float scale) {
  scores<R>(q, keys, p, D, S, W);
  for (int j = 0; j < R; ++j) softmax_row(p + j * W, masks[j], W, scale);
  mix<R>(p, values, out, D, W);
}

// q [R, Q, D] (R = B * Kv cache rows, Q = G * T query rows ordered (group member, token)), keys [R, D, S],
// values [R, S, D], mask [B, T, S], window: int32 [] slots to read (every slot from it on is masked for the rows
// whose output is used); out [R, Q, D].
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> keys,
                           ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::S32> window,
                           ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions(), kd = keys.dimensions(), vd = values.dimensions(), md = mask.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || md.size() != 3)
    return ffi::Error::InvalidArgument("medusa attention: 3-D operands expected");
  const i64 R = qd[0], Q = qd[1], D = qd[2], S = kd[2], B = md[0], T = md[1];
  if (kd[0] != R || kd[1] != D || vd[0] != R || vd[1] != S || vd[2] != D || md[2] != S || B == 0 || T == 0 ||
      R % B || Q % T || D % 16 || S % 16)
    return ffi::Error::InvalidArgument("medusa attention: shapes do not match");
  i64 W = *window.typed_data();
  W = W < 1 ? 1 : (W > S ? S : W);
  W = (W + 15) / 16 * 16;  // whole 16-slot blocks (S is a multiple of 16; slots past the window are masked anyway)
  const i64 kv = R / B, blocks = (Q + kRows - 1) / kRows;
  const float *qp = q.typed_data(), *kp = keys.typed_data(), *vp = values.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  parallel_for(pool, R * blocks, [=](i64 task) {
    thread_local std::vector<float> scratch;
    if (static_cast<i64>(scratch.size()) < kRows * W) scratch.resize(kRows * W);
    const i64 r = task / blocks, i0 = (task % blocks) * kRows, n = Q - i0 < kRows ? Q - i0 : kRows;
    const bool* masks[kRows];
    for (i64 j = 0; j < n; ++j) masks[j] = mp + ((r / kv) * T + (i0 + j) % T) * S;  // row (g, t): token t
    const float* qr = qp + (r * Q + i0) * D;
    const float *kr = kp + r * D * S, *vr = vp + r * S * D;
    float* o = op + (r * Q + i0) * D;
    float* p = scratch.data();
    switch (n) {
      case 6: attend_rows<6>(qr, kr, vr, masks, o, p, D, S, W, scale); break;
      case 5: attend_rows<5>(qr, kr, vr, masks, o, p, D, S, W, scale); break;
      case 4: attend_rows<4>(qr, kr, vr, masks, o, p, D, S, W, scale); break;
      case 3: attend_rows<3>(qr, kr, vr, masks, o, p, D, S, W, scale); break;
      case 2: attend_rows<2>(qr, kr, vr, masks, o, p, D, S, W, scale); break;
      default: attend_rows<1>(qr, kr, vr, masks, o, p, D, S, W, scale); break;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedusaPanelsMatmul, PanelsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedusaDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
