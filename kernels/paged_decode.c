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
 * Work item: a sequence (or a share of its kv heads), reading its blocks' rows in cache order. Two passes:
 * scores (max kept), then exp and the weighted sum of values, divided by the sum at the end; fp32 accumulation
 * for every dtype. A row
 * with no attended key gets zeros. */
#include "attend.h"

/* splits: the kv heads of a sequence are cut into this many work items (it divides KVH); more than 1 only
 * when there are fewer sequences than threads to keep busy. */
#define EXPORT(NAME, BF16)                                                                                      \
    static void NAME##_item(const void *q, long q_row, long q_head, const void *k, const void *v,               \
                            const int64_t *tables, const uint8_t *mask, long mask_row, void *out, int b,        \
                            int kh0, int nkh, int H, int KVH, int D, int NB, int BS, float scale) {             \
        attend(q, q_row, q_head, k, v, tables, mask, mask_row, out, b, kh0, nkh, H, KVH, D, NB, BS, scale,     \
               BF16);                                                                                           \
    }                                                                                                           \
    void NAME(const void *q, long q_row, long q_head, const void *k, const void *v, const int64_t *tables,     \
              const uint8_t *mask, long mask_row, void *out, int B, int H, int KVH, int D, int NB, int BS,     \
              float scale, int splits, int num_threads) {                                                       \
        const int nkh = KVH / splits;                                                                           \
        _Pragma("omp parallel for collapse(2) schedule(static) num_threads(num_threads)")                      \
        for (int b = 0; b < B; b++)                                                                             \
            for (int part = 0; part < splits; part++)                                                           \
                NAME##_item(q, q_row, q_head, k, v, tables, mask, mask_row, out, b, part * nkh, nkh, H, KVH,    \
                            D, NB, BS, scale);                                                                  \
    }
EXPORT(paged_decode_f32, 0)
EXPORT(paged_decode_bf16, 1)
