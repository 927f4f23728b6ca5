/* y = x @ W^T (+ bias) for a few rows of x (decode steps) on the CPU. Built and loaded by kernels/skinny_gemm.py;
 * its torch reference is F.linear.
 *
 *   x     [M, K]   row stride x_row, elements contiguous (fp32 or bf16)
 *   w     [N, K]   contiguous: the weight as nn.Linear stores it, one output per row
 *   bias  [N]      or NULL
 *   y     [M, N]   row stride y_row
 *
 * At a few rows the weights are read once per call and the matmul is a memory stream, which the BLAS's small-M
 * paths do not reach (bench/step_floor.py: MKL's fp32 GEMM at 8 rows took 2.4x its 1-row time here, its bf16
 * GEMV half the read bandwidth). Threads split the weight's rows into contiguous ranges; each reads a group of
 * weight rows once and dots it with every row of x (x stays in L1 / L2). bf16 inputs are widened to fp32 (x once
 * into scratch, W as it streams), products accumulate in fp32 and the output is rounded to bf16 once.
 *
 * A dot's arithmetic depends only on K, never on M or on the row's place in its group (a short group repeats a
 * row and drops its results), so a row's output does not depend on what else is in the batch. */
#include "skinny.h"

#define EXPORT(NAME, BF16)                                                                                      \
    void NAME(const void *x, long x_row, const void *w, const void *bias, void *y, long y_row, int M, int N,   \
              int K, int num_threads) {                                                                         \
        float *scratch = skinny_widens(BF16, x_row, K) ? malloc(sizeof(float) * (size_t)M * K) : NULL;          \
        _Pragma("omp parallel num_threads(num_threads)")                                                        \
        skinny_phase(x, x_row, w, bias, y, y_row, M, N, K, BF16, scratch);                                      \
        free(scratch);                                                                                          \
    }
EXPORT(skinny_gemm_f32, 0)
EXPORT(skinny_gemm_bf16, 1)
