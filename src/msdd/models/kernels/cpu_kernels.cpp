// Fused CPU kernels for x86 CPUs with AVX-512 BF16 and VNNI (msdd.models.cpu_kernels builds and loads them as
// torch.ops.msdd_kernels): attention with RoPE (alone, or an MMDiT block's joint attention straight from its two
// streams' qkv projections, q_norm and k_norm included), adaLN (LayerNorm and modulation, with the gated residual
// before it), SwiGLU's gate, linear layers in bf16, float32 and int8, and a decoder pass's MMDiT blocks in one call
// of them (blocks, at the end).
//
// attention: softmax(q k^T / sqrt(D)) v for q, k, v (B, heads, N, D) of one dtype, bf16 or float32, D a
// multiple of 32, no mask, with RoPE on q and k first where cos and sin (N, D) are given
// (msdd.models.layers.apply_rope, computed in float32 here and rounded once). The result is (B, N, heads * D),
// the layout the output projection reads.
// Work is split over tiles of 6 queries of a head: a tile's scores against all N keys are computed at once (float32,
// 6 x N, its row maxima on the way), then the softmax in float32 without the running-max rescaling of a flash kernel,
// then the weighted sum of the values; a thread pipelines its tiles (the next tile's scores, a panel of 64 keys at a
// time, with this tile's probabilities of the same panel computed inside the score products' loop, one vector every
// few words, over the scores in place: the core overlaps the exponentials with the products).
// bf16 has the precision of PyTorch's CPU flash kernel: bf16 products summed in float32 (vdpbf16ps: two products per
// float32 lane), float32 softmax (its exponential to 7.5e-5, below the bf16 rounding that follows), bf16
// probabilities, bf16 output; float32 is float32 throughout (vfmadd231ps). Both products read 32-bit words: a bf16
// word is a pair of consecutive elements along the summed dimension, a float32 word one element. k is re-laid out in
// panels of 64 keys x D words, v in words along the keys; both are padded with zeros to a multiple of 64
// keys (padded keys get probability 0).
// joint_attention reads q, k and v in place from the (B, N_s, 3 W) outputs of the two streams' qkv layers, applies
// each stream's q_norm / k_norm and RoPE while packing (float32, rounded once), and writes each stream's output
// (B, N_s, W): no split, concatenation, normalisation or slicing ops around it. Inside the blocks op, the qkv layers
// write q, k and v packed themselves (qkv_packed), where a weight panel holds whole heads (D 32 or 64) and the image
// stream's token count is a multiple of 16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace {

// Phase clocks of the blocks op (benchmarks/profile_student.py --phases): compiled in only with MSDD_PHASE_TIMES,
// which the library variant MSDD_CPU_KERNELS=phases builds; empty functions otherwise. `blocks` charges the wall time
// since the last mark to the phase that just ended, read on the calling thread (a phase's parallel loops have joined
// by then).
enum Phase { kPhaseAdaln, kPhaseQkv, kPhaseAttention, kPhaseProj, kPhaseMlp1, kPhaseMlp2, kPhases };
#ifdef MSDD_PHASE_TIMES
double g_phase_seconds[kPhases];
std::chrono::steady_clock::time_point g_phase_mark;
inline void phase_start() { g_phase_mark = std::chrono::steady_clock::now(); }
inline void phase_end(Phase p) {
  const auto now = std::chrono::steady_clock::now();
  g_phase_seconds[p] += std::chrono::duration<double>(now - g_phase_mark).count();
  g_phase_mark = now;
}
// seconds per phase (Phase's order) since the previous call
std::vector<double> phase_times() {
  std::vector<double> out(g_phase_seconds, g_phase_seconds + kPhases);
  std::fill(g_phase_seconds, g_phase_seconds + kPhases, 0.0);
  return out;
}
#else
inline void phase_start() {}
inline void phase_end(Phase) {}
#endif

constexpr int64_t kTile = 6;    // queries per register tile
constexpr int64_t kPanel = 64;  // keys per score tile (four vectors of 16)

// the mask of a vector's first n of 16 lanes (n <= 0: none)
inline __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : n <= 0 ? 0u : (1u << n) - 1u);
}

struct Bf16 {
  using Elem = uint16_t;
  using Acc = __m512;
  static constexpr int64_t kPerWord = 2;
  // 16 words of values e .. e + 16 of two rows: row 0 in the low halves, row 1 in the high (a null row: zeros)
  static __m512i words16(const Elem* const* rows, int64_t e) {
    auto wide = [&](int i) {
      return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[i] + e)));
    };
    const __m512i lo = rows[0] == nullptr ? _mm512_setzero_si512() : wide(0);
    return rows[1] == nullptr ? lo : _mm512_or_si512(lo, _mm512_slli_epi32(wide(1), 16));
  }
  static __m512 dot(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
  static void store16(Elem* p, __m512 x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
  }
  static __m512 load16(const Elem* p) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
  }
  static __m512 load16_masked(const Elem* p, __mmask16 m) {  // zeros outside m
    const __m256i x = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
  }
};

struct Float {
  using Elem = float;
  using Acc = __m512;
  static constexpr int64_t kPerWord = 1;
  static __m512i words16(const Elem* const* rows, int64_t e) {
    return rows[0] == nullptr ? _mm512_setzero_si512() : _mm512_castps_si512(_mm512_loadu_ps(rows[0] + e));
  }
  static __m512 dot(__m512 acc, __m512i a, __m512i b) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc);
  }
  static void store16(Elem* p, __m512 x) { _mm512_storeu_ps(p, x); }
  static __m512 load16(const Elem* p) { return _mm512_loadu_ps(p); }
  static __m512 load16_masked(const Elem* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
};

// int8 products (linear layers only): u8 activations by s8 weights, four of each per 32-bit word, exact int32 sums
// (vpdpbusd)
struct Int8 {
  using Acc = __m512i;
  static constexpr int64_t kPerWord = 4;
  // in place by inline assembly: GCC's intrinsic copied every accumulator and stored it to the stack at each step
  static __m512i dot(__m512i acc, __m512i a, __m512i b) {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
  }
};

constexpr int64_t kMaxHeadDim = 256;

// R rows of q or k, D = 16 V elements each, computed in float32 in registers, phase by phase over the rows (their
// dependency chains, two reductions and a square root long, overlap): LayerNorm over a row first where its w is given
// (weight w, bias b), then RoPE where cos is given (rotate-half layout: element i pairs with i + D/2):
// out[i] = x[i] cos[i] - x[i + D/2] sin[i], out[i + D/2] = x[i + D/2] cos[i + D/2] + x[i] sin[i + D/2]
template <class T, int V, int R>
inline void prep_rows(const typename T::Elem* const (&x)[R], const float* const (&w)[R], const float* const (&b)[R],
                      float eps, const float* cos, const float* sin, __m512 (&r)[R][V]) {
  constexpr float d = 16.0f * V;
  __m512 mean[R], rstd[R];
#pragma GCC unroll 4
  for (int j = 0; j < R; ++j) {
#pragma GCC unroll 16
    for (int i = 0; i < V; ++i) r[j][i] = T::load16(x[j] + 16 * i);
  }
#pragma GCC unroll 4
  for (int j = 0; j < R; ++j) {
    if (w[j] == nullptr) continue;
    __m512 sum = r[j][0];
#pragma GCC unroll 16
    for (int i = 1; i < V; ++i) sum = _mm512_add_ps(sum, r[j][i]);
    mean[j] = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / d);
  }
#pragma GCC unroll 4
  for (int j = 0; j < R; ++j) {
    if (w[j] == nullptr) continue;
    __m512 sq = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int i = 0; i < V; ++i) {
      const __m512 c = _mm512_sub_ps(r[j][i], mean[j]);
      sq = _mm512_fmadd_ps(c, c, sq);
    }
    rstd[j] = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(sq) / d + eps));
  }
#pragma GCC unroll 4
  for (int j = 0; j < R; ++j) {
    if (w[j] == nullptr) continue;
#pragma GCC unroll 16
    for (int i = 0; i < V; ++i)
      r[j][i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(r[j][i], mean[j]), rstd[j]),
                                _mm512_loadu_ps(w[j] + 16 * i), _mm512_loadu_ps(b[j] + 16 * i));
  }
  if (cos == nullptr) return;
  constexpr int half = V / 2;
#pragma GCC unroll 8
  for (int i = 0; i < half; ++i) {
    const __m512 c1 = _mm512_loadu_ps(cos + 16 * i), s1 = _mm512_loadu_ps(sin + 16 * i);
    const __m512 c2 = _mm512_loadu_ps(cos + 16 * (i + half)), s2 = _mm512_loadu_ps(sin + 16 * (i + half));
#pragma GCC unroll 4
    for (int j = 0; j < R; ++j) {
      const __m512 x1 = r[j][i], x2 = r[j][i + half];
      r[j][i] = _mm512_fnmadd_ps(x2, s1, _mm512_mul_ps(x1, c1));
      r[j][i + half] = _mm512_fmadd_ps(x1, s2, _mm512_mul_ps(x2, c2));
    }
  }
}

// 16 rows of 16 32-bit words, transposed in registers: t[j] lane i = row i's word j
inline void transpose16(__m512i (&t)[16]) {
  __m512i u[16];
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane l: rows i, i + 1 at words 4l, 4l + 1 | 4l + 2, 4l + 3
    u[i] = _mm512_unpacklo_epi32(t[i], t[i + 1]);
    u[i + 1] = _mm512_unpackhi_epi32(t[i], t[i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {  // t[i + m], lane l: rows i .. i + 3 at word 4l + m
    t[i] = _mm512_unpacklo_epi64(u[i], u[i + 2]);
    t[i + 1] = _mm512_unpackhi_epi64(u[i], u[i + 2]);
    t[i + 2] = _mm512_unpacklo_epi64(u[i + 1], u[i + 3]);
    t[i + 3] = _mm512_unpackhi_epi64(u[i + 1], u[i + 3]);
  }
#pragma GCC unroll 4
  for (int m = 0; m < 4; ++m) {  // word 4l + m: lane l of t[m], t[4 + m], t[8 + m], t[12 + m]
    u[m] = _mm512_shuffle_i32x4(t[m], t[4 + m], 0x88);       // lanes 0, 2 of each
    u[4 + m] = _mm512_shuffle_i32x4(t[m], t[4 + m], 0xDD);   // lanes 1, 3
    u[8 + m] = _mm512_shuffle_i32x4(t[8 + m], t[12 + m], 0x88);
    u[12 + m] = _mm512_shuffle_i32x4(t[8 + m], t[12 + m], 0xDD);
  }
#pragma GCC unroll 4
  for (int m = 0; m < 4; ++m) {
    t[m] = _mm512_shuffle_i32x4(u[m], u[8 + m], 0x88);
    t[8 + m] = _mm512_shuffle_i32x4(u[m], u[8 + m], 0xDD);
    t[4 + m] = _mm512_shuffle_i32x4(u[4 + m], u[12 + m], 0x88);
    t[12 + m] = _mm512_shuffle_i32x4(u[4 + m], u[12 + m], 0xDD);
  }
}

// 16 keys of `words` words each (rows one after another in src) into a key panel (dst: the first key's lane of word
// 0; a word's 64 lanes lie together), 16 x 16 words at a time transposed in registers
inline void store_keys16(const uint32_t* src, int64_t words, uint32_t* dst) {
  for (int64_t wb = 0; wb < words; wb += 16) {
    __m512i t[16];
#pragma GCC unroll 16
    for (int c = 0; c < 16; ++c) t[c] = _mm512_loadu_si512(src + c * words + wb);
    transpose16(t);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst + (wb + j) * kPanel, t[j]);
  }
}

template <class T>
struct Rows {
  const typename T::Elem* base[2] = {nullptr, nullptr};
  int64_t batch[2] = {0, 0}, head[2] = {0, 0}, token[2] = {0, 0};
  const float* ln_w[2] = {nullptr, nullptr};
  const float* ln_b[2] = {nullptr, nullptr};
  int64_t n0 = 0;
  int stream(int64_t t) const { return t < n0 ? 0 : 1; }
  const typename T::Elem* row(int64_t b, int64_t h, int64_t t) const {
    const int s = stream(t);
    return base[s] + b * batch[s] + h * head[s] + (s == 0 ? t : t - n0) * token[s];
  }
};

// One panel of 64 tokens of batch element b, heads h0 .. h1, D = 16 V: keys into kp's panels [B H][Npad / 64][D
// words][64], values into vp's words along the keys [B H][Npad / kPerWord][D], queries into qp [B H][N][D]; q and k
// LayerNormed and rotated first where the rows and cos say so; zeros past N. From qkv projections token by token, all
// heads of a token together, so that their rows are read in order (head by head they would be read at a stride of
// 3 W, a visible share of the attention; benchmarks/README.md, "Joint attention and adaLN kernels: the ops around the
// matmuls"); from (B, heads, N, D) head by head. Keys go through a buffer of 16 tokens per head and into the panel
// 16 x 16 words at a time, transposed in registers (stored a word at a time across the panel, they took a large share
// of the packing in float32).
template <class T, int V>
void pack_panel(const Rows<T>& q, const Rows<T>& k, const Rows<T>& v, int64_t b, int64_t H, int64_t h0, int64_t h1,
                int64_t panel, int64_t n, int64_t npad, float eps, const float* cos, const float* sin, uint32_t* kp,
                uint32_t* vp, typename T::Elem* qp) {
  using Elem = typename T::Elem;
  constexpr int64_t d = 16 * V, words = d / T::kPerWord;
  const int64_t vwords = npad / T::kPerWord;
  std::unique_ptr<uint32_t[]> kbuf(new uint32_t[(h1 - h0) * 16 * words]);  // [head][token][words]
  for (int64_t g = 0; g < kPanel; g += 16) {
    auto prep = [&](int64_t c, int64_t h) {
      const int64_t key = panel * kPanel + g + c;
      uint32_t* krow = kbuf.get() + ((h - h0) * 16 + c) * words;
      if (key >= n) {
        std::memset(krow, 0, words * sizeof(uint32_t));
        return;
      }
      const float* cs = cos == nullptr ? nullptr : cos + key * d;
      const float* sn = sin == nullptr ? nullptr : sin + key * d;
      const int sk = k.stream(key), sq = q.stream(key);
      __m512 r[2][V];  // the key's row and the query's
      prep_rows<T, V, 2>({k.row(b, h, key), q.row(b, h, key)}, {k.ln_w[sk], q.ln_w[sq]}, {k.ln_b[sk], q.ln_b[sq]}, eps,
                         cs, sn, r);
      Elem* qrow = qp + ((b * H + h) * n + key) * d;
#pragma GCC unroll 16
      for (int i = 0; i < V; ++i) {
        T::store16(reinterpret_cast<Elem*>(krow) + 16 * i, r[0][i]);
        T::store16(qrow + 16 * i, r[1][i]);
      }
    };
    if (k.token[0] > k.head[0]) {  // rows of one token hold every head (qkv projections): token by token
      for (int64_t c = 0; c < 16; ++c)
        for (int64_t h = h0; h < h1; ++h) prep(c, h);
    } else {  // (B, heads, N, D): head by head
      for (int64_t h = h0; h < h1; ++h)
        for (int64_t c = 0; c < 16; ++c) prep(c, h);
    }
    for (int64_t h = h0; h < h1; ++h)
      store_keys16(kbuf.get() + (h - h0) * 16 * words, words,
                   kp + (b * H + h) * npad * words + panel * words * kPanel + g);
  }
  for (int64_t j = panel * kPanel / T::kPerWord; j < (panel + 1) * kPanel / T::kPerWord; ++j) {
    for (int64_t h = h0; h < h1; ++h) {
      const Elem* src[2] = {nullptr, nullptr};
      for (int64_t i = 0; i < T::kPerWord; ++i)
        src[i] = j * T::kPerWord + i < n ? v.row(b, h, j * T::kPerWord + i) : nullptr;
      uint32_t* out = vp + (b * H + h) * vwords * d + j * d;
      for (int64_t e = 0; e < d; e += 16) _mm512_storeu_si512(out + e, T::words16(src, e));
    }
  }
}

// pack_panel for the head dim d (a multiple of 32 up to 256: V = d / 16 even, 2 .. 16)
template <class T, int V = 2>
void pack_panel_d(int64_t d, const Rows<T>& q, const Rows<T>& k, const Rows<T>& v, int64_t b, int64_t H, int64_t h0,
                  int64_t h1, int64_t panel, int64_t n, int64_t npad, float eps, const float* cos, const float* sin,
                  uint32_t* kp, uint32_t* vp, typename T::Elem* qp) {
  if constexpr (V > kMaxHeadDim / 16) {
    TORCH_CHECK(false, "msdd attention: head dim ", d, " is not a multiple of 32 up to ", kMaxHeadDim);
  } else if (d == 16 * V) {
    pack_panel<T, V>(q, k, v, b, H, h0, h1, panel, n, npad, eps, cos, sin, kp, vp, qp);
  } else {
    pack_panel_d<T, V + 2>(d, q, k, v, b, H, h0, h1, panel, n, npad, eps, cos, sin, kp, vp, qp);
  }
}

// acc[r][c] = sum over `words` words w of a[r * lda + w] . bp[w * 64 + 16 c .. + 16): R rows of a (queries, or a linear
// layer's inputs) against one panel of 64 columns (keys, or output features) in float32 sums (int32 for Int8);
// before(w) and after(w) around word w's products: work for the core to overlap with them (a linear layer's prefetches
// before: after them they held up the int8 products; the attention's probabilities after, where they ran faster than
// before; benchmarks/README.md, "The attention's probabilities among the score products, and a faster peak"); W:
// `words` at compile time (0: not)
struct Nothing {
  void operator()(int64_t) const {}
};
template <class T, int R, int W = 0, class Before = Nothing, class After = Nothing>
inline void dot_tile(const uint32_t* a, int64_t lda, const uint32_t* bp, int64_t words_in, typename T::Acc (&acc)[R][4],
                     Before&& before = {}, After&& after = {}) {
  const int64_t words = W > 0 ? W : words_in;
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) acc[r][c] = typename T::Acc{};  // zeros
  for (int64_t w = 0; w < words; ++w) {
    before(w);
    __m512i b[4];
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) b[c] = _mm512_loadu_si512(bp + w * kPanel + 16 * c);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512i x = _mm512_set1_epi32(static_cast<int>(a[r * lda + w]));
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) acc[r][c] = T::dot(acc[r][c], x, b[c]);
    }
    after(w);
  }
}

// 2^x for x below 128 (below -149: zero): a degree-5 polynomial on the fraction in [-1/2, 1/2] (near-minimax for the
// relative error: 7.5e-8, 2.1e-7 with float32's roundings, as with the degree-6 one it replaced), exact scaling by the
// integer part. The attention's float32 probabilities (x <= 0) take it without a clamp, which makes a float32 attention
// slightly faster (benchmarks/README.md, "The machine's state, a peak probed beside each sample, faster adaLN rows")
inline __m512 exp2v_unclamped(__m512 x) {
  const __m512 i = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, i);
  __m512 p = _mm512_set1_ps(1.32761849e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.67554085e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.55071417e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40221197e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.93146967e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.00000007e+0f));
  return _mm512_scalef_ps(p, i);
}

// 2^x, x clamped to [-126, 126] first (any float32, infinities included)
inline __m512 exp2v(__m512 x) {
  return exp2v_unclamped(_mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(126.0f)));
}

// 2^x for results rounded to bf16 (attention's probabilities, SwiGLU's gate): degree-3 polynomial on the fraction
// in [-1/2, 1/2] (relative error < 7.5e-5, 26 times below a bf16 rounding's 2^-9), exact scaling by the integer part,
// which takes x below -149 to zero and x of 128 or more to infinity without a clamp. Three multiply-adds fewer than
// exp2v, time a bf16 attention saves (benchmarks/README.md, "Shorter bf16 exponentials, the fixed cost of a pass, and
// the runs after them")
inline __m512 exp2v_bf16(__m512 x) {
  const __m512 i = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, i);
  __m512 p = _mm512_set1_ps(5.51716123e-2f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.42611172e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.93261001e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.99928071e-1f));
  return _mm512_scalef_ps(p, i);
}

// the unnormalised probabilities 2^x (x <= 0) of 16 scores: float32's exp2v_unclamped, or bf16's shorter polynomial
template <class T>
inline __m512 prob16(__m512 x) {
  if constexpr (T::kPerWord == 2) return exp2v_bf16(x);
  else return exp2v_unclamped(x);
}

// A tile's unnormalised probabilities 2^(scale_log2 s - shift[r]) of one panel of 64 keys, written over its scores:
// row r's scores of the panel at s + r * lds (float32), its probabilities at prob + r * lds * kPerWord (the same
// rows; a bf16 row in the first half of the row's bytes, each store on scores already read: a row's vectors are
// taken in order, panel after panel), zeros past the valid keys; each vector added to its row's float32 sums (16 per
// row)
template <class T>
struct ProbPanel {
  const float* s;
  typename T::Elem* prob;
  int64_t lds;
  const float* shift;
  float* sums;
  __m512 mul;
  // vector c of row r, where `left` keys of it are valid
  void vector(int r, int c, int64_t left) const {
    const __m512 sh = _mm512_set1_ps(shift[r]);
    __m512 e;
    if (left >= 16) {
      e = prob16<T>(_mm512_fmsub_ps(_mm512_loadu_ps(s + r * lds + 16 * c), mul, sh));
    } else if (left > 0) {
      const __mmask16 keep = first_lanes(left);
      const __m512 x = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(keep, s + r * lds + 16 * c), mul, sh);
      e = _mm512_maskz_mov_ps(keep, prob16<T>(x));
    } else {
      e = _mm512_setzero_ps();
    }
    _mm512_storeu_ps(sums + 16 * r, _mm512_add_ps(_mm512_loadu_ps(sums + 16 * r), e));
    T::store16(prob + r * lds * T::kPerWord + 16 * c, e);
  }
};

// s[r][c] = q[r] . k[c] for 6 queries and one panel of 64 keys (float32 sums); mx[r] = the max of mx[r] and the
// row's scores of the panel's first `valid` keys (the rest are padding). Where `prob` is given (a full panel of the
// previous tile), its 24 probability vectors are computed among the products, one every words / 24 words (run
// after the tile's products instead, the exponentials held the products' units back; benchmarks/README.md, "The
// attention's probabilities among the score products, and a faster peak"); W: the words per key at compile time
// (0: `words`)
template <class T, int W = 0>
inline void score_tile(const uint32_t* q, const uint32_t* kp, int64_t words_in, float* s, int64_t lds, __m512* mx,
                       int64_t valid, const ProbPanel<T>* prob) {
  const int64_t words = W > 0 ? W : words_in, step = std::max<int64_t>(1, words / (4 * kTile));
  int v = prob == nullptr ? 4 * kTile : 0;  // the next probability vector: row v / 4, vector v % 4
  const ProbPanel<T> pp = prob == nullptr ? ProbPanel<T>{} : *prob;
  __m512 acc[kTile][4];
  dot_tile<T, kTile, W>(q, words, kp, words, acc, Nothing{}, [&](int64_t w) {
    if (v < 4 * kTile && w % step == step - 1) {
      pp.vector(v / 4, v % 4, 16);
      ++v;
    }
  });
  for (; v < 4 * kTile; ++v) pp.vector(v / 4, v % 4, 16);
#pragma GCC unroll 6
  for (int r = 0; r < kTile; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + r * lds + 16 * c, acc[r][c]);
    __m512 m;
    if (valid >= kPanel) {
      m = _mm512_max_ps(_mm512_max_ps(acc[r][0], acc[r][1]), _mm512_max_ps(acc[r][2], acc[r][3]));
    } else {
      m = _mm512_set1_ps(-INFINITY);
      for (int c = 0; c < 4; ++c) m = _mm512_mask_max_ps(m, first_lanes(valid - 16 * c), m, acc[r][c]);
    }
    mx[r] = _mm512_max_ps(mx[r], m);
  }
}

// out[r][dc .. dc + 16 C) = inv[r] * sum_j prob[r] . v over `words` words of keys, for the 6 rows of a tile
// (out: one pointer per output row, `rows` of them)
template <class T, int C>
inline void value_tile(const uint32_t* prob, int64_t lda, const uint32_t* vp, int64_t d, int64_t words,
                       const float* inv, int rows, typename T::Elem* const* out, int64_t dc) {
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
    for (int c = 0; c < C; ++c) T::store16(out[r] + dc + 16 * c, _mm512_mul_ps(acc[r][c], w));
  }
}

// The attention's operands packed for its tiles (every word written before the tiles read it, zeros past N: no
// initialisation): keys in panels [B H][Npad / 64][D words][64], values in words along the keys
// [B H][Npad / kPerWord][D], queries [B H][N][D], N tokens of the joint sequence, the first n0 stream 0's
template <class T>
struct Packed {
  using Elem = typename T::Elem;
  int64_t B, H, N, n0, D, npad, words, vwords;
  std::unique_ptr<uint32_t[]> kp, vp;
  std::unique_ptr<Elem[]> qp;
  Packed(int64_t B_, int64_t H_, int64_t N_, int64_t n0_, int64_t D_)
      : B(B_), H(H_), N(N_), n0(n0_), D(D_), npad((N_ + kPanel - 1) / kPanel * kPanel), words(D_ / T::kPerWord),
        vwords(npad / T::kPerWord), kp(new uint32_t[B * H * npad * words]), vp(new uint32_t[B * H * vwords * D]),
        qp(new Elem[B * H * N * D]) {}
};

// softmax(q k^T / sqrt(D)) v of packed operands. Output row (b, t) of head h: out0 + ((b * n0 + t) * H + h) * D for
// t < n0, else out1 + ((b * (N - n0) + t - n0) * H + h) * D: each stream's (B, tokens, H * D).
template <class T>
void attention_tiles(const Packed<T>& pk, typename T::Elem* out0, typename T::Elem* out1);

// softmax(q k^T / sqrt(D)) v over the joint sequence of N tokens for B x H heads; q and k LayerNormed and rotated
// first where their rows and cos say so; outputs as attention_tiles writes them
template <class T>
void attention_impl(const Rows<T>& q, const Rows<T>& k, const Rows<T>& v, int64_t B, int64_t H, int64_t N,
                    int64_t D, float eps, const float* cos, const float* sin, typename T::Elem* out0,
                    typename T::Elem* out1) {
  Packed<T> pk(B, H, N, q.n0, D);
  const int64_t npad = pk.npad;
  // packing tasks: a panel of a batch element for a group of heads, at least 4 tasks per thread where the heads allow
  const int64_t panels = npad / kPanel;
  const int64_t groups = std::min(H, (4 * at::get_num_threads() + B * panels - 1) / (B * panels));
  const int64_t group_heads = (H + groups - 1) / groups, group_count = (H + group_heads - 1) / group_heads;
  at::parallel_for(0, B * panels * group_count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bp = task / group_count, h0 = task % group_count * group_heads;
      pack_panel_d<T>(D, q, k, v, bp / panels, H, h0, std::min(H, h0 + group_heads), bp % panels, N, npad, eps, cos,
                      sin, pk.kp.get(), pk.vp.get(), pk.qp.get());
    }
  });
  attention_tiles<T>(pk, out0, out1);
}

template <class T>
void attention_tiles(const Packed<T>& pk, typename T::Elem* out0, typename T::Elem* out1) {
  using Elem = typename T::Elem;
  const int64_t B = pk.B, H = pk.H, N = pk.N, D = pk.D, n0 = pk.n0, n1 = N - n0, npad = pk.npad, words = pk.words,
                vwords = pk.vwords, panels = npad / kPanel;
  // the probabilities the value products read: keys up to N rounded up to a word (zeros past N, written up to npad)
  const int64_t kwords = (N + T::kPerWord - 1) / T::kPerWord;
  const uint32_t *kp = pk.kp.get(), *vp = pk.vp.get();
  const Elem* qp = pk.qp.get();
  const float scale_log2 = 1.4426950408889634f / std::sqrt(static_cast<float>(D));
  // Tiles of 6 queries (a head's rows 6 t .. 6 t + 5), each thread through its own run of them as a pipeline: tile
  // i's scores, panel by panel, with tile i - 1's probabilities of the same panel among their products (independent
  // work that the core overlaps with them), then tile i - 1's values. A tile's probabilities replace its scores (one
  // buffer of two tiles' rows, which a float32 attention ran faster than a buffer of their own)
  const int64_t head_tiles = (N + kTile - 1) / kTile;
  at::parallel_for(0, B * H * head_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(2 * kTile * npad);
    std::vector<uint32_t> qb(kTile * words);
    __m512 mx[2][kTile];
    alignas(64) float sums[kTile * 16];
    float shift[kTile], inv[kTile];
    Elem* rows_out[2][kTile];
    int64_t tile_bh[2] = {0, 0}, tile_rows[2] = {0, 0};
    for (int64_t i = begin; i <= end; ++i) {
      const int cur = static_cast<int>(i & 1), prev = cur ^ 1;
      const bool has_cur = i < end, has_prev = i > begin;
      float* s_cur = s.data() + cur * kTile * npad;
      if (has_cur) {
        const int64_t bh = i / head_tiles, b = bh / H, h = bh % H, r0 = i % head_tiles * kTile;
        const int64_t rows = std::min(kTile, N - r0);
        tile_bh[cur] = bh, tile_rows[cur] = rows;
        std::memcpy(qb.data(), qp + (bh * N + r0) * D, rows * D * sizeof(Elem));
        std::fill(qb.begin() + rows * words, qb.end(), 0u);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t t = r0 + r;
          rows_out[cur][r] = t < n0 ? out0 + ((b * n0 + t) * H + h) * D : out1 + ((b * n1 + t - n0) * H + h) * D;
        }
        for (int64_t r = 0; r < kTile; ++r) mx[cur][r] = _mm512_set1_ps(-INFINITY);
      }
      if (has_prev) {
        for (int64_t r = 0; r < kTile; ++r) shift[r] = _mm512_reduce_max_ps(mx[prev][r]) * scale_log2;
        std::fill(sums, sums + kTile * 16, 0.0f);
      }
      const uint32_t* kh = kp + tile_bh[cur] * npad * words;
      float* s_prev = s.data() + prev * kTile * npad;
      for (int64_t panel = 0; panel < panels; ++panel) {
        const int64_t valid = std::min(kPanel, N - panel * kPanel);
        const ProbPanel<T> prob{s_prev + panel * kPanel, reinterpret_cast<Elem*>(s_prev) + panel * kPanel, npad, shift,
                                sums, _mm512_set1_ps(scale_log2)};
        const bool inside = has_prev && valid == kPanel;  // the probabilities among the products
        if (has_cur) {
          float* sc = s_cur + panel * kPanel;
          const uint32_t* kpp = kh + panel * words * kPanel;
          // compiled for the paper's word counts: with the probabilities among the products, the general loop was
          // slower, in bf16 most (benchmarks/README.md, "The attention's probabilities among the score products, and
          // a faster peak")
          if (words == 64)  // float32 D = 64, bf16 128
            score_tile<T, 64>(qb.data(), kpp, words, sc, npad, mx[cur], valid, inside ? &prob : nullptr);
          else if (words == 32)  // float32 D = 32, bf16 64
            score_tile<T, 32>(qb.data(), kpp, words, sc, npad, mx[cur], valid, inside ? &prob : nullptr);
          else
            score_tile<T>(qb.data(), kpp, words, sc, npad, mx[cur], valid, inside ? &prob : nullptr);
        }
        if (has_prev && !(has_cur && inside))
          for (int r = 0; r < kTile; ++r)
            for (int c = 0; c < 4; ++c) prob.vector(r, c, valid - 16 * c);
      }
      if (!has_prev) continue;
      for (int64_t r = 0; r < kTile; ++r) inv[r] = 1.0f / _mm512_reduce_add_ps(_mm512_load_ps(sums + 16 * r));
      const int n_rows = static_cast<int>(tile_rows[prev]);
      const auto* p = reinterpret_cast<const uint32_t*>(s_prev);  // the probabilities, rows of npad words
      const uint32_t* vh = vp + tile_bh[prev] * vwords * D;
      for (int64_t dc = 0; dc < D; dc += 64) {
        if (D - dc >= 64)
          value_tile<T, 4>(p, npad, vh + dc, D, kwords, inv, n_rows, rows_out[prev], dc);
        else
          value_tile<T, 2>(p, npad, vh + dc, D, kwords, inv, n_rows, rows_out[prev], dc);
      }
    }
  });
}

void check_dtype(at::ScalarType dtype, const char* op) {
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "msdd ", op, ": inputs must be bf16 or float32");
}

// cos and sin as float32 (N, D), or undefined
std::pair<at::Tensor, at::Tensor> rope_tables(const std::optional<at::Tensor>& cos_in,
                                              const std::optional<at::Tensor>& sin_in, int64_t N, int64_t D) {
  TORCH_CHECK(cos_in.has_value() == sin_in.has_value(), "msdd attention: give both cos and sin, or neither");
  if (!cos_in.has_value()) return {};
  at::Tensor cos = cos_in->to(at::kFloat).contiguous(), sin = sin_in->to(at::kFloat).contiguous();
  TORCH_CHECK(cos.numel() == N * D && sin.numel() == N * D, "msdd attention: cos and sin must be (N, D)");
  return {cos, sin};
}

template <class T>
void run_attention(const Rows<T>& q, const Rows<T>& k, const Rows<T>& v, int64_t B, int64_t H, int64_t N, int64_t D,
                   double eps, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out0, at::Tensor& out1) {
  attention_impl<T>(q, k, v, B, H, N, D, static_cast<float>(eps), cos.defined() ? cos.data_ptr<float>() : nullptr,
                    sin.defined() ? sin.data_ptr<float>() : nullptr, reinterpret_cast<typename T::Elem*>(out0.data_ptr()),
                    out1.defined() ? reinterpret_cast<typename T::Elem*>(out1.data_ptr()) : nullptr);
}

// q, k, v (B, heads, N, D), one dtype, no normalisation -> (B, N, heads * D)
template <class T>
at::Tensor attention_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                           const at::Tensor& sin) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  Rows<T> rows[3];
  const at::Tensor* src[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    rows[i].base[0] = reinterpret_cast<const typename T::Elem*>(src[i]->data_ptr());
    rows[i].batch[0] = H * N * D, rows[i].head[0] = N * D, rows[i].token[0] = D, rows[i].n0 = N;
  }
  at::Tensor out = at::empty({B, N, H * D}, q.options()), none;
  run_attention<T>(rows[0], rows[1], rows[2], B, H, N, D, 0.0, cos, sin, out, none);
  return out;
}

at::Tensor attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                     const std::optional<at::Tensor>& cos_in, const std::optional<at::Tensor>& sin_in) {
  TORCH_CHECK(q_in.dim() == 4 && q_in.device().is_cpu(), "msdd attention: q, k, v must be (B, heads, N, D) on the CPU");
  const auto dtype = q_in.scalar_type();
  check_dtype(dtype, "attention");
  TORCH_CHECK(k_in.scalar_type() == dtype && v_in.scalar_type() == dtype,
              "msdd attention: q, k, v must be all bf16 or all float32");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t N = q.size(2), D = q.size(3);
  TORCH_CHECK(D % 32 == 0 && D <= kMaxHeadDim && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "msdd attention: q, k, v must have one shape, with D a multiple of 32 up to 256");
  const auto [cos, sin] = rope_tables(cos_in, sin_in, N, D);
  return dtype == at::kBFloat16 ? attention_typed<Bf16>(q, k, v, cos, sin) : attention_typed<Float>(q, k, v, cos, sin);
}

// q_norm's and k_norm's weights and biases as float32 tensors, each checked to be (D,)
std::vector<at::Tensor> norm_tensors(at::TensorList norms, int64_t D, const char* op) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : norms) {
    out.push_back(t.to(at::kFloat).contiguous());
    TORCH_CHECK(out.back().numel() == D, "msdd ", op, ": every norm weight and bias must be (head dim,)");
  }
  return out;
}

// An MMDiT block's joint attention from its two streams' qkv projections, qkv0 (B, N0, 3 W) and qkv1 (B, N1, 3 W)
// (last dimension [q | k | v], each heads x D): q and k LayerNormed per head with the stream's q_norm and k_norm
// (norms: empty, or the 8 float32 tensors (D,) q0 weight, q0 bias, k0 weight, k0 bias, q1 ..., k1 ...), RoPE on the
// joint sequence [stream 0, stream 1], attention, and each stream's output (B, N_s, W).
template <class T>
std::tuple<at::Tensor, at::Tensor> joint_attention_typed(const at::Tensor& qkv0, const at::Tensor& qkv1, int64_t H,
                                                         const std::vector<at::Tensor>& norms, double eps,
                                                         const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t B = qkv0.size(0), n0 = qkv0.size(1), n1 = qkv1.size(1), W = qkv0.size(2) / 3, D = W / H;
  const at::Tensor* src[2] = {&qkv0, &qkv1};
  Rows<T> rows[3];
  for (int part = 0; part < 3; ++part)
    for (int st = 0; st < 2; ++st) {
      Rows<T>& r = rows[part];
      r.base[st] = reinterpret_cast<const typename T::Elem*>(src[st]->data_ptr()) + part * W;
      r.batch[st] = src[st]->size(1) * 3 * W, r.head[st] = D, r.token[st] = 3 * W, r.n0 = n0;
      if (part < 2 && !norms.empty()) {
        r.ln_w[st] = norms[4 * st + 2 * part].data_ptr<float>();
        r.ln_b[st] = norms[4 * st + 2 * part + 1].data_ptr<float>();
      }
    }
  at::Tensor out0 = at::empty({B, n0, W}, qkv0.options()), out1 = at::empty({B, n1, W}, qkv0.options());
  run_attention<T>(rows[0], rows[1], rows[2], B, H, n0 + n1, D, eps, cos, sin, out0, out1);
  return {out0, out1};
}

std::tuple<at::Tensor, at::Tensor> joint_attention(const at::Tensor& qkv0_in, const at::Tensor& qkv1_in,
                                                   int64_t heads, at::TensorList norms_in, double eps,
                                                   const std::optional<at::Tensor>& cos_in,
                                                   const std::optional<at::Tensor>& sin_in) {
  const auto dtype = qkv0_in.scalar_type();
  check_dtype(dtype, "joint_attention");
  TORCH_CHECK(qkv0_in.device().is_cpu() && qkv1_in.device().is_cpu() && qkv1_in.scalar_type() == dtype &&
              qkv0_in.dim() == 3 && qkv1_in.dim() == 3 && qkv0_in.size(0) == qkv1_in.size(0) &&
              qkv0_in.size(2) == qkv1_in.size(2) && heads > 0 && qkv0_in.size(2) % (3 * heads) == 0,
              "msdd joint_attention: qkv0 and qkv1 must be CPU tensors (B, N_s, 3 W) of one dtype, W divisible by heads");
  const at::Tensor qkv0 = qkv0_in.contiguous(), qkv1 = qkv1_in.contiguous();
  const int64_t W = qkv0.size(2) / 3, D = W / heads, N = qkv0.size(1) + qkv1.size(1);
  TORCH_CHECK(D % 32 == 0 && D <= kMaxHeadDim, "msdd joint_attention: the head dim must be a multiple of 32 up to 256");
  TORCH_CHECK(norms_in.empty() || norms_in.size() == 8, "msdd joint_attention: give 8 norm tensors or none");
  const std::vector<at::Tensor> norms = norm_tensors(norms_in, D, "joint_attention");
  const auto [cos, sin] = rope_tables(cos_in, sin_in, N, D);
  return dtype == at::kBFloat16 ? joint_attention_typed<Bf16>(qkv0, qkv1, heads, norms, eps, cos, sin)
                                : joint_attention_typed<Float>(qkv0, qkv1, heads, norms, eps, cos, sin);
}

// adaLN: out = LayerNorm(x) * (1 + scale) + shift over rows of W (no affine weights), with the gated residual
// x' = x + gate * y first where y is given (stored in res, in res's dtype, and normalised as stored). x, y, res and
// out are each bf16 or float32 (the flags); shift, scale and gate float32 (Bm, W) (the kernel's copies of the
// tensors, mod_rows), Bm = 1 (shared) or B (row r of x (B, n, W) reads row r / n). Everything is computed in float32
// and rounded once.
inline __m512 load_any(const void* p, bool bf16, int64_t i) {
  return bf16 ? Bf16::load16(static_cast<const uint16_t*>(p) + i) : _mm512_loadu_ps(static_cast<const float*>(p) + i);
}

inline void store_any(void* p, bool bf16, int64_t i, __m512 x) {
  if (bf16)
    Bf16::store16(static_cast<uint16_t*>(p) + i, x);
  else
    _mm512_storeu_ps(static_cast<float*>(p) + i, x);
}

struct AdalnArgs {
  const void* x;
  bool x16;
  const void* y = nullptr;  // with gate and res: the gated residual first
  bool y16 = false;
  const float* gate = nullptr;
  void* res = nullptr;
  bool res16 = false;
  const float* shift;
  const float* scale;
  void* out;
  bool out16;
  int64_t rows, n, w;
  bool per_batch;  // modulation rows per batch element, else one shared row
  float eps;
};

inline __m512 sum4(const __m512 (&v)[4]) {
  return _mm512_add_ps(_mm512_add_ps(v[0], v[1]), _mm512_add_ps(v[2], v[3]));
}

// adaLN for x's and out's dtypes (bf16: X16, O16), template arguments. A row's sums run in four chains (in one, each
// vector's add waited for the last: 48 dependent steps per pass at W = 768), faster with the dtypes fixed, most at 128
// rows and more (benchmarks/README.md, "The machine's state, a peak probed beside each sample, faster adaLN rows")
template <bool X16, bool O16>
void adaln_rows(const AdalnArgs& a) {
  at::parallel_for(0, a.rows, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(a.w);
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t m = a.per_batch ? (r / a.n) * a.w : 0, o = r * a.w;
      __m512 sum[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t i0 = 0; i0 < a.w; i0 += 64) {
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) {
          const int64_t i = i0 + 16 * k;
          if (i >= a.w) break;
          __m512 v = load_any(a.x, X16, o + i);
          if (a.y != nullptr) {
            v = _mm512_fmadd_ps(_mm512_loadu_ps(a.gate + m + i), load_any(a.y, a.y16, o + i), v);
            store_any(a.res, a.res16, o + i, v);
            if (a.res16) v = load_any(a.res, true, o + i);  // normalise the residual as stored
          }
          _mm512_storeu_ps(buf.data() + i, v);
          sum[k] = _mm512_add_ps(sum[k], v);
        }
      }
      const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum4(sum)) / static_cast<float>(a.w));
      __m512 sq[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t i0 = 0; i0 < a.w; i0 += 64) {
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) {
          const int64_t i = i0 + 16 * k;
          if (i >= a.w) break;
          const __m512 c = _mm512_sub_ps(_mm512_loadu_ps(buf.data() + i), mean);
          sq[k] = _mm512_fmadd_ps(c, c, sq[k]);
        }
      }
      const float var = _mm512_reduce_add_ps(sum4(sq)) / static_cast<float>(a.w);
      const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(var + a.eps));
      for (int64_t i = 0; i < a.w; i += 16) {
        const __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(buf.data() + i), mean), rstd);
        const __m512 mul = _mm512_add_ps(one, _mm512_loadu_ps(a.scale + m + i));
        store_any(a.out, O16, o + i, _mm512_fmadd_ps(c, mul, _mm512_loadu_ps(a.shift + m + i)));
      }
    }
  });
}

void adaln_impl(const AdalnArgs& a) {
  if (a.x16)
    a.out16 ? adaln_rows<true, true>(a) : adaln_rows<true, false>(a);
  else
    a.out16 ? adaln_rows<false, true>(a) : adaln_rows<false, false>(a);
}

// a bf16 or float32 tensor's values as float32 (bf16 widened exactly) in a buffer of the kernel's own: a decode's
// modulation is cached in bf16, and a conversion op per vector (adaLN's vectors, the linear layers' gates) was an
// allocation, a copy and a dispatch each, hundreds per decode
std::vector<float> float_values(const at::Tensor& t_in, const char* op) {
  check_dtype(t_in.scalar_type(), op);
  const at::Tensor t = t_in.contiguous();
  std::vector<float> out(t.numel());
  if (t.scalar_type() == at::kFloat) {
    std::memcpy(out.data(), t.data_ptr<float>(), out.size() * sizeof(float));
  } else {
    const auto* bits = reinterpret_cast<const uint16_t*>(t.data_ptr());
    for (size_t i = 0; i < out.size(); ++i) {
      const uint32_t word = static_cast<uint32_t>(bits[i]) << 16;
      std::memcpy(&out[i], &word, sizeof(float));
    }
  }
  return out;
}

// a modulation vector (Bm, W), Bm = 1 or B, as float_values
std::vector<float> mod_rows(const at::Tensor& t_in, int64_t B, int64_t W) {
  TORCH_CHECK(t_in.device().is_cpu() && t_in.dim() == 2 && (t_in.size(0) == 1 || t_in.size(0) == B) &&
              t_in.size(1) == W, "msdd adaln: shift, scale and gate must be (1, W) or (B, W) CPU tensors");
  return float_values(t_in, "adaln");
}

AdalnArgs adaln_args(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.size(2) % 16 == 0,
              "msdd adaln: x must be a CPU tensor (B, N, W), W a multiple of 16");
  check_dtype(x.scalar_type(), "adaln");
  AdalnArgs a;
  a.x = x.data_ptr(), a.x16 = x.scalar_type() == at::kBFloat16;
  a.rows = x.size(0) * x.size(1), a.n = x.size(1), a.w = x.size(2), a.eps = static_cast<float>(eps);
  a.per_batch = shift.size(0) > 1;
  TORCH_CHECK(scale.size(0) == shift.size(0), "msdd adaln: shift and scale must have the same rows");
  return a;
}

// LayerNorm(x) * (1 + scale) + shift, in the dtype the unfused ops give: x's promoted with shift's and scale's
at::Tensor adaln(const at::Tensor& x_in, const at::Tensor& shift_in, const at::Tensor& scale_in, double eps) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.dim() == 3, "msdd adaln: x must be a CPU tensor (B, N, W), W a multiple of 16");
  const int64_t B = x.size(0), W = x.size(2);
  const std::vector<float> shift = mod_rows(shift_in, B, W), scale = mod_rows(scale_in, B, W);
  AdalnArgs a = adaln_args(x, shift_in, scale_in, eps);
  const auto out_dtype = at::promote_types(x.scalar_type(), at::promote_types(shift_in.scalar_type(), scale_in.scalar_type()));
  check_dtype(out_dtype, "adaln");
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  a.shift = shift.data(), a.scale = scale.data();
  a.out = out.data_ptr(), a.out16 = out_dtype == at::kBFloat16;
  adaln_impl(a);
  return out;
}

// the gated residual x' = x + gate * y and adaln(x', shift, scale), each in the dtype the unfused ops give
std::tuple<at::Tensor, at::Tensor> gated_adaln(const at::Tensor& x_in, const at::Tensor& gate_in, const at::Tensor& y_in,
                                               const at::Tensor& shift_in, const at::Tensor& scale_in, double eps) {
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  TORCH_CHECK(y.sizes() == x.sizes() && y.device().is_cpu(), "msdd gated_adaln: x and y must have one shape");
  check_dtype(y.scalar_type(), "gated_adaln");
  TORCH_CHECK(x.dim() == 3, "msdd adaln: x must be a CPU tensor (B, N, W), W a multiple of 16");
  const int64_t B = x.size(0), W = x.size(2);
  const std::vector<float> gate = mod_rows(gate_in, B, W), shift = mod_rows(shift_in, B, W),
                           scale = mod_rows(scale_in, B, W);
  TORCH_CHECK(gate_in.size(0) == shift_in.size(0), "msdd gated_adaln: gate, shift and scale must have the same rows");
  AdalnArgs a = adaln_args(x, shift_in, scale_in, eps);
  const auto res_dtype = at::promote_types(x.scalar_type(), at::promote_types(gate_in.scalar_type(), y.scalar_type()));
  const auto out_dtype = at::promote_types(res_dtype, at::promote_types(shift_in.scalar_type(), scale_in.scalar_type()));
  check_dtype(res_dtype, "gated_adaln");
  check_dtype(out_dtype, "gated_adaln");
  at::Tensor res = at::empty(x.sizes(), x.options().dtype(res_dtype));
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  a.y = y.data_ptr(), a.y16 = y.scalar_type() == at::kBFloat16, a.gate = gate.data();
  a.res = res.data_ptr(), a.res16 = res_dtype == at::kBFloat16;
  a.shift = shift.data(), a.scale = scale.data();
  a.out = out.data_ptr(), a.out16 = out_dtype == at::kBFloat16;
  adaln_impl(a);
  return {res, out};
}

// swiglu: (..., 2H) [a, b] -> (..., H) silu(a) * b = a b / (1 + exp(-a)), in float32, rounded once; for bf16
// outputs exp and the division to 1.4e-4 (relative), under the bf16 rounding, which saves time (benchmarks/README.md,
// "Shorter bf16 exponentials, the fixed cost of a pass, and the runs after them")
template <class T>
inline __m512 silu_mul(__m512 a, __m512 b) {
  const __m512 one = _mm512_set1_ps(1.0f), minus_log2e = _mm512_set1_ps(-1.4426950408889634f);
  __m512 sig;  // silu(a) = a / (1 + 2^(-a log2 e))
  if constexpr (T::kPerWord == 2)  // to 1.4e-4 for a bf16 result: the short exponential, an approximate 1 / y
    sig = _mm512_mul_ps(a, _mm512_rcp14_ps(_mm512_add_ps(one, exp2v_bf16(_mm512_mul_ps(a, minus_log2e)))));
  else
    sig = _mm512_div_ps(a, _mm512_add_ps(one, exp2v(_mm512_mul_ps(a, minus_log2e))));
  return _mm512_mul_ps(sig, b);
}

template <class T>
void swiglu_impl(const typename T::Elem* in, typename T::Elem* out, int64_t rows, int64_t h) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const typename T::Elem* a = in + r * 2 * h;
      for (int64_t c = 0; c < h; c += 16)
        T::store16(out + r * h + c, silu_mul<T>(T::load16(a + c), T::load16(a + h + c)));
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

// Linear layers: out (M, N) = x (M, K) W^T + bias, or with `swiglu` (W the first layer of a SwiGLU MLP, N = 2 H of
// [a | b]) out (M, H) = silu(x a^T + bias_a) * (x b^T + bias_b), in float32 sums rounded once, on a weight packed by
// pack_linear: [N / 64][K words][64] 32-bit words (bf16: a word is a pair of consecutive elements along K, int8 four),
// panel p holding output features 64 p .. 64 p + 63, or with `swiglu` a's features 32 p .. 32 p + 31 then b's same
// ones.
// The products are the attention's (dot_tile: 6 rows x 64 features per register tile); tasks are (panel, block of
// rows), a thread's consecutive tasks sharing the panel, which stays in its L2. oneDNN's packed kernel ran the
// decoder's shapes no faster (benchmarks/README.md, "msdd's own linear kernel, faster attention packing, and the runs
// after them"); the SwiGLU gate here saves a pass over (M, 2 H) and the op.
// int8 (linear_int8): x quantised per row, symmetric (q = round(x * 127 / max |x_r|), stored as q + 128), the weight
// per output feature (s8, its scale s_c); the exact int32 sums less 128 times the weight's column sums, times
// s_c max |x_r| / 127, plus the bias.
// With a residual r (M, N) and a gate g (N,) (an MMDiT block's gated residuals, without swiglu): out = r + g * (the
// layer's output), rounded once, in the tile's epilogue: no pass over (M, N) after the layer.
struct LinearArgs {
  const float* bias;                 // (N,) in the panels' feature order
  const float* scale = nullptr;      // int8: the weight's scales (N,), same order
  const int32_t* comp = nullptr;     // int8: 128 x the column sums of the int8 weight (N,), same order
  const float* row_scale = nullptr;  // int8: max |x_r| / 127 of every row (M,)
  const float* gate = nullptr;       // with res: the gate (N,)
  const void* res = nullptr;         // the residual (M, N), in the output's dtype
  int64_t n = 0;                     // N: the residual's row length
};

// a tile's float32 outputs from its sums: + bias for bf16 and float32 products. The epilogues read their vectors
// from memory (L1): held in registers, they made the compiler spill the tile's accumulators
struct FloatSums {
  const float* bias;
  FloatSums(const LinearArgs& a, int64_t p) : bias(a.bias + p * kPanel) {}
  void prefetch(int64_t, int64_t) const {}
  __m512 operator()(__m512 acc, int c, int64_t) const { return _mm512_add_ps(acc, _mm512_loadu_ps(bias + 16 * c)); }
};

// int8 products: (sums - comp) s_c max |x_r| / 127 + bias
struct Int8Sums {
  const float *bias, *scale, *row_scale;
  const int32_t* comp;
  Int8Sums(const LinearArgs& a, int64_t p)
      : bias(a.bias + p * kPanel), scale(a.scale + p * kPanel), row_scale(a.row_scale), comp(a.comp + p * kPanel) {}
  void prefetch(int64_t, int64_t) const {}
  __m512 operator()(__m512i acc, int c, int64_t row) const {
    const __m512i sums = _mm512_sub_epi32(acc, _mm512_loadu_si512(comp + 16 * c));
    const __m512 s = _mm512_mul_ps(_mm512_loadu_ps(scale + 16 * c), _mm512_set1_ps(row_scale[row]));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), s, _mm512_loadu_ps(bias + 16 * c));
  }
};

// the gated residual around a tile's outputs: res + gate * sums (S: FloatSums or Int8Sums). Each tile prefetches the
// next tile's residual rows (`prefetch`; the other epilogues read nothing per row): the rows lie a row length apart,
// and their loads in the epilogue stalled the tile, a gated layer running well below its ungated rate
// (benchmarks/README.md, "Gated residuals prefetched, glibc malloc tuned, and what did not help")
template <class S, class O>
struct Gated {
  S sums;
  const float* gate;
  const typename O::Elem* res;
  int64_t ldr;
  Gated(const LinearArgs& a, int64_t p)
      : sums(a, p), gate(a.gate + p * kPanel), res(static_cast<const typename O::Elem*>(a.res) + p * kPanel),
        ldr(a.n) {}
  // the residual's lines in rows row .. row + rows - 1 (the panel's 64 features) on their way into the caches
  void prefetch(int64_t row, int64_t rows) const {
    constexpr int64_t bytes = kPanel * sizeof(typename O::Elem);
    for (int64_t r = row; r < row + rows; ++r) {
      const char* line = reinterpret_cast<const char*>(res + r * ldr);
      for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(line + b, _MM_HINT_T0);
    }
  }
  template <class A>
  __m512 operator()(A acc, int c, int64_t row) const {
    return _mm512_fmadd_ps(sums(acc, c, row), _mm512_loadu_ps(gate + 16 * c), O::load16(res + row * ldr + 16 * c));
  }
};

// R rows from `row` on of x's words against panel bp, into out (elements of O: bf16 or float32)
template <class T, class O, class S, int R, bool kSwiglu>
inline void linear_tile(const uint32_t* x, int64_t words, const uint32_t* bp, const S& sums, int64_t row,
                        typename O::Elem* out, int64_t ldo, const char* pf = nullptr, int64_t pf_lines = 0) {
  typename T::Acc acc[R][4];
  // pf_lines cache lines from pf on (the next weight panel) prefetched, spread evenly over the words
  int64_t due = 0;
  dot_tile<T, R>(x, words, bp, words, acc, [&](int64_t) {
    for (due += pf_lines; due >= words; due -= words, pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
  });
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    if constexpr (kSwiglu) {
#pragma GCC unroll 2
      for (int c = 0; c < 2; ++c)
        O::store16(out + r * ldo + 16 * c,
                   silu_mul<O>(sums(acc[r][c], c, row + r), sums(acc[r][c + 2], c + 2, row + r)));
    } else {
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) O::store16(out + r * ldo + 16 * c, sums(acc[r][c], c, row + r));
    }
  }
}

template <class T, class O, class S, bool kSwiglu, int R = kTile>
inline void linear_rows(int64_t rows, const uint32_t* x, int64_t words, const uint32_t* bp, const S& sums, int64_t row,
                        typename O::Elem* out, int64_t ldo) {  // the last rows % 6 of a block
  if constexpr (R > 0) {
    if (rows == R) return linear_tile<T, O, S, R, kSwiglu>(x, words, bp, sums, row, out, ldo);
    linear_rows<T, O, S, kSwiglu, R - 1>(rows, x, words, bp, sums, row, out, ldo);
  }
}

// Rows r0 .. r1 of x (`words` words per row, T's products) against weight panel p, row r's outputs at o + r * ldo
// (O's elements). The panel at `next` (the thread's next one, `words` words of 64 columns; null: none) goes into the
// caches during this one's full tiles, a slice of its lines per tile between their products: its first tile no longer
// waits for it (layers of 64 and 128 rows gain most; the hardware prefetcher alone fetched it too late, and
// prefetches issued all at once before each tile held up the tile's own loads; benchmarks/README.md, "A Zen 5 machine:
// the next weight panel prefetched, a pipelined attention, samples of a second").
// after(r): rows r0 .. r - 1 are written (after each full tile and at the end)
template <class T, class O, class S, bool kSwiglu, class After = Nothing>
void panel_rows(const uint32_t* xw, int64_t words, const uint32_t* wp, const LinearArgs& args, int64_t p,
                const uint32_t* next, int64_t r0, int64_t r1, typename O::Elem* o, int64_t ldo,
                const After& after = After()) {
  const uint32_t* bp = wp + p * words * kPanel;
  const S sums(args, p);
  const int64_t tiles = (r1 - r0) / kTile;
  const char* pf = next != nullptr && next != bp && tiles > 0 ? reinterpret_cast<const char*>(next) : nullptr;
  const int64_t lines = pf == nullptr ? 0 : words * kPanel * 4 / 64;
  const int64_t per_tile = tiles > 0 ? (lines + tiles - 1) / tiles : 0;
  int64_t r = r0;
  for (int64_t i = 0; r + kTile <= r1; r += kTile, ++i) {
    const int64_t first = std::min(lines, i * per_tile), count = std::min(lines, first + per_tile) - first;
    sums.prefetch(r + kTile, std::min(kTile, r1 - r - kTile));  // the next tile's residual rows, if any
    linear_tile<T, O, S, kTile, kSwiglu>(xw + r * words, words, bp, sums, r, o + r * ldo, ldo, pf + 64 * first,
                                         count);
    after(r + kTile);
  }
  if (r < r1) linear_rows<T, O, S, kSwiglu>(r1 - r, xw + r * words, words, bp, sums, r, o + r * ldo, ldo);
  after(r1);
}

// A layer's rows in chunks of about equal size whose inputs take at most chunk_bytes (8 MiB unless set), at least a
// tile: `count` chunks of `size` rows. Taken a chunk at a time through every weight panel, the inputs are read from
// memory once, instead of once per panel where they outgrow the caches, as at batch 16 (benchmarks/README.md, "Batch
// 16: inputs in chunks, and no mmap")
int64_t g_chunk_bytes = 8 << 20;
// sets the chunks' bytes (n > 0; 0: unchanged) and returns the value before: another machine's caches may want
// another, and the tests take chunks of a few rows
int64_t chunk_bytes(int64_t n) {
  const int64_t before = g_chunk_bytes;
  if (n > 0) g_chunk_bytes = n;
  return before;
}
struct Chunks {
  int64_t count, size;
  Chunks(int64_t rows, int64_t row_bytes, int64_t unit = kTile) {  // chunks of whole `unit`s of rows
    const int64_t units = (rows + unit - 1) / unit;
    count = std::max<int64_t>(1, std::min(units, (rows * row_bytes + g_chunk_bytes - 1) / g_chunk_bytes));
    size = (units + count - 1) / count * unit;
    count = std::max<int64_t>(1, (rows + size - 1) / size);
  }
};

// x: M rows of `words` words (T's products), out: O's elements
template <class T, class O, class S, bool kSwiglu>
void linear_impl(const uint32_t* xw, int64_t M, int64_t words, const uint32_t* wp, const LinearArgs& args, int64_t N,
                 typename O::Elem* out) {
  const int64_t panels = N / kPanel, cols = kSwiglu ? kPanel / 2 : kPanel;
  const int64_t ldo = kSwiglu ? N / 2 : N;
  const Chunks chunks(M, words * 4);
  const int64_t rows = std::min(M, chunks.size);
  // blocks of a chunk's rows where the chunks' panels alone leave a thread idle (at least 4 tasks per thread), as many
  // tasks for each thread where the rows allow: the final layer's 3 panels in 9 tasks gave one thread 5 while the
  // other waited (benchmarks/README.md, "Packing as the tiles finish, the final layer's tasks evenly, and what a
  // batch-1 pass still pays")
  const int64_t threads = at::get_num_threads(), tasks = chunks.count * panels, tiles = (rows + kTile - 1) / kTile;
  int64_t blocks = std::min(tiles, std::max<int64_t>(1, (4 * threads + tasks - 1) / tasks));
  while (blocks < tiles && tasks * blocks % threads != 0) ++blocks;
  const int64_t block_rows = ((rows + blocks - 1) / blocks + kTile - 1) / kTile * kTile, per_chunk = panels * blocks;
  at::parallel_for(0, chunks.count * per_chunk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c0 = task / per_chunk * chunks.size, t = task % per_chunk, p = t / blocks;
      const int64_t r0 = c0 + t % blocks * block_rows, r1 = std::min({M, c0 + chunks.size, r0 + block_rows});
      const int64_t next = task + 1 < end ? (task + 1) % per_chunk / blocks : p;
      if (r0 < r1)
        panel_rows<T, O, S, kSwiglu>(xw, words, wp, args, p, wp + next * words * kPanel, r0, r1, out + p * cols, ldo);
    }
  });
}

// linear_impl with the epilogue the call asks for: the gated residual, the SwiGLU gate, or the sums alone
template <class T, class O, class S>
void linear_any(const uint32_t* xw, int64_t M, int64_t words, const uint32_t* wp, const LinearArgs& args, int64_t N,
                bool swiglu, void* out) {
  auto* o = static_cast<typename O::Elem*>(out);
  if (args.res != nullptr)
    linear_impl<T, O, Gated<S, O>, false>(xw, M, words, wp, args, N, o);
  else if (swiglu)
    linear_impl<T, O, S, true>(xw, M, words, wp, args, N, o);
  else
    linear_impl<T, O, S, false>(xw, M, words, wp, args, N, o);
}

// The two streams' same layer (the output projections, or the MLP's first or second layers: one shape, N and
// `words`) as one run of tasks, for an image stream of few rows: task p takes panel p of layer 0 (the context
// stream's) over all its rows, then panel p of layer 1 (the image stream's). Alone, a layer of 16 rows waits for its
// weights, which come from memory once per pass, its few tiles too short to fetch the next panel (the 32-px stage's
// image layers after the attention ran far below the matmul rate; benchmarks/README.md, "Less outside the blocks op,
// and the 32-px stage's two streams as pairs");
// here the first half of layer 0's tiles fetch layer 1's panel and the second half layer 0's next one. Every row's
// outputs are those of linear_impl (the same tiles' products in the same order). Both layers' inputs in one chunk.
template <class T, class O, class S, bool kSwiglu>
void pair_impl(const uint32_t* const (&xw)[2], const int64_t (&M)[2], int64_t words, const uint32_t* const (&wp)[2],
               const LinearArgs (&args)[2], int64_t N, void* const (&out)[2]) {
  const int64_t panels = N / kPanel, cols = kSwiglu ? kPanel / 2 : kPanel, ldo = kSwiglu ? N / 2 : N;
  const int64_t half = M[0] / kTile / 2 * kTile;  // layer 0's rows whose tiles fetch layer 1's panel
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      auto* o0 = static_cast<typename O::Elem*>(out[0]) + p * cols;
      const uint32_t* next = p + 1 < end ? wp[0] + (p + 1) * words * kPanel : nullptr;
      panel_rows<T, O, S, kSwiglu>(xw[0], words, wp[0], args[0], p, wp[1] + p * words * kPanel, 0, half, o0, ldo);
      panel_rows<T, O, S, kSwiglu>(xw[0], words, wp[0], args[0], p, next, half, M[0], o0, ldo);
      panel_rows<T, O, S, kSwiglu>(xw[1], words, wp[1], args[1], p, nullptr, 0, M[1],
                                   static_cast<typename O::Elem*>(out[1]) + p * cols, ldo);
    }
  });
}

// A linear layer's weight (N, K), bf16, float32 or int8, N a multiple of 64 (with swiglu, of 128), K of 2 (int8: of 4),
// packed for linear() or linear_int8() (int32 [N / 64, K words, 64]), and its bias (N,) reordered the same way as
// float32 (zeros without one)
std::tuple<at::Tensor, at::Tensor> pack_linear(const at::Tensor& w_in, const std::optional<at::Tensor>& bias_in,
                                               bool swiglu) {
  const auto dtype = w_in.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kChar,
              "msdd pack_linear: the weight must be bf16, float32 or int8");
  const int64_t per_word = 4 / w_in.element_size();
  TORCH_CHECK(w_in.dim() == 2 && w_in.device().is_cpu() && w_in.size(0) % (swiglu ? 2 * kPanel : kPanel) == 0 &&
              w_in.size(1) % per_word == 0,
              "msdd pack_linear: the weight must be a CPU (N, K) tensor, N a multiple of ",
              swiglu ? 2 * kPanel : kPanel, " and K of ", per_word);
  const at::Tensor w = w_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1), words = K / per_word;
  auto feature = [&](int64_t p, int64_t c) {  // the weight row of panel p's column c
    return swiglu ? (c < kPanel / 2 ? p * kPanel / 2 + c : N / 2 + p * kPanel / 2 + c - kPanel / 2) : p * kPanel + c;
  };
  at::Tensor packed = at::empty({N / kPanel, words, kPanel}, w.options().dtype(at::kInt));
  const auto* src = reinterpret_cast<const uint32_t*>(w.data_ptr());
  auto* dst = reinterpret_cast<uint32_t*>(packed.data_ptr());
  at::parallel_for(0, N / kPanel, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t c = 0; c < kPanel; ++c)
        for (int64_t k = 0; k < words; ++k) dst[(p * words + k) * kPanel + c] = src[feature(p, c) * words + k];
  });
  at::Tensor bias = at::zeros({N}, w.options().dtype(at::kFloat));
  if (bias_in.has_value()) {
    const at::Tensor b = bias_in->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == N, "msdd pack_linear: the bias must be (N,)");
    for (int64_t p = 0; p < N / kPanel; ++p)
      for (int64_t c = 0; c < kPanel; ++c) bias.data_ptr<float>()[p * kPanel + c] = b.data_ptr<float>()[feature(p, c)];
  }
  return {packed, bias};
}

// What linear and linear_int8 share: x (..., K), bf16 or float32, checked against a weight packed with `per_word`
// elements per 32-bit word; x contiguous, its M rows, and the output (..., N), or (..., N / 2) with swiglu, in x's
// dtype; the residual (x's dtype, the output's shape) and the gate (N elements, as float32) where they are given
struct LinearCall {
  at::Tensor x, packed, out, residual;
  std::vector<float> gate;
  int64_t M, N, K;
};

LinearCall linear_call(const at::Tensor& x_in, const at::Tensor& packed_in, int64_t per_word, bool swiglu,
                       const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& gate,
                       const char* op) {
  check_dtype(x_in.scalar_type(), op);
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() >= 1 && packed_in.dim() == 3 &&
              packed_in.scalar_type() == at::kInt && packed_in.size(2) == kPanel &&
              x_in.size(-1) == packed_in.size(1) * per_word,
              "msdd ", op, ": x (..., K) must be a CPU tensor matching the packed weight (N / 64, K / ", per_word,
              ", 64)");
  LinearCall c{x_in.contiguous(), packed_in.contiguous(), {}, {}, {}, 0, packed_in.size(0) * kPanel, x_in.size(-1)};
  c.M = c.x.numel() / c.K;
  std::vector<int64_t> sizes = c.x.sizes().vec();
  sizes.back() = swiglu ? c.N / 2 : c.N;
  c.out = at::empty(sizes, c.x.options());
  TORCH_CHECK(residual.has_value() == gate.has_value() && !(residual.has_value() && swiglu),
              "msdd ", op, ": give the residual and the gate together, without swiglu");
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == c.x.scalar_type() && residual->device().is_cpu() &&
                residual->sizes() == c.out.sizes() && gate->numel() == c.N,
                "msdd ", op, ": the residual must be x's dtype and the output's shape (..., N), the gate N elements");
    c.residual = residual->contiguous();
    TORCH_CHECK(gate->device().is_cpu(), "msdd ", op, ": the gate must be a CPU tensor");
    c.gate = float_values(*gate, op);
  }
  return c;
}

// the epilogue's arguments for the call's residual and gate, where it has them
void add_residual(LinearArgs& args, const LinearCall& c) {
  if (!c.residual.defined()) return;
  args.gate = c.gate.data(), args.res = c.residual.data_ptr(), args.n = c.N;
}

// x (..., K) -> (..., N), or (..., N / 2) with swiglu, in x's dtype (bf16 or float32, the dtype the weight was packed
// from), on a weight and bias from pack_linear
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& bias, bool swiglu,
                  const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& gate) {
  const auto dtype = x_in.scalar_type();
  const int64_t per_word = dtype == at::kBFloat16 ? 2 : 1;
  const LinearCall c = linear_call(x_in, packed, per_word, swiglu, residual, gate, "linear");
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == c.N,
              "msdd linear: the bias must be pack_linear's float32 (N,)");
  if (c.M == 0) return c.out;
  LinearArgs args{bias.data_ptr<float>()};
  add_residual(args, c);
  const auto* wp = reinterpret_cast<const uint32_t*>(c.packed.data_ptr());
  const auto* xw = reinterpret_cast<const uint32_t*>(c.x.data_ptr());
  const int64_t words = c.K / per_word;
  if (dtype == at::kBFloat16)
    linear_any<Bf16, Bf16, FloatSums>(xw, c.M, words, wp, args, c.N, swiglu, c.out.data_ptr());
  else
    linear_any<Float, Float, FloatSums>(xw, c.M, words, wp, args, c.N, swiglu, c.out.data_ptr());
  return c.out;
}

template <class T, class O, class S>
void pair_any(const uint32_t* const (&xw)[2], const int64_t (&M)[2], int64_t words, const uint32_t* const (&wp)[2],
              const LinearArgs (&args)[2], int64_t N, bool swiglu, void* const (&out)[2]) {
  if (args[0].res != nullptr)
    pair_impl<T, O, Gated<S, O>, false>(xw, M, words, wp, args, N, out);
  else if (swiglu)
    pair_impl<T, O, S, true>(xw, M, words, wp, args, N, out);
  else
    pair_impl<T, O, S, false>(xw, M, words, wp, args, N, out);
}

// image-stream rows up to which `blocks` runs the two streams' layers after the attention as pairs (pair_impl): the
// pairs made the blocks op faster at 16 rows (batch 1 at 32 px), not at 32 rows (batch 2) nor at 64 (64 px)
// (benchmarks/README.md, "Less outside the blocks op, and the 32-px stage's two streams as pairs")
constexpr int64_t kPairRows = 24;

// linear() of the two streams' same layer, the weight and bias of layer l at params[idx[l]] and params[idx[l] + 1], on
// x[l] with the residual res[l] and gate gate[l] where res is given, as one run of tasks (pair_impl); the layers one
// by one where their shapes differ or an input takes more than a chunk
std::array<at::Tensor, 2> linear_pair(at::TensorList params, const size_t (&idx)[2], const at::Tensor (&x)[2],
                                      bool swiglu, const at::Tensor* res, const at::Tensor* gate) {
  const auto dtype = x[0].scalar_type();
  const int64_t per_word = dtype == at::kBFloat16 ? 2 : 1;
  auto opt = [](const at::Tensor* t, int l) { return t == nullptr ? std::optional<at::Tensor>() : t[l]; };
  LinearCall c[2];
  for (int l = 0; l < 2; ++l)
    c[l] = linear_call(x[l], params[idx[l]], per_word, swiglu, opt(res, l), opt(gate, l), "blocks");
  const int64_t words = c[0].K / per_word;
  if (x[1].scalar_type() != dtype || c[0].N != c[1].N || c[0].K != c[1].K || c[0].M == 0 || c[1].M == 0 ||
      Chunks(c[0].M, words * 4).count > 1 || Chunks(c[1].M, words * 4).count > 1) {
    std::array<at::Tensor, 2> out;
    for (int l = 0; l < 2; ++l)
      out[l] = linear(x[l], params[idx[l]], params[idx[l] + 1], swiglu, opt(res, l), opt(gate, l));
    return out;
  }
  LinearArgs args[2];
  for (int l = 0; l < 2; ++l) {
    const at::Tensor& bias = params[idx[l] + 1];
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == c[l].N,
                "msdd blocks: a layer's bias must be pack_linear's float32 (N,)");
    args[l] = LinearArgs{bias.data_ptr<float>()};
    add_residual(args[l], c[l]);
  }
  const uint32_t* const xw[2] = {reinterpret_cast<const uint32_t*>(c[0].x.data_ptr()),
                                 reinterpret_cast<const uint32_t*>(c[1].x.data_ptr())};
  const uint32_t* const wp[2] = {reinterpret_cast<const uint32_t*>(c[0].packed.data_ptr()),
                                 reinterpret_cast<const uint32_t*>(c[1].packed.data_ptr())};
  const int64_t M[2] = {c[0].M, c[1].M};
  void* const out[2] = {c[0].out.data_ptr(), c[1].out.data_ptr()};
  if (dtype == at::kBFloat16)
    pair_any<Bf16, Bf16, FloatSums>(xw, M, words, wp, args, c[0].N, swiglu, out);
  else
    pair_any<Float, Float, FloatSums>(xw, M, words, wp, args, c[0].N, swiglu, out);
  return {c[0].out, c[1].out};
}

// rows of x (M, K), K a multiple of 4, as u8 words for Int8's products: q + 128 with q = round(x * 127 / max |x_r|)
// (to nearest, ties to even), and the rows' scales max |x_r| / 127 (a row of zeros: q = 0, scale 0)
template <class O>
void quantise_rows(const typename O::Elem* x, int64_t M, int64_t K, uint8_t* q, float* row_scale) {
  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const typename O::Elem* row = x + r * K;
      const int64_t full = K / 16 * 16;
      const __mmask16 tail = first_lanes(K - full);
      __m512 mx = _mm512_setzero_ps();
      for (int64_t k = 0; k < full; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(O::load16(row + k)));
      if (tail) mx = _mm512_max_ps(mx, _mm512_abs_ps(O::load16_masked(row + full, tail)));
      const float amax = _mm512_reduce_max_ps(mx);
      row_scale[r] = amax / 127.0f;
      const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      const __m512i offset = _mm512_set1_epi32(128);
      auto quantise = [&](__m512 x) { return _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(x, inv)), offset); };
      for (int64_t k = 0; k < full; k += 16)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + r * K + k), _mm512_cvtepi32_epi8(quantise(O::load16(row + k))));
      if (tail) _mm512_mask_cvtepi32_storeu_epi8(q + r * K + full, tail, quantise(O::load16_masked(row + full, tail)));
    }
  });
}

// x (..., K) bf16 or float32 -> (..., N), or (..., N / 2) with swiglu, in x's dtype, through an int8 weight packed by
// pack_linear with its scales (N,), compensations comp (N,) int32 = 128 x the int8 weight's column sums, and bias (N,),
// all three float32 / int32 in the panels' feature order
at::Tensor linear_int8(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scale,
                       const at::Tensor& comp, const at::Tensor& bias, bool swiglu,
                       const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& gate) {
  const auto dtype = x_in.scalar_type();
  const LinearCall c = linear_call(x_in, packed, 4, swiglu, residual, gate, "linear_int8");
  const at::Tensor &x = c.x, &pw = c.packed, &out = c.out;
  const int64_t M = c.M, N = c.N, K = c.K;
  for (const at::Tensor* t : {&scale, &bias})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == N,
                "msdd linear_int8: scale and bias must be float32 (N,) in the panels' order");
  TORCH_CHECK(comp.scalar_type() == at::kInt && comp.is_contiguous() && comp.numel() == N,
              "msdd linear_int8: comp must be int32 (N,) in the panels' order");
  if (M == 0) return out;
  std::unique_ptr<uint8_t[]> q(new uint8_t[M * K]);
  std::vector<float> row_scale(M);
  LinearArgs args{bias.data_ptr<float>(), scale.data_ptr<float>(), comp.data_ptr<int32_t>(), row_scale.data()};
  add_residual(args, c);
  const auto* wp = reinterpret_cast<const uint32_t*>(pw.data_ptr());
  const auto* xw = reinterpret_cast<const uint32_t*>(q.get());
  if (dtype == at::kBFloat16) {
    quantise_rows<Bf16>(reinterpret_cast<const uint16_t*>(x.data_ptr()), M, K, q.get(), row_scale.data());
    linear_any<Int8, Bf16, Int8Sums>(xw, M, K / 4, wp, args, N, swiglu, out.data_ptr());
  } else {
    quantise_rows<Float>(x.data_ptr<float>(), M, K, q.get(), row_scale.data());
    linear_any<Int8, Float, Int8Sums>(xw, M, K / 4, wp, args, N, swiglu, out.data_ptr());
  }
  return out;
}

// One panel of a stream's qkv projection (64 features: the queries, keys or values of heads h0 .. h0 + 64 / D - 1,
// `part` 0, 1, 2) for tokens i0 .. i1 - 1 of the stream's n tokens of batch element b, rows of 64 elements from src
// (token i at src + i * 64), into the attention's packed operands as pack_panel packs them from the qkv tensor: q
// and k LayerNormed (ln_w, ln_b) and rotated (cos, sin) first where given, in float32, rounded once. The stream's
// tokens are joint tokens t0 .. t0 + n - 1, t0 and i0 multiples of 16 (the keys' groups), i1 too unless it is n;
// with i1 = n the last stream also writes the zeros past N.
template <class T, int V>
void pack_qkv_panel(const typename T::Elem* src, int64_t b, int64_t i0, int64_t i1, int64_t n, int64_t t0, bool last,
                    int part, int64_t h0, Packed<T>& pk, const float* ln_w, const float* ln_b, float eps,
                    const float* cos, const float* sin) {
  using Elem = typename T::Elem;
  constexpr int64_t d = 16 * V, words = d / T::kPerWord;
  const int64_t H = pk.H, N = pk.N, npad = pk.npad;
  auto prep = [&](const Elem* x, int64_t t, __m512 (&r)[1][V]) {
    prep_rows<T, V, 1>({x}, {ln_w}, {ln_b}, eps, cos == nullptr ? nullptr : cos + t * d,
                       sin == nullptr ? nullptr : sin + t * d, r);
  };
  const bool tail = last && i1 == n;  // the zeros past N too
  for (int64_t h = h0; h < h0 + kPanel / d; ++h) {
    const Elem* rows = src + (h - h0) * d;  // the stream's token i at rows + i * 64
    if (part == 0) {
      Elem* q = pk.qp.get() + ((b * H + h) * N + t0) * d;
      for (int64_t i = i0; i < i1; ++i) {
        __m512 r[1][V];
        prep(rows + i * kPanel, t0 + i, r);
#pragma GCC unroll 16
        for (int j = 0; j < V; ++j) T::store16(q + i * d + 16 * j, r[0][j]);
      }
    } else if (part == 1) {  // 16 keys at a time into a buffer, then transposed into their panel
      alignas(64) uint32_t kbuf[16 * words];
      for (int64_t g = t0 + i0; g < (tail ? npad : t0 + i1); g += 16) {
        for (int64_t c = 0; c < 16; ++c) {
          if (g + c >= t0 + i1) {
            std::memset(kbuf + c * words, 0, words * sizeof(uint32_t));
            continue;
          }
          __m512 r[1][V];
          prep(rows + (g + c - t0) * kPanel, g + c, r);
#pragma GCC unroll 16
          for (int j = 0; j < V; ++j) T::store16(reinterpret_cast<Elem*>(kbuf + c * words) + 16 * j, r[0][j]);
        }
        store_keys16(kbuf, words,
                     pk.kp.get() + (b * H + h) * npad * words + g / kPanel * words * kPanel + g % kPanel);
      }
    } else {  // values: kPerWord tokens per word
      for (int64_t j = (t0 + i0) / T::kPerWord; j < (tail ? pk.vwords : (t0 + i1) / T::kPerWord); ++j) {
        const Elem* x[2] = {nullptr, nullptr};
        for (int64_t i = 0; i < T::kPerWord; ++i) {
          const int64_t t = j * T::kPerWord + i;
          x[i] = t < t0 + n ? rows + (t - t0) * kPanel : nullptr;
        }
        uint32_t* out = pk.vp.get() + ((b * H + h) * pk.vwords + j) * d;
        for (int64_t e = 0; e < d; e += 16) _mm512_storeu_si512(out + e, T::words16(x, e));
      }
    }
  }
}

// A stream's qkv projection (x: M = B n rows of `words` words, T's products; the weight packed by pack_linear, args
// its epilogue's) written straight into the attention's packed operands: a task is a panel of the layer over a
// chunk's rows (whole images, Chunks; every row at batch 1 and 2), computed into the thread's buffer (rows x 64: 128
// KB for a 1024-token bf16 stream, in its L2) and packed from there (pack_qkv_panel), instead of the (B, n, 3 W)
// tensor and the attention's packing pass over it, which read the tensor back from L3 or memory. A thread's run of
// tasks takes the q, k and v panels of the same heads in turn (the panels in order would give one thread the queries
// and the other the values, which need no LayerNorm). Bit for bit as before, and faster (benchmarks/README.md, "The
// qkv layers write the attention's packed operands").
// The rows are packed as the tiles finish them, 16 tokens (a group of keys) at a time, between the tiles' products
// (panel_rows' `after`), not in a pass after the panel's tiles: the packing's stores overlap the next tile's products
// (bit for bit; faster qkv layers, a gain within a whole decode's noise: benchmarks/README.md, "Packing as the tiles
// finish, the final layer's tasks evenly, and what a batch-1 pass still pays"). norms: q_norm's weight and bias,
// k_norm's (null: none); D 32 or 64.
template <class T, class O, class S>
void qkv_packed(const uint32_t* xw, int64_t M, int64_t words, const uint32_t* wp, const LinearArgs& args, int64_t n,
                int64_t t0, bool last, const float* const (&norms)[4], float eps, const float* cos, const float* sin,
                Packed<O>& pk) {
  const int64_t per_part = pk.H * pk.D / kPanel, panels = 3 * per_part;
  const Chunks chunks(M, words * 4, n);  // of whole batch elements
  auto panel = [&](int64_t task) { return task % panels % 3 * per_part + task % panels / 3; };
  at::parallel_for(0, chunks.count * panels, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<typename O::Elem[]> buf(new typename O::Elem[std::min(M, chunks.size) * kPanel]);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = panel(task), t = task % panels, h0 = t / 3 * (kPanel / pk.D);
      const int64_t r0 = task / panels * chunks.size, r1 = std::min(M, r0 + chunks.size);
      const int part = static_cast<int>(t % 3);
      LinearArgs a = args;  // the chunk's rows from 0
      if (a.row_scale != nullptr) a.row_scale += r0;
      const uint32_t* next = wp + (task + 1 < end ? panel(task + 1) : p) * words * kPanel;
      const float *w = part < 2 ? norms[2 * part] : nullptr, *b = part < 2 ? norms[2 * part + 1] : nullptr;
      const float *c = part < 2 ? cos : nullptr, *s = part < 2 ? sin : nullptr;
      int64_t done = 0;  // the chunk's rows packed so far
      auto pack = [&](int64_t rows) {  // the chunk's rows up to `rows` are computed: pack whole groups of 16 tokens
        while (done < rows) {
          const int64_t e = done / n, i0 = done % n, ready = std::min(n, rows - e * n);  // of batch element e
          const int64_t i1 = ready == n ? n : ready / 16 * 16;
          if (i1 <= i0) return;
          const typename O::Elem* src = buf.get() + e * n * kPanel;
          if (pk.D == 64)
            pack_qkv_panel<O, 4>(src, r0 / n + e, i0, i1, n, t0, last, part, h0, pk, w, b, eps, c, s);
          else
            pack_qkv_panel<O, 2>(src, r0 / n + e, i0, i1, n, t0, last, part, h0, pk, w, b, eps, c, s);
          done = e * n + i1;
        }
      };
      panel_rows<T, O, S, false>(xw + r0 * words, words, wp, a, p, next, 0, r1 - r0, buf.get(), kPanel, pack);
    }
  });
}

// An MMDiT block's two qkv projections and its joint attention, the projections written packed (qkv_packed): h the
// streams' adaLN outputs (B, n_s, W) in O's dtype, their qkv layers' params at params[layer[s]] (as `blocks` takes
// them), norms the 8 q_norm / k_norm tensors as joint_attention takes them. Each stream's output (B, n_s, W). Takes
// D = 32 or 64 and n_0 a multiple of 16 (`blocks` checks).
template <class O>
std::tuple<at::Tensor, at::Tensor> qkv_attention(const at::Tensor (&h)[2], at::TensorList params,
                                                 const size_t (&layer)[2], bool int8, int64_t H,
                                                 const std::vector<at::Tensor>& norms, double eps,
                                                 const at::Tensor& cos_in, const at::Tensor& sin_in) {
  const at::Tensor x[2] = {h[0].contiguous(), h[1].contiguous()};
  const int64_t B = x[0].size(0), n0 = x[0].size(1), n1 = x[1].size(1), W = x[0].size(2), D = W / H, N = n0 + n1;
  const auto [cos, sin] = rope_tables(cos_in, sin_in, N, D);
  const std::vector<at::Tensor> nf = norm_tensors(norms, D, "blocks");
  Packed<O> pk(B, H, N, n0, D);
  const float* c = cos.defined() ? cos.data_ptr<float>() : nullptr;
  const float* s = sin.defined() ? sin.data_ptr<float>() : nullptr;
  for (int st = 0; st < 2; ++st) {
    const int64_t M = B * x[st].size(1), per_word = int8 ? 4 : O::kPerWord;
    const at::Tensor& w = params[layer[st]];
    TORCH_CHECK(x[st].dim() == 3 && x[st].size(0) == B && x[st].size(2) == W,
                "msdd blocks: x and c must be (B, N, W) and (B, L, W)");
    TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kInt && w.size(0) * kPanel == 3 * W &&
                    w.size(1) * per_word == W && w.size(2) == kPanel,
                "msdd blocks: a qkv layer's packed weight must be (3 W / 64, W / ", per_word, ", 64) int32");
    for (size_t i = 1; i < (int8 ? 4u : 2u); ++i)
      TORCH_CHECK(params[layer[st] + i].numel() == 3 * W && params[layer[st] + i].is_contiguous() &&
                      params[layer[st] + i].scalar_type() == (int8 && i == 2 ? at::kInt : at::kFloat),
                  "msdd blocks: a qkv layer's bias (and int8 scales, compensations) must be pack_linear's (3 W,)");
    const float* nrm[4];
    for (int i = 0; i < 4; ++i) nrm[i] = nf[4 * st + i].data_ptr<float>();
    const auto* xw = reinterpret_cast<const uint32_t*>(x[st].data_ptr());
    const auto* wp = reinterpret_cast<const uint32_t*>(w.data_ptr());
    if (int8) {
      std::unique_ptr<uint8_t[]> q(new uint8_t[M * W]);
      std::vector<float> row_scale(M);
      quantise_rows<O>(reinterpret_cast<const typename O::Elem*>(xw), M, W, q.get(), row_scale.data());
      const LinearArgs args{params[layer[st] + 3].data_ptr<float>(), params[layer[st] + 1].data_ptr<float>(),
                            params[layer[st] + 2].data_ptr<int32_t>(), row_scale.data()};
      qkv_packed<Int8, O, Int8Sums>(reinterpret_cast<const uint32_t*>(q.get()), M, W / 4, wp, args, x[st].size(1),
                                    st == 0 ? 0 : n0, st == 1, nrm, static_cast<float>(eps), c, s, pk);
    } else {
      const LinearArgs args{params[layer[st] + 1].data_ptr<float>()};
      qkv_packed<O, O, FloatSums>(xw, M, W / O::kPerWord, wp, args, x[st].size(1), st == 0 ? 0 : n0, st == 1, nrm,
                                  static_cast<float>(eps), c, s, pk);
    }
  }
  phase_end(kPhaseQkv);
  at::Tensor out0 = at::empty({B, n0, W}, x[0].options()), out1 = at::empty({B, n1, W}, x[0].options());
  attention_tiles<O>(pk, reinterpret_cast<typename O::Elem*>(out0.data_ptr()),
                     reinterpret_cast<typename O::Elem*>(out1.data_ptr()));
  return {out0, out1};
}

// An MMDiT decoder pass's blocks in one call, each block as msdd.models.layers.JointBlock runs it on the optimised
// path, by the kernels above: each stream's adaLN and qkv projection, the joint attention, then for each full stream
// (not pre_only) the output projection with its gated residual, adaLN, the SwiGLU MLP's first layer with its gate
// and its second layer with its gated residual. x (B, N, W) image tokens, c (B, L, W) context tokens; `full` two
// flags per block (image stream, context stream), 0 for a stream that only gives keys and values (allowed in the last
// block only, and never for the image stream, which is returned); `params` per block and stream in order: its
// modulation vectors (shift, scale, gate, shift, scale, gate; shift, scale alone when not full, each (1, W)), each
// layer's packed weight and bias from pack_linear (`int8`: linear_int8's packed weight, scales, compensations and
// bias) for qkv, then the projection, the MLP's first layer (packed with swiglu) and second layer when full, then
// q_norm's weight and bias and k_norm's; eps the adaLN norms', qk_eps q_norm's and k_norm's; cos and sin the RoPE
// tables of the joint sequence. Every matmul computes in `bf16` or float32 (what the weights were packed from; int8
// products with bf16 or float32 around them); an input in another dtype is converted first, as the linear layers'
// forward does. One call instead of a Python loop over the blocks' 13 kernel calls, whose Python and dispatch were a
// visible share of a paper-256 student decode (benchmarks/README.md, "A decoder pass's blocks in one call, and what a
// batch-1 pass pays"). The qkv layers and the attention through qkv_attention where it applies (see qkv_packed); the
// layers after the attention as pairs of the two streams' (linear_pair) where the image stream has at most kPairRows
// rows.
at::Tensor blocks(const at::Tensor& x, const at::Tensor& c, at::TensorList params, at::IntArrayRef full, int64_t heads,
                  double eps, double qk_eps, const at::Tensor& cos, const at::Tensor& sin, bool bf16, bool int8) {
  TORCH_CHECK(!full.empty() && full.size() % 2 == 0, "msdd blocks: give two flags per block (image stream, context "
              "stream), got ", full.size());
  const size_t n_blocks = full.size() / 2, per_layer = int8 ? 4 : 2;
  size_t expected = 0;
  for (size_t i = 0; i < full.size(); ++i) {
    TORCH_CHECK(full[i] == 1 || (full[i] == 0 && i % 2 == 1 && i / 2 == n_blocks - 1),
                "msdd blocks: only the last block's context stream may be pre_only (flag 0); flags are 0 or 1");
    expected += full[i] ? 10 + 4 * per_layer : 6 + per_layer;
  }
  TORCH_CHECK(params.size() == expected, "msdd blocks: ", n_blocks, " blocks with these flags take ", expected,
              " params (", 10 + 4 * per_layer, " per full stream, ", 6 + per_layer, " per pre_only one), got ",
              params.size());
  const auto dtype = bf16 ? at::kBFloat16 : at::kFloat;
  auto in_dtype = [&](const at::Tensor& t) { return t.scalar_type() == dtype ? t : t.to(dtype); };
  const std::optional<at::Tensor> none;
  // the layer whose params start at p
  auto layer = [&](size_t p, const at::Tensor& in, bool swiglu, const std::optional<at::Tensor>& res,
                   const std::optional<at::Tensor>& gate) {
    return int8 ? linear_int8(in, params[p], params[p + 1], params[p + 2], params[p + 3], swiglu, res, gate)
                : linear(in, params[p], params[p + 1], swiglu, res, gate);
  };
  at::Tensor s[2] = {in_dtype(x), in_dtype(c)};
  // the qkv projections written packed for the attention where a weight panel holds whole heads and stream 0's tokens
  // fill the keys' groups of 16
  const int64_t W = x.size(-1), D = heads > 0 && W % heads == 0 ? W / heads : 0;
  const bool packed = x.dim() == 3 && c.dim() == 3 && (D == 32 || D == 64) && W % kPanel == 0 && x.size(1) > 0 &&
                      x.size(1) % 16 == 0 && c.size(1) > 0;
  size_t i = 0;
  phase_start();
  for (size_t b = 0; b < n_blocks; ++b) {
    at::Tensor h[2];
    size_t mods[2], qkv[2];
    std::vector<at::Tensor> norms;
    for (int st = 0; st < 2; ++st) {
      const bool f = full[2 * b + st];
      const size_t w = i + (f ? 6 : 2), nrm = w + (f ? 4 : 1) * per_layer;
      mods[st] = i, qkv[st] = w;
      h[st] = in_dtype(adaln(s[st], params[i], params[i + 1], eps));
      norms.insert(norms.end(), params.begin() + nrm, params.begin() + nrm + 4);
      i = nrm + 4;
    }
    phase_end(kPhaseAdaln);
    at::Tensor out[2];
    if (packed) {
      std::tie(out[0], out[1]) = bf16 ? qkv_attention<Bf16>(h, params, qkv, int8, heads, norms, qk_eps, cos, sin)
                                      : qkv_attention<Float>(h, params, qkv, int8, heads, norms, qk_eps, cos, sin);
    } else {
      const at::Tensor qkv0 = layer(qkv[0], h[0], false, none, none), qkv1 = layer(qkv[1], h[1], false, none, none);
      phase_end(kPhaseQkv);
      std::tie(out[0], out[1]) = joint_attention(qkv0, qkv1, heads, norms, qk_eps, cos, sin);
    }
    phase_end(kPhaseAttention);
    if (!int8 && full[2 * b] && full[2 * b + 1] && s[0].numel() / W <= kPairRows) {  // the context stream first
      const size_t m[2] = {mods[1], mods[0]}, w[2] = {m[0] + 6 + per_layer, m[1] + 6 + per_layer};
      const at::Tensor in[2] = {out[1], out[0]}, res_in[2] = {s[1], s[0]};
      const at::Tensor gate[2] = {params[m[0] + 2], params[m[1] + 2]}, gate2[2] = {params[m[0] + 5], params[m[1] + 5]};
      const auto res = linear_pair(params, w, in, false, res_in, gate);
      phase_end(kPhaseProj);
      const at::Tensor h[2] = {in_dtype(adaln(res[0], params[m[0] + 3], params[m[0] + 4], eps)),
                               in_dtype(adaln(res[1], params[m[1] + 3], params[m[1] + 4], eps))};
      phase_end(kPhaseAdaln);
      const size_t w12[2] = {w[0] + per_layer, w[1] + per_layer}, w3[2] = {w12[0] + per_layer, w12[1] + per_layer};
      const auto g = linear_pair(params, w12, h, true, nullptr, nullptr);
      phase_end(kPhaseMlp1);
      const auto o = linear_pair(params, w3, {g[0], g[1]}, false, res.data(), gate2);
      phase_end(kPhaseMlp2);
      s[1] = o[0], s[0] = o[1];
      continue;
    }
    for (int st = 0; st < 2; ++st) {
      if (!full[2 * b + st]) continue;
      const size_t m = mods[st], w = m + 6 + per_layer;  // the projection's params
      const at::Tensor res = layer(w, out[st], false, s[st], params[m + 2]);
      phase_end(kPhaseProj);
      const at::Tensor h = in_dtype(adaln(res, params[m + 3], params[m + 4], eps));
      phase_end(kPhaseAdaln);
      const at::Tensor g = layer(w + per_layer, h, true, none, none);
      phase_end(kPhaseMlp1);
      s[st] = layer(w + 2 * per_layer, g, false, res, params[m + 5]);
      phase_end(kPhaseMlp2);
    }
  }
  return s[0];
}

}  // namespace

TORCH_LIBRARY(msdd_kernels, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? cos=None, Tensor? sin=None) -> Tensor");
  m.def("joint_attention(Tensor qkv0, Tensor qkv1, int heads, Tensor[] norms, float eps, Tensor? cos=None, "
        "Tensor? sin=None) -> (Tensor, Tensor)");
  m.def("adaln(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor");
  m.def("gated_adaln(Tensor x, Tensor gate, Tensor y, Tensor shift, Tensor scale, float eps) -> (Tensor, Tensor)");
  m.def("swiglu(Tensor h) -> Tensor");
  m.def("pack_linear(Tensor w, Tensor? bias, bool swiglu) -> (Tensor, Tensor)");
  m.def("linear(Tensor x, Tensor packed, Tensor bias, bool swiglu, Tensor? residual=None, Tensor? gate=None) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor packed, Tensor scale, Tensor comp, Tensor bias, bool swiglu, "
        "Tensor? residual=None, Tensor? gate=None) -> Tensor");
  m.def("blocks(Tensor x, Tensor c, Tensor[] params, int[] full, int heads, float eps, float qk_eps, Tensor cos, "
        "Tensor sin, bool bf16, bool int8=False) -> Tensor");
  m.def("chunk_bytes(int n) -> int", chunk_bytes);
#ifdef MSDD_PHASE_TIMES
  m.def("phase_times() -> float[]", phase_times);
#endif
}
TORCH_LIBRARY_IMPL(msdd_kernels, CPU, m) {
  m.impl("attention", attention);
  m.impl("joint_attention", joint_attention);
  m.impl("adaln", adaln);
  m.impl("gated_adaln", gated_adaln);
  m.impl("swiglu", swiglu);
  m.impl("pack_linear", pack_linear);
  m.impl("linear", linear);
  m.impl("linear_int8", linear_int8);
  m.impl("blocks", blocks);
}
