/* Elementwise steps of a transformer layer, each in one pass over its rows where PyTorch runs
 * a chain of operations that each read and write the whole tensor: RMSNorm (seven of them),
 * rotary embedding (five) and the SiLU gate (two). A decode step of a small model spends as
 * long in those chains as in its matrix products. Also the 4-bit KV cache's decode
 * (dequantize_rows), four such passes in PyTorch.
 *
 * Arithmetic is fp32. With bf16 tensors, results are rounded to bf16 where PyTorch's chain
 * rounds them (after each operation it runs in bf16), so both agree to about bf16's precision.
 * dtype: 0 float32, 1 bfloat16. Sizes and strides are in elements; any sizes (masked tails).
 * Part of the library kernels/native.py builds. */
#include "simd.h"

/* round to nearest even at bf16's precision (NaN aside), kept in fp32 */
static inline __m512 round_bf16(__m512 x) {
    __m512i bits = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
    return _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32((int)0xFFFF0000u)));
}

static inline __mmask16 lanes_from(int64_t left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }

static inline __m512 load(const void *p, int64_t i, __mmask16 m, int dtype) {
    if (dtype == 0) return _mm512_maskz_loadu_ps(m, (const float *)p + i);
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* x is already rounded when dtype is bf16 */
static inline void store(void *p, int64_t i, __mmask16 m, __m512 x, int dtype) {
    if (dtype == 0) {
        _mm512_mask_storeu_ps((float *)p + i, m, x);
        return;
    }
    __m256i half = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(x), 16));
    _mm256_mask_storeu_epi16((uint16_t *)p + i, m, half);
}

static inline __m512 rounded(__m512 x, int dtype) { return dtype == 1 ? round_bf16(x) : x; }

/* out[r] = w * (x[r] / rms(x[r])) or, with unit_offset (Gemma), x[r] / rms(x[r]) * (1 + w).
 * x: rows of `dim` at x_stride; out: contiguous. */
void rms_norm(const void *x, int64_t rows, int64_t dim, int64_t x_stride, const void *w, float eps,
              int unit_offset, void *out, int dtype, int threads) {
    const int element = dtype == 1 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const char *row = (const char *)x + r * x_stride * element;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t i = 0; i < dim; i += 16) {
            __m512 v = load(row, i, lanes_from(dim - i), dtype);
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        __m512 inverse = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)dim + eps));
        char *target = (char *)out + r * dim * element;
        for (int64_t i = 0; i < dim; i += 16) {
            __mmask16 m = lanes_from(dim - i);
            __m512 normed = _mm512_mul_ps(load(row, i, m, dtype), inverse), weight = load(w, i, m, dtype);
            __m512 y = unit_offset ? _mm512_mul_ps(normed, _mm512_add_ps(weight, _mm512_set1_ps(1.0f)))
                                   : _mm512_mul_ps(weight, rounded(normed, dtype));
            store(target, i, m, rounded(y, dtype), dtype);
        }
    }
}

/* Rotary embedding, half-split layout: for x [B, H, S, D] at strides (b, h, s) and cos/sin
 * [B, S, R] contiguous, out [B, H, S, D] contiguous gets, for d < R/2,
 *   x[d] cos[d] - x[d + R/2] sin[d]   and   x[d + R/2] cos[d + R/2] + x[d] sin[d + R/2],
 * and x[d] for d >= R (partial rotary). */
void rotary(const void *x, int64_t batch, int64_t heads, int64_t seq, int64_t dim, const int64_t *strides,
            const void *cos, const void *sin, int64_t rotary_dim, void *out, int dtype, int threads) {
    const int element = dtype == 1 ? 2 : 4;
    const int64_t half = rotary_dim / 2, vectors = batch * heads * seq;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < vectors; n++) {
        const int64_t b = n / (heads * seq), h = n / seq % heads, s = n % seq;
        const char *in = (const char *)x + (b * strides[0] + h * strides[1] + s * strides[2]) * element;
        const char *c = (const char *)cos + (b * seq + s) * rotary_dim * element;
        const char *sn = (const char *)sin + (b * seq + s) * rotary_dim * element;
        char *target = (char *)out + n * dim * element;
        for (int64_t i = 0; i < half; i += 16) {
            __mmask16 m = lanes_from(half - i);
            __m512 lo = load(in, i, m, dtype), hi = load(in, half + i, m, dtype);
            __m512 lo_out = _mm512_add_ps(rounded(_mm512_mul_ps(lo, load(c, i, m, dtype)), dtype),
                                          rounded(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), hi),
                                                                load(sn, i, m, dtype)), dtype));
            __m512 hi_out = _mm512_add_ps(rounded(_mm512_mul_ps(hi, load(c, half + i, m, dtype)), dtype),
                                          rounded(_mm512_mul_ps(lo, load(sn, half + i, m, dtype)), dtype));
            store(target, i, m, rounded(lo_out, dtype), dtype);
            store(target, half + i, m, rounded(hi_out, dtype), dtype);
        }
        for (int64_t i = rotary_dim; i < dim; i += 16) {
            __mmask16 m = lanes_from(dim - i);
            store(target, i, m, load(in, i, m, dtype), dtype);
        }
    }
}

/* gate = silu(gate) * up over n elements, in place (both contiguous) */
void silu_times(void *gate, const void *up, int64_t n, int dtype, int threads) {
    const int64_t chunk = 4096;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t start = 0; start < n; start += chunk) {
        const int64_t stop = start + chunk < n ? start + chunk : n;
        for (int64_t i = start; i < stop; i += 16) {
            __mmask16 m = lanes_from(stop - i);
            __m512 g = load(gate, i, m, dtype);
            /* sigmoid from e^-|g| <= 1, so no overflow */
            __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
            __m512 one = _mm512_set1_ps(1.0f), inverse = _mm512_div_ps(one, _mm512_add_ps(one, e));
            __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
            __m512 sigmoid = _mm512_mask_mul_ps(inverse, negative, e, inverse);
            __m512 silu = rounded(_mm512_mul_ps(g, sigmoid), dtype);
            store(gate, i, m, rounded(_mm512_mul_ps(silu, load(up, i, m, dtype)), dtype), dtype);
        }
    }
}

/* 4-bit KV cache rows decoded into bf16 (storage/kv_rows.py's layout): each of `count` rows,
 * `row_bytes` apart, holds `groups` groups of packed levels (group / 2 bytes each, the first
 * value in the high nibble), then the groups' bf16 minimums, then their bf16 steps.
 * out[r, g, j] = level * step + minimum, rounded to bf16 after the product and after the sum,
 * as PyTorch's mul_ then add_ round them: the same bits. A group's 16 possible values are
 * computed once and looked up 32 at a time (vpermw), so the pass is bound by memory. */
void dequantize_rows(const uint8_t *rows, int64_t count, int64_t row_bytes, int64_t groups, int64_t group,
                     uint16_t *out, int threads) {
    const int64_t packed = group / 2;
    const __m512 levels = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < count; r++) {
        const uint8_t *data = rows + r * row_bytes;
        const uint16_t *minimums = (const uint16_t *)(data + groups * packed), *steps = minimums + groups;
        for (int64_t g = 0; g < groups; g++) {
            __m512 step = _mm512_castsi512_ps(_mm512_set1_epi32((int32_t)((uint32_t)steps[g] << 16)));
            __m512 minimum = _mm512_castsi512_ps(_mm512_set1_epi32((int32_t)((uint32_t)minimums[g] << 16)));
            __m512 values = round_bf16(_mm512_add_ps(round_bf16(_mm512_mul_ps(levels, step)), minimum));
            __m512i table = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(values), 16)));
            const uint8_t *src = data + g * packed;
            uint16_t *dst = out + (r * groups + g) * group;
            for (int64_t i = 0; i < packed; i += 16) {
                const int64_t left = packed - i;
                __m512i bytes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes_from(left), src + i));
                /* word 2k is byte k's high nibble, word 2k + 1 its low one */
                __m512i index = _mm512_or_si512(_mm512_srli_epi32(bytes, 4),
                                                _mm512_slli_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), 16));
                __mmask32 lanes = left >= 16 ? 0xFFFFFFFFu : (__mmask32)((1u << (2 * left)) - 1);
                _mm512_mask_storeu_epi16(dst + 2 * i, lanes, _mm512_permutexvar_epi16(index, table));
            }
        }
    }
}
