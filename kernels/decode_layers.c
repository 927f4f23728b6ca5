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
 *   ids      [M] int64           the tokens: when given, h starts as their rows of `embed` [V, HD]; else h is given
 *   ptrs     [L, NPTR] int64     per layer the addresses below (a bias 0 when the layer has none)
 *   pos      [M] int64           each token's position: its RoPE row of `cos`, `sin` [*, D] (the model's tables,
 *                                sin signed: LlamaModel.rope_tables)
 *   head     when `logits` is given, the step ends with the final RMSNorm (`norm`) and the lm_head (`head_w`,
 *            `head_b`, its LoRA ops `head_ops`) into logits [M, V] (h's dtype), then widened into logits32
 *            [M, V] fp32 (the sampler's input; for fp32 the same buffer): every row is sampled in a decode step;
 *            and each row's argmax into argmax [M] int64 (the greedy token, found where the logits are still in
 *            the caches of the threads that wrote them; part_val / part_idx: [M * threads] scratch)
 *   slots    [M] int64           cache row of each token's K / V
 *   tables   [M, NB] int64       each sequence's KV blocks (rows table_row apart); mask [M, NB * BS] bool per layer
 *                                (its window; rows mask_row apart)
 *   x, qkv, attn, gu, act        scratch [M, HD], [M, (NH + 2 KVH) D], [M, NH D], [M, 2 I], [M, I]
 *   wide     fp32 scratch [M * max(HD, NH D, I, (NH + 2 KVH) D, 2 I)]: bf16 inputs widened for the small-batch
 *            GEMM where the CPU needs it, or the BLAS's fp32 output of a bf16 matmul before its rounding
 *
 * The arithmetic is the module path's, rounding where it rounds (bf16: after every op, as torch stores each op's
 * output): RMSNorm normalises in fp32 then scales (HF), RoPE is x * cos + roll(x) * sin with no fused multiply-add,
 * SiLU then the product. Sums (norms, matmuls) run in another order than torch's: fp32 results agree to rounding. */
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "attend.h"
#include "bf16.h"
#include "lora.h"
#include "skinny.h"
#include "vexp.h"

enum { NORM1, QKV_W, QKV_B, O_W, O_B, NORM2, GU_W, GU_B, DOWN_W, DOWN_B, K_CACHE, V_CACHE, MASK,
       LORA0, NPTR = LORA0 + 8 };   /* LORA0 + 2 j, + 1: first op and count of linear j's LoRA ops (qkv, o, gu, down) */
/* a LoRA op: one rank bucket of one linear, as kernels/lora_fused.c takes it */
enum { OP_A, OP_R, OP_TABLE, OP_PARTS, OP_NSEG, OP_STARTS, OP_LENS, OP_SLOTS, NOP };
#define MAX_SEGS 64       /* segments of one op: at most one per row (kernels/decode_layers.py MAX_ROWS) */
#define MAX_PARTS 8
#define MAX_HEAD_DIM 512  /* kernels/decode_layers.py MAX_HEAD_DIM */
#define SILU_CHUNK 256    /* SiLU columns per work item: a row's shared by the threads */

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

/* One head's RoPE into t [D]: x * cos + roll(x, D / 2) * sin, each product rounded as torch rounds it and no
 * contraction into a fused multiply-add (the sum is left for the caller to round or store). */
__attribute__((optimize("fp-contract=off"), noinline)) static void
rope_head(float *t, const char *x, const void *cos, const void *sin, int D, int bf16) {
    const int half = D / 2;
#pragma omp simd
    for (int d = 0; d < half; d++)
        t[d] = rnd(load_w(x, d, bf16) * load_w(cos, d, bf16), bf16)
             + rnd(load_w(x, d + half, bf16) * load_w(sin, d, bf16), bf16);
#pragma omp simd
    for (int d = half; d < D; d++)
        t[d] = rnd(load_w(x, d, bf16) * load_w(cos, d, bf16), bf16)
             + rnd(load_w(x, d - half, bf16) * load_w(sin, d, bf16), bf16);
}

/* RoPE of `heads` heads of D in place (the keys written to the cache). */
static void rope_row(void *row, const void *cos, const void *sin, int heads, int D, int bf16) {
    float t[MAX_HEAD_DIM];
    for (int hd = 0; hd < heads; hd++) {
        char *x = (char *)row + (long)hd * D * (bf16 ? 2 : 4);
        rope_head(t, x, cos, sin, D, bf16);
        for (int d = 0; d < D; d++) store(x, d, t[d], bf16);
    }
}

/* The same RoPE of `heads` query heads of `row` into fp32 qf [heads, D], each value rounded to the row's dtype then
 * times `scale` (the attention's queries; the row is left as it is, for the other pieces of its sequence). */
static void rope_query(float *qf, const void *row, const void *cos, const void *sin, int heads, int D, float scale,
                       int bf16) {
    for (int hd = 0; hd < heads; hd++) {
        float *t = qf + (long)hd * D;
        rope_head(t, (const char *)row + (long)hd * D * (bf16 ? 2 : 4), cos, sin, D, bf16);
        for (int d = 0; d < D; d++) t[d] = rnd(t[d], bf16) * scale;
    }
}

/* act[i0, i1) = SiLU(gate) * up, each rounded as torch rounds (SiLU's output, then the product). */
static inline __attribute__((always_inline)) void
silu_mul(const void *gate, const void *up, void *act, int i0, int i1, int bf16) {
#pragma omp simd
    for (int i = i0; i < i1; i++) {
        const float g = load_w(gate, i, bf16);
        store(act, i, rnd(g / (1.f + vexp(-g)), bf16) * load_w(up, i, bf16), bf16);
    }
}

/* Phase timing for bench/decode_phases.py, compiled in only with -DPHASE_TIMES: thread 0's seconds from the end of
 * one phase to the end of the next (its closing barrier included, so a phase's imbalance counts where it is),
 * summed over calls into phase_seconds. */
enum { PH_EMBED, PH_QKV, PH_ATTN_ITEMS, PH_ATTN_MERGE, PH_O, PH_NORM, PH_GATE_UP, PH_SILU, PH_DOWN, PH_RESIDUAL,
       PH_HEAD, PH_ARGMAX, PH_LORA, PH_COUNT };
#ifdef PHASE_TIMES
double phase_seconds[PH_COUNT];
static double phase_mark;
#define PHASE_START()                                                                                           \
    do {                                                                                                        \
        if (omp_get_thread_num() == 0) phase_mark = omp_get_wtime();                                            \
    } while (0)
#define PHASE_END(i)                                                                                            \
    do {                                                                                                        \
        if (omp_get_thread_num() == 0) {                                                                        \
            const double now_ = omp_get_wtime();                                                                \
            phase_seconds[i] += now_ - phase_mark;                                                              \
            phase_mark = now_;                                                                                  \
        }                                                                                                       \
    } while (0)
#else
#define PHASE_START() do { } while (0)
#define PHASE_END(i) do { } while (0)
#endif

#define ADDR(p, i) ((void *)(intptr_t)(p)[i])

/* The BLAS the model's F.linear uses (torch's MKL), for batches beyond the small-batch GEMM: Fortran sgemm and
 * MKL's bf16 x bf16 -> fp32 GEMM, passed in by address (kernels/decode_layers.py); NULL where not found. */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
typedef void (*bf16gemm_fn)(int, int, int, int, int, int, float, const uint16_t *, int, const uint16_t *, int, float,
                            float *, int);

typedef struct {
    int L, M, HD, NH, KVH, D, I, NB, BS, threads;
    float eps, scale;
    long mask_row, table_row;
    const int64_t *ptrs, *ops, *slots, *tables, *ids, *pos, *head_ops;   /* head_ops: first op, count */
    char *h, *x, *qkv, *attn, *gu, *act, *logits;
    float *logits32, *part_val;
    int64_t *argmax, *part_idx;
    const char *cos, *sin, *embed, *norm, *head_w, *head_b;
    int V;
    float *wide, *lora_tmp;       /* fp32 scratch: see the header; the LoRA shrink output [M * max R] */
    const int *first, *used;      /* attention pieces: sequence b's are first[b] .. first[b + 1] - 1 of `items` */
    int items, head_groups;       /* work items: items x head_groups (kv heads in that many groups) */
    float *records, *queries;     /* the pieces' records (attend.h), each thread's queries [NH D] */
    sgemm_fn sgemm;
    bf16gemm_fn bf16gemm;
} Step;

/* ---- phases: work-shared loops (`omp for`, each ending in a barrier) run by every thread of the enclosing region */
static inline __attribute__((always_inline)) void phase_embed(const Step *s, int bf16) {
    const long row = (long)s->HD * (bf16 ? 2 : 4);
#pragma omp for schedule(static)
    for (int m = 0; m < s->M; m++) memcpy(s->h + m * row, s->embed + s->ids[m] * row, row);
}

/* x = RMSNorm(h) * w: the first layer's input norm (later ones: the residual phase ending the layer before), or
 * with no layers the final norm */
static inline __attribute__((always_inline)) void phase_norm(const Step *s, const void *w, int bf16) {
    const int es = bf16 ? 2 : 4;
#pragma omp for schedule(static)
    for (int m = 0; m < s->M; m++)
        rmsnorm_row(s->h + (long)m * s->HD * es, w, s->x + (long)m * s->HD * es, s->HD, s->eps, bf16);
}

/* Per work item (a piece of a sequence's blocks, kernels/attend.h, and a group of its kv heads): RoPE of those kv
 * heads' query heads into the thread's fp32 queries; the sequence's last piece (the new token's block) also ropes
 * the group's key heads and writes its K / V rows into the cache first; then the piece's record of those heads.
 * Then each (sequence, head)'s records merged into attn. The heads are grouped only when there are too few pieces
 * to keep the threads busy (one short sequence); a head's arithmetic is the same in any group. */
static inline __attribute__((always_inline)) void phase_attention(const Step *s, const int64_t *p, int bf16) {
    const int es = bf16 ? 2 : 4, NQKV = (s->NH + 2 * s->KVH) * s->D, QD = s->NH * s->D, G = s->NH / s->KVH,
              D = s->D, NH = s->NH, nkh = s->KVH / s->head_groups;
    const long kv_row = (long)s->KVH * D, stride = attend_record(NH, D);
    float *qf = s->queries + (long)omp_get_thread_num() * QD;
#pragma omp for collapse(2) schedule(static)
    for (int it = 0; it < s->items; it++)
        for (int hg = 0; hg < s->head_groups; hg++) {
            int b = 0;
            while (s->first[b + 1] <= it) b++;
            const int j = it - s->first[b], pb = attend_piece_blocks(s->used[b]), jb0 = j * pb,
                      jb1 = jb0 + pb < s->used[b] ? jb0 + pb : s->used[b], kh0 = hg * nkh, h0 = kh0 * G;
            char *row = s->qkv + (long)b * NQKV * es, *k = row + (long)(QD + kh0 * D) * es,
                 *v = row + (QD + kv_row + kh0 * D) * es;
            const long at = s->pos[b] * D * es;
            rope_query(qf, row + (long)h0 * D * es, s->cos + at, s->sin + at, nkh * G, D, s->scale, bf16);
            if (it == s->first[b + 1] - 1) {                /* the last piece: the new token's block */
                const long slot = s->slots[b] * kv_row + (long)kh0 * D;
                rope_row(k, s->cos + at, s->sin + at, nkh, D, bf16);
                memcpy((char *)ADDR(p, K_CACHE) + slot * es, k, (long)nkh * D * es);
                memcpy((char *)ADDR(p, V_CACHE) + slot * es, v, (long)nkh * D * es);
            }
            float *rec = s->records + it * stride;
            attend_piece(qf, ADDR(p, K_CACHE), ADDR(p, V_CACHE), s->tables + (long)b * s->table_row,
                         (const uint8_t *)ADDR(p, MASK) + b * s->mask_row, kh0, nkh, G, s->KVH, D, jb0, jb1, s->BS,
                         bf16, rec + (long)h0 * D, rec + (long)NH * D + h0, rec + (long)NH * D + NH + h0);
        }
    PHASE_END(PH_ATTN_ITEMS);
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < s->M; b++)
        for (int h = 0; h < NH; h++)
            attend_merge(s->records + s->first[b] * stride, stride, s->first[b + 1] - s->first[b], NH, h, D,
                         s->attn + ((long)b * QD + (long)h * D) * es, bf16);
}

/* h += x; then x = RMSNorm(h) * norm when norm is given */
static inline __attribute__((always_inline)) void phase_residual(const Step *s, const void *norm, int bf16) {
    const int es = bf16 ? 2 : 4;
#pragma omp for schedule(static)
    for (int m = 0; m < s->M; m++)
        residual_row(s->h + (long)m * s->HD * es, s->x + (long)m * s->HD * es, norm, s->x + (long)m * s->HD * es,
                     s->HD, s->eps, bf16);
}

/* The norm after layer l's residual: layer l + 1's first (its input), or after the last layer the final norm
 * when the lm_head follows; the residual phase applies it, so x is the next matmul's input. */
static inline const void *next_norm(const Step *s, int l) {
    if (l + 1 < s->L) return ADDR(s->ptrs + (long)(l + 1) * NPTR, NORM1);
    return s->logits ? s->norm : NULL;
}

/* bf16 logits -> fp32 (exact) */
static inline __attribute__((always_inline)) void phase_widen_logits(const Step *s) {
    const long n = (long)s->M * s->V, chunks = (n + 4095) / 4096;
#pragma omp for schedule(static)
    for (long c = 0; c < chunks; c++) {
        const long end = (c + 1) * 4096 < n ? (c + 1) * 4096 : n;
        for (long i = c * 4096; i < end; i++) s->logits32[i] = bf16_to_f32(((const uint16_t *)s->logits)[i]);
    }
}

/* The first maximum of row[lo, hi) (lo < hi), NaN counting as the maximum: its index, and its value in *val. */
static inline long argmax_share(const float *row, long lo, long hi, float *val) {
    long best = lo, i = lo + 1;
    float bv = row[lo];
#if defined(__AVX512F__)
    /* 16 lanes, each keeping its first maximum (strictly greater replaces), then the lanes' largest value at its
     * smallest index; a NaN ends the scan at the first one */
    if (bv == bv && hi - i >= 16) {
        __m512 lane_val = _mm512_set1_ps(bv);
        __m512i lane_idx = _mm512_set1_epi32(0);        /* offsets from lo; 0: row[lo] itself */
        const __m512i step = _mm512_set1_epi32(16);
        __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int)(i - lo)),
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        for (; i + 16 <= hi; i += 16, idx = _mm512_add_epi32(idx, step)) {
            const __m512 v = _mm512_loadu_ps(row + i);
            const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            if (nan) {
                best = i + __builtin_ctz(nan);
                *val = row[best];
                return best;
            }
            const __mmask16 gt = _mm512_cmp_ps_mask(v, lane_val, _CMP_GT_OQ);
            lane_val = _mm512_mask_mov_ps(lane_val, gt, v);
            lane_idx = _mm512_mask_mov_epi32(lane_idx, gt, idx);
        }
        bv = _mm512_reduce_max_ps(lane_val);
        const __mmask16 top = _mm512_cmp_ps_mask(lane_val, _mm512_set1_ps(bv), _CMP_EQ_OQ);
        best = lo + _mm512_mask_reduce_min_epi32(top, lane_idx);
    }
#endif
    for (; i < hi && bv == bv; i++)
        if (row[i] > bv || row[i] != row[i]) bv = row[best = i];
    *val = bv;
    return best;
}

/* argmax[m] = the index of row m's first maximum, NaN counting as the maximum (torch.max's rule): each thread
 * scans the share of the row it wrote (the widening's and the lm_head's static halves), then the shares are
 * combined in order. */
static inline __attribute__((always_inline)) void phase_argmax(const Step *s) {
    const int parts = omp_get_num_threads();
#pragma omp for collapse(2) schedule(static)
    for (int m = 0; m < s->M; m++)
        for (int q = 0; q < parts; q++) {
            const float *row = s->logits32 + (long)m * s->V;
            const long lo = (long)s->V * q / parts, hi = (long)s->V * (q + 1) / parts;
            float bv = -INFINITY;
            s->part_idx[m * parts + q] = lo < hi ? argmax_share(row, lo, hi, &bv) : -1;
            s->part_val[m * parts + q] = bv;
        }
#pragma omp for schedule(static)
    for (int m = 0; m < s->M; m++) {
        long best = -1;
        float bv = -INFINITY;
        for (int q = 0; q < parts; q++) {
            const float v = s->part_val[m * parts + q];
            const long i = s->part_idx[m * parts + q];
            if (i >= 0 && (best < 0 || v > bv || (v != v && bv == bv))) bv = v, best = i;
        }
        s->argmax[m] = best;
    }
}

static inline __attribute__((always_inline)) void phase_silu(const Step *s, int bf16) {
    const int es = bf16 ? 2 : 4, chunks = (s->I + SILU_CHUNK - 1) / SILU_CHUNK;
#pragma omp for collapse(2) schedule(static)
    for (int m = 0; m < s->M; m++)
        for (int c = 0; c < chunks; c++) {
            const char *gate = s->gu + (long)m * 2 * s->I * es;
            const int i0 = c * SILU_CHUNK, i1 = i0 + SILU_CHUNK < s->I ? i0 + SILU_CHUNK : s->I;
            silu_mul(gate, gate + (long)s->I * es, s->act + (long)m * s->I * es, i0, i1, bf16);
        }
}

/* A linear's LoRA deltas (ops first .. first + count - 1 of s->ops) added into y: per op (rank bucket) the shrink
 * of every segment's rows, then every slice's expand (kernels/lora.h), as kernels/lora_fused.c does in its own
 * region. */
static inline __attribute__((always_inline)) void
phase_lora(const Step *s, const int64_t *range, const void *x, int H_in, void *y, long y_row, int bf16) {
    for (int o = 0; o < range[1]; o++) {
        const int64_t *op = s->ops + (range[0] + o) * NOP;
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
            for (int r = 0; r < R; r += SRB)
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
static inline __attribute__((always_inline)) void skinny_body(const Step *s, int bf16) {
    const int NQKV = (s->NH + 2 * s->KVH) * s->D, QD = s->NH * s->D, HD = s->HD, I = s->I, M = s->M;
    {
        PHASE_START();
        if (s->ids) phase_embed(s, bf16);
        for (int l = 0; l < s->L; l++) {
            const int64_t *p = s->ptrs + (long)l * NPTR;
            if (l == 0) phase_norm(s, ADDR(p, NORM1), bf16);    /* later layers': by the residual ending the last */
            PHASE_END(PH_EMBED);
            skinny_phase(s->x, HD, ADDR(p, QKV_W), ADDR(p, QKV_B), s->qkv, NQKV, M, NQKV, HD, bf16, s->wide);
            PHASE_END(PH_QKV);
            phase_lora(s, p + LORA0, s->x, HD, s->qkv, NQKV, bf16);
            PHASE_END(PH_LORA);
            phase_attention(s, p, bf16);
            PHASE_END(PH_ATTN_MERGE);
            skinny_phase(s->attn, QD, ADDR(p, O_W), ADDR(p, O_B), s->x, HD, M, HD, QD, bf16, s->wide);
            PHASE_END(PH_O);
            phase_lora(s, p + LORA0 + 2, s->attn, QD, s->x, HD, bf16);
            PHASE_END(PH_LORA);
            phase_residual(s, ADDR(p, NORM2), bf16);
            PHASE_END(PH_NORM);
            skinny_phase(s->x, HD, ADDR(p, GU_W), ADDR(p, GU_B), s->gu, 2 * I, M, 2 * I, HD, bf16, s->wide);
            PHASE_END(PH_GATE_UP);
            phase_lora(s, p + LORA0 + 4, s->x, HD, s->gu, 2 * I, bf16);
            PHASE_END(PH_LORA);
            phase_silu(s, bf16);
            PHASE_END(PH_SILU);
            skinny_phase(s->act, I, ADDR(p, DOWN_W), ADDR(p, DOWN_B), s->x, HD, M, HD, I, bf16, s->wide);
            PHASE_END(PH_DOWN);
            phase_lora(s, p + LORA0 + 6, s->act, I, s->x, HD, bf16);
            PHASE_END(PH_LORA);
            phase_residual(s, next_norm(s, l), bf16);
            PHASE_END(PH_RESIDUAL);
        }
        if (s->logits) {
            if (s->L == 0) phase_norm(s, s->norm, bf16);
            skinny_phase(s->x, HD, s->head_w, s->head_b, s->logits, s->V, M, s->V, HD, bf16, s->wide);
            PHASE_END(PH_HEAD);
            phase_lora(s, s->head_ops, s->x, HD, s->logits, s->V, bf16);
            PHASE_END(PH_LORA);
            if (bf16) phase_widen_logits(s);
            phase_argmax(s);
            PHASE_END(PH_ARGMAX);
        }
    }
}

/* The dtype as a constant inside the region: an OpenMP body is outlined into its own function, which would get
 * `bf16` as a runtime value (loops over elements then not specialised, some not vectorised). */
static void run_skinny(const Step *s, int bf16) {
#pragma omp parallel num_threads(s->threads)
    {
        if (bf16) skinny_body(s, 1);
        else skinny_body(s, 0);
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
        _Pragma("omp parallel num_threads(s->threads)") {                                                       \
            if (bf16) {                      /* the dtype a constant in the outlined body (see run_skinny) */ \
                const int bf16 = 1;                                                                             \
                (void)bf16;                                                                                     \
                stmt;                                                                                           \
            } else {                                                                                            \
                const int bf16 = 0;                                                                             \
                (void)bf16;                                                                                     \
                stmt;                                                                                           \
            }                                                                                                   \
        }                                                                                                       \
    } while (0)
#define PAR_LORA(range, x, H_in, y, y_row)                                                                      \
    do {                                                                                                        \
        if ((range)[1]) PAR(phase_lora(s, range, x, H_in, y, y_row, bf16));                                    \
    } while (0)

static inline __attribute__((always_inline)) void run_blas(const Step *s, int bf16) {
    const int NQKV = (s->NH + 2 * s->KVH) * s->D, QD = s->NH * s->D, HD = s->HD, I = s->I;
    if (s->ids) PAR(phase_embed(s, bf16));
    for (int l = 0; l < s->L; l++) {
        const int64_t *p = s->ptrs + (long)l * NPTR;
        if (l == 0) PAR(phase_norm(s, ADDR(p, NORM1), bf16));
        blas_linear(s, s->x, HD, ADDR(p, QKV_W), ADDR(p, QKV_B), s->qkv, NQKV, NQKV, HD, bf16);
        PAR_LORA(p + LORA0 + 0, s->x, HD, s->qkv, NQKV);
        PAR(phase_attention(s, p, bf16));
        blas_linear(s, s->attn, QD, ADDR(p, O_W), ADDR(p, O_B), s->x, HD, HD, QD, bf16);
        PAR_LORA(p + LORA0 + 2, s->attn, QD, s->x, HD);
        PAR(phase_residual(s, ADDR(p, NORM2), bf16));
        blas_linear(s, s->x, HD, ADDR(p, GU_W), ADDR(p, GU_B), s->gu, 2 * I, 2 * I, HD, bf16);
        PAR_LORA(p + LORA0 + 4, s->x, HD, s->gu, 2 * I);
        PAR(phase_silu(s, bf16));
        blas_linear(s, s->act, I, ADDR(p, DOWN_W), ADDR(p, DOWN_B), s->x, HD, HD, I, bf16);
        PAR_LORA(p + LORA0 + 6, s->act, I, s->x, HD);
        PAR(phase_residual(s, next_norm(s, l), bf16));
    }
    if (s->logits) {
        if (s->L == 0) PAR(phase_norm(s, s->norm, bf16));
        blas_linear(s, s->x, HD, s->head_w, s->head_b, s->logits, s->V, s->V, HD, bf16);
        PAR_LORA(s->head_ops, s->x, HD, s->logits, s->V);
        if (bf16) PAR(phase_widen_logits(s));
        PAR(phase_argmax(s));
    }
}

/* Groups the kv heads are cut into: 1, or with fewer pieces than two per thread the fewest (a divisor of KVH)
 * that make that many work items, else one per kv head. */
static int head_groups(int pieces, int KVH, int threads) {
    for (int n = 1; n <= KVH; n++)
        if (KVH % n == 0 && pieces * n >= 2 * threads) return n;
    return KVH;
}

/* skinny: the matmuls by the small-batch GEMM (else sgemm / bf16gemm, which must then be given) */
#define EXPORT(NAME, BF16)                                                                                      \
    void NAME(int L, const int64_t *ptrs, const int64_t *ops, void *h, int M, int HD, int NH, int KVH, int D,   \
              int I, float eps, float scale, const int64_t *ids, const void *embed, const int64_t *pos,         \
              const void *cos, const void *sin, const int64_t *slots, const int64_t *tables, int NB, int BS,    \
              long mask_row, long table_row, float *records, float *queries, const void *norm, const void *head_w,    \
              const void *head_b,                                                                               \
              const int64_t *head_ops, void *logits, float *logits32, int64_t *argmax, float *part_val,        \
              int64_t *part_idx, int V, void *x, void *qkv, void *attn, void *gu, void *act, float *wide,       \
              float *lora_tmp, int skinny, void *sgemm, void *bf16gemm, int num_threads) {                      \
        int first[MAX_SEGS + 1], used[MAX_SEGS];    /* M <= 64: kernels/decode_layers.py MAX_ROWS */          \
        /* pieces from the first layer's mask; at least one per sequence, which writes its new K / V */         \
        attend_cut(L ? (const uint8_t *)ADDR(ptrs, MASK) : NULL, mask_row, M, NB, BS, 1, first, used);          \
        const Step s = {L, M, HD, NH, KVH, D, I, NB, BS, num_threads, eps, scale, mask_row, table_row, ptrs, ops, \
                        slots, tables, ids, pos, head_ops, h, x, qkv, attn, gu, act, logits, logits32,         \
                        part_val, argmax, part_idx, cos, sin, embed, norm, head_w, head_b, V, wide, lora_tmp,  \
                        first, used, first[M], head_groups(first[M], KVH, num_threads), records, queries,      \
                        (sgemm_fn)sgemm, (bf16gemm_fn)bf16gemm};                                                \
        if (skinny) run_skinny(&s, BF16);                                                                       \
        else run_blas(&s, BF16);                                                                                \
    }
EXPORT(decode_layers_f32, 0)
EXPORT(decode_layers_bf16, 1)
