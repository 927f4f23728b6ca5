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
 *   wide     fp32 scratch [M * max(HD, NH D, I)] (bf16 inputs widened for the matmul where the CPU needs it)
 *
 * The arithmetic is the module path's, rounding where it rounds (bf16: after every op, as torch stores each op's
 * output): RMSNorm normalises in fp32 then scales (HF), RoPE is x * cos + roll(x) * sin with no fused multiply-add,
 * SiLU then the product. Sums (norms, matmuls) run in another order than torch's: fp32 results agree to rounding. */
#include <math.h>
#include <stdint.h>

#include "attend.h"
#include "bf16.h"
#include "skinny.h"

enum { NORM1, QKV_W, QKV_B, O_W, O_B, NORM2, GU_W, GU_B, DOWN_W, DOWN_B, K_CACHE, V_CACHE, MASK, NPTR };

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

static inline __attribute__((always_inline)) void
stack(int L, const int64_t *ptrs, char *h, int M, int HD, int NH, int KVH, int D, int I, float eps, float scale,
      const char *cos, const char *sin, const int64_t *slots, const int64_t *tables, int NB, int BS, long mask_row,
      int splits, char *x, char *qkv, char *attn, char *gu, char *act, float *wide, int bf16) {
    const int es = bf16 ? 2 : 4, NQKV = (NH + 2 * KVH) * D, QD = NH * D, nkh = KVH / splits;
    const long kv_row = (long)KVH * D;
    for (int l = 0; l < L; l++) {
        const int64_t *p = ptrs + (long)l * NPTR;
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) rmsnorm_row(h + (long)m * HD * es, ADDR(p, NORM1), x + (long)m * HD * es, HD, eps, bf16);
        skinny_phase(x, HD, ADDR(p, QKV_W), ADDR(p, QKV_B), qkv, NQKV, M, NQKV, HD, bf16, wide);
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) {
            char *row = qkv + (long)m * NQKV * es;
            rope_row(row, cos + (long)m * D * es, sin + (long)m * D * es, NH + KVH, D, bf16);
            memcpy((char *)ADDR(p, K_CACHE) + slots[m] * kv_row * es, row + (long)QD * es, kv_row * es);
            memcpy((char *)ADDR(p, V_CACHE) + slots[m] * kv_row * es, row + (QD + kv_row) * es, kv_row * es);
        }
#pragma omp for collapse(2) schedule(static)
        for (int b = 0; b < M; b++)
            for (int part = 0; part < splits; part++)
                attend(qkv, NQKV, D, ADDR(p, K_CACHE), ADDR(p, V_CACHE), tables, ADDR(p, MASK), mask_row, attn, b,
                       part * nkh, nkh, NH, KVH, D, NB, BS, scale, bf16);
        skinny_phase(attn, QD, ADDR(p, O_W), ADDR(p, O_B), x, HD, M, HD, QD, bf16, wide);
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++)
            residual_row(h + (long)m * HD * es, x + (long)m * HD * es, ADDR(p, NORM2), x + (long)m * HD * es, HD,
                         eps, bf16);
        skinny_phase(x, HD, ADDR(p, GU_W), ADDR(p, GU_B), gu, 2 * I, M, 2 * I, HD, bf16, wide);
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) silu_mul_row(gu + (long)m * 2 * I * es, act + (long)m * I * es, I, bf16);
        skinny_phase(act, I, ADDR(p, DOWN_W), ADDR(p, DOWN_B), x, HD, M, HD, I, bf16, wide);
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++)
            residual_row(h + (long)m * HD * es, x + (long)m * HD * es, NULL, NULL, HD, eps, bf16);
    }
}

#define EXPORT(NAME, BF16)                                                                                      \
    void NAME(int L, const int64_t *ptrs, void *h, int M, int HD, int NH, int KVH, int D, int I, float eps,     \
              float scale, const void *cos, const void *sin, const int64_t *slots, const int64_t *tables, int NB,  \
              int BS, long mask_row, int splits, void *x, void *qkv, void *attn, void *gu, void *act, float *wide, \
              int num_threads) {                                                                                \
        _Pragma("omp parallel num_threads(num_threads)")                                                        \
        stack(L, ptrs, h, M, HD, NH, KVH, D, I, eps, scale, cos, sin, slots, tables, NB, BS, mask_row, splits,  \
              x, qkv, attn, gu, act, wide, BF16);                                                               \
    }
EXPORT(decode_layers_f32, 0)
EXPORT(decode_layers_bf16, 1)
