"""The plan of a run: which examples each micro-batch holds, which completion each
example's mismatched pair takes, how the learning rate moves over the steps, and the
fixed pairs of a held-out evaluation.

Everything here is decided before the first step, from the examples' lengths, labels
and prompts and the options, so a resumed run replays the same batches.

Batch orders (`batching`):
- "trl": what TRL's KTOTrainer (1.16) does: no shuffling at all (its KL pairs require
  its "sequential" sampler); every epoch cuts the examples, in the order given, into the
  same batches, the last one short. The order of the data file is the order of training.
- "shuffled": each epoch shuffled (Python's random, seeded), the remainder that does
  not fill a batch left out.
- "bucketed": as "shuffled", then each run of 50 batches sorted by length, each class
  on its own, so a batch pads to little; the batches are then shuffled.

Mismatched pairs (`mismatch`), whose log-ratio estimates the KL reference point:
- "trl": TRL's rule: before any shuffling, the examples in the order given are cut into
  chunks of batch_size and each takes the completion of the one before it in its chunk
  (the first the last's). The pair is fixed for the run and usually outside the batch.
- "batch_shift": each example takes the completion of the one before it in its batch.
- "other_prompt": as batch_shift, with the batch arranged so that neighbours differ in
  prompt; an example whose batch holds no other prompt takes a completion of another
  prompt drawn from the whole set. A pair that shares its prompt is not mismatched: its
  log-ratio is the policy's gain on its own kind of answer, and a reference point made
  of such pairs cancels the rewards it should be compared against.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace

from pipeline.training.encode import Encoded
from pipeline.training.errors import TrainError
from pipeline.training.options import TrainOptions

# Bucketed batching sorts this many batches at a time by length.
BUCKET_BATCHES = 50


@dataclass(frozen=True)
class Plan:
    """Every micro-batch of the run, as example indices, for this rank, and for each
    example of a batch the index of the completion its mismatched pair takes."""

    batches: list[list[int]]
    partners: list[list[int]]
    steps: int  # optimizer steps

    def pairs(self) -> set[tuple[int, int]]:
        """(prompt index, completion index) of every matched and mismatched pair."""
        out = set()
        for batch, partners in zip(self.batches, self.partners, strict=True):
            for i, j in zip(batch, partners, strict=True):
                out.add((i, i))
                out.add((i, j))
        return out


def plan_batches(
    lengths: Sequence[int],
    desirable: Sequence[bool],
    options: TrainOptions,
    rank: int = 0,
    world: int = 1,
    prompts: Sequence[Hashable] | None = None,
) -> Plan:
    """The batches of every epoch and their mismatched pairs (see the module docstring).

    Args:
        lengths: tokens of each example (prompt + completion).
        desirable: each example's label.
        prompts: a key per example telling prompts apart (default: every example its
            own prompt); used by mismatch = "other_prompt".
    """
    n = len(lengths)
    prompts = list(range(n)) if prompts is None else list(prompts)
    per_step = options.batch_size * world
    if n < per_step:
        raise TrainError(
            f"{n} training records are fewer than one step's batch ({options.batch_size} x "
            f"{world} ranks); lower batch_size or collect more feedback"
        )
    epochs = options.epochs
    full = n // per_step
    if options.max_steps is not None:
        # max_steps overrides epochs, as in transformers: as many passes as it needs.
        epochs = math.ceil(options.max_steps * options.grad_accum / full)
    global_batches = _epochs(lengths, desirable, options, per_step, epochs, world)
    steps = len(global_batches) // options.grad_accum
    if options.max_steps is not None:
        steps = min(steps, options.max_steps)
    if steps < 1:
        raise TrainError(
            f"{n} records make {len(global_batches)} batches, fewer than grad_accum="
            f"{options.grad_accum}: lower grad_accum or batch_size"
        )
    global_batches = global_batches[: steps * options.grad_accum]
    partners = _partners(global_batches, prompts, options)
    # Each rank takes its slice of every global batch: same mismatched-pair structure.
    size = options.batch_size

    def mine(batches: list[list[int]]) -> list[list[int]]:
        return [b[rank * size : (rank + 1) * size] for b in batches]

    return Plan(mine(global_batches), mine(partners), steps)


def _epochs(
    lengths: Sequence[int],
    desirable: Sequence[bool],
    options: TrainOptions,
    per_step: int,
    epochs: int,
    world: int,
) -> list[list[int]]:
    """The global batches of every epoch, in the order the steps take them."""
    n = len(lengths)
    out: list[list[int]] = []
    if options.batching == "trl":
        # A short last batch cannot be split evenly across ranks: dropped there.
        keep = n if world == 1 else n - n % per_step
        epoch = [list(range(k, min(keep, k + per_step))) for k in range(0, keep, per_step)]
        return [list(b) for _ in range(epochs) for b in epoch]
    rng = random.Random(options.seed)
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        order = order[: n - n % per_step]
        if options.batching == "bucketed":
            out += _bucketed(order, lengths, desirable, per_step, rng)
        else:
            out += [order[k : k + per_step] for k in range(0, len(order), per_step)]
    return out


def _bucketed(
    order: list[int],
    lengths: Sequence[int],
    desirable: Sequence[bool],
    per_step: int,
    rng: random.Random,
) -> list[list[int]]:
    """One epoch's batches, each run of BUCKET_BATCHES sorted by length before it is
    cut. Each class is sorted on its own and every batch takes its share of both:
    length often follows the label (curt answers get disliked), and sorting the two
    together would fill batches with one class."""
    chunk = per_step * BUCKET_BATCHES
    epoch: list[list[int]] = []
    for s in range(0, len(order), chunk):
        part = order[s : s + chunk]
        k = len(part) // per_step
        liked, disliked = (
            sorted((i for i in part if desirable[i] == label), key=lambda i: lengths[i])
            for label in (True, False)
        )
        taken = 0
        for b in range(k):
            # The liked share of this batch; the disliked fill it to exactly per_step,
            # so every example of the part is used once.
            lo, hi = b * len(liked) // k, (b + 1) * len(liked) // k
            rest = per_step - (hi - lo)
            batch = liked[lo:hi] + disliked[taken : taken + rest]
            taken += rest
            # Shuffled so that the shift-by-one pairs mix the classes.
            rng.shuffle(batch)
            epoch.append(batch)
    rng.shuffle(epoch)
    return epoch


def _partners(
    batches: list[list[int]], prompts: list[Hashable], options: TrainOptions
) -> list[list[int]]:
    """The completion each example's mismatched pair takes, batch by batch. With
    "other_prompt" the batches themselves are reordered in place."""
    if options.mismatch == "trl":
        n, size = len(prompts), options.batch_size
        fixed = [0] * n
        for s in range(0, n, size):
            chunk = list(range(s, min(n, s + size)))
            for k, i in enumerate(chunk):
                fixed[i] = chunk[k - 1]
        return [[fixed[i] for i in batch] for batch in batches]
    if options.mismatch == "other_prompt":
        rng = random.Random(f"{options.seed}-mismatch")
        out = []
        for b, batch in enumerate(batches):
            batches[b] = batch = _spread_prompts(batch, prompts)
            out.append([_other_prompt(i, batch[k - 1], prompts, rng) for k, i in enumerate(batch)])
        return out
    return [[batch[k - 1] for k in range(len(batch))] for batch in batches]


def _spread_prompts(batch: list[int], prompts: list[Hashable]) -> list[int]:
    """The batch reordered so that, read as a ring, neighbours differ in prompt where
    the batch allows it: the examples grouped by prompt, largest group first, dealt
    into the even positions, then the odd ones."""
    groups: dict[Hashable, list[int]] = {}
    for i in batch:
        groups.setdefault(prompts[i], []).append(i)
    if len(groups) == len(batch):
        return batch
    ordered = [i for g in sorted(groups.values(), key=len, reverse=True) for i in g]
    slots = list(range(0, len(batch), 2)) + list(range(1, len(batch), 2))
    out = [0] * len(batch)
    for slot, i in zip(slots, ordered, strict=True):
        out[slot] = i
    return out


def _other_prompt(i: int, j: int, prompts: list[Hashable], rng: random.Random) -> int:
    """j if its prompt differs from i's, else an example of another prompt drawn from
    the whole set (i itself when every example shares one prompt)."""
    if prompts[j] != prompts[i]:
        return j
    n = len(prompts)
    for _ in range(64):
        k = rng.randrange(n)
        if prompts[k] != prompts[i]:
            return k
    others = [k for k in range(n) if prompts[k] != prompts[i]]
    return rng.choice(others) if others else j


def eval_pairs(n: int, batch_size: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Matched pairs of a held-out set and mismatched ones within fixed batches."""
    matched = [(i, i) for i in range(n)]
    mismatched = []
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        if len(idx) > 1:
            mismatched += [(i, idx[k - 1]) for k, i in enumerate(idx)]
    return matched, mismatched


def lr_factor(options: TrainOptions, steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier at each optimizer step: a linear warmup over
    warmup_ratio of the steps, then cosine, linear or constant."""
    warmup = int(options.warmup_ratio * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if options.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        if options.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def normalised_weights(examples: list[Encoded]) -> list[Encoded]:
    """The examples with weights scaled to average 1, so that the learning rate means
    the same whether or not examples carry vote weights."""
    mean = sum(e.weight for e in examples) / len(examples)
    if mean == 1.0:
        return examples
    return [replace(e, weight=e.weight / mean) for e in examples]
