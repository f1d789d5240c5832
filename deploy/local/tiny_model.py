"""Build a tiny Llama-style chat model locally: the stand-in for a real base model in
tests, benchmarks and the demo, since nothing can be downloaded from a model hub here.

The tokenizer is a byte-level BPE trained on the given corpus with `tokenizers`, and
carries a chat template. Its generation prompt ends in a newline, never a space: with
byte-level BPE a trailing space belongs to the next word's token, so a template that
ends in one makes the trained and the served token sequences differ.

    python -m deploy.local.tiny_model --out data/models/tiny
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PAD = "<|pad|>"
BOS = "<|bos|>"
END = "<|end|>"  # ends every turn; the serving engine stops on it
ROLES = ("system", "user", "assistant")

# Each turn is "<|role|>\n{content}<|end|>\n"; the generation prompt is "<|assistant|>\n".
CHAT_TEMPLATE = (
    "{{ '<|bos|>' }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny model. head_dim = hidden / heads must be >= 32: vLLM's CPU
    attention kernels reject smaller heads."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 512
    max_position_embeddings: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.hidden_size // self.num_heads < 32:
            raise ValueError(
                f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a whole "
                "head_dim of at least 32 (vLLM's CPU attention rejects smaller heads)"
            )


def default_corpus() -> list[str]:
    """A few hundred lines of chat-like English, enough to train a small vocabulary."""
    from deploy.local.synthetic import corpus_lines

    return corpus_lines()


def build_tokenizer(corpus: Iterable[str], vocab_size: int):
    """Train a byte-level BPE tokenizer with the chat special tokens and template.

    Returns:
        A transformers PreTrainedTokenizerFast with pad, bos and eos (= end of turn) set.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, END, *(f"<|{role}|>" for role in ROLES)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=END
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    out: str | Path,
    spec: TinyModelSpec | None = None,
    corpus: Iterable[str] | None = None,
    chat_template: bool = True,
) -> Path:
    """Write a randomly initialised (seeded) Llama-style model and its tokenizer to `out`.

    The directory loads with AutoModelForCausalLM / AutoTokenizer and serves in vLLM.
    Args:
        chat_template: False writes a tokenizer without one (to test that path).
    Returns:
        The model directory.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or TinyModelSpec()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus if corpus is not None else default_corpus(), spec.vocab_size)
    if not chat_template:
        tokenizer.chat_template = None
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    save_random_model(LlamaForCausalLM, config, tokenizer, out, spec.seed)
    (out / "tiny_model.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out


def save_random_model(model_class: Any, config: Any, tokenizer: Any, out: Path, seed: int) -> Any:
    """Build `model_class(config)` with seeded random weights, give it a generation
    config with the tokenizer's special tokens, and save both to `out`; returns the
    model."""
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--hidden", type=int, default=TinyModelSpec.hidden_size)
    parser.add_argument("--layers", type=int, default=TinyModelSpec.num_layers)
    parser.add_argument("--heads", type=int, default=TinyModelSpec.num_heads)
    parser.add_argument("--intermediate", type=int, default=TinyModelSpec.intermediate_size)
    parser.add_argument("--vocab", type=int, default=TinyModelSpec.vocab_size)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    spec = TinyModelSpec(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        seed=args.seed,
    )
    print(build_tiny_model(args.out, spec))


if __name__ == "__main__":
    main()
