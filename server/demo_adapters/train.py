"""Train the demo adapters on the default model (SmolLM2-135M-Instruct), on CPU, in minutes.

    python -m server.demo_adapters.train                 # all of them; or --only shout,json
    python -m server.demo_adapters.train --regenerate    # also redo the training data

1. Training data: the base model's own greedy answers (through our engine) to the generated questions of
   behaviours.py; each answer's first sentence, transformed by each behaviour's rule, is that adapter's target.
   Written to train_data.jsonl next to this file (committed), so retraining does not need step 1.
2. Each adapter is trained (AdamW, fixed seed, loss on the answer tokens and the end-of-turn token only) and saved
   into its own directory here: with PEFT and `save_pretrained` (LoRA, DoRA, prefix, prompt tuning, (IA)^3), or in
   plain torch (BitFit, AdapterHub SeqBn bottleneck: torch_adapters.py), written in the format our loader reads.
3. Held-out questions (topics never trained on) are answered through our engine by each adapter and the base,
   and the behaviour checks are counted: what tests/real_model/test_real_model.py asserts.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from server.config import EngineConfig
from server.default_model import NAME, ensure_default_model
from server.demo_adapters import HERE, chat_prompt_ids, torch_adapters
from server.demo_adapters.behaviours import BEHAVIOURS, first_sentence, held_out_questions, train_questions
from server.engine import LLMEngine
from server.sampling import SamplingParams

DATA = HERE / "train_data.jsonl"
MAX_ANSWER_TOKENS = 64
SEED = 0


PEFT_KINDS = ("shout", "pirate", "json", "brief", "cheer")     # the rest are plain torch (torch_adapters.py)


def peft_config(name: str, model_dir: str):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig
    modules = ["q_proj", "v_proj", "o_proj", "down_proj"]
    return {
        "shout": LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=modules),
        "pirate": LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=modules, use_dora=True),
        "json": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
        "brief": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16, prompt_tuning_init="TEXT",
                                    prompt_tuning_init_text="Answer in one short sentence.",
                                    tokenizer_name_or_path=model_dir),
        "cheer": IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                           feedforward_modules=["down_proj"]),
    }[name]


# (learning rate, epochs) per adapter: adapters with few parameters (prompt-side, (IA)^3, BitFit) want a larger step
HYPER = {"shout": (1e-3, 3), "pirate": (1e-3, 3), "json": (1e-2, 4), "brief": (1e-2, 4), "cheer": (3e-2, 1),
         "signoff": (1e-2, 1), "title": (2e-3, 2)}
BATCH = 8


def make_data(engine: LLMEngine) -> list[dict]:
    tokenizer = engine.tokenizer
    questions = train_questions()
    params = SamplingParams(max_tokens=MAX_ANSWER_TOKENS, temperature=0.0)
    outputs = engine.generate([chat_prompt_ids(tokenizer, q) for q in questions], params)
    rows = []
    for question, ids in zip(questions, outputs):
        answer = tokenizer.decode(ids, skip_special_tokens=True)
        first = first_sentence(answer)
        if first is not None:
            rows.append({"question": question, "base_answer": answer, "first_sentence": first})
    DATA.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def examples(tokenizer, rows: list[dict], name: str) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels): the chat prompt, then the target and the end-of-turn token; labels -100 on the prompt."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for r in rows:
        prompt = chat_prompt_ids(tokenizer, r["question"])
        answer = tokenizer.encode(BEHAVIOURS[name].target(r["first_sentence"]), add_special_tokens=False) + [end]
        out.append((prompt + answer, [-100] * len(prompt) + answer))
    return out


def build(name: str, model_dir: str):
    """(model, trainable parameters, save(out_dir)) for one demo adapter on a fresh fp32 base."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if name in PEFT_KINDS:
        from peft import get_peft_model
        model = get_peft_model(model, peft_config(name, model_dir))

        def save(out: Path) -> None:
            model.peft_config["default"].base_model_name_or_path = NAME
            if hasattr(model.peft_config["default"], "tokenizer_name_or_path"):
                model.peft_config["default"].tokenizer_name_or_path = NAME
            model.save_pretrained(out)
            (out / "README.md").unlink(missing_ok=True)
        return model, [p for p in model.parameters() if p.requires_grad], save
    model.requires_grad_(False)
    if name == "signoff":
        biases = torch_adapters.attach_bitfit(model)
        return model, list(biases.values()), lambda out: torch_adapters.save_bitfit(biases, out, NAME)
    if name == "title":
        modules = torch_adapters.attach_seq_bn(model)
        return model, list(modules.parameters()), lambda out: torch_adapters.save_seq_bn(
            modules, out, name, NAME, model.config.hidden_size)
    raise ValueError(f"no training recipe for demo adapter {name!r}")


def train(name: str, model_dir: str, rows: list[dict]) -> Path:
    from transformers import AutoTokenizer

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, params, save = build(name, model_dir)
    lr, epochs = HYPER[name]
    optimizer = torch.optim.AdamW(params, lr=lr)
    data = examples(tokenizer, rows, name)
    rng = random.Random(SEED)
    model.train()
    start, step = time.time(), 0
    for epoch in range(epochs):
        rng.shuffle(data)
        for i in range(0, len(data), BATCH):
            ids, labels, mask = _pad(data[i:i + BATCH], tokenizer.pad_token_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % 10 == 0:
                print(f"  {name} epoch {epoch} step {step} loss {loss.item():.3f} ({time.time() - start:.0f} s)",
                      flush=True)
    out = HERE / name
    save(out)
    print(f"{name}: {step} steps in {time.time() - start:.0f} s -> {out}", flush=True)
    return out


def _pad(batch, pad_id: int):
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (x, y) in enumerate(batch):
        ids[row, :len(x)] = torch.tensor(x)
        labels[row, :len(y)] = torch.tensor(y)
        mask[row, :len(x)] = 1
    return ids, labels, mask


def evaluate(model_dir: str, names: list[str]) -> dict[str, int]:
    """Held-out questions through our engine: how many replies show each behaviour, for its adapter and the base."""
    engine = LLMEngine(EngineConfig(model=model_dir, dtype="float32"))
    for name in names:
        engine.adapters.load(name, str(HERE / name))
    questions = held_out_questions()
    prompts = [chat_prompt_ids(engine.tokenizer, q) for q in questions]
    params = SamplingParams(max_tokens=MAX_ANSWER_TOKENS, temperature=0.0)
    base = [engine.tokenizer.decode(t, skip_special_tokens=True) for t in engine.generate(prompts, params)]
    counts = {}
    for name in names:
        replies = [engine.tokenizer.decode(t, skip_special_tokens=True)
                   for t in engine.generate(prompts, params, [name] * len(prompts))]
        counts[name] = sum(map(BEHAVIOURS[name].holds, replies))
        counts[f"base:{name}"] = sum(map(BEHAVIOURS[name].holds, base))
        print(f"{name}: holds on {counts[name]}/{len(questions)} held-out questions (base: "
              f"{counts[f'base:{name}']}); e.g. {questions[0]!r} -> {replies[0]!r}", flush=True)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated adapter names (default: all)")
    parser.add_argument("--regenerate", action="store_true", help="regenerate train_data.jsonl")
    parser.add_argument("--eval-only", action="store_true")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BEHAVIOURS)
    model_dir = ensure_default_model()
    if not args.eval_only:
        if args.regenerate or not DATA.exists():
            rows = make_data(LLMEngine(EngineConfig(model=model_dir, dtype="float32")))
        else:
            rows = [json.loads(line) for line in DATA.read_text().splitlines()]
        print(f"{len(rows)} training examples", flush=True)
        for name in names:
            train(name, model_dir, rows)
    evaluate(model_dir, names)


if __name__ == "__main__":
    main()
