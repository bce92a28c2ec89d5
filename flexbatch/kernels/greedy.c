/* The greedy choice of a decode step: for each row of logits, the first index of its maximum
 * and that token's log-probability (maximum - log sum exp), in two passes over the row, where
 * PyTorch's argmax and log_softmax take three and write the whole [rows, vocab] result.
 *
 * Part of the library kernels/native.py builds (with decode_attention.c). */
#include "simd.h"

/* logits [n, stride] fp32, a row's first v entries its logits. Writes tokens [n] and
 * logprobs [n]. Returns 0; 1 if a row holds a NaN (the caller then applies PyTorch's rules). */
int greedy_pick(const float *logits, int64_t n, int64_t v, int64_t stride, int64_t *tokens, float *logprobs,
                int threads) {
    int nan_seen = 0;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const float *x = logits + r * stride;
        __m512 best = _mm512_set1_ps(-INFINITY);
        __m512i best_at = _mm512_setzero_si512(), at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                                          13, 14, 15);
        __mmask16 nan = 0;
        for (int64_t t = 0; t < v; t += 16, at = _mm512_add_epi32(at, _mm512_set1_epi32(16))) {
            __mmask16 lanes = v - t >= 16 ? 0xFFFF : (__mmask16)((1u << (v - t)) - 1);
            __m512 x16 = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), lanes, x + t);
            nan |= _mm512_cmp_ps_mask(x16, x16, _CMP_UNORD_Q);
            __mmask16 higher = _mm512_cmp_ps_mask(x16, best, _CMP_GT_OQ); /* strictly: a lane keeps its first */
            best = _mm512_mask_mov_ps(best, higher, x16);
            best_at = _mm512_mask_mov_epi32(best_at, higher, at);
        }
        if (nan) {
#pragma omp atomic write
            nan_seen = 1;
            continue;
        }
        float top = _mm512_reduce_max_ps(best);
        /* the lowest index among the lanes that hold the maximum: the first in the row */
        __mmask16 holders = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
        int first = _mm512_mask_reduce_min_epi32(holders, best_at);
        __m512 shift = _mm512_set1_ps(top), sum = _mm512_setzero_ps();
        for (int64_t t = 0; t < v; t += 16) {
            __mmask16 lanes = v - t >= 16 ? 0xFFFF : (__mmask16)((1u << (v - t)) - 1);
            __m512 x16 = _mm512_maskz_loadu_ps(lanes, x + t);
            sum = _mm512_mask_add_ps(sum, lanes, sum, exp_nonpositive(_mm512_sub_ps(x16, shift)));
        }
        tokens[r] = first;
        logprobs[r] = -logf(_mm512_reduce_add_ps(sum));
    }
    return nan_seen;
}
