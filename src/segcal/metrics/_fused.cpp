// Fused CPU kernels for CalibrationMetrics.update (see _fused.py). Plain C++17, no torch headers: builds in about a
// second. Every real value is turned into an integer the way the PyTorch fallback does it (float32 products and
// ceil for slots, round-half-even of value * 2**32 for sums), and every sum is an integer sum, so the results do not
// depend on the order of the pixels or on the number of threads: they equal the fallback's bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#include <vector>

namespace {

constexpr double kUnit = 4294967296.0;  // PIXEL_UNIT = 2**32
constexpr int64_t kOneBits = 0x3F800000;
constexpr double kTMaxD = 24.0 * 8388608.0;  // ACE_T_MAX octaves of float32 bit patterns

constexpr double kMagic = 4503599627370496.0;  // 2**52: adding it rounds a value in [0, 2**51) to an integer

// round(v) for 0 <= v < 2**51, half to even (the default rounding mode), without a float -> int conversion
// instruction (AVX2 has none for 64-bit integers), so the loops below vectorise.
inline int64_t round_small(double v) {
  const double r = v + kMagic;
  int64_t bits, magic_bits;
  std::memcpy(&bits, &r, sizeof bits);
  std::memcpy(&magic_bits, &kMagic, sizeof magic_bits);
  return bits - magic_bits;
}

inline int64_t units(float v) { return round_small(static_cast<double>(v) * kUnit); }  // 0 <= v <= 1

// flag (0 or 1) ? a : b, by bit masks
inline int32_t select(int32_t flag, int32_t a, int32_t b) { return b ^ ((a ^ b) & -flag); }

inline int32_t slot(float v, float nf, int32_t n) {
  const int32_t s = static_cast<int32_t>(std::ceil(v * nf));
  return s < 0 ? 0 : (s > n ? n : s);
}

// floor((bits(1) - bits(1 - c)) (res - 1) / (24 * 2**23)): the product is below 2**52, so exact in double, and the
// quotient's rounding error (< 2**-29) is smaller than its distance to the next integer (>= 2**-27.6), so the floor
// equals the integer division of the PyTorch twin — in a form that vectorises.
inline int32_t fine_index(float c, double res_minus_1) {
  const float d = 1.0f - c;
  int32_t bits;
  std::memcpy(&bits, &d, sizeof bits);
  const double q = static_cast<double>(static_cast<int32_t>(kOneBits) - bits) * res_minus_1 / kTMaxD;
  const int32_t idx = static_cast<int32_t>(std::min(q, res_minus_1 - 1.0));
  return c >= 1.0f ? static_cast<int32_t>(res_minus_1) : idx;
}

// Runs fn(begin, end, thread) on `threads` contiguous parts of [0, total), on OpenMP threads: in a process that has
// loaded PyTorch's libgomp these are PyTorch's own intra-op threads (one soname, one runtime), so the kernels never
// compete with threads that PyTorch keeps spinning after its last parallel operation.
template <class F>
void parallel(int64_t total, int threads, int64_t grain, F fn) {
  const int parts = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(threads, total / std::max<int64_t>(1, grain))));
  if (parts == 1) {
    fn(0, total, 0);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(parts)
  {
    const int64_t t = omp_get_thread_num(), used = omp_get_num_threads();
    fn(total * t / used, total * (t + 1) / used, static_cast<int>(t));
  }
#else  // a compiler without OpenMP (e.g. Apple clang): one thread, same results
  fn(0, total, 0);
#endif
}

// exp(x) for x <= 0 in float32, as a fixed sequence of IEEE operations that softmax_twin() in _fused.py repeats
// with tensor operations: the result is identical on every device. Cody-Waite reduction x = k ln2 + r, Cephes'
// degree-5 polynomial for exp(r) (about 1 ulp), scaling by 2**k through the exponent bits; below -87 (where 2**k
// would leave the normal range) the result is 0, which no summed metric can tell from a subnormal.
inline float exp_nonpositive(float x) {
  const float t = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2**23: rounds to an integer, half to even
  const float k = t - 12582912.0f;
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  const float e = q * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : e * scale;
}

// log(v) for normal v > 0 in float32, as a fixed sequence of IEEE operations that log_twin() in _fused.py repeats:
// v = 2**e m with m in [sqrt(1/2), sqrt(2)), Cephes' logf polynomial in f = m - 1 (about 1 ulp).
inline float log_positive(float v) {
  int32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  int32_t e = ((bits >> 23) & 0xff) - 126;
  const int32_t mant = (bits & 0x7FFFFF) | 0x3F000000;
  float f;
  std::memcpy(&f, &mant, sizeof f);  // in [1/2, 1)
  const bool low = f < 0.707106781186547524f;
  e = low ? e - 1 : e;
  f = low ? (f + f) - 1.0f : f - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f + -1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f + -1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f + -1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f + -2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = (y * f) * z;
  const float fe = static_cast<float>(e);
  y = y + -2.12194440e-4f * fe;
  y = y + -0.5f * z;
  return (f + y) + 0.693359375f * fe;
}

// Softmax over the C values of each pixel of one image row (x rows are `stride` apart) into p (C, W):
// m = max, e_k = exp(x_k - m), s = e_0 + e_1 + ... (in class order), p_k = e_k / s.
// m (max) and s (sum) are kept for the NLL, log s - (x_y - m). Returns whether a value was NaN or infinite.
// arg: the first argmax of the logits (the model's prediction), found in the max pass; p[arg] = 1 / s = max_k p_k.
// With the labels lab (in [0, C)): py = p_y and dy = x_y - m, picked up in the passes (no gather).
bool softmax_row(const float* __restrict x, int64_t stride, int64_t C, int64_t W, const int32_t* __restrict lab,
                 float* __restrict p, float* __restrict m, float* __restrict s, int32_t* __restrict arg,
                 float* __restrict py, float* __restrict dy) {
  int32_t bad = 0;
  for (int64_t w = 0; w < W; ++w) {
    m[w] = x[w];
    s[w] = 0.0f;
    arg[w] = 0;
    py[w] = 0.0f;
    dy[w] = 0.0f;
  }
  // every select below is an unconditional store of a blend: GCC turns `a[w] = cond ? v : a[w]` into a masked
  // store, which AMD CPUs microcode
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t w = 0; w < W; ++w) {
      const float v = x[c * stride + w], mw = m[w];
      const int32_t aw = arg[w];
      bad |= (v - v) != 0.0f;  // NaN for NaN and +-inf
      const int32_t gt = -static_cast<int32_t>(v > mw);
      m[w] = v > mw ? v : mw;
      arg[w] = aw ^ ((aw ^ static_cast<int32_t>(c)) & gt);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    float* __restrict pc = p + c * W;
    for (int64_t w = 0; w < W; ++w) {
      const float d = x[c * stride + w] - m[w];
      pc[w] = exp_nonpositive(d);
      s[w] += pc[w];
      dy[w] += lab[w] == static_cast<int32_t>(c) ? d : 0.0f;  // + 0 elsewhere: exact
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    float* __restrict pc = p + c * W;
    for (int64_t w = 0; w < W; ++w) {
      pc[w] /= s[w];
      py[w] += lab[w] == static_cast<int32_t>(c) ? pc[w] : 0.0f;
    }
  }
  return bad != 0;
}

void max_argmax(const float* __restrict p, int64_t stride, int64_t C, int64_t W, float* __restrict top,
                int32_t* __restrict arg) {
  for (int64_t w = 0; w < W; ++w) {
    top[w] = p[w];
    arg[w] = 0;
  }
  for (int64_t c = 1; c < C; ++c) {
    const float* __restrict pc = p + c * stride;
    for (int64_t w = 0; w < W; ++w) {
      const float v = pc[w], tw = top[w];
      const int32_t aw = arg[w];
      const int32_t gt = -static_cast<int32_t>(v > tw);
      top[w] = v > tw ? v : tw;
      arg[w] = aw ^ ((aw ^ static_cast<int32_t>(c)) & gt);
    }
  }
}

void add_squares(const float* __restrict pc, int64_t W, float* __restrict sq) {
  for (int64_t w = 0; w < W; ++w) sq[w] += pc[w] * pc[w];
}

// round(v * 2**32), half to even, for 0 <= v < 1/2 in float32 arithmetic: v * 2**32 is exact, below 2**23 adding
// and subtracting 2**23 rounds it (above, it is an integer already), and the result fits an int32 — the same integer
// as units(v), in a form that vectorises eight to a register.
inline int32_t units_below_half(float v) {
  const float r = v * 4294967296.0f;
  return static_cast<int32_t>(r < 8388608.0f ? (r + 8388608.0f) - 8388608.0f : r);
}

// Whether a probability is summed in the vectorised pass of classwise_row: p * n <= 1 (slot 1, or slot 0 where
// p = 0, which adds 0 units either way) and 0 <= p < 1/2 (so that units_below_half applies).
inline int32_t is_low(float v, float nf) { return (v * nf <= 1.0f) & (v < 0.5f) & (v >= 0.0f); }

#ifdef __AVX2__
// For each 8-bit mask, the positions of its set bits packed to the left: a permutation that moves the flagged lanes
// of a vector to its front.
struct LeftPack {
  alignas(32) int32_t idx[256][8];
  LeftPack() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int b = 0; b < 8; ++b)
        if (m >> b & 1) idx[m][k++] = b;
      while (k < 8) idx[m][k++] = 0;
    }
  }
};
const LeftPack kLeftPack;

// classwise_low() eight pixels at a time with AVX2: the flagged values are packed to the front of each vector
// (a table permutation) and stored contiguously.
int64_t classwise_low_avx2(const float* __restrict pc, const uint8_t* __restrict ok, int64_t W, float nf,
                           float* __restrict vals, int64_t* n_high, int64_t* w_done) {
  const __m256 vnf = _mm256_set1_ps(nf), one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  const __m256 zero = _mm256_setzero_ps(), scale = _mm256_set1_ps(4294967296.0f), magic = _mm256_set1_ps(8388608.0f);
  __m256i acc_lo = _mm256_setzero_si256(), acc_hi = _mm256_setzero_si256();
  int64_t n = 0, w = 0;
  for (; w + 8 <= W; w += 8) {
    const __m256 v = _mm256_loadu_ps(pc + w);
    int64_t ok8;
    std::memcpy(&ok8, ok + w, sizeof ok8);
    const __m256 valid = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(ok8)), _mm256_setzero_si256()));
    const __m256 low = _mm256_and_ps(_mm256_and_ps(_mm256_cmp_ps(_mm256_mul_ps(v, vnf), one, _CMP_LE_OQ),
                                                   _mm256_cmp_ps(v, half, _CMP_LT_OQ)),
                                     _mm256_cmp_ps(v, zero, _CMP_GE_OQ));
    const __m256 r = _mm256_mul_ps(v, scale);
    const __m256 rounded = _mm256_blendv_ps(r, _mm256_sub_ps(_mm256_add_ps(r, magic), magic),
                                            _mm256_cmp_ps(r, magic, _CMP_LT_OQ));
    const __m256i u = _mm256_and_si256(_mm256_cvttps_epi32(rounded), _mm256_castps_si256(_mm256_and_ps(valid, low)));
    acc_lo = _mm256_add_epi64(acc_lo, _mm256_cvtepu32_epi64(_mm256_castsi256_si128(u)));
    acc_hi = _mm256_add_epi64(acc_hi, _mm256_cvtepu32_epi64(_mm256_extracti128_si256(u, 1)));
    const int mask = _mm256_movemask_ps(_mm256_andnot_ps(low, valid));
    const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kLeftPack.idx[mask]));
    _mm256_storeu_ps(vals + n, _mm256_permutevar8x32_ps(v, perm));
    n += __builtin_popcount(mask);
  }
  alignas(32) int64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_add_epi64(acc_lo, acc_hi));
  *n_high = n;
  *w_done = w;
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}
#endif

// Of one class row's valid probabilities, the units of the low ones (is_low) summed, and the others copied to vals
// (n_high of them; vals holds W + 8).
int64_t classwise_low(const float* __restrict pc, const uint8_t* __restrict ok, int64_t W, float nf,
                      float* __restrict vals, int64_t* n_high) {
  int64_t first = 0, n = 0, w = 0;
#ifdef __AVX2__
  first = classwise_low_avx2(pc, ok, W, nf, vals, &n, &w);
#endif
  for (; w < W; ++w) {
    const float v = pc[w];
    const int32_t valid = ok[w], low = is_low(v, nf);
    first += units_below_half(v) & -(valid & low);
    vals[n] = v;
    n += valid & (low ^ 1);
  }
  *n_high = n;
  return first;
}

// One class row of the classwise histogram (n + 1 slots, kept four times: hc4 holds 4 (n + 1)); invalid pixels
// count nowhere. Most probabilities are low and are summed into slot 1 in one vectorised pass; only the others get
// a slot and a scatter, into the four interleaved copies so that consecutive additions to one slot do not chain
// through memory.
void classwise_row(const float* __restrict pc, const uint8_t* __restrict ok, int64_t W, float nf, int32_t n,
                   int64_t* __restrict hc4, float* __restrict vals, int64_t* __restrict u, int32_t* __restrict s) {
  const int64_t S = n + 1;
  int64_t n_high = 0;
  hc4[1] += classwise_low(pc, ok, W, nf, vals, &n_high);
  for (int64_t j = 0; j < n_high; ++j) {
    u[j] = units(vals[j]);
    s[j] = slot(vals[j], nf, n);
  }
  for (int64_t j = 0; j < n_high; ++j) hc4[(j & 3) * S + s[j]] += u[j];
}

// per pixel, the float32 Brier score (sum_k p_k^2 - 2 p_y) + 1 (squares summed in class order), rounded to units
int64_t brier_terms(const float* __restrict py, const float* __restrict sq, const uint8_t* __restrict ok,
                    int64_t W) {
  int64_t b = 0;
  for (int64_t w = 0; w < W; ++w) {
    const float brier = (sq[w] - 2.0f * py[w]) + 1.0f;
    b += ok[w] ? std::llrint(static_cast<double>(brier) * kUnit) : 0;  // may be -0.0: not in [0, 2**51)
  }
  return b;
}

// float32 NLL per pixel: log s - (x_y - m) from logits, -log max(p_y, FLT_MIN) from probabilities
void nll_terms(bool logits, const float* __restrict s, const float* __restrict dy, const float* __restrict py,
               int64_t W, float* __restrict out) {
  if (logits) {
    for (int64_t w = 0; w < W; ++w) out[w] = log_positive(s[w]) - dy[w];
  } else {
    for (int64_t w = 0; w < W; ++w) out[w] = -log_positive(std::max(py[w], 1.17549435e-38f));
  }
}

}  // namespace

extern "C" {

// Labels of P pixels -> y (int32, 0 where invalid) and valid (0/1): valid unless equal to `ignore` (if has_ignore)
// or excluded (exclude: C flags, may be null). Returns 2 if a valid label is outside [0, C), else 0.
int32_t segcal_labels(const int64_t* target, int64_t P, int64_t C, int32_t has_ignore, int64_t ignore,
                      const uint8_t* exclude, int32_t* y, uint8_t* valid, int32_t threads) {
  std::vector<int32_t> status(threads, 0);
  parallel(P, threads, 1 << 16, [&](int64_t begin, int64_t end, int t) {
    // branch-free, so that it vectorises; excluded classes (rare) are cleared in a second, scalar pass
    int64_t bad = 0;
    const int64_t ign = has_ignore ? ignore : -1;  // without has_ignore, `checked` = 0 keeps every label
    const int64_t checked = has_ignore ? 1 : 0, n_classes = C;
    const int64_t* __restrict lab_in = target;
    uint8_t* __restrict ok_out = valid;
    int32_t* __restrict y_out = y;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t lab = lab_in[k];
      const int64_t in_range = (lab >= 0) & (lab < n_classes), kept = (lab != ign) | (checked ^ 1);
      bad |= kept & (in_range ^ 1);
      ok_out[k] = static_cast<uint8_t>(kept & in_range);
      y_out[k] = static_cast<int32_t>(lab & -(kept & in_range));
    }
    if (exclude) {
      for (int64_t k = begin; k < end; ++k) {
        const bool drop = valid[k] && exclude[y[k]];
        valid[k] = drop ? 0 : valid[k];
        y[k] = drop ? 0 : y[k];
      }
    }
    status[t] = bad ? 2 : 0;
  });
  int32_t result = 0;
  for (int32_t st : status) result |= st;
  return result;
}

// Dense step over (N, C, H, W) scores x (logits if `logits`, else probabilities), one image row (all classes) at
// a time. Out per pixel: conf = max_k p_k, pred = first argmax of x (= of the logits, or of the probabilities),
// p_y = p[y]. Accumulated (+=) over valid pixels:
// cw (C, n + 1): units(p_k) by slot(p_k); brier: units of sum_k p_k^2 - 2 p_y + 1 (each term rounded on its own).
// nll_rows (N * H) float64: per image row, the in-order sum over valid pixels of the float32 NLL
// (logits: log s - (x_y - m); probabilities: -log max(p_y, FLT_MIN)). Returns 0, or 1 if x holds NaN/inf (logits
// only), or 2 if a valid pixel's label is outside [0, C) (then nothing is read or written out of range).
int32_t segcal_dense_rows(const float* x, int32_t logits, const int32_t* y, const uint8_t* valid, int64_t N,
                          int64_t C, int64_t H, int64_t W, int32_t n, int32_t classwise, float* conf, int32_t* pred,
                          float* p_y, int64_t* cw, int64_t* brier, double* nll_rows, int32_t threads) {
  const int64_t S = n + 1;
  const float nf = static_cast<float>(n);
  std::vector<std::vector<int64_t>> part_cw(threads);
  std::vector<int64_t> part_brier(threads, 0);
  std::vector<int32_t> status(threads, 0);
  parallel(N * H, threads, 8, [&](int64_t begin, int64_t end, int t) {
    std::vector<int64_t> local(classwise ? C * 4 * S : 0, 0);
    std::vector<int64_t> u(W);
    std::vector<float> sq(W);
    std::vector<int32_t> s(W), lab(W);
    std::vector<float> vals(W + 8);
    const int32_t n_classes = static_cast<int32_t>(C);
    std::vector<float> prob(logits ? C * W : 0), m(W), z(W), dy(W), nll_px(W);
    int64_t b = 0;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r / H, h = r % H, pix = r * W;
      float* cmax = conf + pix;
      int32_t* arg = pred + pix;
      const uint8_t* ok = valid + pix;
      const float* x0 = x + (i * C * H + h) * W;
      const float* p0 = x0;
      int64_t stride = H * W;  // between the classes of p0
      int32_t out_of_range = 0;  // possible only with validate_args=False: then read class 0, and fail
      for (int64_t w = 0; w < W; ++w) {
        const int32_t l = y[pix + w], in_range = (l >= 0) & (l < n_classes);
        out_of_range |= in_range ^ 1;
        lab[w] = l & -in_range;
      }
      if (out_of_range) status[t] |= 2;
      float* __restrict py = p_y + pix;
      if (logits) {
        if (softmax_row(x0, stride, C, W, lab.data(), prob.data(), m.data(), z.data(), arg, py, dy.data()))
          status[t] |= 1;
        p0 = prob.data();
        stride = W;
        for (int64_t w = 0; w < W; ++w) cmax[w] = 1.0f / z[w];
      } else {
        max_argmax(p0, stride, C, W, cmax, arg);
      }
      std::fill(sq.begin(), sq.end(), 0.0f);
      for (int64_t c = 0; c < C; ++c) {
        const float* pc = p0 + c * stride;
        add_squares(pc, W, sq.data());
        if (classwise) {
          classwise_row(pc, ok, W, nf, n, local.data() + c * 4 * S, vals.data(), u.data(), s.data());
        }
      }
      if (!logits) {
        for (int64_t w = 0; w < W; ++w) py[w] = p0[lab[w] * stride + w];
      }
      b += brier_terms(py, sq.data(), ok, W);
      nll_terms(logits != 0, z.data(), dy.data(), py, W, nll_px.data());
      double nll = 0.0;
      for (int64_t w = 0; w < W; ++w) nll += ok[w] ? static_cast<double>(nll_px[w]) : 0.0;  // in order
      nll_rows[r] = nll;
    }
    part_cw[t] = std::move(local);
    part_brier[t] = b;
  });
  int32_t result = 0;
  for (int t = 0; t < threads; ++t) {
    result |= status[t];
    *brier += part_brier[t];
    const std::vector<int64_t>& a = part_cw[t];
    for (int64_t c = 0; c < (a.empty() ? 0 : C); ++c)
      for (int64_t q = 0; q < 4; ++q)
        for (int64_t k = 0; k < S; ++k) cw[c * S + k] += a[(c * 4 + q) * S + k];
  }
  return (result & 1) ? 1 : result;
}

// Per-pixel histograms over a batch of P = n_img * hw pixels (valid ones only), accumulated (+=):
// top (n_img, R, n + 1, 3): count, correct, units(conf) by image, region and slot(conf);
// fine (res, 3): the same by fine_index(conf); pos (C, n + 1): count by label and slot(p_y) (if classwise);
// confmat (C, C): count by (label, prediction). Needs 4 (C^2 + 1) < 2**31 (the caller checks).
// Blocks of pixels: a vectorised pass computes every index as an int32 offset (invalid pixels point at one extra,
// discarded cell), then a plain scatter pass adds. Count and correct share one int64 (count << 32 | correct; an
// update has < 2**30 pixels), and the small histograms are kept four times (by pixel index mod 4) so that
// neighbouring pixels, which mostly fall in the same cell, do not chain their additions through memory.
void segcal_pixel_hist(const float* conf, const int32_t* pred, const float* p_y, const int32_t* y,
                       const uint8_t* valid, const int32_t* region, int64_t n_img, int64_t hw, int64_t C, int32_t n,
                       int64_t R, int64_t res, int32_t classwise, int64_t* top, int64_t* fine, int64_t* pos,
                       int64_t* confmat, int32_t threads) {
  // copies: T per image (4 each), then Q and M (4 each), then the fine histogram F; each with a discard cell
  const int32_t S = n + 1, T = static_cast<int32_t>(R) * S * 2 + 2, Q = static_cast<int32_t>(C) * S + 1,
                M = static_cast<int32_t>(C * C + 1), F = static_cast<int32_t>(res + 1) * 2;
  const int64_t top_size = n_img * 4 * T, pos_at = top_size, conf_at = pos_at + 4 * Q, fine_at = conf_at + 4 * M;
  const float nf = static_cast<float>(n);
  constexpr int64_t kCount = int64_t{1} << 32;
  constexpr int64_t kBlock = 1024;
  std::vector<std::vector<int64_t>> parts(threads);
  parallel(n_img * hw, threads, 1 << 16, [&](int64_t begin, int64_t end, int t) {
    std::vector<int64_t> acc(fine_at + F, 0);
    const int32_t cC = static_cast<int32_t>(C), cn = n;
    const float cnf = nf;
    const double cres = static_cast<double>(res - 1);
    const int32_t cw = classwise != 0;
    int32_t ti[kBlock], fi[kBlock], qi[kBlock], mi[kBlock];
    int64_t pk[kBlock], uu[kBlock];
    for (int64_t k0 = begin; k0 < end;) {
      const int64_t img = k0 / hw, stop = std::min({end, (img + 1) * hw, k0 + kBlock}), len = stop - k0;
      const float* __restrict cf = conf + k0;
      const float* __restrict py = p_y + k0;
      const int32_t* __restrict pr = pred + k0;
      const int32_t* __restrict lb = y + k0;
      const uint8_t* __restrict ok = valid + k0;
      const int32_t phase = static_cast<int32_t>(k0 & 3);
      // one loop per output: a single loop over all of them runs out of vector registers
      // (select() rather than `ok ? a : b`: GCC would load a's inputs with masked loads)
      for (int32_t j = 0; j < len; ++j) {
        ti[j] = ((phase + j) & 3) * T + select(ok[j], slot(cf[j], cnf, cn) * 2, T - 2);
        uu[j] = units(cf[j]);
      }
      for (int32_t j = 0; j < len; ++j) fi[j] = select(ok[j], fine_index(cf[j], cres) * 2, F - 2);
      for (int32_t j = 0; j < len; ++j) {
        const int32_t copy = (phase + j) & 3;
        qi[j] = copy * Q + select(ok[j] & cw, lb[j] * S + slot(py[j], cnf, cn), Q - 1);
        mi[j] = copy * M + select(ok[j], lb[j] * cC + pr[j], M - 1);
        pk[j] = kCount | (pr[j] == lb[j]);
      }
      if (region) {
        for (int32_t j = 0; j < len; ++j) ti[j] += select(ok[j], region[k0 + j] * S * 2, 0);
      }
      int64_t* __restrict at = acc.data() + img * 4 * T;
      int64_t* __restrict ap = acc.data() + pos_at;
      int64_t* __restrict am = acc.data() + conf_at;
      int64_t* __restrict af = acc.data() + fine_at;
      for (int32_t j = 0; j < len; ++j) {
        at[ti[j]] += pk[j];
        at[ti[j] + 1] += uu[j];
        af[fi[j]] += pk[j];
        af[fi[j] + 1] += uu[j];
        ap[qi[j]] += 1;
        am[mi[j]] += 1;
      }
      k0 = stop;
    }
    parts[t] = std::move(acc);
  });
  for (int t = 0; t < threads; ++t) {
    const std::vector<int64_t>& a = parts[t];
    if (a.empty()) continue;
    for (int64_t img = 0; img < n_img; ++img) {
      int64_t* out = top + img * R * S * 3;
      for (int64_t q = 0; q < 4; ++q) {
        const int64_t* tp = a.data() + (4 * img + q) * T;
        for (int64_t k = 0; k < R * S; ++k) {
          out[3 * k] += tp[2 * k] >> 32;
          out[3 * k + 1] += tp[2 * k] & 0xFFFFFFFF;
          out[3 * k + 2] += tp[2 * k + 1];
        }
      }
    }
    for (int64_t q = 0; q < 4; ++q) {
      for (int64_t k = 0; k < C * S; ++k) pos[k] += a[pos_at + q * Q + k];
      for (int64_t k = 0; k < C * C; ++k) confmat[k] += a[conf_at + q * M + k];
    }
    const int64_t* fp = a.data() + fine_at;
    for (int64_t k = 0; k < res; ++k) {
      fine[3 * k] += fp[2 * k] >> 32;
      fine[3 * k + 1] += fp[2 * k] & 0xFFFFFFFF;
      fine[3 * k + 2] += fp[2 * k + 1];
    }
  }
}

}  // extern "C"
