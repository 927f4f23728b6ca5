/* A LoRA linear's shrink and expand work items (kernels/lora_fused.c has the layout and the algorithm), shared by
 * that kernel and kernels/decode_layers.c. */
#pragma once
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CB 64     /* columns of an expand item */
#define SRB 4     /* rank rows of a shrink item */

#include "bf16.h"

static inline float lora_load(const void *row, long d, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)row)[d]) : ((const float *)row)[d];
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* f32_to_bf16 (bf16.h) on 16 lanes: round to nearest even, NaN kept a (quiet) NaN */
static inline __m256i round_bf16x16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
    const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                                  _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    const __m512i quiet = _mm512_or_si512(u, _mm512_set1_epi32(0x400000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_mask_mov_epi32(rounded, nan, quiet), 16));
}

/* 16 elements of a row (of A, B^T or x) from element c as fp32 (m: the valid ones) */
static inline __m512 lora_chunk(const char *row, long c, __mmask16 m, int bf16) {
    if (!bf16) return _mm512_maskz_loadu_ps(m, (const float *)row + c);
    const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)row + c);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The expand item below with its 4 x 16 columns and four rows at a time in registers: each B^T row's chunk is
 * loaded once for the four rows, and the next item's chunk of every B^T row prefetched to L2 as it goes (the rows
 * are `width` apart: without it the R short runs of an item streamed at ~60% of a plain read). */
static inline __attribute__((always_inline)) void
expand_avx(void *y, long y_row, int R, const int64_t *seg_start, const int64_t *seg_len, const float *tmp,
           long t_row, long rank, long width, long col, const char *b, int n, int bf16) {
    const int esize = bf16 ? 2 : 4;
    __mmask16 m[CB / 16];
    for (int c = 0; c < CB / 16; c++) {
        const int left = n - 16 * c;
        m[c] = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
    }
    const long len = seg_len[0];
    for (long t0 = 0; t0 < len; t0 += 4) {
        const float *s[4];
        for (int u = 0; u < 4; u++) s[u] = tmp + (t_row + (t0 + u < len ? t0 + u : len - 1)) * R;
        __m512 acc[4][CB / 16];
        for (int u = 0; u < 4; u++)
            for (int c = 0; c < CB / 16; c++) acc[u][c] = _mm512_setzero_ps();
        if (t0 + 4 < len)      /* the next four rows' y block: rows `y_row` apart, which the hardware does not fetch ahead */
            for (int u = 4; u < 8 && t0 + u < len; u++) {
                const char *yr = (const char *)y + ((seg_start[0] + t0 + u) * y_row + col) * esize;
                for (int off = 0; off < n * esize; off += 64) _mm_prefetch(yr + off, _MM_HINT_T0);
            }
        for (long r = 0; r < rank; r++) {
            const char *br = b + r * width * esize;
            if (t0 == 0)
                for (int off = 0; off < CB * esize; off += 64) _mm_prefetch(br + CB * esize + off, _MM_HINT_T1);
            __m512 bv[CB / 16];
            for (int c = 0; c < CB / 16; c++) bv[c] = lora_chunk(br, 16 * c, m[c], bf16);
            for (int u = 0; u < 4; u++) {
                const __m512 sv = _mm512_set1_ps(s[u][r]);
                for (int c = 0; c < CB / 16; c++) acc[u][c] = _mm512_fmadd_ps(sv, bv[c], acc[u][c]);
            }
        }
        for (int u = 0; u < 4 && t0 + u < len; u++) {
            char *yr = (char *)y + ((seg_start[0] + t0 + u) * y_row + col) * esize;
            for (int c = 0; c < CB / 16; c++) {
                if (!m[c]) continue;
                if (bf16) {
                    uint16_t *yo = (uint16_t *)yr + 16 * c;
                    const __m512 sum = _mm512_add_ps(lora_chunk((const char *)yo, 0, m[c], 1), acc[u][c]);
                    _mm256_mask_storeu_epi16(yo, m[c], round_bf16x16(sum));
                } else {
                    float *yo = (float *)yr + 16 * c;
                    _mm512_mask_storeu_ps(yo, m[c], _mm512_add_ps(_mm512_maskz_loadu_ps(m[c], yo), acc[u][c]));
                }
            }
        }
    }
}

/* The shrink item below for TU rows of x against SRB rows of A at a time (TU x SRB accumulators: each x chunk is
 * loaded once for the SRB A rows and each A chunk once for the TU x rows, which a prefill's long segments need:
 * one A row against four x rows was load-bound at about half the FMA rate of torch's GEMM). The next item's A
 * rows are prefetched to L2 as it goes (a burst of whole rows at the start of the item streamed ~2/3 as fast). A
 * block past the last A row repeats that row and drops the results. */
static inline __attribute__((always_inline)) void
shrink_tile(const char *x, long x_row, int H_in, const char *ar, int nr, long start, long t0, float *out, int R,
            int prefetch, int bf16, const int TU) {
    const int esize = bf16 ? 2 : 4;
    const char *xr[4], *wr[SRB];
    for (int u = 0; u < TU; u++) xr[u] = x + (start + t0 + u) * x_row * esize;
    for (int k = 0; k < SRB; k++) wr[k] = ar + (long)(k < nr ? k : nr - 1) * H_in * esize;
    __m512 acc[4][SRB];
    for (int u = 0; u < TU; u++)
        for (int k = 0; k < SRB; k++) acc[u][k] = _mm512_setzero_ps();
    for (int d = 0; d < H_in; d += 16) {
        const __mmask16 m = H_in - d >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (H_in - d)) - 1);
        if (prefetch)
            for (int k = 0; k < SRB; k++) _mm_prefetch(ar + ((long)(SRB + k) * H_in + d) * esize, _MM_HINT_T1);
        __m512 xv[4];
        for (int u = 0; u < TU; u++) xv[u] = lora_chunk(xr[u], d, m, bf16);
        for (int k = 0; k < SRB; k++) {
            const __m512 w = lora_chunk(wr[k], d, m, bf16);
            for (int u = 0; u < TU; u++) acc[u][k] = _mm512_fmadd_ps(xv[u], w, acc[u][k]);
        }
    }
    float dots[4][SRB];    /* reduced with constant indices: a runtime index (k < nr) kept acc on the stack */
    for (int u = 0; u < TU; u++)
        for (int k = 0; k < SRB; k++) dots[u][k] = _mm512_reduce_add_ps(acc[u][k]);
    for (int u = 0; u < TU; u++)
        for (int k = 0; k < nr; k++)
            out[(t0 + u) * R + k] = bf16 ? bf16_to_f32(f32_to_bf16(dots[u][k])) : dots[u][k];
}

static inline __attribute__((always_inline)) void
shrink_avx(const char *x, long x_row, int H_in, const char *ar, int nr, long start, long n, float *out, int R,
           int bf16) {
    long t0 = 0;
    for (; t0 + 4 <= n; t0 += 4) shrink_tile(x, x_row, H_in, ar, nr, start, t0, out, R, t0 == 0, bf16, 4);
    switch (n - t0) {
    case 3: shrink_tile(x, x_row, H_in, ar, nr, start, t0, out, R, t0 == 0, bf16, 3); break;
    case 2: shrink_tile(x, x_row, H_in, ar, nr, start, t0, out, R, t0 == 0, bf16, 2); break;
    case 1: shrink_tile(x, x_row, H_in, ar, nr, start, t0, out, R, t0 == 0, bf16, 1); break;
    }
}
#endif


/* Rank rows [r, r + SRB) of segment i (fewer at the end of A): tmp[row, r + k] = x[row] . a[slot, r + k] for the
 * segment's rows. Without AVX-512: one A row against four rows at a time (four independent accumulators: one
 * dot alone is a chain of dependent FMAs; a short group repeats its last row and drops the extra results). */
static inline __attribute__((always_inline)) void
shrink_item(const void *x, long x_row, int H_in, const void *a, int R, const int64_t *seg_start,
            const int64_t *seg_len, const int64_t *seg_slot, const int64_t *seg_off, float *tmp, int i, int r0,
            int bf16) {
    const int esize = bf16 ? 2 : 4, nr = R - r0 < SRB ? R - r0 : SRB;
    const long n = seg_len[i];
#if defined(__AVX512F__)
    const char *ar = (const char *)a + ((seg_slot[i] * R + r0) * (long)H_in) * esize;
    shrink_avx((const char *)x, x_row, H_in, ar, nr, seg_start[i], n, tmp + seg_off[i] * R + r0, R, bf16);
#else
    for (int r = r0; r < r0 + nr; r++) {
        const char *ar = (const char *)a + ((seg_slot[i] * R + r) * (long)H_in) * esize;
        for (long off = 0; off < (long)H_in * esize; off += 64)     /* the row after next, ahead of its item */
            __builtin_prefetch(ar + 2L * H_in * esize + off);
        for (long t = 0; t < n; t += 4) {
            const char *xr[4];
            for (int u = 0; u < 4; u++)
                xr[u] = (const char *)x + (seg_start[i] + (t + u < n ? t + u : n - 1)) * x_row * esize;
            float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
#pragma omp simd reduction(+:d0, d1, d2, d3)
            for (int d = 0; d < H_in; d++) {
                const float w = lora_load(ar, d, bf16);
                d0 += lora_load(xr[0], d, bf16) * w;
                d1 += lora_load(xr[1], d, bf16) * w;
                d2 += lora_load(xr[2], d, bf16) * w;
                d3 += lora_load(xr[3], d, bf16) * w;
            }
            const float dots[4] = {d0, d1, d2, d3};
            for (int u = 0; u < 4 && t + u < n; u++)
                tmp[(seg_off[i] + t + u) * R + r] = bf16 ? bf16_to_f32(f32_to_bf16(dots[u])) : dots[u];
        }
    }
#endif
}

/* Columns [c0, c0 + n) of slice p for segment i: y[row, col + c] += sum_r tmp[row, r0 + r] * b[slot, r, c]. */
static inline __attribute__((always_inline)) void
expand_item(void *y, long y_row, int R, const int64_t *seg_start, const int64_t *seg_len, const int64_t *seg_slot,
            const int64_t *seg_off, const float *tmp, const int64_t *part_r0, const int64_t *part_r1,
            const int64_t *part_col, const int64_t *part_width, const int64_t *part_b, int i, int p, int c0,
            int bf16) {
    const int esize = bf16 ? 2 : 4, n = part_width[p] - c0 < CB ? (int)(part_width[p] - c0) : CB;
    const long rank = part_r1[p] - part_r0[p], width = part_width[p];
    const char *b = (const char *)(intptr_t)part_b[p] + (seg_slot[i] * rank * width + c0) * esize;
#if defined(__AVX512F__)
    expand_avx(y, y_row, R, seg_start + i, seg_len + i, tmp + part_r0[p], seg_off[i], rank, width, part_col[p] + c0,
               b, n, bf16);
#else
    float acc[CB];
    for (long r = 0; r < rank; r++)                             /* the next block of columns, ahead of its item */
        for (int off = 0; off < CB * esize; off += 64)
            __builtin_prefetch(b + (r * width + CB) * esize + off);
    for (long t = 0; t < seg_len[i]; t++) {
        const float *s = tmp + (seg_off[i] + t) * R + part_r0[p];
        memset(acc, 0, sizeof(float) * n);
        for (long r = 0; r < rank; r++) {
            const char *br = b + r * width * esize;
            const float sr = s[r];
#pragma omp simd
            for (int c = 0; c < n; c++) acc[c] += sr * lora_load(br, c, bf16);
        }
        char *yr = (char *)y + ((seg_start[i] + t) * y_row + part_col[p] + c0) * esize;
        if (bf16) {
            uint16_t *yo = (uint16_t *)yr;
            for (int c = 0; c < n; c++) yo[c] = f32_to_bf16(bf16_to_f32(yo[c]) + acc[c]);
        } else {
            float *yo = (float *)yr;
#pragma omp simd
            for (int c = 0; c < n; c++) yo[c] += acc[c];
        }
    }
#endif
}
