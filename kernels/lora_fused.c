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
 * Phase 1, items (segment, block of SRB rank rows): each A row is read once and dotted with the segment's token
 * rows into fp32 scratch (rounded to bf16 for bf16 inputs, as the torch path's bf16 shrink output is). Phase 2, items
 * (segment, slice, block of CB columns): the block's B^T rows are read once and accumulated in fp32 for each
 * token row, then added to y (one rounding for bf16). */
#include "lora.h"

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
                for (int r = 0; r < R; r += SRB)                                                                     \
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
