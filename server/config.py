"""Engine configuration: one dataclass that validates itself."""
from __future__ import annotations

import os
from dataclasses import dataclass

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = (None, "nf4")


def parse_memory(value: str | int | float, total_bytes: int) -> int:
    """'2GiB', '512MiB', '1e9', 1073741824 -> bytes; a float in (0, 1] (or '0.3') -> that fraction of total."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        text = str(value).strip()
        units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
        for suffix, scale in units.items():
            if text.lower().endswith(suffix):
                try:
                    return int(float(text[: -len(suffix)]) * scale)
                except ValueError:
                    raise ValueError(f"cannot parse memory size {value!r}") from None
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"cannot parse memory size {value!r} (use bytes, e.g. 2GiB, or a fraction)") from None
    if 0 < number <= 1:
        return int(number * total_bytes)
    if number < 1:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return int(number)


def total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * 2**30


@dataclass
class EngineConfig:
    model: str                              # HF model directory
    served_model_name: str | None = None    # name clients use for the base model; default: directory name
    dtype: str = "auto"                     # auto = the checkpoint's torch_dtype (fp32 if absent); compute dtype
    quantize: str | None = None             # "nf4": 4-bit base (bitsandbytes format) quantized at load
    double_quant: bool = False              # with nf4: 8-bit block scales (bnb_4bit_use_double_quant)
    max_num_seqs: int = 64                  # sequences per step
    max_num_batched_tokens: int = 2048      # tokens per step (prefill chunks + decodes)
    max_model_len: int | None = None        # prompt + output; default min(max_position_embeddings, 8192)
    kv_cache_memory: str | int | float = "2GiB"  # bytes, or a fraction of the memory the base weights leave
    block_size: int = 16                    # tokens per KV block
    max_waiting: int = 1024                 # more queued requests than this -> 503
    max_loras: int = 64                     # adapter slots on the device (LoRA stacks grow up to this)
    max_adapter_memory: str | int | float | None = None     # device-tier adapter bytes; None = slots only
    max_host_adapter_memory: str | int | float | None = "4GiB"   # host-tier adapter bytes; None = no limit
    device: str = "cpu"
    enable_prefix_caching: bool = True      # reuse full KV blocks of earlier prompts (same tokens and adapter)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_waiting", "max_loras"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE[1:]} or unset, got {self.quantize!r}")
        if self.double_quant and self.quantize is None:
            raise ValueError("double_quant needs quantize='nf4' (--double-quant goes with --quantize nf4)")
        self.set_weight_bytes(0)
        if self.served_model_name is None:
            self.served_model_name = os.path.basename(os.path.normpath(self.model))

    def set_weight_bytes(self, weight_bytes: int) -> None:
        """Resolve the memory budgets: a fraction is of physical memory minus the base weights (a 4-bit base
        leaves more for KV blocks and adapters); byte sizes are taken as given."""
        left = max(total_memory_bytes() - weight_bytes, 0)
        self.weight_bytes = weight_bytes
        self.kv_cache_bytes = parse_memory(self.kv_cache_memory, left)
        self.max_adapter_bytes = _optional_memory(self.max_adapter_memory, left)
        self.max_host_adapter_bytes = _optional_memory(self.max_host_adapter_memory, left, allow_zero=True)


def _optional_memory(value, total_bytes: int, allow_zero: bool = False) -> int | None:
    """None -> None; 0 (only where `allow_zero`) -> 0; else parse_memory of `total_bytes`."""
    if value is None:
        return None
    if allow_zero and str(value).strip() in ("0", "0.0"):
        return 0
    return parse_memory(value, total_bytes)
