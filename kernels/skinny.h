/* The small-batch GEMM's dots (kernels/skinny_gemm.c has the layout and the why), shared by that kernel and
 * kernels/decode_layers.c: `skinny_phase` runs inside a caller's parallel region. */
#pragma once
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

#define WR1 8   /* weight rows per group, one row of x */
#ifndef AHEAD
#define AHEAD 2 /* prefetch the weight rows this many groups ahead */
#endif
/* into L2, not L1: a T0 prefetch holds one of the core's line fill buffers (16) until its line is in L1, which
 * caps the weight stream; to L2 the streams ran 5-10% faster at 1, 4 and 8 rows, fp32 and bf16, ahead of a
 * plain sum over the same bytes (2-core AVX-512 VM, 2026-12-03) */
#define PREFETCH_HINT _MM_HINT_T1
#define WR4 4   /* weight rows per group, four rows of x at a time */

static inline float load_w(const void *row, long k, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)row)[k]) : ((const float *)row)[k];
}

static inline void store(void *y, long i, float v, int bf16) {
    if (bf16) ((uint16_t *)y)[i] = f32_to_bf16(v);
    else ((float *)y)[i] = v;
}

static inline float bias_at(const void *bias, long n, int bf16) {
    return bias ? load_w(bias, n, bf16) : 0.f;
}

/* Weight rows [n0, n0 + WR1) (the last repeated past N) dotted with the single row xf. */
static inline __attribute__((always_inline)) void
group1(const float *xf, const char *w, const void *bias, char *y, int N, int K, int n0, int bf16) {
    const int es = bf16 ? 2 : 4;
    const char *wr[WR1];
    for (int u = 0; u < WR1; u++) wr[u] = w + (long)(n0 + u < N ? n0 + u : N - 1) * K * es;
    float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f, d4 = 0.f, d5 = 0.f, d6 = 0.f, d7 = 0.f;
#pragma omp simd reduction(+:d0, d1, d2, d3, d4, d5, d6, d7)
    for (int k = 0; k < K; k++) {
        const float xk = xf[k];
        d0 += xk * load_w(wr[0], k, bf16);
        d1 += xk * load_w(wr[1], k, bf16);
        d2 += xk * load_w(wr[2], k, bf16);
        d3 += xk * load_w(wr[3], k, bf16);
        d4 += xk * load_w(wr[4], k, bf16);
        d5 += xk * load_w(wr[5], k, bf16);
        d6 += xk * load_w(wr[6], k, bf16);
        d7 += xk * load_w(wr[7], k, bf16);
    }
    const float d[WR1] = {d0, d1, d2, d3, d4, d5, d6, d7};
    for (int u = 0; u < WR1 && n0 + u < N; u++) store(y, n0 + u, d[u] + bias_at(bias, n0 + u, bf16), bf16);
}

/* Weight rows [n0, n0 + WR4) dotted with every row of xf ([M, K] fp32, contiguous), four rows of x at a time. */
static inline __attribute__((always_inline)) void
group4(const float *xf, int M, const char *w, const void *bias, char *y, long y_row, int N, int K, int n0,
       int bf16) {
    const int es = bf16 ? 2 : 4;
    const char *wr[WR4];
    for (int u = 0; u < WR4; u++) wr[u] = w + (long)(n0 + u < N ? n0 + u : N - 1) * K * es;
    for (int m = 0; m < M; m += 4) {
        const float *x0 = xf + (long)m * K, *x1 = xf + (long)(m + 1 < M ? m + 1 : M - 1) * K,
                    *x2 = xf + (long)(m + 2 < M ? m + 2 : M - 1) * K, *x3 = xf + (long)(m + 3 < M ? m + 3 : M - 1) * K;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, b0 = 0.f, b1 = 0.f, b2 = 0.f, b3 = 0.f;
        float c0 = 0.f, c1 = 0.f, c2 = 0.f, c3 = 0.f, e0 = 0.f, e1 = 0.f, e2 = 0.f, e3 = 0.f;
#pragma omp simd reduction(+:a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, e0, e1, e2, e3)
        for (int k = 0; k < K; k++) {
            const float w0 = load_w(wr[0], k, bf16), w1 = load_w(wr[1], k, bf16), w2 = load_w(wr[2], k, bf16),
                        w3 = load_w(wr[3], k, bf16);
            const float p = x0[k], q = x1[k], r = x2[k], s = x3[k];
            a0 += p * w0; a1 += p * w1; a2 += p * w2; a3 += p * w3;
            b0 += q * w0; b1 += q * w1; b2 += q * w2; b3 += q * w3;
            c0 += r * w0; c1 += r * w1; c2 += r * w2; c3 += r * w3;
            e0 += s * w0; e1 += s * w1; e2 += s * w2; e3 += s * w3;
        }
        const float d[4][WR4] = {{a0, a1, a2, a3}, {b0, b1, b2, b3}, {c0, c1, c2, c3}, {e0, e1, e2, e3}};
        for (int v = 0; v < 4 && m + v < M; v++)
            for (int u = 0; u < WR4 && n0 + u < N; u++)
                store(y + (long)(m + v) * y_row * es, n0 + u, d[v][u] + bias_at(bias, n0 + u, bf16), bf16);
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* The same dots with AVX-512 (GCC's auto-vectoriser picks 256-bit vectors on these CPUs): 16 fp32 lanes per
 * accumulator, a masked tail, one horizontal sum per dot at the end. A row of x: fp32 (F32), or bf16 dotted
 * with bf16 weights by vdpbf16ps (BF16DP: products exact, fp32 sums), or bf16 weights widened to fp32 (BF16W). */
enum { F32 = 0, BF16DP = 1, BF16W = 2 };

static inline __m512 wload(const char *row, long k, __mmask16 m, int mode) {   /* 16 weights as fp32 */
    if (mode == F32) return _mm512_maskz_loadu_ps(m, (const float *)row + k);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)row + k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

#if defined(__AVX512BF16__)
static inline __m512bh bload(const char *row, long k, __mmask32 m) {           /* 32 bf16 */
    return (__m512bh)_mm512_maskz_loadu_epi16(m, (const uint16_t *)row + k);
}
#endif

/* acc[v][u] = x row v . w row u over K, for XR rows of x (pointers) and WR weight rows. */
#define DOTS(WR, XR, mode, wr, xr, K, acc, ahead)                                                                     \
    do {                                                                                                        \
        for (int u = 0; u < WR; u++)                                                                            \
            for (int v = 0; v < XR; v++) acc[v][u] = _mm512_setzero_ps();                                       \
        if (mode == BF16DP) {                                                                                   \
            DP_LOOP(WR, XR, wr, xr, K, acc, ahead);                                                             \
        } else {                                                                                                \
            for (long k = 0; k < K; k += 16) {                                                                  \
                const __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);         \
                __m512 xv[XR];                                                                                  \
                for (int v = 0; v < XR; v++) xv[v] = _mm512_maskz_loadu_ps(m, xr[v] + k);                       \
                for (int u = 0; u < WR; u++) {                                                                  \
                    _mm_prefetch(wr[u] + ahead + k * (mode == F32 ? 4 : 2), PREFETCH_HINT);                      \
                    const __m512 wv = wload(wr[u], k, m, mode);                                                 \
                    for (int v = 0; v < XR; v++) acc[v][u] = _mm512_fmadd_ps(xv[v], wv, acc[v][u]);             \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
    } while (0)

#if defined(__AVX512BF16__)
#define DP_LOOP(WR, XR, wr, xr, K, acc, ahead)                                                                       \
    for (long k = 0; k < K; k += 32) {                                                                          \
        const __mmask32 m = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1ull << (K - k)) - 1);          \
        __m512bh xv[XR];                                                                                        \
        for (int v = 0; v < XR; v++) xv[v] = bload((const char *)xr[v], k, m);                                  \
        for (int u = 0; u < WR; u++) {                                                                          \
            _mm_prefetch(wr[u] + ahead + k * 2, PREFETCH_HINT);                                                   \
            const __m512bh wv = bload(wr[u], k, m);                                                             \
            for (int v = 0; v < XR; v++) acc[v][u] = _mm512_dpbf16_ps(acc[v][u], xv[v], wv);                    \
        }                                                                                                       \
    }
#else
#define DP_LOOP(WR, XR, wr, xr, K, acc, ahead) do { } while (0)
#endif

#if defined(__AVX512BF16__)
#define BF16_MODE BF16DP
#else
#define BF16_MODE BF16W
#endif

/* Weight rows [n0, n0 + WR) with x rows [m0, m0 + XR) (both repeated past their ends, extra results dropped).
 * x: fp32 rows (x_es 4) or, for BF16DP, bf16 rows (x_es 2), row stride x_row elements. */
#define GROUP(NAME, WR, XR)                                                                                     \
    static inline __attribute__((always_inline)) void                                                           \
    NAME(const char *x, long x_row, int x_es, int M, const char *w, const void *bias, char *y, long y_row,     \
         int N, int K, int n0, int mode, int bf16_out) {                                                        \
        const int es = mode == F32 ? 4 : 2;                                                                     \
        const char *wr[WR];                                                                                     \
        for (int u = 0; u < WR; u++) wr[u] = w + (long)(n0 + u < N ? n0 + u : N - 1) * K * es;                \
        for (int m0 = 0; m0 < M; m0 += XR) {                                                                    \
            const float *xr[XR];                                                                                \
            for (int v = 0; v < XR; v++)                                                                        \
                xr[v] = (const float *)(x + (long)(m0 + v < M ? m0 + v : M - 1) * x_row * x_es);                \
            __m512 acc[XR][WR];                                                                                 \
            DOTS(WR, XR, mode, wr, xr, K, acc, AHEAD * (long)WR * K * es);                                                                 \
            float dot[XR][WR];                      /* constant indices: acc stays in registers */              \
            for (int v = 0; v < XR; v++)                                                                        \
                for (int u = 0; u < WR; u++) dot[v][u] = _mm512_reduce_add_ps(acc[v][u]);                       \
            for (int v = 0; v < XR && m0 + v < M; v++)                                                          \
                for (int u = 0; u < WR && n0 + u < N; u++)                                                      \
                    store(y + (long)(m0 + v) * y_row * (bf16_out ? 2 : 4), n0 + u,                              \
                          dot[v][u] + bias_at(bias, n0 + u, bf16_out), bf16_out);                               \
        }                                                                                                       \
    }
GROUP(avx_g1, WR1, 1)
GROUP(avx_g4, WR4, 4)
#endif

/* Whether x must first be widened into fp32 scratch [M, K]: on the portable path for bf16 or strided rows; with
 * AVX-512 only for bf16 on a CPU without vdpbf16ps. */
static inline int skinny_widens(int bf16, long x_row, int K) {
#if defined(__AVX512F__)
    (void)x_row, (void)K;
    return bf16 && BF16_MODE == BF16W;
#else
    return bf16 || x_row != K;
#endif
}

/* y = x W^T (+ bias), run by every thread of an enclosing parallel region: work-shared `omp for`s, each ending in
 * a barrier. scratch: fp32 [M * K] when skinny_widens(...), else unused. */
static inline __attribute__((always_inline)) void
skinny_phase(const void *x, long x_row, const void *w, const void *bias, void *y, long y_row, int M, int N, int K,
             int bf16, float *scratch) {
    const char *xs = x;
    long xs_row = x_row;
    int x_es = bf16 ? 2 : 4;
    if (skinny_widens(bf16, x_row, K)) {
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++)
            for (int k = 0; k < K; k++)
                scratch[(long)m * K + k] = load_w((const char *)x + (long)m * x_row * x_es, k, bf16);
        xs = (const char *)scratch;
        xs_row = K;
        x_es = 4;
    }
    const int groups = M == 1 ? (N + WR1 - 1) / WR1 : (N + WR4 - 1) / WR4;
#pragma omp for schedule(static)
    for (int g = 0; g < groups; g++) {
#if defined(__AVX512F__)
        const int mode = bf16 ? BF16_MODE : F32;
        if (M == 1) avx_g1(xs, xs_row, x_es, M, w, bias, y, y_row, N, K, g * WR1, mode, bf16);
        else avx_g4(xs, xs_row, x_es, M, w, bias, y, y_row, N, K, g * WR4, mode, bf16);
#else
        (void)xs_row, (void)x_es;
        if (M == 1) group1((const float *)xs, w, bias, y, N, K, g * WR1, bf16);
        else group4((const float *)xs, M, w, bias, y, y_row, N, K, g * WR4, bf16);
#endif
    }
}
