"""Summed completion log-probs of (prompt, completion) token sequences under a causal LM.

Two savings over scoring padded prompt+completion sequences, both exact up to float
rounding:

- Shared prompts. KTO scores each prompt with two completions (its own, and another
  example's for the KL estimate), and the reference scores both again. A prompt is run
  once, left-padded so that every prompt ends in the same column; its key/value cache
  is then reused by each completion, which only runs its own tokens.
- Only completion positions go through the LM head: the hidden states that predict a
  completion token are gathered first, then projected and normalised.

`collate` + `token_logps` score whole sequences the plain way; tests use them to check
the shared path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SequenceBatch:
    """Right-padded token sequences and where their completions are.

    Attributes:
        input_ids: (B, T) token ids, padded with pad_id.
        attention_mask: (B, T) 1 on real tokens.
        rows, cols: (N,) the positions whose hidden state predicts a completion token.
        targets: (N,) those completion tokens.
        lengths: (B,) completion token counts.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> SequenceBatch:
        return SequenceBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def collate(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> SequenceBatch:
    """Pack (prompt_ids, completion_ids) pairs into a right-padded batch."""
    width = max(len(p) + len(c) for p, c in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    rows, cols, targets, lengths = [], [], [], []
    for i, (p, c) in enumerate(pairs):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor([*p, *c], dtype=torch.long)
        attention_mask[i, :n] = 1
        start = len(p)
        rows.extend([i] * len(c))
        # The hidden state at position t predicts token t + 1.
        cols.extend(range(start - 1, start - 1 + len(c)))
        targets.extend(c)
        lengths.append(len(c))
    return SequenceBatch(
        input_ids,
        attention_mask,
        torch.tensor(rows, dtype=torch.long),
        torch.tensor(cols, dtype=torch.long),
        torch.tensor(targets, dtype=torch.long),
        torch.tensor(lengths, dtype=torch.long),
    )


def _text_config(causal_lm: torch.nn.Module) -> Any:
    config = causal_lm.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_logps(
    causal_lm: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Log-probs of `targets` (N,) from the hidden states (N, H) that predict them,
    through the model's LM head and its logit scaling or soft-capping, if any."""
    logits = causal_lm.get_output_embeddings()(hidden)
    config = _text_config(causal_lm)
    scale = getattr(config, "logit_scale", None) or getattr(config, "output_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None):
        scale = 1 / config.logits_scaling
    if scale not in (None, 1.0):
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    logps = F.log_softmax(logits.float(), dim=-1)
    return logps.gather(1, targets.unsqueeze(1)).squeeze(1)


def token_logps(causal_lm: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Log-prob of every completion token of a batch of whole sequences.

    Args:
        causal_lm: a transformers causal LM (LoRA layers may be injected in it).
        batch: the sequences.
    Returns:
        (N,) float32 log-probs, aligned with batch.targets; with gradient if enabled.
    """
    hidden = causal_lm.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state
    return head_logps(causal_lm, hidden[batch.rows, batch.cols], batch.targets)


@dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts: every prompt ends in the last column.

    Attributes:
        input_ids, attention_mask, position_ids: (B, P).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    def to(self, device: torch.device) -> PromptBatch:
        return PromptBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device)
        )


@dataclass(frozen=True)
class Continuations:
    """Completions, each following one prompt of a PromptBatch.

    The first completion token is predicted by its prompt's last hidden state; the rest
    by the hidden states of the completion's own tokens, so the last token is never fed.

    Attributes:
        prompt_rows: (K,) which prompt each completion follows.
        first_targets: (K,) first completion tokens.
        input_ids: (K, W) completion tokens but the last, right-padded (W may be 0).
        attention_mask: (K, P + W) the prompt's mask, then the completion's.
        position_ids: (K, W) positions after the prompt's.
        rows, cols, targets: (N,) the later tokens and the hidden states predicting them.
        last: (K,) where each completion's last token is in the first-then-later order
            (first tokens 0..K-1, then the N later ones).
    """

    prompt_rows: torch.Tensor
    first_targets: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    last: torch.Tensor

    @property
    def size(self) -> int:
        return self.prompt_rows.shape[0]

    def to(self, device: torch.device) -> Continuations:
        return Continuations(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> PromptBatch:
    """Left-pad prompts into one batch."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    position_ids = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, width - len(p) :] = 1
        position_ids[i, width - len(p) :] = torch.arange(len(p))
    return PromptBatch(input_ids, attention_mask, position_ids)


def collate_continuations(
    prompts: PromptBatch,
    prompt_rows: Sequence[int],
    completions: Sequence[Sequence[int]],
    pad_id: int,
) -> Continuations:
    """Right-pad completions that follow the given prompt rows."""
    width = max(len(c) for c in completions) - 1
    k = len(completions)
    input_ids = torch.full((k, width), pad_id, dtype=torch.long)
    own_mask = torch.zeros((k, width), dtype=torch.long)
    rows_t = torch.tensor(prompt_rows, dtype=torch.long)
    prompt_lengths = prompts.attention_mask.sum(1)[rows_t]
    position_ids = prompt_lengths.unsqueeze(1) + torch.arange(width).unsqueeze(0)
    rows, cols, targets, last = [], [], [], []
    for i, c in enumerate(completions):
        rest = len(c) - 1
        if rest:
            input_ids[i, :rest] = torch.tensor(c[:-1], dtype=torch.long)
            own_mask[i, :rest] = 1
            rows.extend([i] * rest)
            cols.extend(range(rest))
            targets.extend(c[1:])
        last.append(k + len(targets) - 1 if rest else i)
    return Continuations(
        prompt_rows=rows_t,
        first_targets=torch.tensor([c[0] for c in completions], dtype=torch.long),
        input_ids=input_ids,
        attention_mask=torch.cat([prompts.attention_mask[rows_t], own_mask], dim=1),
        position_ids=position_ids,
        rows=torch.tensor(rows, dtype=torch.long),
        cols=torch.tensor(cols, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        last=torch.tensor(last, dtype=torch.long),
    )


@dataclass
class PromptState:
    """A prompt pass's output: the last hidden state per prompt and the key/value cache."""

    last_hidden: torch.Tensor  # (B, H)
    cache: Any

    def detached(self) -> PromptState:
        return PromptState(self.last_hidden.detach(), _select(self.cache, None, detach=True))


def run_prompts(causal_lm: torch.nn.Module, prompts: PromptBatch) -> PromptState:
    """Run the prompts once; their cache serves every completion that follows."""
    out = causal_lm.base_model(
        input_ids=prompts.input_ids,
        attention_mask=prompts.attention_mask,
        position_ids=prompts.position_ids,
        use_cache=True,
    )
    cache = out.cache if _CACHE_ARG == "cache" else out.past_key_values
    return PromptState(out.last_hidden_state[:, -1], cache)


def run_prompts_with_completions(
    causal_lm: torch.nn.Module, prompts: PromptBatch, conts: Continuations
) -> tuple[PromptState, torch.Tensor]:
    """One forward over each prompt followed by its own completion (conts row i follows
    prompt i): fewer, larger matrix products than a prompt pass and a continuation pass.

    Returns:
        The prompt state (its cache cut back to the prompts, for other completions to
        follow) and the completions' summed log-probs (B,).
    """
    width = prompts.input_ids.shape[1]
    out = causal_lm.base_model(
        input_ids=torch.cat([prompts.input_ids, conts.input_ids], dim=1),
        attention_mask=conts.attention_mask,
        position_ids=torch.cat([prompts.position_ids, conts.position_ids], dim=1),
        use_cache=True,
    )
    hidden = out.last_hidden_state
    last = hidden[:, width - 1]
    n = conts.size
    logps = head_logps(
        causal_lm,
        torch.cat([last[conts.prompt_rows], hidden[conts.rows, width + conts.cols]]),
        torch.cat([conts.first_targets, conts.targets]),
    )
    summed = logps[:n].index_add(0, conts.rows, logps[n:])
    cache = out.cache if _CACHE_ARG == "cache" else out.past_key_values
    return PromptState(last, _select(cache, None, detach=False, length=width)), summed


def continuation_logps(
    causal_lm: torch.nn.Module, state: PromptState, conts: Continuations
) -> torch.Tensor:
    """Summed log-probs of each completion after its prompt: (K,).

    The prompt state's cache is not modified, so several sets of continuations can
    follow the same prompts.
    """
    return continuation_logps_and_last(causal_lm, state, conts)[0]


def continuation_logps_and_last(
    causal_lm: torch.nn.Module, state: PromptState, conts: Continuations
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each completion (K,), and the log-prob of its last token (K,):
    the end-of-turn token, whose probability falling is how a collapsing policy that
    no longer stops shows up."""
    if conts.input_ids.shape[1] == 0:
        first = head_logps(causal_lm, state.last_hidden[conts.prompt_rows], conts.first_targets)
        return first, first
    identity = conts.size == state.last_hidden.shape[0] and bool(
        (conts.prompt_rows == torch.arange(conts.size, device=conts.prompt_rows.device)).all()
    )
    cache = _select(state.cache, None if identity else conts.prompt_rows, detach=False)
    hidden = causal_lm.base_model(
        input_ids=conts.input_ids,
        attention_mask=conts.attention_mask,
        position_ids=conts.position_ids,
        use_cache=True,
        **{_CACHE_ARG: cache},
    ).last_hidden_state
    n = conts.size
    logps = head_logps(
        causal_lm,
        torch.cat([state.last_hidden[conts.prompt_rows], hidden[conts.rows, conts.cols]]),
        torch.cat([conts.first_targets, conts.targets]),
    )
    return logps[:n].index_add(0, conts.rows, logps[n:]), logps[conts.last]


def _cache_arg() -> str:
    # transformers 5 renamed the backbone's past_key_values argument and output to cache.
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


_CACHE_ARG = _cache_arg()


def _select(cache: Any, rows: torch.Tensor | None, detach: bool, length: int | None = None) -> Any:
    """A new cache holding the given batch rows (all if None) and the first `length`
    positions (all if None) of `cache`'s tensors: extending it never touches the
    original."""
    from transformers import DynamicCache

    data = []
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        if rows is not None:
            k, v = k[rows], v[rows]
        if length is not None:
            k, v = k[:, :, :length], v[:, :, :length]
        if detach:
            k, v = k.detach(), v.detach()
        data.append((k, v))
    return DynamicCache(ddp_cache_data=data)


def sequence_logps(token_lp: torch.Tensor, batch: SequenceBatch) -> torch.Tensor:
    """Sum per-token log-probs into one log-prob per sequence: (N,) -> (B,)."""
    out = torch.zeros(batch.size, dtype=token_lp.dtype, device=token_lp.device)
    return out.index_add(0, batch.rows, token_lp)
