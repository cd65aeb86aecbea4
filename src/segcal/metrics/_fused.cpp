// Fused CPU kernels for CalibrationMetrics.update (see _fused.py). Plain C++17, no torch headers: builds in about a
// second. Every real value is turned into an integer the way the PyTorch fallback does it (float32 products and
// ceil for slots, round-half-even of value * 2**32 for sums), and every sum is an integer sum, so the results do not
// depend on the order of the pixels or on the number of threads: they equal the fallback's bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
bool softmax_row(const float* __restrict x, int64_t stride, int64_t C, int64_t W, float* __restrict p,
                 float* __restrict m, float* __restrict s, int32_t* __restrict arg) {
  int32_t bad = 0;
  for (int64_t w = 0; w < W; ++w) {
    m[w] = x[w];
    s[w] = 0.0f;
    arg[w] = 0;
  }
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t w = 0; w < W; ++w) {
      const float v = x[c * stride + w];
      bad |= (v - v) != 0.0f;  // NaN for NaN and +-inf
      const bool gt = v > m[w];
      m[w] = gt ? v : m[w];
      arg[w] = gt ? static_cast<int32_t>(c) : arg[w];
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    float* __restrict pc = p + c * W;
    for (int64_t w = 0; w < W; ++w) {
      pc[w] = exp_nonpositive(x[c * stride + w] - m[w]);
      s[w] += pc[w];
    }
  }
  for (int64_t c = 0; c < C; ++c)
    for (int64_t w = 0; w < W; ++w) p[c * W + w] /= s[w];
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
      const bool gt = pc[w] > top[w];
      top[w] = gt ? pc[w] : top[w];
      arg[w] = gt ? static_cast<int32_t>(c) : arg[w];
    }
  }
}

void add_squares(const float* __restrict pc, int64_t W, float* __restrict sq) {
  for (int64_t w = 0; w < W; ++w) sq[w] += pc[w] * pc[w];
}

// Units and slots of one class row (invalid pixels: slot 1 and 0 units). Returns the units of slot 1 — the slot of
// most probabilities (p <= 1/n) — summed in the vectorised loop, so only the other slots need the scatter.
// Units and slots of one class row (invalid pixels: slot 1 and 0 units). Returns the units of slot 1 — the slot of
// most probabilities (p <= 1/n) — summed in the vectorised loop, so only the other slots need the scatter.
int64_t units_slots(const float* __restrict pc, const uint8_t* __restrict ok, int64_t W, float nf, int32_t n,
                    int64_t* __restrict u, int32_t* __restrict s) {
  int64_t first = 0;
  for (int64_t w = 0; w < W; ++w) {
    u[w] = ok[w] ? units(pc[w]) : 0;
    s[w] = ok[w] ? slot(pc[w], nf, n) : 1;
    first += s[w] == 1 ? u[w] : 0;
  }
  return first;
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
    int32_t bad = 0;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t lab = target[k];
      const bool in_range = lab >= 0 && lab < C;
      bool ok = !(has_ignore && lab == ignore);
      bad |= ok && !in_range;
      ok = ok && in_range && !(exclude && exclude[in_range ? lab : 0]);
      valid[k] = ok;
      y[k] = ok ? static_cast<int32_t>(lab) : 0;
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
    std::vector<int32_t> s(W), rest(W);
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
      if (logits) {
        if (softmax_row(x0, stride, C, W, prob.data(), m.data(), z.data(), arg)) status[t] |= 1;
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
          int64_t* hc = local.data() + c * 4 * S;
          hc[1] += units_slots(pc, ok, W, nf, n, u.data(), s.data());
          // the rest: their positions first (branch-free), then the additions, into four interleaved histograms
          // so that consecutive additions to one slot (runs are common) do not chain through memory
          int64_t n_rest = 0;
          for (int64_t w = 0; w < W; ++w) {
            rest[n_rest] = static_cast<int32_t>(w);
            n_rest += s[w] != 1;
          }
          for (int64_t j = 0; j < n_rest; ++j) {
            const int32_t w = rest[j];
            hc[(j & 3) * S + s[w]] += u[w];
          }
        }
      }
      float* __restrict py = p_y + pix;
      for (int64_t w = 0; w < W; ++w) {
        int32_t lab = y[pix + w];
        if (lab < 0 || lab >= C) {  // only reachable with validate_args=False
          status[t] |= 2;
          lab = 0;
        }
        py[w] = p0[lab * stride + w];
        dy[w] = logits ? x0[lab * H * W + w] - m[w] : 0.0f;
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
// confmat (C, C): count by (label, prediction).
// Blocks of pixels: a vectorised pass computes every index (invalid pixels point at one extra, discarded cell),
// then a plain scatter pass adds. Count and correct share one int64 (count << 32 | correct; an update has < 2**30
// pixels), and the small histograms are kept four times (by pixel index mod 4) so that neighbouring pixels, which
// mostly fall in the same cell, do not chain their additions through memory.
void segcal_pixel_hist(const float* conf, const int32_t* pred, const float* p_y, const int32_t* y,
                       const uint8_t* valid, const int32_t* region, int64_t n_img, int64_t hw, int64_t C, int32_t n,
                       int64_t R, int64_t res, int32_t classwise, int64_t* top, int64_t* fine, int64_t* pos,
                       int64_t* confmat, int32_t threads) {
  const int64_t S = n + 1, T = R * S * 2 + 2, F = (res + 1) * 2, Q = C * S + 1, M = C * C + 1;
  const int64_t lane = T + Q + M;  // one copy of one image's small histograms (+ a discard cell each)
  const float nf = static_cast<float>(n);
  constexpr int64_t kCount = int64_t{1} << 32;
  constexpr int64_t kBlock = 1024;
  std::vector<std::vector<int64_t>> parts(threads);
  parallel(n_img * hw, threads, 1 << 16, [&](int64_t begin, int64_t end, int t) {
    std::vector<int64_t> acc(n_img * 4 * lane + F, 0);
    int64_t* fp = acc.data() + n_img * 4 * lane;
    const int64_t cT = T, cQ = Q, cM = M, cF = F, cS = S, cC = C, cLane = lane, cHw = hw;
    const int32_t cn = n;
    const float cnf = nf;
    const double cres = static_cast<double>(res - 1);
    const bool cw = classwise != 0;
    int64_t ti[kBlock], fi[kBlock], qi[kBlock], mi[kBlock], pk[kBlock], uu[kBlock];
    for (int64_t k0 = begin; k0 < end;) {
      const int64_t img = k0 / cHw, stop = std::min({end, (img + 1) * cHw, k0 + kBlock}), len = stop - k0;
      const float* __restrict cf = conf + k0;
      const float* __restrict py = p_y + k0;
      const int32_t* __restrict pr = pred + k0;
      const int32_t* __restrict lb = y + k0;
      const uint8_t* __restrict ok = valid + k0;
      const int64_t base = 4 * img * cLane;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t lane_j = base + ((k0 + j) & 3) * cLane;
        const bool v = ok[j] != 0;
        ti[j] = lane_j + (v ? slot(cf[j], cnf, cn) * 2 : cT - 2);
        fi[j] = v ? fine_index(cf[j], cres) * 2 : cF - 2;
        qi[j] = lane_j + cT + (v && cw ? lb[j] * cS + slot(py[j], cnf, cn) : cQ - 1);
        mi[j] = lane_j + cT + cQ + (v ? lb[j] * cC + pr[j] : cM - 1);
        pk[j] = kCount | (pr[j] == lb[j]);
        uu[j] = units(cf[j]);
      }
      if (region) {
        for (int64_t j = 0; j < len; ++j) ti[j] += ok[j] ? region[k0 + j] * cS * 2 : 0;
      }
      int64_t* a = acc.data();
      for (int64_t j = 0; j < len; ++j) {
        a[ti[j]] += pk[j];
        a[ti[j] + 1] += uu[j];
        fp[fi[j]] += pk[j];
        fp[fi[j] + 1] += uu[j];
        a[qi[j]] += 1;
        a[mi[j]] += 1;
      }
      k0 = stop;
    }
    parts[t] = std::move(acc);
  });
  for (int t = 0; t < threads; ++t) {
    const std::vector<int64_t>& a = parts[t];
    if (a.empty()) continue;
    for (int64_t img = 0; img < n_img; ++img) {
      for (int64_t q = 0; q < 4; ++q) {
        const int64_t* tp = a.data() + (4 * img + q) * lane;
        int64_t* out = top + img * R * S * 3;
        for (int64_t k = 0; k < R * S; ++k) {
          out[3 * k] += tp[2 * k] >> 32;
          out[3 * k + 1] += tp[2 * k] & 0xFFFFFFFF;
          out[3 * k + 2] += tp[2 * k + 1];
        }
        for (int64_t k = 0; k < C * S; ++k) pos[k] += tp[T + k];
        for (int64_t k = 0; k < C * C; ++k) confmat[k] += tp[T + Q + k];
      }
    }
    const int64_t* fp = a.data() + n_img * 4 * lane;
    for (int64_t k = 0; k < res; ++k) {
      fine[3 * k] += fp[2 * k] >> 32;
      fine[3 * k + 1] += fp[2 * k] & 0xFFFFFFFF;
      fine[3 * k + 2] += fp[2 * k + 1];
    }
  }
}

}  // extern "C"
