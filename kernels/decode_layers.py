"""A decode step's whole decoder stack in one CPU call (kernels/decode_layers.c).

At one to a few sequences a small, deep model's step is its weight read plus ~20 torch ops and Python calls per
layer (SmolLM2-135M: 30 layers, ~8 ms of a 27 ms fp32 step on the development machine, bench/step_floor.py).
This kernel runs every layer of a decode-only step (one new token per sequence) inside one OpenMP region: the
matmuls by kernels/skinny.h, the attention by kernels/attend.h, the glue between them in C. Its reference is the
model's module path, which the model takes whenever this one does not apply (`supports`: adapters acting inside
the layers, prefill rows, more rows than the small-batch GEMM takes, a 4-bit base...).

Built and loaded by kernels/native.py; without it the module path serves everything.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from kernels import native, skinny_gemm

DTYPES = {torch.float32: "decode_layers_f32", torch.bfloat16: "decode_layers_bf16"}
# one layer's row of `ptrs`, in the kernel's order (decode_layers.c's enum): addresses, then for each of the four
# linears (qkv, o, gate_up, down) the first row of its LoRA ops in `ops` and their count
FIELDS = ("norm1", "qkv_w", "qkv_b", "o_w", "o_b", "norm2", "gate_up_w", "gate_up_b", "down_w", "down_b",
          "k_cache", "v_cache", "mask", "lora_qkv", "num_lora_qkv", "lora_o", "num_lora_o", "lora_gate_up",
          "num_lora_gate_up", "lora_down", "num_lora_down")
# a LoRA op (one rank bucket of one linear, kernels/lora_fused's layout): A stack address, its rows R, the
# address of the slices' [5, P] table, P, the number of segments and the addresses of their starts, lens, slots
OP_FIELDS = ("a", "rank_rows", "table", "parts", "segments", "starts", "lens", "slots")
MAX_PARTS = 8
MAX_HEAD_DIM = 512
ATT_MAX_PIECES = 8   # kernels/attend.h
MAX_ROWS = 64   # beyond the small-batch GEMM's rows the matmuls go to torch's BLAS (MKL), up to this many


@dataclass(frozen=True)
class Dims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    scale: float


@dataclass(frozen=True)
class Head:
    """The step's end, when every row is sampled: logits = lm_head(RMSNorm(h) * norm) (+ its LoRA ops)."""
    norm: torch.Tensor          # [hidden]
    weight: torch.Tensor        # [V, hidden] contiguous
    bias: torch.Tensor | None
    ops: tuple[int, int]        # first row of its LoRA ops in `ops`, and their count


class Workspace:
    """The kernel's scratch for up to M rows of one dtype (a caller keeps one, sized for the most rows it has
    seen, and reuses it step after step: every buffer is read as its first m rows)."""

    def __init__(self, m: int, dtype: torch.dtype, dims: Dims, vocab: int):
        d = dims
        qkv_width = (d.heads + 2 * d.kv_heads) * d.head_dim
        empty = functools.partial(torch.empty, dtype=dtype)
        self.x, self.qkv, self.attn = empty(m, d.hidden), empty(m, qkv_width), empty(m, d.heads * d.head_dim)
        self.gate_up, self.act = empty(m, 2 * d.intermediate), empty(m, d.intermediate)
        self.wide = torch.empty(m * max(d.hidden, qkv_width, 2 * d.intermediate, vocab), dtype=torch.float32)
        self.logits = empty(m, vocab) if vocab and dtype != torch.float32 else None     # before widening
        self.lora_tmp = torch.empty(m * 64, dtype=torch.float32)
        self.part_val = torch.empty(m * 64, dtype=torch.float32)         # the argmax's per-thread shares
        self.part_idx = torch.empty(m * 64, dtype=torch.long)
        # the attention's pieces (kernels/attend.h: at most ATT_MAX_PIECES per sequence), each thread's queries
        self.records = torch.empty(m * ATT_MAX_PIECES * d.heads * (d.head_dim + 2), dtype=torch.float32)
        self.queries = torch.empty(0, dtype=torch.float32)
        self.rows, self.key = m, (dtype, dims, vocab)
        self._addresses: tuple | None = None        # the buffers' addresses, as the call passes them

    def addresses(self, threads: int) -> tuple:
        """(records, queries, part_val, part_idx, x, qkv, attn, gate_up, act, wide) addresses, the attention and
        argmax scratch sized for `threads` (kept until a buffer is replaced: data_ptr() is a call into torch)."""
        self.attention_scratch(threads)
        self.argmax_scratch(self.rows, threads)
        if self._addresses is None:
            self._addresses = tuple(t.data_ptr() for t in (self.records, self.queries, self.part_val, self.part_idx,
                                                           self.x, self.qkv, self.attn, self.gate_up, self.act,
                                                           self.wide))
        return self._addresses

    def fits(self, m: int, dtype: torch.dtype, dims: Dims, vocab: int) -> bool:
        return m <= self.rows and self.key == (dtype, dims, vocab)

    def lora_scratch(self, m: int, ops: torch.Tensor) -> torch.Tensor:
        need = m * max([1, *ops[:, 1].tolist()])
        if self.lora_tmp.numel() < need:
            self.lora_tmp = torch.empty(need, dtype=torch.float32)
        return self.lora_tmp

    def attention_scratch(self, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.key[1]
        if self.queries.numel() < threads * d.heads * d.head_dim:
            self.queries = torch.empty(threads * d.heads * d.head_dim, dtype=torch.float32)
            self._addresses = None
        return self.records, self.queries

    def argmax_scratch(self, m: int, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.part_idx.numel() < m * threads:
            self.part_val, self.part_idx = torch.empty(m * threads), torch.empty(m * threads, dtype=torch.long)
            self._addresses = None
        return self.part_val, self.part_idx


@dataclass(frozen=True)
class RowAddresses:
    """A step's per-row inputs given by address, for a caller that keeps them in its own buffers (numpy, reused
    step after step): ids, positions, slots [>= M] int64; tables int64, row b at tables + b * table_row; `blocks`
    of them used by the step (each layer's mask rows then `mask_row` bytes apart, the first blocks * block_size
    of a row read)."""
    ids: int
    positions: int
    slots: int
    tables: int
    blocks: int
    table_row: int
    mask_row: int


def decode_layers(h: torch.Tensor, ptrs: torch.Tensor, ops: torch.Tensor | None, dims: Dims,
                  positions: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor | None,
                  block_tables: torch.Tensor | None, block_size: int, ids: torch.Tensor | None = None,
                  embed: torch.Tensor | None = None, head: Head | None = None,
                  workspace: Workspace | None = None, rows: RowAddresses | None = None) -> torch.Tensor:
    """Run every layer of `ptrs` ([L, len(FIELDS)] int64) on h [M, hidden] in place. ops: [n, len(OP_FIELDS)]
    int64, the LoRA ops the layers' rows point at (their slots index the A / B stacks), or None when they point
    at none. With `ids` ([M] int64), h starts as their rows of `embed` [V, hidden] (h's contents are ignored).
    Returns h, or with `head` the logits [M, V] as fp32 (rounded to h's dtype first, as the lm_head's output),
    carrying `row_argmax` [M] int64: each row's greedy token (server/sampler.py uses it while the logits are
    unchanged).

    positions [M] int64 index the RoPE tables cos, sin [P, head_dim] (contiguous, sin signed); slots [M],
    block_tables [M, NB] int64; each layer's mask [M, NB * block_size] bool contiguous. `rows`: those inputs
    (ids too, with `embed`) by address instead. `workspace`: scratch for at least M rows (else made here). Needs
    `supports(...)`."""
    m, d = h.shape[0], dims
    vocab = 0 if head is None else head.weight.shape[0]
    ws = workspace
    if ws is None or not ws.fits(m, h.dtype, dims, vocab):
        ws = Workspace(m, h.dtype, dims, vocab)
    if rows is None:
        nb = block_tables.shape[1]
        rows = RowAddresses(_ptr(ids), positions.data_ptr(), slots.data_ptr(), block_tables.data_ptr(), nb, nb,
                            nb * block_size)
    skinny = m <= skinny_gemm.MAX_ROWS.get(h.dtype, 0)
    sgemm, bf16gemm = _blas()
    if ops is None:
        ops, lora_tmp = _NO_OPS, ws.lora_tmp
    else:
        lora_tmp = ws.lora_scratch(m, ops)
    logits32 = torch.empty(m, vocab, dtype=torch.float32) if head is not None else None
    argmax = torch.empty(m, dtype=torch.long) if head is not None else None
    threads = torch.get_num_threads()
    records, queries, part_val, part_idx, x, qkv, attn, gate_up, act, wide = ws.addresses(threads)
    logits = logits32 if ws.logits is None else ws.logits
    norm, weight, bias = (None, None, None) if head is None else (head.norm, head.weight, head.bias)
    head_ops = _NO_HEAD_OPS if head is None or head.ops == (0, 0) else torch.tensor(head.ops, dtype=torch.long)
    getattr(_library(), DTYPES[h.dtype])(
        ptrs.shape[0], ptrs.data_ptr(), ops.data_ptr(), h.data_ptr(), m, d.hidden, d.heads, d.kv_heads, d.head_dim,
        d.intermediate, d.eps, d.scale, rows.ids, _ptr(embed), rows.positions, cos.data_ptr(), sin.data_ptr(),
        rows.slots, rows.tables, rows.blocks, block_size, rows.mask_row, rows.table_row, records, queries,
        _ptr(norm), _ptr(weight), _ptr(bias), head_ops.data_ptr(), _ptr(logits), _ptr(logits32), _ptr(argmax),
        part_val, part_idx, vocab, x, qkv, attn, gate_up, act, wide, lora_tmp.data_ptr(), skinny, sgemm, bf16gemm,
        threads)
    if logits32 is None:
        return h
    logits32.row_argmax = argmax
    return logits32


_NO_OPS = torch.zeros(1, len(OP_FIELDS), dtype=torch.long)
_NO_HEAD_OPS = torch.zeros(2, dtype=torch.long)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def supports(h: torch.Tensor, dims: Dims) -> bool:
    """CPU, fp32 / bf16, h contiguous with rows for the small-batch GEMM (or up to MAX_ROWS where torch's BLAS
    was found for the dtype), heads the kernel handles."""
    limit = MAX_ROWS if _blas()[h.dtype == torch.bfloat16] else skinny_gemm.MAX_ROWS.get(h.dtype, 0)
    return (h.device.type == "cpu" and h.dtype in DTYPES and h.dim() == 2 and h.is_contiguous()
            and 0 < h.shape[0] <= limit and dims.head_dim <= MAX_HEAD_DIM
            and dims.head_dim % 2 == 0 and dims.heads % dims.kv_heads == 0 and available())


def available() -> bool:
    return _library() is not None


@functools.cache
def _library() -> ctypes.CDLL | None:
    p, i, l, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
    return native.load_functions("decode_layers", DTYPES.values(),
                                 [i, p, p, p] + [i] * 6 + [f, f] + [p] * 7 + [i, i, l, l, p, p] + [p] * 9 + [i]
                                 + [p] * 7 + [i, p, p, i])


@functools.cache
def _blas() -> tuple[int, int]:
    """Addresses of the GEMMs in torch's own library (MKL in the x86 wheels): Fortran `sgemm_` and
    `cblas_gemm_bf16bf16f32`, 0 where absent (then only the small-batch GEMM's rows are taken)."""
    import os
    found = []
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    except OSError:
        return 0, 0
    for name in ("sgemm_", "cblas_gemm_bf16bf16f32"):
        try:
            found.append(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0)
        except AttributeError:
            found.append(0)
    return found[0], found[1]
