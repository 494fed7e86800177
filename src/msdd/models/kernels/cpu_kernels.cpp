// Fused CPU kernels for x86 CPUs with AVX-512 (msdd.models.cpu_kernels builds and loads them as
// torch.ops.msdd_kernels): attention with RoPE, and SwiGLU's gate.
//
// attention: softmax(q k^T / sqrt(D)) v for q, k, v (B, heads, N, D) of one dtype, bf16 or float32, D a
// multiple of 32, no mask, with RoPE on q and k first where cos and sin (N, D) are given
// (msdd.models.layers.apply_rope, computed in float32 here and rounded once). The result is (B, N, heads * D),
// the layout the output projection reads.
// Work is split over (batch x head, block of 12 queries): the block's scores against all N keys are computed at
// once (float32, 12 x N fits in L2), then the softmax in float32 without the running-max rescaling of a flash
// kernel, then the weighted sum of the values. bf16 has the precision of PyTorch's CPU flash kernel: bf16
// products summed in float32 (vdpbf16ps: two products per float32 lane), float32 softmax, bf16 probabilities,
// bf16 output; float32 is float32 throughout (vfmadd231ps). Both products read 32-bit words: a bf16 word is a
// pair of consecutive elements along the summed dimension, a float32 word one element. k is re-laid out in
// panels of 64 keys x D words, v in words along the keys; both are padded with zeros to a multiple of 64 keys
// (padded keys get probability 0).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kRows = 12;   // queries per block
constexpr int64_t kTile = 6;    // queries per register tile
constexpr int64_t kPanel = 64;  // keys per score tile (four vectors of 16)

struct Bf16 {
  using Elem = uint16_t;
  static constexpr int64_t kPerWord = 2;
  static uint32_t bits(Elem x) { return x; }
  static __m512 dot(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
  static void store16(Elem* p, __m512 x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
  }
  static __m512 load16(const Elem* p) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
  }
};

struct Float {
  using Elem = float;
  static constexpr int64_t kPerWord = 1;
  static uint32_t bits(Elem x) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    return u;
  }
  static __m512 dot(__m512 acc, __m512i a, __m512i b) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc);
  }
  static void store16(Elem* p, __m512 x) { _mm512_storeu_ps(p, x); }
  static __m512 load16(const Elem* p) { return _mm512_loadu_ps(p); }
};

// RoPE of one row of D elements (rotate-half layout: element i pairs with i + D/2), computed in float32:
// out[i] = x[i] cos[i] - x[i + D/2] sin[i], out[i + D/2] = x[i + D/2] cos[i + D/2] + x[i] sin[i + D/2]
template <class T>
inline void rope_row(const typename T::Elem* x, const float* cos, const float* sin, typename T::Elem* out,
                     int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; i += 16) {
    const __m512 x1 = T::load16(x + i), x2 = T::load16(x + half + i);
    T::store16(out + i, _mm512_fnmadd_ps(x2, _mm512_loadu_ps(sin + i), _mm512_mul_ps(x1, _mm512_loadu_ps(cos + i))));
    T::store16(out + half + i, _mm512_fmadd_ps(x1, _mm512_loadu_ps(sin + half + i),
                                               _mm512_mul_ps(x2, _mm512_loadu_ps(cos + half + i))));
  }
}

// K (N, D) -> panels of 64 keys: [Npad / 64][W words][64], zero past N; RoPE applied first where cos is given
template <class T>
void pack_keys(const typename T::Elem* k, const float* cos, const float* sin, uint32_t* out, int64_t n,
               int64_t npad, int64_t d) {
  const int64_t words = d / T::kPerWord;
  std::vector<uint32_t> rotated(words);
  for (int64_t panel = 0; panel < npad / kPanel; ++panel) {
    uint32_t* dst = out + panel * words * kPanel;
    for (int64_t c = 0; c < kPanel; ++c) {
      const int64_t key = panel * kPanel + c;
      const uint32_t* row = reinterpret_cast<const uint32_t*>(k + key * d);
      if (key < n && cos != nullptr) {
        rope_row<T>(k + key * d, cos + key * d, sin + key * d, reinterpret_cast<typename T::Elem*>(rotated.data()), d);
        row = rotated.data();
      }
      for (int64_t w = 0; w < words; ++w) dst[w * kPanel + c] = key < n ? row[w] : 0;
    }
  }
}

// V (N, D) -> [Npad / kPerWord][D] words along the keys, zero past N.
template <class T>
void pack_values(const typename T::Elem* v, uint32_t* out, int64_t n, int64_t npad, int64_t d) {
  for (int64_t j = 0; j < npad / T::kPerWord; ++j) {
    for (int64_t e = 0; e < d; ++e) {
      uint32_t word = 0;
      for (int64_t i = 0; i < T::kPerWord; ++i) {
        const int64_t key = j * T::kPerWord + i;
        if (key < n) word |= T::bits(v[key * d + e]) << (16 * i);
      }
      out[j * d + e] = word;
    }
  }
}

// s[r][c] = q[r] . k[c] for 6 queries and one panel of 64 keys (float32 sums)
template <class T>
inline void score_tile(const uint32_t* q, const uint32_t* kp, int64_t words, float* s, int64_t lds) {
  __m512 acc[kTile][4];
#pragma GCC unroll 6
  for (int r = 0; r < kTile; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t w = 0; w < words; ++w) {
    __m512i b[4];
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) b[c] = _mm512_loadu_si512(kp + w * kPanel + 16 * c);
#pragma GCC unroll 6
    for (int r = 0; r < kTile; ++r) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(q[r * words + w]));
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) acc[r][c] = T::dot(acc[r][c], a, b[c]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < kTile; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + r * lds + 16 * c, acc[r][c]);
}

// 2^x, x clamped to [-126, 126]: degree-6 polynomial on the fraction in [-1/2, 1/2] (relative error < 2e-7),
// exact scaling by the integer part
inline __m512 exp2v(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(126.0f));
  const __m512 i = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, i);
  __m512 p = _mm512_set1_ps(1.5403530e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, i);
}

// one row: probabilities exp(scale * (s - max)) (zero past n), returns their float32 sum
template <class T>
inline float softmax_row(const float* s, typename T::Elem* prob, int64_t n, int64_t npad, float scale_log2) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + c));
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - c)) - 1u);
  if (c < n) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, s + c));
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(mx) * scale_log2);
  const __m512 mul = _mm512_set1_ps(scale_log2);
  __m512 sum = _mm512_setzero_ps();
  for (c = 0; c < npad; c += 16) {
    const __mmask16 valid = c + 16 <= n ? static_cast<__mmask16>(0xffff)
                          : c < n       ? tail
                                        : static_cast<__mmask16>(0);
    __m512 e = exp2v(_mm512_fmsub_ps(_mm512_loadu_ps(s + c), mul, shift));
    e = _mm512_maskz_mov_ps(valid, e);
    sum = _mm512_add_ps(sum, e);
    T::store16(prob + c, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// out rows (r0 .. r0 + 6) columns (dc .. dc + 16 C) = inv[r] * sum_j prob[r] . v over `words` words of keys
template <class T, int C>
inline void value_tile(const uint32_t* prob, int64_t lda, const uint32_t* vp, int64_t d, int64_t words,
                       const float* inv, int rows, typename T::Elem* out, int64_t ldo) {
  __m512 acc[kTile][C];
#pragma GCC unroll 6
  for (int r = 0; r < kTile; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < words; ++j) {
    __m512i b[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) b[c] = _mm512_loadu_si512(vp + j * d + 16 * c);
#pragma GCC unroll 6
    for (int r = 0; r < kTile; ++r) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(prob[r * lda + j]));
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = T::dot(acc[r][c], a, b[c]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < kTile; ++r) {
    if (r >= rows) break;
    const __m512 w = _mm512_set1_ps(inv[r]);
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) T::store16(out + r * ldo + 16 * c, _mm512_mul_ps(acc[r][c], w));
  }
}

template <class T>
at::Tensor attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* cos,
                          const float* sin) {
  using Elem = typename T::Elem;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), words = D / T::kPerWord;
  const int64_t npad = (N + kPanel - 1) / kPanel * kPanel, blocks = (N + kRows - 1) / kRows;
  const int64_t vwords = npad / T::kPerWord;  // words along the keys, per value column
  at::Tensor kp = at::empty({B * H, npad * words}, q.options().dtype(at::kInt));
  at::Tensor vp = at::empty({B * H, vwords * D}, q.options().dtype(at::kInt));
  at::Tensor out = at::empty({B, N, H * D}, q.options());
  const auto* qd = reinterpret_cast<const uint32_t*>(q.data_ptr());
  const auto* kd = reinterpret_cast<const Elem*>(k.data_ptr());
  const auto* vd = reinterpret_cast<const Elem*>(v.data_ptr());
  auto* kpd = reinterpret_cast<uint32_t*>(kp.data_ptr());
  auto* vpd = reinterpret_cast<uint32_t*>(vp.data_ptr());
  auto* od = reinterpret_cast<Elem*>(out.data_ptr());
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      pack_keys<T>(kd + bh * N * D, cos, sin, kpd + bh * npad * words, N, npad, D);
      pack_values<T>(vd + bh * N * D, vpd + bh * vwords * D, N, npad, D);
    }
  });
  const float scale_log2 = 1.4426950408889634f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(kRows * npad);
    std::vector<Elem> prob(kRows * npad);
    std::vector<uint32_t> qb(kRows * words);
    float inv[kRows];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, r0 = (task % blocks) * kRows, rows = std::min(kRows, N - r0);
      const uint32_t* qh = qd + (bh * N + r0) * words;
      for (int64_t i = 0; i < kRows * words; ++i) qb[i] = i < rows * words ? qh[i] : 0;
      if (cos != nullptr) {
        auto* qe = reinterpret_cast<Elem*>(qb.data());
        for (int64_t r = 0; r < rows; ++r)
          rope_row<T>(qe + r * D, cos + (r0 + r) * D, sin + (r0 + r) * D, qe + r * D, D);
      }
      const uint32_t* kh = kpd + bh * npad * words;
      for (int64_t t = 0; t < kRows; t += kTile)
        for (int64_t panel = 0; panel < npad / kPanel; ++panel)
          score_tile<T>(qb.data() + t * words, kh + panel * words * kPanel, words,
                        s.data() + t * npad + panel * kPanel, npad);
      for (int64_t r = 0; r < kRows; ++r)
        inv[r] = 1.0f / softmax_row<T>(s.data() + r * npad, prob.data() + r * npad, N, npad, scale_log2);
      const auto* pw = reinterpret_cast<const uint32_t*>(prob.data());
      const uint32_t* vh = vpd + bh * vwords * D;
      const int64_t b = bh / H, h = bh % H;
      for (int64_t rr = 0; rr < rows; rr += kTile) {
        const int n_rows = static_cast<int>(std::min<int64_t>(kTile, rows - rr));
        Elem* o = od + ((b * N + r0 + rr) * H + h) * D;
        const uint32_t* p = pw + rr * vwords;
        for (int64_t dc = 0; dc < D; dc += 64) {
          if (D - dc >= 64)
            value_tile<T, 4>(p, vwords, vh + dc, D, vwords, inv + rr, n_rows, o + dc, H * D);
          else
            value_tile<T, 2>(p, vwords, vh + dc, D, vwords, inv + rr, n_rows, o + dc, H * D);
        }
      }
    }
  });
  return out;
}

at::Tensor attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                     const std::optional<at::Tensor>& cos_in, const std::optional<at::Tensor>& sin_in) {
  TORCH_CHECK(q_in.dim() == 4 && q_in.device().is_cpu(), "msdd attention: q, k, v must be (B, heads, N, D) on the CPU");
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK((dtype == at::kBFloat16 || dtype == at::kFloat) && k_in.scalar_type() == dtype &&
              v_in.scalar_type() == dtype, "msdd attention: q, k, v must be all bf16 or all float32");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t N = q.size(2), D = q.size(3);
  TORCH_CHECK(D % 32 == 0 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "msdd attention: q, k, v must have one shape, with D a multiple of 32");
  TORCH_CHECK(cos_in.has_value() == sin_in.has_value(), "msdd attention: give both cos and sin, or neither");
  at::Tensor cos, sin;
  if (cos_in.has_value()) {
    cos = cos_in->to(at::kFloat).contiguous();
    sin = sin_in->to(at::kFloat).contiguous();
    TORCH_CHECK(cos.numel() == N * D && sin.numel() == N * D, "msdd attention: cos and sin must be (N, D)");
  }
  const float* c = cos.defined() ? cos.data_ptr<float>() : nullptr;
  const float* s = sin.defined() ? sin.data_ptr<float>() : nullptr;
  return dtype == at::kBFloat16 ? attention_impl<Bf16>(q, k, v, c, s) : attention_impl<Float>(q, k, v, c, s);
}

// swiglu: (..., 2H) [a, b] -> (..., H) silu(a) * b = a b / (1 + exp(-a)), in float32, rounded once
template <class T>
void swiglu_impl(const typename T::Elem* in, typename T::Elem* out, int64_t rows, int64_t h) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    const __m512 one = _mm512_set1_ps(1.0f), minus_log2e = _mm512_set1_ps(-1.4426950408889634f);
    for (int64_t r = begin; r < end; ++r) {
      const typename T::Elem* a = in + r * 2 * h;
      for (int64_t c = 0; c < h; c += 16) {
        const __m512 x = T::load16(a + c);
        const __m512 sig = _mm512_div_ps(x, _mm512_add_ps(one, exp2v(_mm512_mul_ps(x, minus_log2e))));
        T::store16(out + r * h + c, _mm512_mul_ps(sig, T::load16(a + h + c)));
      }
    }
  });
}

at::Tensor swiglu(const at::Tensor& h_in) {
  const auto dtype = h_in.scalar_type();
  TORCH_CHECK(h_in.device().is_cpu() && (dtype == at::kBFloat16 || dtype == at::kFloat),
              "msdd swiglu: the input must be a bf16 or float32 CPU tensor");
  TORCH_CHECK(h_in.dim() >= 1 && h_in.size(-1) % 32 == 0, "msdd swiglu: the last dimension must be a multiple of 32");
  const at::Tensor h = h_in.contiguous();
  const int64_t hidden = h.size(-1) / 2, rows = h.numel() / std::max<int64_t>(1, 2 * hidden);
  std::vector<int64_t> sizes = h.sizes().vec();
  sizes.back() = hidden;
  at::Tensor out = at::empty(sizes, h.options());
  if (dtype == at::kBFloat16)
    swiglu_impl<Bf16>(reinterpret_cast<const uint16_t*>(h.data_ptr()), reinterpret_cast<uint16_t*>(out.data_ptr()),
                      rows, hidden);
  else
    swiglu_impl<Float>(h.data_ptr<float>(), out.data_ptr<float>(), rows, hidden);
  return out;
}

}  // namespace

TORCH_LIBRARY(msdd_kernels, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? cos=None, Tensor? sin=None) -> Tensor");
  m.def("swiglu(Tensor h) -> Tensor");
}
TORCH_LIBRARY_IMPL(msdd_kernels, CPU, m) {
  m.impl("attention", attention);
  m.impl("swiglu", swiglu);
}
