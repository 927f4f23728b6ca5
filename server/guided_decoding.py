"""Per-request grammar state during generation, and each step's token masks (structured output, issue #14).

Each constrained request has an llguidance LLMatcher that advances with every accepted token. In a step,
`start` hands the masks of the requests to be sampled to a worker thread while the model's forward runs (both
release the GIL in native code; llguidance computes the whole batch's masks in one call); `apply` joins it and
returns the logits with those rows' disallowed tokens at -inf, to sample from, greedy or not (reported logprobs
stay those of the unmasked logits). A stop token is allowed only where the grammar may end; a request whose
grammar has accepted one, or can take no more tokens, is done. Unconstrained rows are never touched.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from server.guided import GrammarCache, GuidedSpec


@dataclass
class MaskTimes:
    """Seconds, summed over steps: masks computed on the worker; the engine waiting for them after the forward
    (what the overlap did not hide); number of masks."""
    compute_s: float = 0.0
    wait_s: float = 0.0
    num_masks: int = 0


@dataclass
class StepMasks:
    request_ids: list[str]                        # row i of `bitmask` is request_ids[i]'s
    bitmask: torch.Tensor                         # [R, ceil(V / 32)] int32, bit t of word t // 32 = token allowed
    future: Future | None = None
    rows: dict[str, int] = field(default_factory=dict)


class GuidedDecoding:
    def __init__(self, grammars: GrammarCache):
        self.grammars = grammars
        self.vocab_size = grammars.vocab_size
        self._matchers: dict[str, object] = {}    # request id -> llguidance.LLMatcher
        self._worker: ThreadPoolExecutor | None = None
        self._executor = None                     # llguidance.LLExecutor: the batch's masks in Rust
        self._step: StepMasks | None = None       # the masks of the step under way
        self.times = MaskTimes()

    def add(self, request_id: str, spec: GuidedSpec) -> None:
        """Compile (or find cached) the request's grammar; ParamError for an invalid one."""
        self._matchers[request_id] = self.grammars.matcher(spec)

    def fork(self, parent_id: str, child_id: str) -> None:
        """A sample forked from `parent_id` before either has a token (n > 1): a copy of its grammar state, and
        its mask in the step under way is the parent's. Forks happen after the forward but before `apply`: the
        worker may still be computing the parent's mask (the matcher mutably borrowed in Rust), so wait for it."""
        matcher = self._matchers.get(parent_id)
        if matcher is None:
            return
        if self._step is not None and parent_id in self._step.rows and self._step.future is not None:
            self._step.future.result()
        self._matchers[child_id] = matcher.deep_copy()
        if self._step is not None and parent_id in self._step.rows:
            self._step.rows[child_id] = self._step.rows[parent_id]

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers

    def start(self, request_ids: list[str]) -> StepMasks | None:
        """Begin the masks of the constrained requests among `request_ids` (those sampled this step) on the
        worker thread; None when there are none."""
        ids = [rid for rid in request_ids if rid in self._matchers]
        self._step = None
        if not ids:
            return None
        if self._worker is None:
            import llguidance
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="peftserve-masks")
            self._executor = llguidance.LLExecutor(num_threads=1)
        words = (self.vocab_size + 31) // 32
        masks = StepMasks(ids, torch.empty(len(ids), words, dtype=torch.int32),
                          rows={rid: i for i, rid in enumerate(ids)})
        masks.future = self._worker.submit(self._fill, [self._matchers[rid] for rid in ids], masks.bitmask)
        self._step = masks
        return masks

    def _fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        t0 = time.perf_counter()
        words = bitmask.shape[1]
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                               words * 4, len(matchers))
        self.times.compute_s += time.perf_counter() - t0
        self.times.num_masks += len(matchers)

    def apply(self, masks: StepMasks | None, logits: torch.Tensor, request_ids: list[str]) -> torch.Tensor:
        """Wait for the masks; `logits` [S, V] (row i is request_ids[i]'s) with each constrained row's disallowed
        tokens at -inf: a new tensor, or `logits` itself when no row is constrained."""
        if masks is None:
            return logits
        t0 = time.perf_counter()
        masks.future.result()
        self.times.wait_s += time.perf_counter() - t0
        pairs = [(i, masks.rows[rid]) for i, rid in enumerate(request_ids) if rid in masks.rows]
        if not pairs:
            return logits
        logit_rows = torch.tensor([i for i, _ in pairs])
        allowed = unpack_bitmask(masks.bitmask[torch.tensor([r for _, r in pairs])], logits.shape[1])
        with torch.inference_mode():                      # the model's logits are inference tensors
            masked = logits.clone()
            masked[logit_rows] = logits[logit_rows].masked_fill(~allowed, float("-inf"))
        return masked

    def accept(self, request_id: str, token: int) -> bool:
        """Advance the request's grammar by its sampled token. True when the grammar is done (it accepted a
        stop token or cannot take another). Unconstrained requests: always False."""
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return False
        if not matcher.consume_token(token):
            raise RuntimeError(f"the grammar rejected sampled token {token}: {matcher.get_error()}")
        return matcher.is_stopped()

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None


_BITS = torch.arange(32, dtype=torch.int32)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 words -> [R, vocab_size] bool: token t allowed iff bit t % 32 of word t // 32 is set."""
    bits = (bitmask[:, :, None] >> _BITS) & 1                      # [R, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
