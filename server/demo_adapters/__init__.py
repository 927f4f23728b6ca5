"""Demo adapters for the default model (SmolLM2-135M-Instruct), each a different PEFT method with a behaviour a
person sees at once (behaviours.py). `peftserve serve` with no --model preloads them; train.py made them."""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def demo_adapter_dirs() -> dict[str, str]:
    """name -> checkpoint directory, for every demo adapter shipped with the package."""
    from server.demo_adapters.behaviours import BEHAVIOURS
    return {name: str(HERE / name) for name in BEHAVIOURS if (HERE / name / "adapter_config.json").is_file()}


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    """The prompt the chat endpoint builds for one user message (template, then encode without extra BOS)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)
