// Fused CPU kernels for LogLinear: matrix-vector / small-batch products straight from packed n-bit codes.
//
// Layout (see logart/quant/packing.py and logart/io/linear.py): row r holds `len` codes packed LSB-first in
// chunks of 32 codes = `bits` uint32 words; its weights are row_scale[r] * table[table_index[r]][code].
// Rows are output channels (G = 1) or groups of g inputs (row r = channel r / G, group r % G).
// The activations arrive as xg[B][G][len_pad] with zero padding, so padded codes contribute nothing.
//
// Decoding never materialises the weight matrix: each chunk of 8 codes becomes 8 floats in a register
// (a permute from the 16-entry table with AVX2) and is multiplied into up to MAXB accumulators at once.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOGART_AVX2 1
#endif

static constexpr int MAXB = 8;

// 32 codes of one chunk -> idx[32].
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

#ifdef LOGART_AVX2
// 8 table values for 8 indices (< 16) held in two registers.
static inline __m256 lookup16(__m256 tlo, __m256 thi, __m256i id) {
  const __m256 lo = _mm256_permutevar8x32_ps(tlo, id);
  const __m256 hi = _mm256_permutevar8x32_ps(thi, id);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(id, 28)));
}
#endif

// y[b][o] for b < B, o in [o0, o1): y = sum over the channel's rows of row_scale * <table[code], x>.
static void gemv_rows(const uint32_t* q, const float* row_scale, const int32_t* tidx, const float* tables,
                      int M, int bits, int G, int len, int words, const float* xg, int B, int64_t xstride,
                      float* y, int64_t ystride, int64_t o0, int64_t o1) {
  const int len_pad = (len + 31) / 32 * 32;
  alignas(32) int32_t idx[32];
  alignas(32) float wv[32];
  for (int64_t o = o0; o < o1; ++o) {
    float total[MAXB] = {0};
    for (int g = 0; g < G; ++g) {
      const int64_t r = o * G + g;
      const uint32_t* qr = q + r * words;
      const float* t = tables + (int64_t)tidx[r] * M;
      const float* xr = xg + (int64_t)g * len_pad;
#ifdef LOGART_AVX2
      __m256 acc[MAXB];
      for (int b = 0; b < B; ++b) acc[b] = _mm256_setzero_ps();
      __m256 acc1[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      if (bits <= 4) {
        alignas(32) float tpad[16] = {0};
        std::memcpy(tpad, t, sizeof(float) * M);
        const __m256 tlo = _mm256_load_ps(tpad), thi = _mm256_load_ps(tpad + 8);
        const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        const __m256i m15 = _mm256_set1_epi32(15);
        for (int c = 0; c < len_pad; c += 32) {
          const uint32_t* wq = qr + (c / 32) * bits;
          if (bits == 4 && B == 1) {  // decode: four independent FMA chains hide the FMA latency
            for (int k = 0; k < 4; ++k) {
              const __m256i id = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)wq[k]), shifts), m15);
              acc1[k] = _mm256_fmadd_ps(lookup16(tlo, thi, id), _mm256_loadu_ps(xr + c + 8 * k), acc1[k]);
            }
          } else if (bits == 4) {
            for (int k = 0; k < 4; ++k) {
              const __m256i id = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)wq[k]), shifts), m15);
              const __m256 w = lookup16(tlo, thi, id);
              for (int b = 0; b < B; ++b)
                acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + b * xstride + c + 8 * k), acc[b]);
            }
          } else {
            unpack32(wq, bits, idx);
            for (int k = 0; k < 4; ++k) {
              const __m256 w = lookup16(tlo, thi, _mm256_load_si256((const __m256i*)(idx + 8 * k)));
              for (int b = 0; b < B; ++b)
                acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + b * xstride + c + 8 * k), acc[b]);
            }
          }
        }
      } else {
        for (int c = 0; c < len_pad; c += 32) {
          unpack32(qr + (c / 32) * bits, bits, idx);
          for (int k = 0; k < 4; ++k) {
            const __m256 w = _mm256_i32gather_ps(t, _mm256_load_si256((const __m256i*)(idx + 8 * k)), 4);
            for (int b = 0; b < B; ++b)
              acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + b * xstride + c + 8 * k), acc[b]);
          }
        }
      }
      if (bits == 4 && B == 1)
        acc[0] = _mm256_add_ps(_mm256_add_ps(acc1[0], acc1[1]), _mm256_add_ps(acc1[2], acc1[3]));
      for (int b = 0; b < B; ++b) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[b]), _mm256_extractf128_ps(acc[b], 1));
        s = _mm_hadd_ps(s, s);
        s = _mm_hadd_ps(s, s);
        total[b] += row_scale[r] * _mm_cvtss_f32(s);
      }
#else
      float acc[MAXB] = {0};
      for (int c = 0; c < len_pad; c += 32) {
        unpack32(qr + (c / 32) * bits, bits, idx);
        for (int i = 0; i < 32; ++i) wv[i] = t[idx[i]];
        for (int b = 0; b < B; ++b) {
          const float* xb = xr + b * xstride + c;
          float s = 0.f;
          for (int i = 0; i < 32; ++i) s += wv[i] * xb[i];
          acc[b] += s;
        }
      }
      for (int b = 0; b < B; ++b) total[b] += row_scale[r] * acc[b];
#endif
    }
    for (int b = 0; b < B; ++b) y[b * ystride + o] = total[b];
  }
}

// x: [B, G, len_pad] float32 contiguous (zero padded). Returns y: [B, out].
torch::Tensor lut_gemv(torch::Tensor qweight, torch::Tensor row_scale, torch::Tensor table_index,
                       torch::Tensor tables, torch::Tensor xg, int64_t bits, int64_t out_features,
                       int64_t groups, int64_t len) {
  TORCH_CHECK(xg.dim() == 3 && xg.scalar_type() == torch::kFloat32 && xg.is_contiguous(), "xg must be [B, G, len_pad] fp32");
  const int64_t B = xg.size(0);
  auto y = torch::empty({B, out_features}, xg.options());
  const int M = tables.size(1);
  const int words = qweight.size(1);
  const auto* q = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  const float* rs = row_scale.data_ptr<float>();
  const int32_t* ti = table_index.data_ptr<int32_t>();
  const float* tb = tables.data_ptr<float>();
  const float* x = xg.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t xstride = xg.size(1) * xg.size(2);
  for (int64_t b0 = 0; b0 < B; b0 += MAXB) {
    const int nb = (int)std::min<int64_t>(MAXB, B - b0);
    at::parallel_for(0, out_features, 16, [&](int64_t o0, int64_t o1) {
      gemv_rows(q, rs, ti, tb, M, (int)bits, (int)groups, (int)len, words, x + b0 * xstride, nb, xstride,
                yp + b0 * out_features, out_features, o0, o1);
    });
  }
  return y;
}

// The dequantized weight rows [R, len] (used for large batches, where a BLAS matmul wins).
torch::Tensor lut_dequant(torch::Tensor qweight, torch::Tensor row_scale, torch::Tensor table_index,
                          torch::Tensor tables, int64_t bits, int64_t len) {
  const int64_t R = qweight.size(0);
  auto w = torch::empty({R, len}, row_scale.options());
  const int M = tables.size(1);
  const int words = qweight.size(1);
  const auto* q = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  const float* rs = row_scale.data_ptr<float>();
  const int32_t* ti = table_index.data_ptr<int32_t>();
  const float* tb = tables.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    alignas(32) int32_t idx[32];
    for (int64_t r = r0; r < r1; ++r) {
      const float* t = tb + (int64_t)ti[r] * M;
      const float s = rs[r];
      for (int64_t c = 0; c < len; c += 32) {
        unpack32(q + r * words + (c / 32) * bits, (int)bits, idx);
        const int64_t n = std::min<int64_t>(32, len - c);
        for (int64_t i = 0; i < n; ++i) wp[r * len + c + i] = s * t[idx[i]];
      }
    }
  });
  return w;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lut_gemv", &lut_gemv, "packed LUT matrix-vector / small-batch product");
  m.def("lut_dequant", &lut_dequant, "packed LUT dequantization");
}
