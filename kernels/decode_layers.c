/* A decode step's whole decoder stack (Llama / Mistral / Qwen2) on the CPU in one call: for M sequences with one
 * new token each, every layer's RMSNorm, fused QKV matmul, RoPE, K/V cache write, paged attention, o matmul,
 * residual, RMSNorm, gate/up matmul, SiLU * up, down matmul and residual. Built and loaded by
 * kernels/decode_layers.py; its reference is the model's own module path (server/model/llama.py).
 *
 * At decode sizes a small, deep model spends as long between its matmuls as in them: 30 layers x ~20 torch ops
 * and Python calls a step (bench/step_floor.py). Here one OpenMP region runs the stack; each phase is a
 * work-shared loop (the matmuls: kernels/skinny.h; the attention: kernels/attend.h) and the barrier ending it is
 * the only cost between phases.
 *
 *   h        [M, HD]             the residual stream (contiguous), updated in place: the stack's output
 *   ptrs     [L, NPTR] int64     per layer the addresses below (a bias 0 when the layer has none)
 *   cos, sin [M, D]              RoPE tables of this step's positions (sin signed: LlamaModel.rope)
 *   slots    [M] int64           cache row of each token's K / V
 *   tables   [M, NB] int64       each sequence's KV blocks; mask [M, NB * BS] bool per layer (its window)
 *   x, qkv, attn, gu, act        scratch [M, HD], [M, (NH + 2 KVH) D], [M, NH D], [M, 2 I], [M, I]
 *   wide     fp32 scratch [M * max(HD, NH D, I, (NH + 2 KVH) D, 2 I)]: bf16 inputs widened for the small-batch
 *            GEMM where the CPU needs it, or the BLAS's fp32 output of a bf16 matmul before its rounding
 *
 * The arithmetic is the module path's, rounding where it rounds (bf16: after every op, as torch stores each op's
 * output): RMSNorm normalises in fp32 then scales (HF), RoPE is x * cos + roll(x) * sin with no fused multiply-add,
 * SiLU then the product. Sums (norms, matmuls) run in another order than torch's: fp32 results agree to rounding. */
#include <math.h>
#include <stdint.h>

#include "attend.h"
#include "bf16.h"
#include "lora.h"
#include "skinny.h"

enum { NORM1, QKV_W, QKV_B, O_W, O_B, NORM2, GU_W, GU_B, DOWN_W, DOWN_B, K_CACHE, V_CACHE, MASK,
       LORA0, NPTR = LORA0 + 8 };   /* LORA0 + 2 j, + 1: first op and count of linear j's LoRA ops (qkv, o, gu, down) */
/* a LoRA op: one rank bucket of one linear, as kernels/lora_fused.c takes it */
enum { OP_A, OP_R, OP_TABLE, OP_PARTS, OP_NSEG, OP_STARTS, OP_LENS, OP_SLOTS, NOP };
#define MAX_SEGS 64       /* segments of one op: at most one per row (kernels/decode_layers.py MAX_ROWS) */
#define MAX_PARTS 8

static inline float rnd(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* out = RMSNorm(h) * w, as HF: x * rsqrt(mean(x^2) + eps) in fp32, then (bf16: rounded, then) times w. */
static inline __attribute__((always_inline)) void
rmsnorm_row(const void *h, const void *w, void *out, int n, float eps, int bf16) {
    float ss = 0.f;
#pragma omp simd reduction(+:ss)
    for (int i = 0; i < n; i++) {
        const float v = load_w(h, i, bf16);
        ss += v * v;
    }
    const float r = 1.f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) store(out, i, load_w(w, i, bf16) * rnd(load_w(h, i, bf16) * r, bf16), bf16);
}

/* h += o (rounded to h's dtype), then out = RMSNorm(h) * w when w is given. */
static inline __attribute__((always_inline)) void
residual_row(void *h, const void *o, const void *w, void *out, int n, float eps, int bf16) {
    for (int i = 0; i < n; i++) store(h, i, load_w(h, i, bf16) + load_w(o, i, bf16), bf16);
    if (w) rmsnorm_row(h, w, out, n, eps, bf16);
}

/* RoPE of `heads` heads of D in place: x * cos + roll(x, D / 2) * sin, each product and the sum rounded as torch
 * rounds them (no contraction into a fused multiply-add). */
__attribute__((optimize("fp-contract=off"), noinline)) static void
rope_row(void *row, const void *cos, const void *sin, int heads, int D, int bf16) {
    float t[512];
    for (int hd = 0; hd < heads; hd++) {
        char *x = (char *)row + (long)hd * D * (bf16 ? 2 : 4);
        for (int d = 0; d < D; d++) {
            const float a = rnd(load_w(x, d, bf16) * load_w(cos, d, bf16), bf16);
            const float b = rnd(load_w(x, (d + D / 2) % D, bf16) * load_w(sin, d, bf16), bf16);
            t[d] = a + b;
        }
        for (int d = 0; d < D; d++) store(x, d, t[d], bf16);
    }
}

/* act = SiLU(gate) * up, each rounded as torch rounds (SiLU's output, then the product). */
static inline __attribute__((always_inline)) void silu_mul_row(const void *gu, void *act, int n, int bf16) {
    for (int i = 0; i < n; i++) {
        const float g = load_w(gu, i, bf16);
        store(act, i, rnd(g / (1.f + expf(-g)), bf16) * load_w(gu, n + i, bf16), bf16);
    }
}

#define ADDR(p, i) ((void *)(intptr_t)(p)[i])

/* The BLAS the model's F.linear uses (torch's MKL), for batches beyond the small-batch GEMM: Fortran sgemm and
 * MKL's bf16 x bf16 -> fp32 GEMM, passed in by address (kernels/decode_layers.py); NULL where not found. */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
typedef void (*bf16gemm_fn)(int, int, int, int, int, int, float, const uint16_t *, int, const uint16_t *, int, float,
                            float *, int);

typedef struct {
    int L, M, HD, NH, KVH, D, I, NB, BS, splits, threads;
    float eps, scale;
    long mask_row;
    const int64_t *ptrs, *ops, *slots, *tables;
    char *h, *x, *qkv, *attn, *gu, *act;
    const char *cos, *sin;
    float *wide, *lora_tmp;       /* fp32 scratch: see the header; the LoRA shrink output [M * max R] */
    sgemm_fn sgemm;
    bf16gemm_fn bf16gemm;
} Step;

/* ---- phases: work-shared loops (`omp for`, each ending in a barrier) run by every thread of the enclosing region */
static inline __attribute__((always_inline)) void phase_norm(const Step *s, const int64_t *p, int bf16) {
    const int es = bf16 ? 2 : 4;
#pragma omp for schedule(static)
    for (int m = 0; m < s->M; m++)
        rmsnorm_row(s->h + (long)m * s->HD * es, ADDR(p, NORM1), s->x + (long)m * s->HD * es, s->HD, s->eps, bf16);
}

static inline __attribute__((always_inline)) void phase_attention(const Step *s, const int64_t *p, int bf16) {
    const int es = bf16 ? 2 : 4, NQKV = (s->NH + 2 * s->KVH) * s->D, QD = s->NH * s->D, nkh = s->KVH / s->splits;
    const long kv_row = (long)s->KVH * s->D;
#pragma omp for schedule(static)
    for (int m = 0; m < s->M; m++) {
        char *row = s->qkv + (long)m * NQKV * es;
        rope_row(row, s->cos + (long)m * s->D * es, s->sin + (long)m * s->D * es, s->NH + s->KVH, s->D, bf16);
        memcpy((char *)ADDR(p, K_CACHE) + s->slots[m] * kv_row * es, row + (long)QD * es, kv_row * es);
        memcpy((char *)ADDR(p, V_CACHE) + s->slots[m] * kv_row * es, row + (QD + kv_row) * es, kv_row * es);
    }
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < s->M; b++)
        for (int part = 0; part < s->splits; part++)
            attend(s->qkv, NQKV, s->D, ADDR(p, K_CACHE), ADDR(p, V_CACHE), s->tables, ADDR(p, MASK), s->mask_row,
                   s->attn, b, part * nkh, nkh, s->NH, s->KVH, s->D, s->NB, s->BS, s->scale, bf16);
}

/* h += x; then x = RMSNorm(h) * norm when norm is given */
static inline __attribute__((always_inline)) void phase_residual(const Step *s, const void *norm, int bf16) {
    const int es = bf16 ? 2 : 4;
#pragma omp for schedule(static)
    for (int m = 0; m < s->M; m++)
        residual_row(s->h + (long)m * s->HD * es, s->x + (long)m * s->HD * es, norm, s->x + (long)m * s->HD * es,
                     s->HD, s->eps, bf16);
}

static inline __attribute__((always_inline)) void phase_silu(const Step *s, int bf16) {
    const int es = bf16 ? 2 : 4;
#pragma omp for schedule(static)
    for (int m = 0; m < s->M; m++)
        silu_mul_row(s->gu + (long)m * 2 * s->I * es, s->act + (long)m * s->I * es, s->I, bf16);
}

/* Linear j's LoRA deltas added into y: per op (rank bucket) the shrink of every segment's rows, then every
 * slice's expand (kernels/lora.h), as kernels/lora_fused.c does in its own region. */
static inline __attribute__((always_inline)) void
phase_lora(const Step *s, const int64_t *p, int j, const void *x, int H_in, void *y, long y_row, int bf16) {
    for (int o = 0; o < p[LORA0 + 2 * j + 1]; o++) {
        const int64_t *op = s->ops + (p[LORA0 + 2 * j] + o) * NOP;
        const int R = (int)op[OP_R], P = (int)op[OP_PARTS], nseg = (int)op[OP_NSEG];
        const int64_t *t = ADDR(op, OP_TABLE), *ss = ADDR(op, OP_STARTS), *sl = ADDR(op, OP_LENS),
                      *sk = ADDR(op, OP_SLOTS);
        int64_t so[MAX_SEGS + 1], first[MAX_PARTS + 1];
        so[0] = 0;
        for (int i = 0; i < nseg; i++) so[i + 1] = so[i] + sl[i];
        first[0] = 0;
        for (int q = 0; q < P; q++) first[q + 1] = first[q] + (t[3 * P + q] + CB - 1) / CB;
        const int blocks = (int)first[P];
#pragma omp for collapse(2) schedule(static)
        for (int i = 0; i < nseg; i++)
            for (int r = 0; r < R; r++)
                shrink_item(x, H_in, H_in, ADDR(op, OP_A), R, ss, sl, sk, so, s->lora_tmp, i, r, bf16);
#pragma omp for collapse(2) schedule(static)
        for (int i = 0; i < nseg; i++)
            for (int k = 0; k < blocks; k++) {
                int q = 0;
                while (first[q + 1] <= k) q++;
                expand_item(y, y_row, R, ss, sl, sk, so, s->lora_tmp, t, t + P, t + 2 * P, t + 3 * P, t + 4 * P,
                            i, q, (int)(k - first[q]) * CB, bf16);
            }
    }
}

/* ---- the small-batch driver: one parallel region for the whole stack, the matmuls by kernels/skinny.h */
static inline __attribute__((always_inline)) void run_skinny(const Step *s, int bf16) {
    const int NQKV = (s->NH + 2 * s->KVH) * s->D, QD = s->NH * s->D, HD = s->HD, I = s->I, M = s->M;
#pragma omp parallel num_threads(s->threads)
    for (int l = 0; l < s->L; l++) {
        const int64_t *p = s->ptrs + (long)l * NPTR;
        phase_norm(s, p, bf16);
        skinny_phase(s->x, HD, ADDR(p, QKV_W), ADDR(p, QKV_B), s->qkv, NQKV, M, NQKV, HD, bf16, s->wide);
        phase_lora(s, p, 0, s->x, HD, s->qkv, NQKV, bf16);
        phase_attention(s, p, bf16);
        skinny_phase(s->attn, QD, ADDR(p, O_W), ADDR(p, O_B), s->x, HD, M, HD, QD, bf16, s->wide);
        phase_lora(s, p, 1, s->attn, QD, s->x, HD, bf16);
        phase_residual(s, ADDR(p, NORM2), bf16);
        skinny_phase(s->x, HD, ADDR(p, GU_W), ADDR(p, GU_B), s->gu, 2 * I, M, 2 * I, HD, bf16, s->wide);
        phase_lora(s, p, 2, s->x, HD, s->gu, 2 * I, bf16);
        phase_silu(s, bf16);
        skinny_phase(s->act, I, ADDR(p, DOWN_W), ADDR(p, DOWN_B), s->x, HD, M, HD, I, bf16, s->wide);
        phase_lora(s, p, 3, s->act, I, s->x, HD, bf16);
        phase_residual(s, NULL, bf16);
    }
}

/* ---- the larger-batch driver: the matmuls by the BLAS (which parallelises itself), each phase its own region */
static inline __attribute__((always_inline)) void
blas_linear(const Step *s, const void *x, long x_row, const void *w, const void *bias, void *y, long y_row, int N,
            int K, int bf16) {
    const int M = s->M;
    if (!bf16) {                     /* torch's addmm: the bias copied into y, then y = 1 * x W^T + 1 * y */
        float *yf = y;
        for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n++) yf[(long)m * y_row + n] = bias ? ((const float *)bias)[n] : 0.f;
        const float one = 1.f, beta = bias ? 1.f : 0.f;
        const int ldx = (int)x_row, ldy = (int)y_row;
        s->sgemm("T", "N", &N, &M, &K, &one, w, &K, x, &ldx, &beta, yf, &ldy);
        return;
    }
    /* row-major C = A B^T: x [M, K] times W [N, K] transposed, into fp32, then the bias and one rounding */
    s->bf16gemm(101, 111, 112, M, N, K, 1.f, x, (int)x_row, w, K, 0.f, s->wide, N);
#pragma omp parallel for num_threads(s->threads) schedule(static)
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++)
            store((char *)y + (long)m * y_row * 2, n, s->wide[(long)m * N + n] + bias_at(bias, n, 1), 1);
}

#define PAR(stmt)                                                                                               \
    do {                                                                                                        \
        _Pragma("omp parallel num_threads(s->threads)") { stmt; }                                               \
    } while (0)
#define PAR_LORA(j, x, H_in, y, y_row)                                                                          \
    do {                                                                                                        \
        if (p[LORA0 + 2 * (j) + 1]) PAR(phase_lora(s, p, j, x, H_in, y, y_row, bf16));                          \
    } while (0)

static inline __attribute__((always_inline)) void run_blas(const Step *s, int bf16) {
    const int NQKV = (s->NH + 2 * s->KVH) * s->D, QD = s->NH * s->D, HD = s->HD, I = s->I;
    for (int l = 0; l < s->L; l++) {
        const int64_t *p = s->ptrs + (long)l * NPTR;
        PAR(phase_norm(s, p, bf16));
        blas_linear(s, s->x, HD, ADDR(p, QKV_W), ADDR(p, QKV_B), s->qkv, NQKV, NQKV, HD, bf16);
        PAR_LORA(0, s->x, HD, s->qkv, NQKV);
        PAR(phase_attention(s, p, bf16));
        blas_linear(s, s->attn, QD, ADDR(p, O_W), ADDR(p, O_B), s->x, HD, HD, QD, bf16);
        PAR_LORA(1, s->attn, QD, s->x, HD);
        PAR(phase_residual(s, ADDR(p, NORM2), bf16));
        blas_linear(s, s->x, HD, ADDR(p, GU_W), ADDR(p, GU_B), s->gu, 2 * I, 2 * I, HD, bf16);
        PAR_LORA(2, s->x, HD, s->gu, 2 * I);
        PAR(phase_silu(s, bf16));
        blas_linear(s, s->act, I, ADDR(p, DOWN_W), ADDR(p, DOWN_B), s->x, HD, HD, I, bf16);
        PAR_LORA(3, s->act, I, s->x, HD);
        PAR(phase_residual(s, NULL, bf16));
    }
}

/* skinny: the matmuls by the small-batch GEMM (else sgemm / bf16gemm, which must then be given) */
#define EXPORT(NAME, BF16)                                                                                      \
    void NAME(int L, const int64_t *ptrs, const int64_t *ops, void *h, int M, int HD, int NH, int KVH, int D,   \
              int I, float eps, float scale, const void *cos, const void *sin, const int64_t *slots,            \
              const int64_t *tables, int NB, int BS, long mask_row, int splits, void *x, void *qkv, void *attn, \
              void *gu, void *act, float *wide, float *lora_tmp, int skinny, void *sgemm, void *bf16gemm,       \
              int num_threads) {                                                                                \
        const Step s = {L, M, HD, NH, KVH, D, I, NB, BS, splits, num_threads, eps, scale, mask_row, ptrs, ops,  \
                        slots, tables, h, x, qkv, attn, gu, act, cos, sin, wide, lora_tmp, (sgemm_fn)sgemm,    \
                        (bf16gemm_fn)bf16gemm};                                                                 \
        if (skinny) run_skinny(&s, BF16);                                                                       \
        else run_blas(&s, BF16);                                                                                \
    }
EXPORT(decode_layers_f32, 0)
EXPORT(decode_layers_bf16, 1)
