"""The engine: requests in, one step at a time, deltas out. Single-threaded; see async_engine for serving."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import replace

import torch
from transformers import AutoTokenizer

from adapters.catalog import make_runtimes
from adapters.interface import has_kind
from adapters.registry import AdapterRegistry
from server.config import EngineConfig
from server.detokenizer import Detokenizer
from server.engine_stats import engine_stats
from server.guided import GrammarCache
from server.guided_decoding import GuidedDecoding
from server.kv_blocks import BlockManager
from server.outputs import RequestFailed, RequestOutput, TokenLogprob
from server.prefix_store import PrefixStore, RuntimeSlots
from server.residency import IsolatedResidency
from server.runner import ModelRunner
from server.sampling import ParamError, SamplingParams
from server.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from server.sequence import FinishReason, Sequence, SequenceStatus
from server.step_sampling import RequestState, sample_key, sample_seed, sample_states

log = logging.getLogger(__name__)

LOAD_WAIT_S = 0.02       # a step with nothing to run but adapter reads in flight waits this long for them


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_name = config.served_model_name
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.runner = ModelRunner(config)
        spec = self.runner.spec
        capacity = self.runner.num_blocks * config.block_size
        wanted = config.max_model_len or min(spec.max_position_embeddings, 8192)
        if config.max_model_len is not None and wanted > capacity:
            raise ValueError(f"max_model_len={wanted} does not fit the KV cache ({capacity} tokens); "
                             "raise --kv-cache-memory or lower --max-model-len")
        self.max_model_len = min(wanted, capacity)
        self.eos_token_ids = set(spec.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.vocab_size = spec.vocab_size
        self.scheduler = Scheduler(BlockManager(self.runner.num_blocks, config.block_size,
                                                config.enable_prefix_caching),
                                   config.max_num_seqs, config.max_num_batched_tokens)
        self.requests: dict[str, RequestState] = {}     # sequence key -> its state
        self.samples: dict[str, list[str]] = {}          # request id -> its samples' keys (n > 1)
        self.num_prefill_tokens = 0         # prompt tokens run through the model (recomputation included)
        self._aborted: list[RequestState] = []
        self.num_preemptions = 0
        # model steps run, their seconds (schedule to outputs), the tokens and sequences in them
        self.step_counts = {"num_steps": 0, "step_seconds": 0.0, "step_tokens": 0, "step_seqs": 0}
        self.runtimes = make_runtimes(self.runner.model)       # one per adapter family (adapters/catalog.py)
        self.runner.adapter_runtimes = self.runtimes
        self.whole_prompt_kinds = {kind for rt in self.runtimes for kind in rt.whole_prompt_kinds}
        self.prefixes = PrefixStore(self.runner, self.scheduler.blocks)     # adapters' virtual tokens
        self.scheduler.blocks.prefix_of = lambda seq: self.prefixes.prefix_of(seq.adapter)
        self.adapters = AdapterRegistry(
            runtimes={kind: RuntimeSlots(rt, self.prefixes) for rt in self.runtimes for kind in rt.kinds},
            loaders={kind: rt.load for rt in self.runtimes for kind in rt.kinds},
            num_layers=spec.num_layers, max_slots=config.max_loras,
            max_device_bytes=config.max_adapter_bytes, max_host_bytes=config.max_host_adapter_bytes)
        for runtime in self.runtimes:
            runtime.bind(self.adapters)         # kinds made of other loaded adapters (AdapterFusion) look them up
        self.residency = IsolatedResidency(self.adapters)
        self.scheduler.adapters = self.residency      # admission puts adapters on the device
        # structured output; the HTTP side compiles into the same cache at admission
        self.guided = GuidedDecoding(GrammarCache(self.tokenizer, self.vocab_size, sorted(self.eos_token_ids)))

    # ---- requests in -------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    adapter: str | None = None, adapter_drop: int | None = None) -> None:
        """Queue a request. `adapter`: a loaded adapter's name (None = the base model); `adapter_drop`:
        skip the adapter in layers below this one (AdapterDrop; default: the adapter's own setting).
        Raises AdapterNotFound for an unknown adapter, ParamError for bad input."""
        if request_id in self.requests or request_id in self.samples:
            raise ValueError(f"duplicate request id {request_id!r}")
        handle = self.adapters.get(adapter) if adapter is not None else None
        num_virtual = _num_virtual_tokens(handle)
        self.validate_prompt(prompt_ids, params, num_virtual)
        if params.guided is not None:       # an invalid grammar is a ParamError before anything is held
            self.guided.grammars.compile(params.guided)
        first_layer = 0
        if handle is not None:
            first_layer = handle.drop_layers if adapter_drop is None else adapter_drop
            if not 0 <= first_layer <= self.runner.spec.num_layers:
                raise ParamError(f"adapter_drop must be in [0, {self.runner.spec.num_layers}], got {first_layer}",
                                 "adapter_drop")
            if has_kind(handle, self.whole_prompt_kinds) and len(prompt_ids) > self.config.max_num_batched_tokens:
                raise ParamError(f"adapter {adapter!r} takes its gates over the whole prompt, which must fit one "
                                 f"step: the prompt has {len(prompt_ids)} tokens, max_num_batched_tokens is "
                                 f"{self.config.max_num_batched_tokens}", "prompt")
            self.adapters.acquire(handle)
        seq = Sequence(request_id, prompt_ids, params, handle, first_layer, arrival=time.monotonic(),
                       num_virtual_tokens=num_virtual,
                       first_position=None if handle is None else handle.info.get("first_position"))
        seq.whole_prompt = handle is not None and has_kind(handle, self.whole_prompt_kinds)
        seq.num_forks = params.num_samples - 1      # forked from it once its prompt is computed
        if seq.num_forks:
            self.samples[request_id] = [request_id]
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.requests[request_id] = self._state(seq, request_id, seed, 0)
        if params.guided is not None:
            self.guided.add(request_id, params.guided)
        self.scheduler.add(seq)

    def _state(self, seq: Sequence, request_id: str, seed: int, index: int) -> RequestState:
        generator = torch.Generator().manual_seed(sample_seed(seed, index))
        detok = Detokenizer(self.tokenizer, seq.prompt_ids, seq.params.stop, seq.params.min_tokens)
        return RequestState(seq, detok, generator, request_id, seed, index)

    def validate_prompt(self, prompt_ids: list[int], params: SamplingParams, num_virtual_tokens: int = 0) -> None:
        """`num_virtual_tokens`: the adapter's prefix / prompt-tuning tokens, which share the context."""
        if not prompt_ids:
            raise ParamError("prompt is empty", "prompt")
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ParamError(f"token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})", "prompt")
        bad = [t for t in params.logit_bias if t >= self.vocab_size]
        if bad:
            raise ParamError(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                             "logit_bias")
        total = num_virtual_tokens + len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            virtual = f", the adapter's virtual tokens {num_virtual_tokens}" if num_virtual_tokens else ""
            raise ParamError(f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                             f"{len(prompt_ids)} tokens{virtual} and max_tokens is {params.max_tokens} "
                             f"({total} in all). Shorten the prompt or lower max_tokens.", "max_tokens"
                             if num_virtual_tokens + len(prompt_ids) < self.max_model_len else "prompt")

    def context_len(self, adapter: str | None) -> int:
        """Prompt + output tokens a request for `adapter` may have: max_model_len less its virtual tokens."""
        handle = self.adapters.handles.get(adapter) if adapter is not None else None
        return self.max_model_len - _num_virtual_tokens(handle)

    def abort_request(self, request_id: str, index: int | None = None) -> None:
        """Abort every sample of the request, or only sample `index`."""
        keys = list(self.samples.get(request_id, [request_id]))
        for key in keys if index is None else [sample_key(request_id, index)]:
            state = self.requests.get(key)
            if state is not None:
                self._remove(state)
                self._finish(state.seq, FinishReason.ABORT)
                self._aborted.append(state)

    def _remove(self, state: RequestState) -> None:
        """Forget a finished sample (and its request once no sample is left)."""
        del self.requests[state.seq.request_id]
        keys = self.samples.get(state.request_id)
        if keys is not None and not any(key in self.requests for key in keys):
            del self.samples[state.request_id]

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._aborted)

    # ---- one iteration -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration. A request whose share of it raises (its adapter's kernels, its sampling, its
        detokenization) gets a final output with `error` set; the step's other requests go on unharmed."""
        outputs = [self._output(s, [], None, final=True) for s in self._aborted]
        self._aborted = []
        outputs += self._apply_adapter_reads()
        batch = self.scheduler.schedule()
        self._note_first_scheduled(batch)
        outputs += self._fail_uninstallable()
        self.num_preemptions += len(batch.preempted)
        if batch.is_empty:
            if self.adapters.has_pending_loads():
                self.adapters.wait_for_loads(LOAD_WAIT_S)
            return outputs
        self.num_prefill_tokens += sum(_prompt_tokens_in(item) for item in batch.scheduled)
        masks = self.guided.start([item.seq.request_id for item in batch.scheduled if item.is_last_chunk])
        start = time.perf_counter()
        num_tokens, num_seqs = batch.num_tokens, len(batch.scheduled)
        sampled, logits, failed = self._forward(batch)
        states, logits = self._fork([self.requests[item.seq.request_id] for item in sampled], logits)
        samples = sample_states(logits, states, self.guided, masks, self.eos_token_ids)
        outputs += [self._fail(s, exc) for s, exc in failed] + self._postprocess(batch, states, samples)
        counts = self.step_counts
        counts["num_steps"] += 1
        counts["step_seconds"] += time.perf_counter() - start
        counts["step_tokens"] += num_tokens
        counts["step_seqs"] += num_seqs
        return outputs

    def _note_first_scheduled(self, batch: SchedulerOutput) -> None:
        now = time.monotonic()
        for item in batch.scheduled:
            state = self.requests.get(item.seq.request_id)
            if state is not None and state.queue_seconds is None:
                state.queue_seconds = now - item.seq.arrival

    def _forward(self, batch: SchedulerOutput) -> tuple[list[ScheduledSeq], torch.Tensor, list]:
        """runner.run(batch); if it raises, each sequence runs alone (a request's numbers do not depend on its
        neighbours, so the outputs are the same) and those that raise alone fail: (state, exception) pairs."""
        try:
            sampled, logits = self.runner.run(batch)
            return sampled, logits, []
        except Exception as exc:
            if len(batch.scheduled) == 1:
                log.exception("request %s failed in the model forward", batch.scheduled[0].seq.request_id)
                failed = [(self.requests[batch.scheduled[0].seq.request_id], exc)]
                batch.scheduled = []
                return [], torch.empty(0, self.vocab_size), failed
            log.warning("step of %d sequences failed (%s: %s); running them one by one",
                        len(batch.scheduled), type(exc).__name__, exc)
        sampled, rows, failed = [], [], []
        for item in batch.scheduled:
            try:
                one_sampled, one_logits = self.runner.run(SchedulerOutput(scheduled=[item]))
            except Exception as exc:
                log.exception("request %s failed in the model forward", item.seq.request_id)
                failed.append((self.requests[item.seq.request_id], exc))
                continue
            sampled += one_sampled
            rows.append(one_logits)
        batch.scheduled = [item for item in batch.scheduled
                           if all(item.seq is not state.seq for state, _ in failed)]
        logits = torch.cat(rows) if rows else torch.empty(0, self.vocab_size)
        return sampled, logits, failed

    def _fork(self, states: list[RequestState], logits: torch.Tensor) -> tuple[list[RequestState], torch.Tensor]:
        """A request with n samples computed its prompt once: its other samples start now, sharing its blocks
        and this step's logits row (each draws from its own generator)."""
        if not any(state.seq.num_forks for state in states):
            return states, logits
        out, rows = [], []
        for row, state in enumerate(states):
            group = [state]
            parent = state.seq
            for index in range(1, parent.num_forks + 1):
                key = sample_key(state.request_id, index)
                child = Sequence(key, parent.prompt_ids, parent.params, parent.adapter, parent.first_adapter_layer,
                                 arrival=parent.arrival, num_virtual_tokens=parent.num_virtual_tokens,
                                 first_position=parent.first_position)
                child.num_computed_tokens = parent.num_tokens    # its whole prompt, computed this step
                child.whole_prompt, child.adapter_state = parent.whole_prompt, parent.adapter_state
                if parent.adapter is not None:
                    self.adapters.acquire(parent.adapter)
                self.scheduler.fork(parent, child)
                child_state = self._state(child, state.request_id, state.seed, index)
                child_state.queue_seconds = state.queue_seconds
                self.requests[key] = child_state
                self.samples[state.request_id].append(key)
                self.guided.fork(parent.request_id, key)
                group.append(child_state)
            parent.num_forks = 0
            out += group
            rows += [row] * len(group)
        return out, logits[torch.tensor(rows, dtype=torch.long)]

    def _postprocess(self, batch: SchedulerOutput, states: list[RequestState],
                     samples: list[tuple | Exception]) -> list[RequestOutput]:
        blocks = self.scheduler.blocks
        for item in batch.scheduled:
            item.seq.num_computed_tokens += item.num_tokens
            blocks.cache_computed(item.seq)
        outputs = []
        for state, sampled in zip(states, samples):
            if isinstance(sampled, Exception):
                outputs.append(self._fail(state, sampled))
                continue
            try:
                outputs.append(self._append(state, *sampled))
            except Exception as exc:
                log.exception("request %s failed in postprocessing", state.seq.request_id)
                outputs.append(self._fail(state, exc))
        return outputs

    def _append(self, state: RequestState, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        seq = state.seq
        seq.append_token(token)
        if logprob is not None:
            state.cumulative_logprob += logprob.logprob
            if seq.params.logprobs is None:       # computed only to rank best_of samples
                logprob = None
        grammar_done = self.guided.accept(seq.request_id, token)
        stopped_by_text = state.detok.add(token)
        reason = FinishReason.STOP if grammar_done else self._finish_reason(seq, token, stopped_by_text)
        if reason is not None:
            self._finish(seq, reason)
            self._remove(state)
        return self._output(state, [token], logprob, final=reason is not None)

    def _fail(self, state: RequestState, exc: Exception) -> RequestOutput:
        """End one request with an error output; it frees its blocks and adapter like any other finish."""
        seq = state.seq
        if seq.request_id in self.requests:
            self._remove(state)
            self._finish(seq, FinishReason.ABORT)
        error = RequestFailed(f"internal error while generating ({type(exc).__name__}: {exc})")
        return RequestOutput(request_id=state.request_id, token_ids=[], text="", logprobs=None, finished=True,
                             finish_reason=FinishReason.ABORT.value, num_prompt_tokens=seq.num_prompt_tokens,
                             num_output_tokens=len(seq.output_ids), error=error, index=state.index)

    def _fail_uninstallable(self) -> list[RequestOutput]:
        """Requests waiting for an adapter whose install raised at admission fail (the others were admitted)."""
        outputs = []
        for handle, exc in self.residency.take_failures():
            for state in [s for s in self.requests.values() if s.seq.adapter is handle
                          and s.seq.status is SequenceStatus.WAITING]:
                outputs.append(self._fail(state, exc))
        return outputs

    def _apply_adapter_reads(self) -> list[RequestOutput]:
        """Adapters read back from disk go to the host tier; a failed read fails the requests waiting for it."""
        outputs = []
        for handle, exc in self.adapters.poll_loads():
            log.error("reloading adapter %r from %s failed: %s", handle.name, handle.path, exc)
            for state in [s for s in self.requests.values() if s.seq.adapter is handle]:
                self._remove(state)
                self._finish(state.seq, FinishReason.ABORT)
                outputs.append(replace(self._output(state, [], None, final=True), error=exc))
        return outputs

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq, reason)
        self.guided.remove(seq.request_id)
        if seq.adapter is not None:
            self.adapters.release(seq.adapter)

    def _finish_reason(self, seq: Sequence, token: int, stopped_by_text: bool) -> FinishReason | None:
        p = seq.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids or stopped_by_text:
            return FinishReason.STOP
        if len(seq.output_ids) >= p.max_tokens or seq.num_virtual_tokens + seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _output(self, state: RequestState, tokens: list[int], logprob: TokenLogprob | None,
                final: bool) -> RequestOutput:
        seq = state.seq
        return RequestOutput(
            request_id=state.request_id,
            index=state.index,
            token_ids=tokens,
            text=state.detok.delta(final),
            logprobs=[logprob] if logprob is not None else None,
            finished=final,
            finish_reason=seq.finish_reason.value if final and seq.finish_reason else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=len(seq.output_ids),
            queue_seconds=state.queue_seconds if final else None,
            cumulative_logprob=state.cumulative_logprob,
        )

    def stats(self, include_adapters: bool = True) -> dict:
        """Counters and gauges for /metrics and /health (server/engine_stats.py); without `include_adapters`, only
        those that change with every step."""
        return engine_stats(self, include_adapters)

    # ---- offline use -------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 adapters: list[str | None] | None = None) -> list[list[int]]:
        """Run prompts to completion; returns each one's generated token ids (tests, benchmarks). One sample per
        prompt: drive add_request / step for n > 1."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if any(p.num_samples > 1 for p in params_list):
            raise ValueError("generate() runs one sample per prompt (n=1, no best_of); use add_request and step")
        adapters = adapters or [None] * len(prompts)
        ids = [f"offline-{i}-{random.getrandbits(32)}" for i in range(len(prompts))]
        for rid, prompt, p, adapter in zip(ids, prompts, params_list, adapters):
            self.add_request(rid, prompt, p, adapter)
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.error is not None:
                    raise out.error
                tokens[out.request_id].extend(out.token_ids)
        return [tokens[rid] for rid in ids]


def _prompt_tokens_in(item: ScheduledSeq) -> int:
    """How many of the prompt's tokens this step computes for `item`."""
    return max(0, min(item.num_tokens, item.seq.num_prompt_tokens - item.seq.num_computed_tokens))


def _num_virtual_tokens(handle) -> int:
    """Virtual tokens a request for `handle` (None = the base model) has before its own tokens (prefix / prompt
    tuning; the registry keeps the count while the weights are on disk)."""
    return 0 if handle is None else handle.info.get("num_virtual_tokens", 0)
