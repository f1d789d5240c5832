"""The plan of a run: which examples each micro-batch holds, how the learning rate
moves over the steps, and the fixed pairs of a held-out evaluation.

Everything here is decided before the first step, from the examples' lengths and
labels and the options, so a resumed run replays the same batches.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from pipeline.encode import Encoded
from pipeline.train_errors import TrainError
from pipeline.train_options import TrainOptions


@dataclass(frozen=True)
class Plan:
    """Every micro-batch of the run, as example indices, for this rank."""

    batches: list[list[int]]
    steps: int  # optimizer steps

    def pairs(self) -> set[tuple[int, int]]:
        """(prompt index, completion index) of every matched and mismatched pair."""
        out = set()
        for batch in self.batches:
            for k, i in enumerate(batch):
                out.add((i, i))
                out.add((i, batch[k - 1]))
        return out


def plan_batches(
    lengths: Sequence[int],
    desirable: Sequence[bool],
    options: TrainOptions,
    rank: int = 0,
    world: int = 1,
) -> Plan:
    """Shuffle each epoch (seeded) into batches of batch_size per rank.

    With length bucketing, each run of 50 batches is sorted by length before it is cut,
    so a batch pads to little, and the batches are then shuffled. Each class is sorted
    on its own and every batch takes its share of both: length often follows the label
    (curt answers get disliked), and sorting the two together would fill batches with
    one class. The mismatched pairs of a batch are its own completions shifted by one,
    as in TRL.
    """
    n = len(lengths)
    per_step = options.batch_size * world
    if n < per_step:
        raise TrainError(
            f"{n} training records are fewer than one step's batch ({options.batch_size} x "
            f"{world} ranks); lower batch_size or collect more feedback"
        )
    rng = random.Random(options.seed)
    epochs = options.epochs
    if options.max_steps is not None:
        # max_steps overrides epochs, as in transformers: as many passes as it needs.
        epochs = math.ceil(options.max_steps * options.grad_accum / (n // per_step))
    global_batches: list[list[int]] = []
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        order = order[: n - n % per_step]
        if options.length_bucketing:
            chunk = per_step * 50
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
                    # The liked share of this batch; the disliked fill it to exactly
                    # per_step, so every example of the part is used once.
                    lo, hi = b * len(liked) // k, (b + 1) * len(liked) // k
                    rest = per_step - (hi - lo)
                    batch = liked[lo:hi] + disliked[taken : taken + rest]
                    taken += rest
                    # Shuffled so that the shift-by-one pairs mix the classes.
                    rng.shuffle(batch)
                    epoch.append(batch)
            rng.shuffle(epoch)
        else:
            epoch = [order[k : k + per_step] for k in range(0, len(order), per_step)]
        global_batches += epoch
    steps = len(global_batches) // options.grad_accum
    if options.max_steps is not None:
        steps = min(steps, options.max_steps)
    if steps < 1:
        raise TrainError(
            f"{n} records make {len(global_batches)} batches, fewer than grad_accum="
            f"{options.grad_accum}: lower grad_accum or batch_size"
        )
    global_batches = global_batches[: steps * options.grad_accum]
    # Each rank takes its slice of every global batch: same mismatched-pair structure.
    mine = [b[rank * options.batch_size : (rank + 1) * options.batch_size] for b in global_batches]
    return Plan(mine, steps)


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
