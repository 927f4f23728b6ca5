"""A tiny random-weight Llama in HF format, for tests, benchmarks and as the fallback when the default model
(server/default_model.py) cannot be fetched.

The weights are random (fixed seed), so its text is gibberish; it exercises the serving path.
The tokenizer is a byte-level BPE trained on a fixed list of Python stdlib sources.
"""
from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

from server.cache_dir import build_once, cache_root

DEFAULT_NAME = "demo-llama"

# ChatML-like: <|im_start|>role\ncontent<|im_end|>\n ... then "<|im_start|>assistant\n" for the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
# Read in this order; missing files (other Python versions) are skipped, so training text depends only on them.
CORPUS_FILES = ("textwrap.py", "string.py", "heapq.py", "bisect.py", "fnmatch.py", "colorsys.py", "shlex.py",
                "queue.py", "copy.py", "contextlib.py", "functools.py", "random.py")


def default_cache_dir() -> Path:
    return cache_root() / DEFAULT_NAME


def ensure_demo_model(cache_dir: str | os.PathLike | None = None, *, hidden_size: int = 256,
                      num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2,
                      intermediate_size: int = 688, vocab_size: int = 4096,
                      max_position_embeddings: int = 2048, seed: int = 0) -> str:
    """Create the demo model directory once and return its path (later calls return the cached one).

    `cache_dir` is the model directory itself (default `$PEFTSERVE_CACHE/demo-llama` or
    `~/.cache/peftserve/demo-llama`), written atomically (`build_once`). A cached directory made with other
    sizes is not rebuilt: give a different `cache_dir` for a different shape.
    """
    def build(tmp: Path) -> None:
        tokenizer = _train_tokenizer(vocab_size)
        _save_tokenizer(tokenizer, tmp)
        _save_model(tmp, seed=seed, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                    num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                    vocab_size=len(tokenizer), max_position_embeddings=max_position_embeddings,
                    bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    return build_once(Path(cache_dir) if cache_dir is not None else default_cache_dir(), build)


def _corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in CORPUS_FILES if (stdlib / name).exists()]
    if not texts:
        raise RuntimeError(f"no training text found in {stdlib} (looked for {', '.join(CORPUS_FILES)})")
    return texts


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", chat_template=CHAT_TEMPLATE)


def _save_tokenizer(tokenizer, path: Path) -> None:
    tokenizer.save_pretrained(path)
    # transformers 5 writes "TokenizersBackend", which transformers 4 cannot load.
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.setdefault("chat_template", CHAT_TEMPLATE)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_model(path: Path, *, seed: int, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                intermediate_size: int, vocab_size: int, max_position_embeddings: int,
                bos_id: int, eos_id: int, pad_id: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    config = LlamaConfig(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
                         vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                         bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
                         tie_word_embeddings=False, dtype="float32")
    with torch.random.fork_rng(devices=[]):    # CPU generator only; leaves the caller's RNG state alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()           # a one-shard progress bar is noise in server logs
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
