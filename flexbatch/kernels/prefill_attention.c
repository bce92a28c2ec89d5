/* Attention of many queries per sequence in bf16: a prompt's prefill over its keys, or one
 * decode step's queries of many sequences over a prefix they all share.
 *
 * Why a kernel of our own: on a CPU without AMX, PyTorch's flash attention for these shapes
 * (tens to hundreds of queries over a few hundred keys, head dim 64) runs at a fifth of the
 * machine's bf16 matmul rate, and a prompt's attention then costs as much as all its linear
 * layers. Here both products run on AVX512-BF16 dot products (VDPBF16PS, 32 multiply-adds an
 * instruction) with keys and values first laid out in the pairs that instruction reads:
 *
 *   keys:   per block of 16 keys, per pair of dims p: [16 keys][2 dims]  (a score per lane)
 *   values: per pair of keys,     per 16 dims c:      [16 dims][2 keys]  (an output per lane)
 *
 * Scores and softmax are fp32; probabilities are rounded to bf16 for the second product, as
 * PyTorch's CPU flash attention does. A task is 16 query rows of one head of one sequence,
 * over the keys any of them sees (from the first key one of them sees to the last). Sizes
 * and strides are in elements; the head dim is contiguous and a multiple of 64.
 */
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#if defined(__AVX512BF16__)
#define ROWS 16 /* query rows per task */
#define KEYS 16 /* keys per block of packed keys */

typedef struct {
    const uint16_t *q, *k, *v;     /* [B, H, S, D], [B, Hkv, T, D] bf16 */
    int64_t q_strides[3], k_strides[3], v_strides[3]; /* of b, head, position */
    const uint16_t *mask;          /* [B or 1, S, T] bf16 additive; NULL: every key visible */
    int64_t mask_strides[2];       /* of b (0: one mask for all), position */
    float hidden_below;            /* a mask value below this hides its key */
    int64_t batch, heads, kv_heads, queries, keys, dim;
    float scale;
    uint16_t *out;                 /* [B, H, S, D] bf16 */
    int64_t out_strides[3];
    float *lse;                    /* [B, H, S] log-sum-exp of each query's scores; NULL: not written */
    /* keys and values [Hkv, P, D] of the first P positions, the same for every sequence (a
     * prompt prefix they share), read in place of the sequences' own first P slots; NULL: none */
    const uint16_t *prefix_k, *prefix_v;
    int64_t prefix_strides[2];     /* of head, position */
    int64_t prefix_len;
} ManyArgs;

static inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }
static inline float bf16_float(uint16_t x) {
    const uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Where position t's key (or value) of one (sequence, KV head) is: the shared prefix's, or
 * the sequence's own slot */
typedef struct {
    const uint16_t *own, *prefix;
    int64_t own_step, prefix_step, prefix_len;
} Rows;

static inline const uint16_t *row_at(const Rows *r, int64_t t) {
    return t < r->prefix_len ? r->prefix + t * r->prefix_step : r->own + t * r->own_step;
}

/* keys [T, D] into blocks of KEYS keys: [T/KEYS][D/2][KEYS] pairs */
static void pack_keys(const Rows *k, int64_t T, int64_t D, int64_t padded, uint32_t *out) {
    memset(out, 0, sizeof(uint16_t) * padded * D);
    for (int64_t t = 0; t < T; t++) {
        const uint32_t *pairs = (const uint32_t *)row_at(k, t);
        uint32_t *block = out + (t / KEYS) * (D / 2) * KEYS + t % KEYS;
        for (int64_t p = 0; p < D / 2; p++) block[p * KEYS] = pairs[p];
    }
}

/* values [T, D] into pairs of keys: [T/2][D/16][16 dims][2 keys] */
static void pack_values(const Rows *v, int64_t T, int64_t D, int64_t padded, uint16_t *out) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t t = 0; t < padded; t += 2) {
        for (int64_t c = 0; c < D / 16; c++) {
            __m256i a = t < T ? _mm256_loadu_si256((const __m256i *)(row_at(v, t) + c * 16)) : zero;
            __m256i b = t + 1 < T ? _mm256_loadu_si256((const __m256i *)(row_at(v, t + 1) + c * 16)) : zero;
            __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
            _mm512_storeu_si512(out + (t / 2 * (D / 16) + c) * 32, _mm512_permutexvar_epi16(interleave, both));
        }
    }
}

/* The keys rows [s0, s0 + n) see: [first, last) over the union of their masks */
static void visible_range(const ManyArgs *a, int64_t b, int64_t s0, int64_t n, int64_t *first, int64_t *last) {
    const int64_t T = a->keys;
    if (a->mask == NULL) { *first = 0; *last = T; return; }
    int64_t lo = T, hi = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *m = a->mask + b * a->mask_strides[0] + (s0 + i) * a->mask_strides[1];
        float below = a->hidden_below;
        int64_t t = 0;
        while (t < lo && bf16_float(m[t]) < below) t++;
        lo = t < lo ? t : lo;
        t = T;
        while (t > hi && bf16_float(m[t - 1]) < below) t--;
        hi = t > hi ? t : hi;
    }
    *first = lo < hi ? lo : 0;
    *last = lo < hi ? hi : 0;
}

/* scores[i][t] for 4 rows over blocks kb, kb + 1 of packed keys: sum over dim pairs */
static inline void score_4x2(const uint32_t *q, int64_t D, const uint32_t *keys, int64_t kb, float *scores,
                             int64_t width, float scale) {
    __m512 acc[4][2];
    for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    const uint32_t *k0 = keys + kb * (D / 2) * KEYS, *k1 = k0 + (D / 2) * KEYS;
    for (int64_t p = 0; p < D / 2; p++) {
        const __m512bh key0 = (__m512bh)_mm512_loadu_si512(k0 + p * KEYS);
        const __m512bh key1 = (__m512bh)_mm512_loadu_si512(k1 + p * KEYS);
        for (int i = 0; i < 4; i++) {
            const __m512bh query = (__m512bh)_mm512_set1_epi32((int)q[i * (D / 2) + p]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], query, key0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], query, key1);
        }
    }
    const __m512 by = _mm512_set1_ps(scale);
    for (int i = 0; i < 4; i++) {
        _mm512_storeu_ps(scores + i * width + kb * KEYS, _mm512_mul_ps(acc[i][0], by));
        _mm512_storeu_ps(scores + i * width + (kb + 1) * KEYS, _mm512_mul_ps(acc[i][1], by));
    }
}

/* one row's scores [lo, hi) plus its mask -> bf16 probabilities (unnormalised, zero outside
 * [lo, hi) up to even bounds lo2, hi2); returns the sum, sets *top to the largest score */
static float softmax_row(float *s, const uint16_t *mask, int64_t lo, int64_t hi, int64_t lo2, int64_t hi2,
                         uint16_t *prob, float *top) {
    __m512 most = _mm512_set1_ps(-INFINITY);
    for (int64_t t = lo; t < hi; t += 16) {
        const __mmask16 keep = hi - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (hi - t)) - 1);
        __m512 x = _mm512_maskz_loadu_ps(keep, s + t);
        if (mask) {
            const __m512i bits = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, mask + t));
            x = _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)));
            _mm512_mask_storeu_ps(s + t, keep, x);
        }
        most = _mm512_mask_max_ps(most, keep, most, x);
    }
    float shift_by = _mm512_reduce_max_ps(most);
    *top = shift_by;
    if (shift_by == -INFINITY) shift_by = 0.0f; /* a row that sees nothing: zeros, not NaN */
    const __m512 shift = _mm512_set1_ps(shift_by);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = lo; t < hi; t += 16) {
        const __mmask16 keep = hi - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (hi - t)) - 1);
        __m512 p = _mm512_maskz_mov_ps(keep, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(keep, s + t), shift)));
        sum = _mm512_add_ps(sum, p);
        _mm256_mask_storeu_epi16(prob + t, keep, (__m256i)_mm512_cvtneps_pbh(p));
    }
    if (lo2 < lo) prob[lo2] = 0;
    if (hi2 > hi) prob[hi] = 0;
    return _mm512_reduce_add_ps(sum);
}

/* out rows += probabilities @ values for 4 rows and 4 dim chunks starting at c0 */
static inline void weigh_4x4(const uint16_t *prob, int64_t width, const uint16_t *values, int64_t D, int64_t c0,
                             int64_t lo2, int64_t hi2, __m512 acc[4][4]) {
    for (int i = 0; i < 4; i++)
        for (int c = 0; c < 4; c++) acc[i][c] = _mm512_setzero_ps();
    for (int64_t t = lo2; t < hi2; t += 2) {
        const uint16_t *pair = values + (t / 2 * (D / 16) + c0) * 32;
        __m512bh value[4];
        for (int c = 0; c < 4; c++) value[c] = (__m512bh)_mm512_loadu_si512(pair + c * 32);
        for (int i = 0; i < 4; i++) {
            const __m512bh weight = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(prob + i * width + t));
            for (int c = 0; c < 4; c++) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], weight, value[c]);
        }
    }
}

typedef struct {
    float *scores;  /* [ROWS][width] */
    uint16_t *prob; /* [ROWS][width] */
    uint32_t *query; /* [ROWS][D/2] */
    float total[ROWS], top[ROWS];
} Scratch;

static void attend_rows(const ManyArgs *a, int64_t b, int64_t h, int64_t s0, const uint32_t *keys,
                        const uint16_t *values, int64_t width, Scratch *w) {
    const int64_t D = a->dim, n = a->queries - s0 < ROWS ? a->queries - s0 : ROWS, n4 = round_up(n, 4);
    int64_t lo, hi;
    visible_range(a, b, s0, n, &lo, &hi);
    const int64_t lo2 = lo & ~1, hi2 = round_up(hi, 2);
    memset(w->query, 0, sizeof(uint32_t) * ROWS * (D / 2));
    for (int64_t i = 0; i < n; i++)
        memcpy(w->query + i * (D / 2), a->q + b * a->q_strides[0] + h * a->q_strides[1] + (s0 + i) * a->q_strides[2],
               sizeof(uint16_t) * D);
    for (int64_t i = 0; i < n4; i += 4)
        for (int64_t kb = lo / KEYS / 2 * 2; kb * KEYS < hi; kb += 2)
            score_4x2(w->query + i * (D / 2), D, keys, kb, w->scores + i * width, width, a->scale);
    for (int64_t i = 0; i < n4; i++) {
        const uint16_t *mask = i >= n || a->mask == NULL ? NULL
                             : a->mask + b * a->mask_strides[0] + (s0 + i) * a->mask_strides[1];
        w->total[i] = softmax_row(w->scores + i * width, mask, lo, hi, lo2, hi2, w->prob + i * width, &w->top[i]);
    }
    for (int64_t c0 = 0; c0 < D / 16; c0 += 4)
        for (int64_t i = 0; i < n4; i += 4) {
            __m512 acc[4][4];
            weigh_4x4(w->prob + i * width, width, values, D, c0, lo2, hi2, acc);
            for (int64_t r = i; r < i + 4 && r < n; r++) {
                const float total = w->total[r];
                const __m512 inverse = _mm512_set1_ps(total > 0.0f ? 1.0f / total : 0.0f);
                uint16_t *out = a->out + b * a->out_strides[0] + h * a->out_strides[1] + (s0 + r) * a->out_strides[2];
                for (int c = 0; c < 4; c++)
                    _mm256_storeu_si256((__m256i *)(out + (c0 + c) * 16),
                                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r - i][c], inverse)));
            }
        }
    if (a->lse)
        for (int64_t r = 0; r < n; r++)
            a->lse[(b * a->heads + h) * a->queries + s0 + r] = w->top[r] + logf(w->total[r]);
}

/* Returns 0; -1 if out of memory, -2 if the head dim is not a multiple of 64. */
int many_query_attention(const ManyArgs *a, int threads) {
    const int64_t D = a->dim, T = a->keys, g = a->heads / a->kv_heads;
    if (D % 64 != 0) return -2;
    const int64_t padded = round_up(T, 2 * KEYS), pairs = a->batch * a->kv_heads;
    const size_t each = sizeof(uint16_t) * padded * D;
    char *packed = aligned_alloc(64, 2 * each * pairs);
    if (packed == NULL) return -1;
    const int64_t blocks = (a->queries + ROWS - 1) / ROWS, tasks = pairs * g * blocks;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < pairs; pair++) {
            const int64_t b = pair / a->kv_heads, kvh = pair % a->kv_heads;
            const int64_t shared = a->prefix_k ? a->prefix_len : 0, at = kvh * a->prefix_strides[0];
            const Rows keys = {a->k + b * a->k_strides[0] + kvh * a->k_strides[1], shared ? a->prefix_k + at : NULL,
                               a->k_strides[2], a->prefix_strides[1], shared};
            const Rows values = {a->v + b * a->v_strides[0] + kvh * a->v_strides[1], shared ? a->prefix_v + at : NULL,
                                 a->v_strides[2], a->prefix_strides[1], shared};
            pack_keys(&keys, T, D, padded, (uint32_t *)(packed + 2 * each * pair));
            pack_values(&values, T, D, padded, (uint16_t *)(packed + 2 * each * pair + each));
        }
        Scratch w;
        w.scores = aligned_alloc(64, sizeof(float) * ROWS * padded);
        w.prob = aligned_alloc(64, sizeof(uint16_t) * ROWS * padded);
        w.query = aligned_alloc(64, sizeof(uint32_t) * ROWS * (D / 2));
        if (w.scores == NULL || w.prob == NULL || w.query == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t task = 0; task < tasks; task++) {
            if (failed) continue;
            const int64_t pair = task / (g * blocks), j = task / blocks % g, block = task % blocks;
            const int64_t b = pair / a->kv_heads, h = pair % a->kv_heads * g + j;
            attend_rows(a, b, h, block * ROWS, (const uint32_t *)(packed + 2 * each * pair),
                        (const uint16_t *)(packed + 2 * each * pair + each), padded, &w);
        }
        free(w.scores);
        free(w.prob);
        free(w.query);
    }
    free(packed);
    return failed ? -1 : 0;
}

int many_query_attention_built(void) { return 1; }
#else
int many_query_attention(const void *a, int threads) { (void)a; (void)threads; return -3; }
int many_query_attention_built(void) { return 0; } /* no AVX512-BF16 on this CPU: PyTorch's attention runs */
#endif
