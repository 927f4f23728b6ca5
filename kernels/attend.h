/* Paged decode attention, shared by kernels/paged_decode.c and kernels/decode_layers.c: one query per sequence
 * attends to its keys where they lie in the cache, in pieces.
 *
 * A sequence's used blocks (up to the last one holding an attended key) are cut into pieces of
 * `attend_piece_blocks(used)` blocks: at most ATT_MAX_PIECES pieces, at least ATT_MIN_PIECE blocks each. A piece
 * is a work item: it reads its blocks' rows once, in cache order (a row's kv heads together), the next blocks
 * prefetched, and leaves per query head an unnormalised record (running max, sum of weights, weighted sum of
 * values, online softmax block by block); `attend_merge` then combines a head's records in piece order. How a
 * sequence is cut depends on its own length alone, so its result never depends on the batch it is in, while one
 * long sequence still spreads over the threads (a decode step at one request: each thread a share of its keys,
 * not of its kv heads, which left one of two threads with two of SmolLM2's three).
 *
 * fp32 accumulation for every dtype; a head with no attended key gets zeros. */
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "vexp.h"

#define ATT_MAX_PIECES 8        /* pieces of one sequence's context */
#define ATT_MIN_PIECE 4         /* blocks of a piece, at least */
#define ATT_AHEAD 2             /* blocks prefetched ahead */
#define ATT_MAX_D 512           /* head dim (kernels/paged_decode.py, kernels/decode_layers.py MAX_HEAD_DIM) */

/* Blocks up to and including the last one with an attended key in mask row m (0: none). */
static inline int attend_used_blocks(const uint8_t *m, int NB, int BS) {
    for (long j = (long)NB * BS - 1; j >= 0; j--)
        if (m[j]) return (int)(j / BS) + 1;
    return 0;
}

static inline int attend_piece_blocks(int used) {
    const int p = (used + ATT_MAX_PIECES - 1) / ATT_MAX_PIECES;
    return p < ATT_MIN_PIECE ? ATT_MIN_PIECE : p;
}

static inline int attend_pieces(int used) {
    const int p = attend_piece_blocks(used);
    return (used + p - 1) / p;
}

/* Sequence b's pieces are first[b] .. first[b + 1] - 1 (first[B]: all of them), over its used[b] blocks of mask
 * row b (none when mask is NULL), at least `at_least` each. */
static inline void attend_cut(const uint8_t *mask, long mask_row, int B, int NB, int BS, int at_least, int *first,
                              int *used) {
    first[0] = 0;
    for (int b = 0; b < B; b++) {
        used[b] = mask ? attend_used_blocks(mask + b * mask_row, NB, BS) : 0;
        const int n = attend_pieces(used[b]);
        first[b + 1] = first[b] + (n > at_least ? n : at_least);
    }
}

/* A piece's record: acc [NH, D], then mx [NH], then sum [NH] (fp32) */
static inline long attend_record(int NH, int D) { return (long)NH * (D + 2); }

/* One element of a row as fp32; `bf16` is a compile-time constant in each exported kernel. */
static inline float attend_load(const void *row, int d, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)row)[d]) : ((const float *)row)[d];
}

/* Whether block jb of a mask row has an attended key */
static inline int attend_any(const uint8_t *m, int jb, int BS) {
    const uint8_t *mb = m + (long)jb * BS;
    int any = 0;
    for (int t = 0; t < BS; t++) any |= mb[t];
    return any;
}

/* The rows of blocks [jb0, jb1) for kv heads [kh0, kh0 + nkh) towards the caches (keys and values). */
static inline void attend_prefetch(const void *k, const void *v, const int64_t *table, int jb0, int jb1, int kh0,
                                   int nkh, int KVH, int D, int BS, int esize) {
    const long kv_row = (long)KVH * D, span = (long)nkh * D * esize;
    for (int jb = jb0; jb < jb1; jb++) {
        const long row0 = (table[jb] * BS * kv_row + (long)kh0 * D) * esize;
        for (int t = 0; t < BS; t++)
            for (long o = 0; o < span; o += 64) {
                __builtin_prefetch((const char *)k + row0 + t * kv_row * esize + o);
                __builtin_prefetch((const char *)v + row0 + t * kv_row * esize + o);
            }
    }
}

/* Portable piece: query heads of kv heads [kh0, kh0 + nkh) (scaled fp32 queries qf [nkh G, D]) over blocks
 * [jb0, jb1) of mask row m and block table `table`; the record into acc [nkh G, D], mx, sum [nkh G]. */
static inline __attribute__((always_inline)) void
attend_piece_portable(const float *qf, const void *k, const void *v, const int64_t *table, const uint8_t *m,
                      int kh0, int nkh, int G, int KVH, int D, int jb0, int jb1, int BS, int bf16, float *acc,
                      float *mx, float *sum) {
    const int NH = nkh * G, esize = bf16 ? 2 : 4;
    const long kv_row = (long)KVH * D;                          /* elements between a block's rows */
    float *s = malloc(sizeof(float) * (size_t)NH * BS);
    for (int h = 0; h < NH; h++) mx[h] = -INFINITY, sum[h] = 0.f;
    memset(acc, 0, sizeof(float) * (size_t)NH * D);
    for (int jb = jb0; jb < jb1; jb++) {                        /* one block: its keys, then its values */
        const uint8_t *mb = m + (long)jb * BS;
        if (!attend_any(m, jb, BS)) continue;
        const long row0 = table[jb] * BS * kv_row + (long)kh0 * D;
        const char *kb = (const char *)k + row0 * esize, *vb = (const char *)v + row0 * esize;
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
    free(s);
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* chunk c (16 elements, the tail masked) of a row as fp32 */
static inline __m512 att_chunk(const char *row, int c, int D, int bf16) {
    const int k = c * 16;
    const __mmask16 m = D - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - k)) - 1);
    if (!bf16) return _mm512_maskz_loadu_ps(m, (const float *)row + k);
    const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)row + k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __mmask16 att_tail(int D, int c) {
    const int k = c * 16;
    return D - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (D - k)) - 1);
}

/* e^x of 16 lanes: vexp's arithmetic (kernels/vexp.h), a NaN kept */
static inline __m512 att_vexp16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.33654f), x);          /* max / min return x when x is NaN */
    x = _mm512_min_ps(_mm512_set1_ps(88.72283f), x);
    const __m512 big = _mm512_set1_ps(12582912.f);
    const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), big), big);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
    const __m512i ni = _mm512_cvttps_epi32(n), a = _mm512_srai_epi32(ni, 1), b = _mm512_sub_epi32(ni, a);
    const __m512 fa = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(a, _mm512_set1_epi32(127)), 23));
    const __m512 fb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(127)), 23));
    return _mm512_mul_ps(_mm512_mul_ps(p, fa), fb);
}

/* Lane i = the sum of v[i]'s 16 lanes: three levels of adds of shuffled halves / quarters / pairs (a transpose as
 * it sums), then the lanes put back in order. */
static inline __m512 att_hsum16(const __m512 *v) {
    __m512 a[8], b[4];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++)       /* 128-bit lanes [x0 + x2, x1 + x3, y0 + y2, y1 + y3], x = v[2i], y = v[2i+1] */
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)       /* 128-bit lane L: four partial sums of v[4i + L] */
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
    const __m512 c0 = _mm512_add_ps(_mm512_unpacklo_ps(b[0], b[1]), _mm512_unpackhi_ps(b[0], b[1]));
    const __m512 c1 = _mm512_add_ps(_mm512_unpacklo_ps(b[2], b[3]), _mm512_unpackhi_ps(b[2], b[3]));
    /* element 4L + j: the sum of v[4j + L] */
    const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c0, c1, 0x44), _mm512_shuffle_ps(c0, c1, 0xEE));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), d);
}

/* n (<= 16) rows of D elements, `row` apart, as fp32 rows of C * 16 (the tail zero) into out; a bf16 row is
 * widened, an fp32 one copied. */
static inline void att_widen_rows(const char *rows, long row, int n, int D, int C, int bf16, float *out) {
    for (int t = 0; t < n; t++)
        for (int c = 0; c < C; c++)
            _mm512_storeu_ps(out + (t * C + c) * 16, att_chunk(rows + t * row, c, D, bf16));
}

#define ATT_TILE 16             /* keys scored together: one vector of scores */

/* The same piece with AVX-512: block by block (ATT_AHEAD blocks prefetched), in a block kv head by kv head, its
 * keys in tiles of 16. A tile's key and value rows are widened to fp32 once (bf16, or a head dim not a multiple of
 * 16; else read in place); per query head its 16 scores come from 16 accumulators summed across lanes at once
 * (att_hsum16: ~3 shuffles and adds a score, not a horizontal sum each), then the online softmax on the vector of
 * scores, then the values: per 16-lane chunk of the head, the 16 weighted rows into the accumulator. */
static inline __attribute__((always_inline)) void
attend_piece_avx(const float *qf, const void *k, const void *v, const int64_t *table, const uint8_t *m, int kh0,
                 int nkh, int G, int KVH, int D, int jb0, int jb1, int BS, int bf16, float *acc, float *mx,
                 float *sum) {
    const int C = (D + 15) / 16, esize = bf16 ? 2 : 4, in_place = !bf16 && D % 16 == 0;
    const long kv_row = (long)KVH * D;
    float kf[ATT_TILE * ATT_MAX_D] __attribute__((aligned(64))), vf[ATT_TILE * ATT_MAX_D] __attribute__((aligned(64)));
    for (int h = 0; h < nkh * G; h++) mx[h] = -INFINITY, sum[h] = 0.f;
    memset(acc, 0, sizeof(float) * (size_t)nkh * G * D);
    attend_prefetch(k, v, table, jb0, jb0 + ATT_AHEAD < jb1 ? jb0 + ATT_AHEAD : jb1, kh0, nkh, KVH, D, BS, esize);
    for (int jb = jb0; jb < jb1; jb++) {
        if (jb + ATT_AHEAD < jb1)
            attend_prefetch(k, v, table, jb + ATT_AHEAD, jb + ATT_AHEAD + 1, kh0, nkh, KVH, D, BS, esize);
        if (!attend_any(m, jb, BS)) continue;
        for (int t0 = 0; t0 < BS; t0 += ATT_TILE) {
            const int n = BS - t0 < ATT_TILE ? BS - t0 : ATT_TILE;
            const __mmask16 live = _mm_mask_cmpneq_epi8_mask((__mmask16)((1u << n) - 1),
                                                             _mm_maskz_loadu_epi8((__mmask16)((1u << n) - 1),
                                                                                  m + (long)jb * BS + t0),
                                                             _mm_setzero_si128());
            if (!live) continue;
            for (int kh = kh0; kh < kh0 + nkh; kh++) {
                const long row0 = (table[jb] * BS + t0) * kv_row + (long)kh * D;
                const char *kb = (const char *)k + row0 * esize, *vb = (const char *)v + row0 * esize;
                const float *kr = in_place ? (const float *)kb : kf, *vr = in_place ? (const float *)vb : vf;
                const long rs = in_place ? kv_row : (long)C * 16;       /* floats between rows */
                if (!in_place) {
                    att_widen_rows(kb, kv_row * esize, n, D, C, bf16, kf);
                    att_widen_rows(vb, kv_row * esize, n, D, C, bf16, vf);
                }
                for (int g = 0; g < G; g++) {
                    const int h = (kh - kh0) * G + g;
                    const float *q = qf + (long)h * D;
                    __m512 p[ATT_TILE];
#pragma GCC unroll 16
                    for (int t = 0; t < ATT_TILE; t++) p[t] = _mm512_setzero_ps();
                    for (int c = 0; c < C; c++) {                       /* scores: 16 keys, one chunk at a time */
                        const __m512 qc = _mm512_maskz_loadu_ps(att_tail(D, c), q + c * 16);
#pragma GCC unroll 16
                        for (int t = 0; t < ATT_TILE; t++) {            /* rows past n: row n - 1 again, dropped */
                            const float *row = kr + (t < n ? t : n - 1) * rs + c * 16;
                            p[t] = _mm512_fmadd_ps(qc, in_place ? _mm512_loadu_ps(row) : _mm512_load_ps(row), p[t]);
                        }
                    }
                    const __m512 s = att_hsum16(p);
                    const float bmax = _mm512_mask_reduce_max_ps(live, s);
                    float c0 = 1.f;
                    if (bmax > mx[h]) {                                 /* rescale what was summed under the old max */
                        c0 = vexp(mx[h] - bmax);
                        sum[h] *= c0;
                        mx[h] = bmax;
                    }
                    const __m512 w = _mm512_maskz_mov_ps(live, att_vexp16(_mm512_sub_ps(s, _mm512_set1_ps(mx[h]))));
                    sum[h] += _mm512_reduce_add_ps(w);
                    float wt[ATT_TILE];
                    _mm512_storeu_ps(wt, w);
                    float *ah = acc + (long)h * D;
                    const __m512 cv = _mm512_set1_ps(c0);
                    for (int c = 0; c < C; c++) {                       /* values: 16 rows into one chunk */
                        const __mmask16 tail = att_tail(D, c);
                        __m512 a[4] = {_mm512_mul_ps(_mm512_maskz_loadu_ps(tail, ah + c * 16), cv),
                                       _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
                        for (int t = 0; t < n; t++)                     /* four chains, not one of 16 FMAs */
                            if (live >> t & 1)                          /* a masked row may hold anything */
                                a[t & 3] = _mm512_fmadd_ps(_mm512_set1_ps(wt[t]), _mm512_loadu_ps(vr + t * rs + c * 16),
                                                           a[t & 3]);
                        _mm512_mask_storeu_ps(ah + c * 16, tail,
                                              _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
                    }
                }
            }
        }
    }
}
#endif

/* A piece: the AVX-512 version where it applies, else the portable one. */
static inline __attribute__((always_inline)) void
attend_piece(const float *qf, const void *k, const void *v, const int64_t *table, const uint8_t *m, int kh0,
             int nkh, int G, int KVH, int D, int jb0, int jb1, int BS, int bf16, float *acc, float *mx, float *sum) {
#if defined(__AVX512F__)
    if (D <= ATT_MAX_D) {
        attend_piece_avx(qf, k, v, table, m, kh0, nkh, G, KVH, D, jb0, jb1, BS, bf16, acc, mx, sum);
        return;
    }
#endif
    attend_piece_portable(qf, k, v, table, m, kh0, nkh, G, KVH, D, jb0, jb1, BS, bf16, acc, mx, sum);
}

/* Head h's output row (D elements of out, rounded to its dtype) from the records of `pieces` pieces, `stride`
 * floats apart, in order: sum_j e_j acc_j / sum_j e_j sum_j with e_j = exp(mx_j - max_j mx_j); one piece gives
 * acc / sum (e = 1 exactly); zeros when no piece attended a key. */
static inline __attribute__((always_inline)) void
attend_merge(const float *records, long stride, int pieces, int NH, int h, int D, void *out, int bf16) {
    const float *mxs = records + (long)NH * D;
    float top = -INFINITY;
    for (int j = 0; j < pieces; j++)
        if (mxs[j * stride + h] > top) top = mxs[j * stride + h];
    float row[ATT_MAX_D], total = 0.f;
    for (int d = 0; d < D; d++) row[d] = 0.f;
    if (top != -INFINITY)
        for (int j = 0; j < pieces; j++) {
            const float *rec = records + j * stride;
            if (rec[(long)NH * D + h] == -INFINITY) continue;      /* nothing attended in this piece */
            const float e = vexp(rec[(long)NH * D + h] - top);
            total += e * rec[(long)NH * D + NH + h];
            const float *a = rec + (long)h * D;
#pragma omp simd
            for (int d = 0; d < D; d++) row[d] += e * a[d];
        }
    for (int d = 0; d < D; d++) {
        const float x = top != -INFINITY ? row[d] / total : 0.f;
        if (bf16) ((uint16_t *)out)[d] = f32_to_bf16(x);
        else ((float *)out)[d] = x;
    }
}
