/* A LoRA linear's shrink and expand work items (kernels/lora_fused.c has the layout and the algorithm), shared by
 * that kernel and kernels/decode_layers.c. */
#pragma once
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CB 128

#include "bf16.h"

static inline float lora_load(const void *row, long d, int bf16) {
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
}

