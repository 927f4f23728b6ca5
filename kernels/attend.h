/* Paged decode attention for one work item (kernels/paged_decode.c has the layout and the algorithm): shared by
 * that kernel and kernels/decode_layers.c. */
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "vexp.h"

/* One element of a row as fp32; `bf16` is a compile-time constant in each exported kernel. */
static inline float attend_load(const void *row, int d, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)row)[d]) : ((const float *)row)[d];
}

/* Work item: sequence b, kv heads [kh0, kh0 + nkh) and their query heads. Each key / value row of those heads
 * is read once, in cache order (a block's rows are consecutive), for all their query heads. Inlined into one
 * function per dtype, so `bf16` is a constant there (in an OpenMP outlined body it would be a runtime value and
 * the inner loops would not vectorise). */
static inline __attribute__((always_inline)) void
attend_portable(const void *q, long q_row, long q_head, const void *k, const void *v, const int64_t *tables,
       const uint8_t *mask, long mask_row, void *out, int b, int kh0, int nkh, int H, int KVH, int D, int NB,
       int BS, float scale, int bf16) {
    const int G = H / KVH, NH = nkh * G, esize = bf16 ? 2 : 4;
    const long kv_row = (long)KVH * D;                          /* elements between a block's rows */
    float *qf = malloc(sizeof(float) * ((size_t)NH * D * 2 + (size_t)NH * BS + 2 * NH));
    float *acc = qf + (size_t)NH * D, *s = acc + (size_t)NH * D, *mx = s + (size_t)NH * BS, *sum = mx + NH;
    const uint8_t *m = mask + b * mask_row;
    const int64_t *table = tables + (long)b * NB;
    for (int h = 0; h < NH; h++) {                              /* local head h is query head kh0 * G + h */
        const char *qh = (const char *)q + (b * q_row + (long)(kh0 * G + h) * q_head) * esize;
        for (int d = 0; d < D; d++) qf[h * D + d] = attend_load(qh, d, bf16) * scale;
        mx[h] = -INFINITY;
    }
    memset(acc, 0, sizeof(float) * (size_t)NH * D);
    for (int h = 0; h < NH; h++) sum[h] = 0.f;
    for (int jb = 0; jb < NB; jb++) {                           /* one block: its keys, then its values */
        const uint8_t *mb = m + (long)jb * BS;
        const long row0 = table[jb] * BS * kv_row + (long)kh0 * D;
        const char *kb = (const char *)k + row0 * esize, *vb = (const char *)v + row0 * esize;
        int any = 0;
        for (int t = 0; t < BS; t++) any |= mb[t];
        if (!any) continue;
        for (int h = 0; h < NH; h++) {                          /* scores of the block, the running max */
            const float *qh = qf + h * D;
            const char *kh = kb + (long)(h / G) * D * esize;
            float bmax = mx[h];
            for (int t = 0; t < BS; t += 4) {       /* four keys at once: four independent FMA chains */
                const char *kr[4];
                for (int u = 0; u < 4; u++)         /* past the block's end: repeat its last row, dropped */
                    kr[u] = kh + (t + u < BS ? t + u : BS - 1) * kv_row * esize;
                float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
#pragma omp simd reduction(+:d0, d1, d2, d3)
                for (int d = 0; d < D; d++) {
                    const float qd = qh[d];
                    d0 += qd * attend_load(kr[0], d, bf16);
                    d1 += qd * attend_load(kr[1], d, bf16);
                    d2 += qd * attend_load(kr[2], d, bf16);
                    d3 += qd * attend_load(kr[3], d, bf16);
                }
                const float dots[4] = {d0, d1, d2, d3};
                for (int u = 0; u < 4 && t + u < BS; u++) {
                    s[h * BS + t + u] = dots[u];    /* masked keys' scores are computed, never used */
                    if (mb[t + u] && dots[u] > bmax) bmax = dots[u];
                }
            }
            if (bmax > mx[h]) {                                 /* rescale what was summed under the old max */
                const float c = vexp(mx[h] - bmax);
                float *ah = acc + h * D;
                for (int d = 0; d < D; d++) ah[d] *= c;
                sum[h] *= c;
                mx[h] = bmax;
            }
            float *sh = s + h * BS, bsum = 0.f;
            const float mh = mx[h];
#pragma omp simd reduction(+:bsum)
            for (int t = 0; t < BS; t++) {                      /* weights of the block's keys, 0 if masked */
                const float e = mb[t] ? vexp(sh[t] - mh) : 0.f;
                sh[t] = e;
                bsum += e;
            }
            sum[h] += bsum;
        }
        for (int t = 0; t < BS; t++) {                          /* values, row by row */
            if (!mb[t]) continue;
            for (int h = 0; h < NH; h++) {
                const char *vr = vb + (t * kv_row + (long)(h / G) * D) * esize;
                const float p = s[h * BS + t];
                float *ah = acc + h * D;
#pragma omp simd
                for (int d = 0; d < D; d++) ah[d] += p * attend_load(vr, d, bf16);
            }
        }
    }
    const int attended = mx[0] != -INFINITY;                    /* some key attended (the mask is per sequence) */
    for (int h = 0; h < NH; h++) {
        const long o = ((long)b * H + kh0 * G + h) * D;
        for (int d = 0; d < D; d++) {
            const float x = attended ? acc[h * D + d] / sum[h] : 0.f;
            if (bf16) ((uint16_t *)out)[o + d] = f32_to_bf16(x);
            else ((float *)out)[o + d] = x;
        }
    }
    free(qf);
}


#if defined(__AVX512F__)
#include <immintrin.h>

#define ATT_MAX_G 16            /* query heads per kv head */
#define ATT_MAX_C 32            /* 16-lane chunks of a head: D <= 512 */
#define ATT_MAX_BS 64           /* keys per block */

/* chunk c (16 elements, the tail masked) of a row as fp32 */
static inline __m512 att_chunk(const char *row, int c, int D, int bf16) {
    const int k = c * 16;
    const __mmask16 m = D - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - k)) - 1);
    if (!bf16) return _mm512_maskz_loadu_ps(m, (const float *)row + k);
    const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)row + k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The same work item with AVX-512, one kv head at a time: each key and value row is loaded once (16 lanes at a
 * time) for the kv head's G query heads, whose scaled queries and output accumulators stay in vectors; a block's
 * scores, then its weights (online softmax, vexp vectorised over the block's keys), then its values. */
static inline __attribute__((always_inline)) void
attend_avx(const void *q, long q_row, long q_head, const void *k, const void *v, const int64_t *tables,
           const uint8_t *mask, long mask_row, void *out, int b, int kh0, int nkh, int H, int KVH, int D, int NB,
           int BS, float scale, int bf16) {
    const int G = H / KVH, C = (D + 15) / 16, esize = bf16 ? 2 : 4;
    const long kv_row = (long)KVH * D;
    const uint8_t *m = mask + b * mask_row;
    const int64_t *table = tables + (long)b * NB;
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int kh = kh0; kh < kh0 + nkh; kh++) {
        __m512 qv[ATT_MAX_G][ATT_MAX_C], acc[ATT_MAX_G][ATT_MAX_C];
        float mx[ATT_MAX_G], sum[ATT_MAX_G];
        float s[ATT_MAX_G][ATT_MAX_BS];
        for (int g = 0; g < G; g++) {
            const char *qh = (const char *)q + (b * q_row + (long)(kh * G + g) * q_head) * esize;
            for (int c = 0; c < C; c++) {
                qv[g][c] = _mm512_mul_ps(att_chunk(qh, c, D, bf16), vscale);
                acc[g][c] = _mm512_setzero_ps();
            }
            mx[g] = -INFINITY;
            sum[g] = 0.f;
        }
        for (int jb = 0; jb < NB; jb++) {
            const uint8_t *mb = m + (long)jb * BS;
            int any = 0;
            for (int t = 0; t < BS; t++) any |= mb[t];
            if (!any) continue;
            const long row0 = table[jb] * BS * kv_row + (long)kh * D;
            const char *kb = (const char *)k + row0 * esize, *vb = (const char *)v + row0 * esize;
            for (int t = 0; t < BS; t++) {                          /* scores: a key row against G queries */
                if (!mb[t]) continue;
                const char *kr = kb + t * kv_row * esize;
                __m512 kv[ATT_MAX_C];
                for (int c = 0; c < C; c++) kv[c] = att_chunk(kr, c, D, bf16);
                for (int g = 0; g < G; g++) {
                    __m512 d = _mm512_mul_ps(qv[g][0], kv[0]);
                    for (int c = 1; c < C; c++) d = _mm512_fmadd_ps(qv[g][c], kv[c], d);
                    s[g][t] = _mm512_reduce_add_ps(d);
                }
            }
            for (int g = 0; g < G; g++) {                           /* weights, the running max and sum */
                float bmax = mx[g];
                for (int t = 0; t < BS; t++)
                    if (mb[t] && s[g][t] > bmax) bmax = s[g][t];
                if (bmax > mx[g]) {
                    const float c0 = vexp(mx[g] - bmax);
                    const __m512 cv = _mm512_set1_ps(c0);
                    for (int c = 0; c < C; c++) acc[g][c] = _mm512_mul_ps(acc[g][c], cv);
                    sum[g] *= c0;
                    mx[g] = bmax;
                }
                float *sg = s[g], bsum = 0.f;
                const float mh = mx[g];
#pragma omp simd reduction(+:bsum)
                for (int t = 0; t < BS; t++) {
                    const float e = mb[t] ? vexp(sg[t] - mh) : 0.f;
                    sg[t] = e;
                    bsum += e;
                }
                sum[g] += bsum;
            }
            for (int t = 0; t < BS; t++) {                          /* values: a row for G accumulators */
                if (!mb[t]) continue;
                const char *vr = vb + t * kv_row * esize;
                __m512 vv[ATT_MAX_C];
                for (int c = 0; c < C; c++) vv[c] = att_chunk(vr, c, D, bf16);
                for (int g = 0; g < G; g++) {
                    const __m512 p = _mm512_set1_ps(s[g][t]);
                    for (int c = 0; c < C; c++) acc[g][c] = _mm512_fmadd_ps(p, vv[c], acc[g][c]);
                }
            }
        }
        for (int g = 0; g < G; g++) {                               /* out = acc / sum (zeros: nothing attended) */
            const long o = ((long)b * H + kh * G + g) * D;
            for (int c = 0; c < C; c++) {
                const int k0 = c * 16;
                const __mmask16 mk = D - k0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - k0)) - 1);
                const __m512 x = mx[g] != -INFINITY ? _mm512_div_ps(acc[g][c], _mm512_set1_ps(sum[g]))
                                                    : _mm512_setzero_ps();
                if (bf16) {
                    float tmp[16];
                    _mm512_storeu_ps(tmp, x);
                    for (int d = 0; d < 16 && k0 + d < D; d++) ((uint16_t *)out)[o + k0 + d] = f32_to_bf16(tmp[d]);
                } else {
                    _mm512_mask_storeu_ps((float *)out + o + k0, mk, x);
                }
            }
        }
    }
}
#endif

/* The work item: the AVX-512 version where it applies, else the portable one. */
static inline __attribute__((always_inline)) void
attend(const void *q, long q_row, long q_head, const void *k, const void *v, const int64_t *tables,
       const uint8_t *mask, long mask_row, void *out, int b, int kh0, int nkh, int H, int KVH, int D, int NB,
       int BS, float scale, int bf16) {
#if defined(__AVX512F__)
    if (H / KVH <= ATT_MAX_G && D <= 16 * ATT_MAX_C && BS <= ATT_MAX_BS) {
        attend_avx(q, q_row, q_head, k, v, tables, mask, mask_row, out, b, kh0, nkh, H, KVH, D, NB, BS, scale, bf16);
        return;
    }
#endif
    attend_portable(q, q_row, q_head, k, v, tables, mask, mask_row, out, b, kh0, nkh, H, KVH, D, NB, BS, scale, bf16);
}
