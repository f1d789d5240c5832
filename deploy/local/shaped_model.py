"""Random-initialised models of realistic shape, built locally: what the benchmarks
train and serve when the speed or memory of a real base model is the question and
nothing can be downloaded. Only the shape is real; the weights are noise.

    python -m deploy.local.shaped_model --shape qwen2-0.5b --out data/models/qwen2-0.5b

Shapes:
- tiny: Llama-style, hidden 256, 4 layers (the trainer benchmark's small model);
- 100m: Llama-style, hidden 768, 12 layers, 12 heads, MLP 2560: about 100M parameters;
- qwen2-0.5b: Qwen2-0.5B's configuration (hidden 896, 24 layers, 14 query and 2
  key/value heads, MLP 4864, 151,936-entry tied embeddings): 494M parameters.

The tokenizer is the tiny model's (a 512-token byte-level BPE with the chat template);
a larger embedding table than the tokenizer needs is what real bases have too.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from deploy.local.tiny_model import build_tokenizer, default_corpus, save_random_model


@dataclass(frozen=True)
class Shape:
    family: str  # "llama" or "qwen2"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int | None = None  # None: the tokenizer's
    tie_embeddings: bool = False
    max_position_embeddings: int = 2048


SHAPES = {
    "tiny": Shape("llama", 256, 4, 4, 4, 688),
    "100m": Shape("llama", 768, 12, 12, 12, 2560),
    "qwen2-0.5b": Shape("qwen2", 896, 24, 14, 2, 4864, 151_936, tie_embeddings=True),
}
TOKENIZER_VOCAB = 512


def build_shaped_model(out: str | Path, shape: str | Shape, seed: int = 0) -> Path:
    """Write a seeded random model of `shape` (a name in SHAPES, or a Shape) and the
    tiny tokenizer to `out`; it loads with AutoModelForCausalLM and serves in vLLM."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    spec = SHAPES[shape] if isinstance(shape, str) else shape
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(default_corpus(), TOKENIZER_VOCAB)
    config_class, model_class = (
        (Qwen2Config, Qwen2ForCausalLM)
        if spec.family == "qwen2"
        else (LlamaConfig, LlamaForCausalLM)
    )
    config = config_class(
        vocab_size=spec.vocab_size or len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=spec.tie_embeddings,
    )
    model = save_random_model(model_class, config, tokenizer, out, seed)
    params = sum(p.numel() for p in model.parameters())
    (out / "shaped_model.json").write_text(
        json.dumps(asdict(spec) | {"parameters": params, "seed": seed}, indent=2) + "\n"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_shaped_model(args.out, args.shape, args.seed))


if __name__ == "__main__":
    main()
