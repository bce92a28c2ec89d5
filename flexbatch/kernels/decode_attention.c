/* Decode attention over a KV cache that reads only what each query sees.
 *
 * One new token per sequence is written into its cache row at the last slot, then attends to the keys of its cache row that its additive mask
 * leaves visible. The rows of a block joined at different times, so most of them see a
 * small part of the slots a dense kernel reads (SDPA reads every row from the oldest
 * sequence's first slot, rows that hold no sequence included). Here each (sequence, KV head)
 * pair loads only its visible keys and values, and the queries name the cache rows they read
 * (`rows`), so a step computes the rows in flight and no others.
 *
 * Built at first use by kernels/native.py (plain C and AVX-512 intrinsics, no Python or torch
 * headers; with greedy.c, into one library) and called through ctypes with raw pointers. Sizes and strides are in elements;
 * the head dim is contiguous and a multiple of 16. Scores and softmax are fp32, as in SDPA.
 */
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define MAX_CHUNKS 16 /* head dims up to 256: 16 vectors of 16 floats */
#define PREFETCH_AHEAD 4 /* slots */

typedef struct {
    const float *q;      /* [n, heads, dim] fp32 */
    const void *k_new, *v_new; /* [n, kv_heads, dim], the caches' type: written at slot end - 1 */
    void *k, *v;         /* caches: any row, head and slot strides */
    int64_t k_strides[3], v_strides[3];
    const int64_t *rows; /* [n]: the cache row each sequence's queries read; NULL: row b */
    const float *mask;   /* [n, mask_stride] additive fp32 */
    int64_t mask_stride;
    float hidden_below;  /* a mask value below this hides its key */
    int64_t n, heads, kv_heads, dim, end; /* keys are cache slots [0, end) */
    float scale, softcap;                 /* softcap 0: scores are not capped */
    float *out;                           /* [n, heads, dim] fp32 */
    float *lse;                           /* [n, heads]: each query's log-sum-exp of scores; NULL: not written */
} DecodeArgs;

/* The `g` query heads of KV head `kvh` of sequence `b` (a GQA group) over its visible keys.
 * Scores first (keys loaded once for the group), then per query its softmax and values.
 * buf: g * end floats. */
static inline __attribute__((always_inline)) void attend_group(const DecodeArgs *a, int64_t b, int64_t kvh, float *buf,
                                                              __m512 (*load)(const void *), int element) {
    const int64_t g = a->heads / a->kv_heads, D = a->dim, T = a->end, chunks = D / 16;
    const int64_t row = a->rows ? a->rows[b] : b;
    char *k = (char *)a->k + (row * a->k_strides[0] + kvh * a->k_strides[1]) * element;
    char *v = (char *)a->v + (row * a->v_strides[0] + kvh * a->v_strides[1]) * element;
    const int64_t fresh = (b * a->kv_heads + kvh) * D * element;
    memcpy(k + (T - 1) * a->k_strides[2] * element, (const char *)a->k_new + fresh, D * element);
    memcpy(v + (T - 1) * a->v_strides[2] * element, (const char *)a->v_new + fresh, D * element);
    const float *mask = a->mask + b * a->mask_stride, *q = a->q + (b * a->heads + kvh * g) * D;
    float *scores = buf; /* [g, T] */
    int64_t first = 0;
    while (first < T && mask[first] < a->hidden_below) first++;
    __m512 key[MAX_CHUNKS];
    for (int64_t t = first; t < T; t++) {
        if (mask[t] < a->hidden_below) {
            for (int64_t j = 0; j < g; j++) scores[j * T + t] = -INFINITY;
            continue;
        }
        /* keys a few slots ahead, and this slot's values (read after every key): the loads of
         * one (sequence, KV head) are too few and too dependent to keep memory busy alone */
        for (int64_t line = 0; line < D * element; line += 64) {
            _mm_prefetch(k + (t + PREFETCH_AHEAD) * a->k_strides[2] * element + line, _MM_HINT_T0);
            _mm_prefetch(v + t * a->v_strides[2] * element + line, _MM_HINT_T0);
        }
        for (int64_t c = 0; c < chunks; c++) key[c] = load(k + (t * a->k_strides[2] + c * 16) * element);
        for (int64_t j = 0; j < g; j++) {
            __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(q + j * D), key[0]);
            for (int64_t c = 1; c < chunks; c++) sum = _mm512_fmadd_ps(_mm512_loadu_ps(q + j * D + c * 16), key[c], sum);
            float s = _mm512_reduce_add_ps(sum) * a->scale;
            if (a->softcap > 0.0f) s = a->softcap * tanhf(s / a->softcap);
            scores[j * T + t] = s + mask[t];
        }
    }
    float *out = a->out + (b * a->heads + kvh * g) * D;
    for (int64_t j = 0; j < g; j++) { /* per query: the softmax, then its sum of values in registers */
        float *s = scores + j * T;
        __m512 most = _mm512_set1_ps(-INFINITY);
        int64_t t = first;
        for (; t + 16 <= T; t += 16) most = _mm512_max_ps(most, _mm512_loadu_ps(s + t));
        const __mmask16 tail = (__mmask16)((1u << (T - t)) - 1);
        most = _mm512_mask_max_ps(most, tail, most, _mm512_maskz_loadu_ps(tail, s + t));
        const float top = _mm512_reduce_max_ps(most);
        const __m512 shift = _mm512_set1_ps(top);
        __m512 sum = _mm512_setzero_ps();
        for (t = first; t + 16 <= T; t += 16) { /* probabilities, unnormalised, in place of the scores */
            __m512 p = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), shift));
            _mm512_storeu_ps(s + t, p);
            sum = _mm512_add_ps(sum, p);
        }
        __m512 p = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + t), shift));
        _mm512_mask_storeu_ps(s + t, tail, p);
        const float total = _mm512_reduce_add_ps(_mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, p)));
        const __m512 inverse = _mm512_set1_ps(1.0f / total);
        if (a->lse) a->lse[b * a->heads + kvh * g + j] = top + logf(total); /* to merge with other keys' */
        __m512 o[MAX_CHUNKS]; /* the values of one (sequence, KV head) stay in L1 across its queries */
        for (int64_t c = 0; c < chunks; c++) o[c] = _mm512_setzero_ps();
        for (t = first; t < T; t++) {
            if (mask[t] < a->hidden_below) continue;
            const __m512 weight = _mm512_set1_ps(s[t]);
            for (int64_t c = 0; c < chunks; c++)
                o[c] = _mm512_fmadd_ps(weight, load(v + (t * a->v_strides[2] + c * 16) * element), o[c]);
        }
        for (int64_t c = 0; c < chunks; c++) _mm512_storeu_ps(out + j * D + c * 16, _mm512_mul_ps(o[c], inverse));
    }
}

/* one copy per element type, each with its load inlined */
#define ATTEND_AS(NAME, LOAD, ELEMENT) \
    static void NAME(const DecodeArgs *a, int64_t b, int64_t kvh, float *buf) { attend_group(a, b, kvh, buf, LOAD, ELEMENT); }
ATTEND_AS(attend_f32, load_f32, 4)
ATTEND_AS(attend_bf16, load_bf16, 2)
ATTEND_AS(attend_f16, load_f16, 2)

/* dtype: 0 float32, 1 bfloat16, 2 float16. Returns 0; -1 if out of memory, -2 if the head
 * dim is not a multiple of 16 up to 256. Every query sees at least one key (itself). */
int decode_attention(const DecodeArgs *a, int dtype, int threads) {
    if (a->dim % 16 != 0 || a->dim / 16 > MAX_CHUNKS) return -2;
    void (*attend)(const DecodeArgs *, int64_t, int64_t, float *) =
        dtype == 1 ? attend_bf16 : dtype == 2 ? attend_f16 : attend_f32;
    const int64_t g = a->heads / a->kv_heads, tasks = a->n * a->kv_heads;
    const size_t floats = (size_t)(g * a->end);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *buf = malloc(sizeof(float) * floats);
        if (buf == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 8)
        for (int64_t task = 0; task < tasks; task++)
            if (buf != NULL) attend(a, task / a->kv_heads, task % a->kv_heads, buf);
        free(buf);
    }
    return failed ? -1 : 0;
}
