/* A LoRA linear's whole delta on the CPU in one call: shrink by the stacked A of all its slices, then expand by
 * each slice's B into its columns, for every segment (rows of one adapter). Built and loaded by
 * kernels/lora_fused.py; its torch reference is kernels/reference.py's sgmv_shrink + sgmv_expand per slice.
 *
 *   x      [T, H_in]           row stride x_row, elements contiguous
 *   a      [S, R, H_in]        contiguous: slot s's stacked lora_A rows (R = sum of the slices' ranks)
 *   y      [T, *]              row stride y_row; slice p adds into columns [col[p], col[p] + width[p])
 *   seg_*  [nseg]              int64 start row, length, slot of each segment
 *   part_* [nparts]            int64 rank rows [r0, r1) of a, column, width, and the address of the slice's
 *                              B^T stack [S, r1 - r0, width] (contiguous)
 *
 * Phase 1, items (segment, rank row): each A row is read once and dotted with the segment's token rows into
 * fp32 scratch (rounded to bf16 for bf16 inputs, as the torch path's bf16 shrink output is). Phase 2, items
 * (segment, slice, block of CB columns): the block's B^T rows are read once and accumulated in fp32 for each
 * token row, then added to y (one rounding for bf16). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CB 128

#include "bf16.h"

static inline float load(const void *row, long d, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)row)[d]) : ((const float *)row)[d];
}

/* One rank row r of segment i: tmp[row, r] = x[row] . a[slot, r] for the segment's rows, four rows at a time
 * (four independent accumulators: one dot alone is a chain of dependent FMAs; a short group repeats its last
 * row and drops the extra results). */
static inline __attribute__((always_inline)) void
shrink_item(const void *x, long x_row, int H_in, const void *a, int R, const int64_t *seg_start,
            const int64_t *seg_len, const int64_t *seg_slot, const int64_t *seg_off, float *tmp, int i, int r,
            int bf16) {
    const int esize = bf16 ? 2 : 4;
    const long n = seg_len[i];
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
            const float w = load(ar, d, bf16);
            d0 += load(xr[0], d, bf16) * w;
            d1 += load(xr[1], d, bf16) * w;
            d2 += load(xr[2], d, bf16) * w;
            d3 += load(xr[3], d, bf16) * w;
        }
        const float dots[4] = {d0, d1, d2, d3};
        for (int u = 0; u < 4 && t + u < n; u++)
            tmp[(seg_off[i] + t + u) * R + r] = bf16 ? bf16_to_f32(f32_to_bf16(dots[u])) : dots[u];
    }
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
            for (int c = 0; c < n; c++) acc[c] += sr * load(br, c, bf16);
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
}

#define EXPORT(NAME, BF16)                                                                                      \
    static void NAME##_shrink(const void *x, long x_row, int H_in, const void *a, int R, const int64_t *ss,    \
                              const int64_t *sl, const int64_t *sk, const int64_t *so, float *tmp, int i, int r) { \
        shrink_item(x, x_row, H_in, a, R, ss, sl, sk, so, tmp, i, r, BF16);                                     \
    }                                                                                                           \
    static void NAME##_expand(void *y, long y_row, int R, const int64_t *ss, const int64_t *sl,               \
                              const int64_t *sk, const int64_t *so, const float *tmp, const int64_t *r0,       \
                              const int64_t *r1, const int64_t *col, const int64_t *w, const int64_t *pb,      \
                              int i, int p, int c0) {                                                           \
        expand_item(y, y_row, R, ss, sl, sk, so, tmp, r0, r1, col, w, pb, i, p, c0, BF16);                      \
    }                                                                                                           \
    void NAME(const void *x, long x_row, int H_in, const void *a, int R, void *y, long y_row, int nseg,        \
              const int64_t *ss, const int64_t *sl, const int64_t *sk, int nparts, const int64_t *r0,          \
              const int64_t *r1, const int64_t *col, const int64_t *w, const int64_t *pb, int num_threads) {   \
        int64_t *so = malloc(sizeof(int64_t) * (nseg + 1)), *first = malloc(sizeof(int64_t) * (nparts + 1));  \
        so[0] = 0;                                                                                              \
        for (int i = 0; i < nseg; i++) so[i + 1] = so[i] + sl[i];       /* scratch row of each segment */      \
        first[0] = 0;                                                                                           \
        for (int p = 0; p < nparts; p++) first[p + 1] = first[p] + (w[p] + CB - 1) / CB;   /* column blocks */ \
        const int blocks = (int)first[nparts];                                                                  \
        float *tmp = malloc(sizeof(float) * (so[nseg] * R + 1));                                                \
        _Pragma("omp parallel num_threads(num_threads)")                                                        \
        {                                                                                                       \
            _Pragma("omp for collapse(2) schedule(static)")                                                     \
            for (int i = 0; i < nseg; i++)                                                                      \
                for (int r = 0; r < R; r++)                                                                     \
                    NAME##_shrink(x, x_row, H_in, a, R, ss, sl, sk, so, tmp, i, r);                            \
            _Pragma("omp for collapse(2) schedule(static)")                                                     \
            for (int i = 0; i < nseg; i++)                                                                      \
                for (int k = 0; k < blocks; k++) {                                                              \
                    int p = 0;                                                                                  \
                    while (first[p + 1] <= k) p++;                                                              \
                    NAME##_expand(y, y_row, R, ss, sl, sk, so, tmp, r0, r1, col, w, pb, i, p,                   \
                                  (int)(k - first[p]) * CB);                                                    \
                }                                                                                               \
        }                                                                                                       \
        free(tmp);                                                                                              \
        free(first);                                                                                            \
        free(so);                                                                                               \
    }
EXPORT(lora_fused_f32, 0)
EXPORT(lora_fused_bf16, 1)
