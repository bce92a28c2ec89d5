/* The greedy choice of a decode step: for each row of logits, the first index of its maximum
 * and that token's log-probability (maximum - log sum exp), in two passes over the row, where
 * PyTorch's argmax and log_softmax take three and write the whole [rows, vocab] result.
 * Logits may stay in the model's 16-bit type: each is widened to fp32 exactly as `.float()`
 * would, so the result is the same, without writing an fp32 copy of [rows, vocab] first.
 *
 * Part of the library kernels/native.py builds (with decode_attention.c). */
#include <string.h>

#include "simd.h"

/* 16 logits from t on, widened to fp32; past the row's end (v) the lanes hold `fill` */
static inline __attribute__((always_inline)) __m512 load16(const char *x, int64_t t, int64_t v, int element,
                                                         __m512 (*load)(const void *), float (*one)(const void *),
                                                         float fill) {
    if (v - t >= 16) return load(x + t * element);
    float tail[16];
    for (int64_t i = 0; i < 16; i++) tail[i] = t + i < v ? one(x + (t + i) * element) : fill;
    return _mm512_loadu_ps(tail);
}

static inline float one_f32(const void *p) { return *(const float *)p; }
static inline float one_bf16(const void *p) {
    uint32_t bits = (uint32_t)(*(const uint16_t *)p) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
static inline float one_f16(const void *p) { return _cvtsh_ss(*(const uint16_t *)p); }

/* row r of the logits: writes tokens[r] and logprobs[r]; returns 1 if the row holds a NaN */
static inline __attribute__((always_inline)) int pick_row(const char *x, int64_t v, int64_t *token, float *logprob,
                                                        int element, __m512 (*load)(const void *),
                                                        float (*one)(const void *)) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i best_at = _mm512_setzero_si512(), at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                                      14, 15);
    __mmask16 nan = 0;
    for (int64_t t = 0; t < v; t += 16, at = _mm512_add_epi32(at, _mm512_set1_epi32(16))) {
        __m512 x16 = load16(x, t, v, element, load, one, -INFINITY);
        nan |= _mm512_cmp_ps_mask(x16, x16, _CMP_UNORD_Q);
        __mmask16 higher = _mm512_cmp_ps_mask(x16, best, _CMP_GT_OQ); /* strictly: a lane keeps its first */
        best = _mm512_mask_mov_ps(best, higher, x16);
        best_at = _mm512_mask_mov_epi32(best_at, higher, at);
    }
    if (nan) return 1;
    float top = _mm512_reduce_max_ps(best);
    /* the lowest index among the lanes that hold the maximum: the first in the row */
    __mmask16 holders = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
    *token = _mm512_mask_reduce_min_epi32(holders, best_at);
    __m512 shift = _mm512_set1_ps(top), sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < v; t += 16) /* -inf past the end: e^-inf adds nothing */
        sum = _mm512_add_ps(sum, exp_nonpositive(_mm512_sub_ps(load16(x, t, v, element, load, one, -INFINITY), shift)));
    *logprob = -logf(_mm512_reduce_add_ps(sum));
    return 0;
}

/* logits [n, stride] of dtype 0 fp32, 1 bf16 or 2 fp16, a row's first v entries its logits.
 * Writes tokens [n] and logprobs [n]. Returns 0; 1 if a row holds a NaN (the caller then
 * applies PyTorch's rules). */
int greedy_pick(const void *logits, int dtype, int64_t n, int64_t v, int64_t stride, int64_t *tokens,
                float *logprobs, int threads) {
    const int element = dtype == 0 ? 4 : 2;
    int nan_seen = 0;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const char *x = (const char *)logits + r * stride * element;
        int nan = dtype == 1 ? pick_row(x, v, tokens + r, logprobs + r, 2, load_bf16, one_bf16)
                  : dtype == 2 ? pick_row(x, v, tokens + r, logprobs + r, 2, load_f16, one_f16)
                               : pick_row(x, v, tokens + r, logprobs + r, 4, load_f32, one_f32);
        if (nan) {
#pragma omp atomic write
            nan_seen = 1;
        }
    }
    return nan_seen;
}
