/* Paged decode attention on the CPU: one query per sequence attends to its KV blocks where they lie in the
 * cache, nothing gathered. Built and loaded by kernels/paged_decode.py; its torch reference there gathers the
 * blocks and calls SDPA.
 *
 *   q      [B, H, D]   row stride q_row, head stride q_head, elements contiguous
 *   k, v   [NBLK, BS, KVH, D] contiguous (the layer's cache)
 *   tables [B, NB]     int64, physical block of each sequence's j-th block
 *   mask   [B, NB*BS]  bool (one byte), row stride mask_row: key j attended when mask[b, j]
 *   out    [B, H, D]   contiguous
 *
 * Work item: a piece of a sequence's blocks, all its heads (kernels/attend.h: how a sequence is cut, the online
 * softmax, the merge of the pieces' records). */
#include <omp.h>

#include "attend.h"

static inline __attribute__((always_inline)) void
paged_decode(const void *q, long q_row, long q_head, const void *k, const void *v, const int64_t *tables,
             const uint8_t *mask, long mask_row, void *out, int B, int H, int KVH, int D, int NB, int BS, float scale,
             int num_threads, int bf16) {
    const int esize = bf16 ? 2 : 4, G = H / KVH;
    const long stride = attend_record(H, D);
    int *first = malloc(sizeof(int) * (size_t)(2 * B + 1)), *used = first + B + 1;
    attend_cut(mask, mask_row, B, NB, BS, 0, first, used);
    const int items = first[B];
    /* the records and each thread's queries: a buffer kept per calling thread (a fresh one of this size is an
     * mmap and its page faults on every call) */
    static __thread float *buffer;
    static __thread size_t capacity;
    const size_t need = (size_t)items * stride + (size_t)num_threads * H * D + 1;
    if (need > capacity) {
        free(buffer);
        buffer = malloc(sizeof(float) * need);
        capacity = need;
    }
    float *records = buffer, *queries = records + (size_t)items * stride;
#pragma omp parallel num_threads(num_threads)
    {
        float *qf = queries + (size_t)omp_get_thread_num() * H * D;
#pragma omp for schedule(static)
        for (int it = 0; it < items; it++) {
            int b = 0;
            while (first[b + 1] <= it) b++;
            const int p = attend_piece_blocks(used[b]), jb0 = (it - first[b]) * p,
                      jb1 = jb0 + p < used[b] ? jb0 + p : used[b];
            for (int h = 0; h < H; h++)
                for (int d = 0; d < D; d++)
                    qf[h * D + d] = attend_load((const char *)q + (b * q_row + h * q_head) * esize, d, bf16) * scale;
            float *rec = records + it * stride;
            attend_piece(qf, k, v, tables + (long)b * NB, mask + b * mask_row, 0, KVH, G, KVH, D, jb0, jb1, BS,
                         bf16, rec, rec + (long)H * D, rec + (long)H * D + H);
        }
#pragma omp for collapse(2) schedule(static)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++)
                attend_merge(records + first[b] * stride, stride, first[b + 1] - first[b], H, h, D,
                             (char *)out + ((long)b * H + h) * D * esize, bf16);
    }
    free(first);
}

#define EXPORT(NAME, BF16)                                                                                      \
    void NAME(const void *q, long q_row, long q_head, const void *k, const void *v, const int64_t *tables,     \
              const uint8_t *mask, long mask_row, void *out, int B, int H, int KVH, int D, int NB, int BS,     \
              float scale, int num_threads) {                                                                   \
        paged_decode(q, q_row, q_head, k, v, tables, mask, mask_row, out, B, H, KVH, D, NB, BS, scale,         \
                     num_threads, BF16);                                                                        \
    }
EXPORT(paged_decode_f32, 0)
EXPORT(paged_decode_bf16, 1)
