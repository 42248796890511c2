// Fused CPU kernels for LogLinear: matrix-vector / small-batch products straight from packed n-bit codes.
//
// Layout (see logart/quant/packing.py and logart/io/linear.py): row r holds `len` codes packed LSB-first in
// chunks of 32 codes = `bits` uint32 words; its weights are row_scale[r] * table[table_index[r]][code].
// Rows are output channels (G = 1) or groups of g inputs (row r = channel r / G, group r % G).
//
// Decoding never materialises the weight matrix. Per chunk of 32 codes, with AVX2:
//   4 bits  the 16-entry table is held as 4 byte planes (byte b of every entry); one `vpshufb` per plane
//           looks up 32 codes at once and three rounds of byte/word unpacks rebuild the 32 floats. The
//           unpacks leave the floats in a fixed permuted order, so the activations are permuted the same
//           way once per call (`prepare_x`), never per row.
//   3 bits  8 codes = 24 bits sit in one unaligned 32-bit load; a variable shift puts each code in the low 3
//           bits of its lane and `vpermps` (which reads only those bits) looks the 8-entry table up.
//   2 bits  as 3 bits, with `vpermilps` on the 4-entry table.
//   8 bits  gathers.
// Small batches (B <= 8) reuse each rebuilt weight vector for every row of the batch.
//
// `lut_linear` is the one entry point Python calls per layer: it reshapes, pads, permutes, runs the fused
// product (or, for larger batches, dequantizes once and hands the matmul to BLAS) and adds the bias.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOGART_AVX2 1
#endif

static constexpr int MAXB = 8;
static constexpr int64_t GRAIN_WEIGHTS = 1 << 15;  // at least this many weights per parallel task

// 32 codes of one chunk -> idx[32] (portable path and dequantization of 8-bit codes).
static inline void unpack32(const uint32_t* w, int bits, int32_t* idx) {
  if (bits == 4) {
    for (int k = 0; k < 4; ++k) for (int i = 0; i < 8; ++i) idx[k * 8 + i] = (w[k] >> (4 * i)) & 15u;
  } else if (bits == 2) {
    for (int k = 0; k < 2; ++k) for (int i = 0; i < 16; ++i) idx[k * 16 + i] = (w[k] >> (2 * i)) & 3u;
  } else if (bits == 8) {
    for (int k = 0; k < 8; ++k) for (int i = 0; i < 4; ++i) idx[k * 4 + i] = (w[k] >> (8 * i)) & 255u;
  } else {  // 3 bits: a 96-bit stream, some codes straddle two words
    const uint64_t lo = (uint64_t)w[0] | ((uint64_t)w[1] << 32);
    const uint64_t hi = (uint64_t)w[1] | ((uint64_t)w[2] << 32);
    for (int i = 0; i < 21; ++i) idx[i] = (lo >> (3 * i)) & 7u;            // bits 0..62
    for (int i = 21; i < 32; ++i) idx[i] = (hi >> (3 * i - 32)) & 7u;      // bits 63..95
  }
}

// Position, within a chunk of 32, of the k-th float that the 4-bit pshufb path produces. Lane 0 of each
// rebuilt vector holds even codes, lane 1 odd codes: vector v (0..3), element e (0..7) is code
// 2 * (8 * (v / 2) + 4 * (v % 2) + e % 4) + e / 4.
static inline int pshufb_order(int k) {
  const int v = k / 8, e = k % 8;
  return 2 * (8 * (v / 2) + 4 * (v % 2) + e % 4) + e / 4;
}

struct Layer {
  const uint32_t* q;
  const float* rs;
  const int32_t* ti;
  const float* tb;
  const uint8_t* planes;  // 4-bit AVX2 path: [n_tables][4][16] byte planes
  int M, bits, G, len, len_pad, words;
};

#ifdef LOGART_AVX2
static inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// The 32 weights (relative values, permuted order) of one 4-bit chunk.
static inline void rebuild4(const uint32_t* wq, const __m256i P[4], __m256 w[4]) {
  const __m256i sh = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  const __m256i m0f = _mm256_set1_epi8(0x0f);
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)wq));
  const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(v, sh), m0f);  // lane 0: low nibbles, lane 1: high
  const __m256i b0 = _mm256_shuffle_epi8(P[0], idx), b1 = _mm256_shuffle_epi8(P[1], idx);
  const __m256i b2 = _mm256_shuffle_epi8(P[2], idx), b3 = _mm256_shuffle_epi8(P[3], idx);
  const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), l23 = _mm256_unpacklo_epi8(b2, b3);
  const __m256i h01 = _mm256_unpackhi_epi8(b0, b1), h23 = _mm256_unpackhi_epi8(b2, b3);
  w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
  w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
  w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
  w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
}

// The 32 weights (natural order) of one 3-bit chunk (12 bytes): groups of 8 codes start at bytes 0, 3, 6
// and 9; the last is read from byte 8 (so nothing past the chunk is touched) and shifted 8 bits further.
static inline void rebuild3(const uint32_t* wq, __m256 t, __m256 w[4]) {
  const uint8_t* b = reinterpret_cast<const uint8_t*>(wq);
  const __m256i s0 = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
  const __m256i s8 = _mm256_setr_epi32(8, 11, 14, 17, 20, 23, 26, 29);
  uint32_t g[4];
  std::memcpy(&g[0], b, 4);
  std::memcpy(&g[1], b + 3, 4);
  std::memcpy(&g[2], b + 6, 4);
  std::memcpy(&g[3], b + 8, 4);
  for (int k = 0; k < 4; ++k)
    w[k] = _mm256_permutevar8x32_ps(t, _mm256_srlv_epi32(_mm256_set1_epi32((int)g[k]), k == 3 ? s8 : s0));
}

// The 32 weights (natural order) of one 2-bit chunk (2 words); `t` holds the 4 entries in both lanes.
static inline void rebuild2(const uint32_t* wq, __m256 t, __m256 w[4]) {
  const __m256i slo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i shi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
  for (int k = 0; k < 2; ++k) {
    const __m256i v = _mm256_set1_epi32((int)wq[k]);
    w[2 * k] = _mm256_permutevar_ps(t, _mm256_srlv_epi32(v, slo));
    w[2 * k + 1] = _mm256_permutevar_ps(t, _mm256_srlv_epi32(v, shi));
  }
}

// 8 bits: gathers from the 256-entry table.
static inline void rebuild8(const uint32_t* wq, const float* t, __m256 w[4]) {
  const __m256i m = _mm256_set1_epi32(255);
  const __m256i sh = _mm256_setr_epi32(0, 8, 16, 24, 0, 8, 16, 24);
  for (int k = 0; k < 4; ++k) {
    const __m256i v = _mm256_setr_epi32((int)wq[2 * k], (int)wq[2 * k], (int)wq[2 * k], (int)wq[2 * k],
                                        (int)wq[2 * k + 1], (int)wq[2 * k + 1], (int)wq[2 * k + 1], (int)wq[2 * k + 1]);
    w[k] = _mm256_i32gather_ps(t, _mm256_and_si256(_mm256_srlv_epi32(v, sh), m), 4);
  }
}

template <int BITS>
static inline void rebuild(const uint32_t* wq, const __m256i P[4], __m256 tv, const float* tptr, __m256 w[4]) {
  if (BITS == 4) rebuild4(wq, P, w);
  else if (BITS == 3) rebuild3(wq, tv, w);
  else if (BITS == 2) rebuild2(wq, tv, w);
  else rebuild8(wq, tptr, w);
}

// Sum over the row's chunks of <rebuilt weights, x[b]> for b < B, into acc[b] (B == 1 uses four chains).
template <int BITS>
static inline void row_dot(const Layer& L, int64_t r, const float* xr, int B, int64_t xstride, float* out) {
  const uint32_t* qr = L.q + r * L.words;
  const int t = L.ti[r];
  __m256i P[4];
  __m256 tv = _mm256_setzero_ps();
  const float* tptr = L.tb + (int64_t)t * L.M;
  if (BITS == 4) {
    for (int p = 0; p < 4; ++p)
      P[p] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(L.planes + (int64_t)t * 64 + 16 * p)));
  } else if (BITS == 3) {
    tv = _mm256_loadu_ps(tptr);
  } else if (BITS == 2) {
    tv = _mm256_broadcast_ps((const __m128*)tptr);
  }
  __m256 w[4];
  if (B == 1) {
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int c = 0; c < L.len_pad; c += 32) {
      rebuild<BITS>(qr + (c / 32) * BITS, P, tv, tptr, w);
      for (int k = 0; k < 4; ++k) a[k] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(xr + c + 8 * k), a[k]);
    }
    out[0] = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
    return;
  }
  __m256 acc[MAXB];
  for (int b = 0; b < B; ++b) acc[b] = _mm256_setzero_ps();
  for (int c = 0; c < L.len_pad; c += 32) {
    rebuild<BITS>(qr + (c / 32) * BITS, P, tv, tptr, w);
    for (int b = 0; b < B; ++b) {
      const float* xb = xr + b * xstride + c;
      __m256 s = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
      s = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), s);
      s = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), s);
      s = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), s);
      acc[b] = _mm256_add_ps(acc[b], s);
    }
  }
  for (int b = 0; b < B; ++b) out[b] = hsum(acc[b]);
}

template <int BITS>
static void gemv_rows(const Layer& L, const float* xg, int B, int64_t xstride, float* y, int64_t ystride,
                      int64_t o0, int64_t o1) {
  float dot[MAXB];
  for (int64_t o = o0; o < o1; ++o) {
    float total[MAXB] = {0};
    for (int g = 0; g < L.G; ++g) {
      const int64_t r = o * L.G + g;
      row_dot<BITS>(L, r, xg + (int64_t)g * L.len_pad, B, xstride, dot);
      for (int b = 0; b < B; ++b) total[b] += L.rs[r] * dot[b];
    }
    for (int b = 0; b < B; ++b) y[b * ystride + o] = total[b];
  }
}
#endif

// Portable fallback (no AVX2): scalar lookups.
static void gemv_rows_scalar(const Layer& L, const float* xg, int B, int64_t xstride, float* y, int64_t ystride,
                             int64_t o0, int64_t o1) {
  alignas(32) int32_t idx[32];
  float wv[32];
  for (int64_t o = o0; o < o1; ++o) {
    float total[MAXB] = {0};
    for (int g = 0; g < L.G; ++g) {
      const int64_t r = o * L.G + g;
      const uint32_t* qr = L.q + r * L.words;
      const float* t = L.tb + (int64_t)L.ti[r] * L.M;
      const float* xr = xg + (int64_t)g * L.len_pad;
      float acc[MAXB] = {0};
      for (int c = 0; c < L.len_pad; c += 32) {
        unpack32(qr + (c / 32) * L.bits, L.bits, idx);
        for (int i = 0; i < 32; ++i) wv[i] = t[idx[i]];
        for (int b = 0; b < B; ++b) {
          const float* xb = xr + b * xstride + c;
          float s = 0.f;
          for (int i = 0; i < 32; ++i) s += wv[i] * xb[i];
          acc[b] += s;
        }
      }
      for (int b = 0; b < B; ++b) total[b] += L.rs[r] * acc[b];
    }
    for (int b = 0; b < B; ++b) y[b * ystride + o] = total[b];
  }
}

static bool uses_pshufb(int bits) {
#ifdef LOGART_AVX2
  return bits == 4;
#else
  (void)bits;
  return false;
#endif
}

// x2 [B, G * len] -> [B, G, len_pad]: zero padded to whole chunks, and permuted per chunk for the pshufb path.
static void prepare_x(const float* x2, int64_t B, int G, int len, int len_pad, bool permute, float* out) {
  for (int64_t b = 0; b < B; ++b)
    for (int g = 0; g < G; ++g) {
      const float* src = x2 + (b * G + g) * (int64_t)len;
      float* dst = out + (b * G + g) * (int64_t)len_pad;
      if (!permute) {
        std::memcpy(dst, src, sizeof(float) * len);
        std::fill(dst + len, dst + len_pad, 0.f);
        continue;
      }
      for (int c = 0; c < len_pad; c += 32)
        for (int k = 0; k < 32; ++k) {
          const int i = c + pshufb_order(k);
          dst[c + k] = i < len ? src[i] : 0.f;
        }
    }
}

static std::vector<uint8_t> byte_planes(const float* tb, int64_t n_tables, int M) {
  std::vector<uint8_t> planes(n_tables * 64, 0);
  for (int64_t t = 0; t < n_tables; ++t)
    for (int j = 0; j < std::min(M, 16); ++j) {
      uint32_t u;
      std::memcpy(&u, tb + t * M + j, 4);
      for (int p = 0; p < 4; ++p) planes[t * 64 + p * 16 + j] = (u >> (8 * p)) & 255u;
    }
  return planes;
}

static Layer make_layer(const torch::Tensor& qweight, const torch::Tensor& row_scale, const torch::Tensor& table_index,
                        const torch::Tensor& tables, int64_t bits, int64_t groups, int64_t len) {
  TORCH_CHECK(qweight.scalar_type() == torch::kInt32 && qweight.is_contiguous() && qweight.dim() == 2, "qweight: int32 [R, words]");
  TORCH_CHECK(row_scale.scalar_type() == torch::kFloat32 && row_scale.is_contiguous(), "row_scale: float32");
  TORCH_CHECK(table_index.scalar_type() == torch::kInt32 && table_index.is_contiguous(), "table_index: int32");
  TORCH_CHECK(tables.scalar_type() == torch::kFloat32 && tables.is_contiguous() && tables.dim() == 2, "tables: float32 [T, 2^bits]");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8");
  TORCH_CHECK(tables.size(1) == (1 << bits), "tables must have 2^bits columns");
  Layer L;
  L.q = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  L.rs = row_scale.data_ptr<float>();
  L.ti = table_index.data_ptr<int32_t>();
  L.tb = tables.data_ptr<float>();
  L.planes = nullptr;
  L.M = (int)tables.size(1);
  L.bits = (int)bits;
  L.G = (int)groups;
  L.len = (int)len;
  L.len_pad = (int)((len + 31) / 32 * 32);
  L.words = (int)qweight.size(1);
  TORCH_CHECK(L.words == L.len_pad / 32 * bits, "qweight has ", L.words, " words per row, expected ", L.len_pad / 32 * bits);
  TORCH_CHECK(row_scale.numel() == qweight.size(0) && table_index.numel() == qweight.size(0), "one scale and table index per row");
  return L;
}

static void run_gemv(const Layer& L, const float* xg, int64_t B, int64_t out_features, float* y) {
  const int64_t xstride = (int64_t)L.G * L.len_pad;
  const int64_t grain = std::max<int64_t>(1, GRAIN_WEIGHTS / std::max<int64_t>(1, xstride));
  for (int64_t b0 = 0; b0 < B; b0 += MAXB) {
    const int nb = (int)std::min<int64_t>(MAXB, B - b0);
    const float* xb = xg + b0 * xstride;
    float* yb = y + b0 * out_features;
    at::parallel_for(0, out_features, grain, [&](int64_t o0, int64_t o1) {
#ifdef LOGART_AVX2
      switch (L.bits) {
        case 4: gemv_rows<4>(L, xb, nb, xstride, yb, out_features, o0, o1); break;
        case 3: gemv_rows<3>(L, xb, nb, xstride, yb, out_features, o0, o1); break;
        case 2: gemv_rows<2>(L, xb, nb, xstride, yb, out_features, o0, o1); break;
        default: gemv_rows<8>(L, xb, nb, xstride, yb, out_features, o0, o1); break;
      }
#else
      gemv_rows_scalar(L, xb, nb, xstride, yb, out_features, o0, o1);
#endif
    });
  }
}

// x: [B, G, len_pad] float32 contiguous (zero padded, natural order). Returns y: [B, out]. (Kept for tests and
// external callers; `lut_linear` is the fast entry point.)
torch::Tensor lut_gemv(torch::Tensor qweight, torch::Tensor row_scale, torch::Tensor table_index,
                       torch::Tensor tables, torch::Tensor xg, int64_t bits, int64_t out_features,
                       int64_t groups, int64_t len) {
  TORCH_CHECK(xg.dim() == 3 && xg.scalar_type() == torch::kFloat32 && xg.is_contiguous(), "xg must be [B, G, len_pad] fp32");
  Layer L = make_layer(qweight, row_scale, table_index, tables, bits, groups, len);
  const int64_t B = xg.size(0);
  auto x2 = xg.narrow(2, 0, len).reshape({B, groups * len}).contiguous();
  std::vector<float> xp(B * groups * L.len_pad);
  const bool permute = uses_pshufb(L.bits);
  prepare_x(x2.data_ptr<float>(), B, L.G, L.len, L.len_pad, permute, xp.data());
  std::vector<uint8_t> planes;
  if (permute) {
    planes = byte_planes(L.tb, tables.size(0), L.M);
    L.planes = planes.data();
  }
  auto y = torch::empty({B, out_features}, xg.options());
  run_gemv(L, xp.data(), B, out_features, y.data_ptr<float>());
  return y;
}

// Dequantize into wp [R, len].
static void dequant_into(const Layer& L, int64_t R, int64_t len, float* wp) {
  at::parallel_for(0, R, std::max<int64_t>(1, GRAIN_WEIGHTS / std::max<int64_t>(1, len)), [&](int64_t r0, int64_t r1) {
    alignas(32) int32_t idx[32];
    alignas(32) float tmp[32];
    for (int64_t r = r0; r < r1; ++r) {
      const float* t = L.tb + (int64_t)L.ti[r] * L.M;
      const float s = L.rs[r];
      const uint32_t* qr = L.q + r * L.words;
#ifdef LOGART_AVX2
      const __m256 sv = _mm256_set1_ps(s);
      __m256 tv = _mm256_setzero_ps(), tlo = _mm256_setzero_ps(), thi = _mm256_setzero_ps();
      if (L.bits == 3) tv = _mm256_loadu_ps(t);
      if (L.bits == 2) tv = _mm256_broadcast_ps((const __m128*)t);
      if (L.bits == 4) { tlo = _mm256_loadu_ps(t); thi = _mm256_loadu_ps(t + 8); }
      const __m256i shifts4 = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
#endif
      for (int64_t c = 0; c < len; c += 32) {
        const uint32_t* wq = qr + (c / 32) * L.bits;
        float* dst = wp + r * len + c;
        const int64_t n = std::min<int64_t>(32, len - c);
#ifdef LOGART_AVX2
        if (L.bits != 8) {
          __m256 wv[4];
          if (L.bits == 4) {
            for (int k = 0; k < 4; ++k) {
              const __m256i id = _mm256_srlv_epi32(_mm256_set1_epi32((int)wq[k]), shifts4);
              const __m256 lo = _mm256_permutevar8x32_ps(tlo, id), hi = _mm256_permutevar8x32_ps(thi, id);
              wv[k] = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(id, 28)));
            }
          } else if (L.bits == 3) {
            rebuild3(wq, tv, wv);
          } else {
            rebuild2(wq, tv, wv);
          }
          if (n == 32) {
            for (int k = 0; k < 4; ++k) _mm256_storeu_ps(dst + 8 * k, _mm256_mul_ps(sv, wv[k]));
          } else {
            for (int k = 0; k < 4; ++k) _mm256_store_ps(tmp + 8 * k, _mm256_mul_ps(sv, wv[k]));
            std::memcpy(dst, tmp, sizeof(float) * n);
          }
          continue;
        }
#endif
        unpack32(wq, L.bits, idx);
        for (int64_t i = 0; i < n; ++i) dst[i] = s * t[idx[i]];
      }
    }
  });
}

// The dequantized weight rows [R, len].
torch::Tensor lut_dequant(torch::Tensor qweight, torch::Tensor row_scale, torch::Tensor table_index,
                          torch::Tensor tables, int64_t bits, int64_t len) {
  const int64_t R = qweight.size(0);
  Layer L = make_layer(qweight, row_scale, table_index, tables, bits, 1, len);
  auto w = torch::empty({R, len}, row_scale.options());
  dequant_into(L, R, len, w.data_ptr<float>());
  return w;
}

// The whole LogLinear forward for float32 CPU inputs x [..., in_features]: fused product for up to
// `small_batch` rows, else dequantize + BLAS. `len` is the row length (group size, or in_features).
torch::Tensor lut_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor row_scale, torch::Tensor table_index,
                         torch::Tensor tables, c10::optional<torch::Tensor> bias, int64_t bits, int64_t in_features,
                         int64_t len, int64_t small_batch) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.device().is_cpu(), "x must be float32 on the CPU");
  TORCH_CHECK(x.size(-1) == in_features && in_features % len == 0, "x has ", x.size(-1), " features, expected ", in_features);
  const int64_t groups = in_features / len;
  const int64_t out_features = qweight.size(0) / groups;
  auto sizes = x.sizes().vec();
  sizes.back() = out_features;
  auto x2 = x.reshape({-1, in_features}).contiguous();
  const int64_t B = x2.size(0);
  if (B > small_batch) {
    // Larger batches: dequantize once into a per-thread scratch buffer (reused from layer to layer, so no
    // fresh pages to fault in) and hand the matmul to BLAS. Autograd would keep the weight for the backward
    // pass, so then it gets a tensor of its own.
    if (x2.requires_grad() && at::GradMode::is_enabled()) {
      auto w = lut_dequant(qweight, row_scale, table_index, tables, bits, len).view({out_features, in_features});
      return at::linear(x2, w, bias).view(sizes);
    }
    thread_local std::vector<float> scratch;
    const int64_t R = qweight.size(0);
    Layer L = make_layer(qweight, row_scale, table_index, tables, bits, 1, len);
    if ((int64_t)scratch.size() < R * len) scratch.resize(R * len);
    dequant_into(L, R, len, scratch.data());
    auto w = torch::from_blob(scratch.data(), {out_features, in_features}, x.options());
    return at::linear(x2, w, bias).view(sizes);
  }
  Layer L = make_layer(qweight, row_scale, table_index, tables, bits, groups, len);
  const bool permute = uses_pshufb(L.bits);
  const float* xg = x2.data_ptr<float>();
  std::vector<float> xp;
  if (permute || L.len_pad != L.len) {
    xp.resize(B * groups * L.len_pad);
    prepare_x(xg, B, L.G, L.len, L.len_pad, permute, xp.data());
    xg = xp.data();
  }
  std::vector<uint8_t> planes;
  if (permute) {
    planes = byte_planes(L.tb, tables.size(0), L.M);
    L.planes = planes.data();
  }
  auto y = torch::empty({B, out_features}, x.options());
  float* yp = y.data_ptr<float>();
  run_gemv(L, xg, B, out_features, yp);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->numel() == out_features, "bias: float32 [out]");
    auto bc = bias->contiguous();
    const float* bp = bc.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t o = 0; o < out_features; ++o) yp[b * out_features + o] += bp[o];
  }
  return y.view(sizes);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lut_linear", &lut_linear, "LogLinear forward (fused packed LUT product or dequant + BLAS)");
  m.def("lut_gemv", &lut_gemv, "packed LUT matrix-vector / small-batch product");
  m.def("lut_dequant", &lut_dequant, "packed LUT dequantization");
}
