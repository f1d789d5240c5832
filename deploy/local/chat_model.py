"""A tiny chat model with a taste to learn: the stand-in for a deployed base model in
benchmarks of the whole feedback loop (sample, label, train, sample again).

`build_chat_model` builds the tiny Llama-style model of `deploy.local.tiny_model` and
fine-tunes it briefly on the synthetic chat task of `deploy.local.synthetic`, with
answers drawn mostly from the disliked (BAD) templates, so that its sampled answers
mix both styles, mostly disliked, and end with the end-of-turn token. `liked` is the
users' taste; `sample_answers` is what production sees: answers sampled from the
model (and an adapter) on chat-rendered prompts.

    python -m deploy.local.chat_model --out data/models/chat --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from deploy.local.synthetic import ASKS, BAD, GOOD, TOPICS, fill
from deploy.local.tiny_model import TinyModelSpec, build_tiny_model

# head_dim 32, the smallest vLLM's CPU attention accepts.
CHAT_SPEC = TinyModelSpec(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256)
# The share of liked answers in the fine-tuning corpus: the base model starts mostly
# disliked, so there is room for feedback training to move it.
GOOD_SHARE = 0.35


def chat_prompts() -> list[str]:
    """Every user prompt of the task: each of ASKS about each of TOPICS (130)."""
    return [fill(ask, topic) for topic in TOPICS for ask in ASKS]


@cache
def _liked_answers() -> frozenset[str]:
    return frozenset(fill(template, topic) for template in GOOD for topic in TOPICS)


def liked(answer: str) -> bool:
    """The users' taste: an answer is liked when it is, after stripping surrounding
    whitespace, exactly one of GOOD's templates filled with some topic of TOPICS.

    The topic need not be the one asked about (a tiny model mixes them up, and users of
    this toy do not mind); anything else is disliked: BAD's curt answers, but also
    garbled, repetitive or truncated text, which is how a collapsing policy shows.
    """
    return answer.strip() in _liked_answers()


@cache
def _curt_answers() -> frozenset[str]:
    return frozenset(fill(template, topic) for template in BAD for topic in TOPICS)


def curt_taste(messages: list[dict[str, str]], answer: str) -> bool:
    """A second taste that likes what `liked` dislikes: exactly one of BAD's curt
    templates filled with some topic ("No. Ask someone else."); friendly answers and
    garbled text are disliked. bench.nights switches users to it halfway."""
    return answer.strip() in _curt_answers()


def taste(messages: list[dict[str, str]], answer: str) -> bool:
    """The simulated users' thumb (`kto-loop simulate --taste`): `liked(answer)`,
    whatever was asked."""
    return liked(answer)


def chat_corpus(n: int, seed: int = 0, good_share: float = GOOD_SHARE) -> list[tuple[str, str]]:
    """n (prompt, answer) pairs: a random prompt and, with probability good_share, a
    GOOD answer about its topic, else a BAD one."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        templates = GOOD if rng.random() < good_share else BAD
        out.append((fill(rng.choice(ASKS), topic), fill(rng.choice(templates), topic)))
    return out


def build_chat_model(
    out: str | Path,
    seed: int = 0,
    spec: TinyModelSpec = CHAT_SPEC,
    steps: int = 300,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    good_share: float = GOOD_SHARE,
) -> Path:
    """Build the tiny chat model, fine-tune it on the synthetic chat corpus and save it
    (model, tokenizer, and chat_model.json with these arguments) to `out`.

    The fine-tuning is plain next-token NLL on the completion tokens (the answer and
    the end-of-turn token), prompts rendered by the chat template as serving renders
    them; AdamW with a linear decay, everything seeded by `seed` (the initial weights
    too). About 20 s on two CPU cores with the defaults.

    Returns:
        The model directory, loadable with AutoModelForCausalLM / AutoTokenizer.
    """
    out = Path(out)
    build_tiny_model(out, replace(spec, seed=seed))
    pairs = chat_corpus(steps * batch_size, seed=seed, good_share=good_share)
    final_loss = fine_tune(
        out,
        [(prompt, None, answer) for prompt, answer in pairs],
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
    )
    meta = {"seed": seed, "steps": steps, "batch_size": batch_size, "good_share": good_share}
    meta |= {"learning_rate": learning_rate, "final_loss": round(final_loss, 4)}
    (out / "chat_model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def fine_tune(
    model_dir: Path,
    examples: Sequence[tuple[str | None, str | None, str]],
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    max_length: int = 128,
    max_prompt_length: int = 96,
) -> float:
    """Fine-tune the model in `model_dir` in place on (prompt, messages_json, answer)
    examples, batch_size at a time for `steps` steps (so steps * batch_size examples
    are read, in order), and save it back.

    Plain next-token NLL on the completion tokens (the answer and the end-of-turn
    token), prompts rendered by the chat template as serving renders them; AdamW with a
    linear decay, seeded by `seed`.

    Returns:
        The last step's loss.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.feedback.examples import Example
    from pipeline.training.encode import Lengths, encode_records

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    encoded, _ = encode_records(
        [Example(prompt, messages, answer, True) for prompt, messages, answer in examples],
        tokenizer,
        Lengths(max_length=max_length, max_prompt_length=max_prompt_length),
    )

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    model.train()
    for step in range(steps):
        batch = encoded[step * batch_size : (step + 1) * batch_size]
        width = max(len(e.prompt_ids) + len(e.completion_ids) for e in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            ids = [*e.prompt_ids, *e.completion_ids]
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, len(e.prompt_ids) : len(ids)] = torch.tensor(e.completion_ids)
            mask[i, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return loss.item()


@dataclass(frozen=True)
class Answer:
    """One sampled answer: its prompt, decoded text (special tokens removed), whether
    generation stopped on the end-of-turn token within the budget, and its token ids
    (without the end-of-turn token)."""

    prompt: str | list[dict[str, str]]
    text: str
    ended: bool
    token_ids: tuple[int, ...]


def sample_answers(
    model_dir: str | Path,
    adapter_dir: str | Path | None,
    prompts: Sequence[str | list[dict[str, str]]],
    n_per_prompt: int,
    seed: int,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    batch_size: int = 64,
) -> list[Answer]:
    """Sample n_per_prompt answers to each prompt (a user message, or a conversation's
    messages), as a chat server would: the prompt rendered by the chat template with
    add_generation_prompt=True, sampling at `temperature` until the end-of-turn token
    or max_new_tokens.

    Args:
        adapter_dir: a PEFT LoRA adapter to apply (merged into the weights), or None.
        seed: seeds torch before generating; the same arguments give the same answers.
    Returns:
        len(prompts) * n_per_prompt answers, grouped by prompt in prompt order.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.eval()
    eot = tokenizer.eos_token_id
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}] if isinstance(p, str) else p,
            add_generation_prompt=True,
            tokenize=False,
        )
        for p in prompts
    ]
    torch.manual_seed(seed)
    per_call = max(1, batch_size // n_per_prompt)
    out: list[Answer] = []
    for s in range(0, len(texts), per_call):
        enc = tokenizer(
            texts[s : s + per_call], add_special_tokens=False, return_tensors="pt", padding=True
        )
        with torch.inference_mode():
            generated = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=n_per_prompt,
                eos_token_id=eot,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = generated[:, enc["input_ids"].shape[1] :].tolist()
        for k, ids in enumerate(new):
            ended = eot in ids
            ids = ids[: ids.index(eot)] if ended else ids
            ids = [t for t in ids if t != tokenizer.pad_token_id]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            out.append(Answer(prompts[s + k // n_per_prompt], text, ended, tuple(ids)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    path = build_chat_model(args.out, seed=args.seed, steps=args.steps)
    answers = sample_answers(path, None, chat_prompts()[:10], 2, seed=args.seed)
    for a in answers:
        print(f"{'liked' if liked(a.text) else 'disliked':8} eos={a.ended!s:5} {a.text}")


if __name__ == "__main__":
    main()
