"""Train a LoRA adapter with the KTO loss on a local causal LM.

One explicit loop. Setup: tokenize the records as serving renders them, load the base
model, wrap it with LoRA (fresh or warm-started from the served adapter), plan every
batch of the run up front, and score the reference once: the reference is frozen, so
the log-probs of every matched and mismatched pair the plan will use are computed
before the first step, in length-sorted batches under no_grad. Each step then needs
one policy forward with gradient on the matched pairs and one without on the
mismatched pairs; the reference is the same weights with the adapter disabled (no
second copy), or a previous adapter for continual rounds.

The run writes, under its output directory: metrics.jsonl (live), checkpoint/ (resume
point), and at the end adapter_model.safetensors + adapter_config.json (a PEFT adapter
that vLLM loads), plots/*.png and manifest.json, which is written last: a directory
with a manifest holds a complete adapter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from pipeline.balance import Balance
from pipeline.encode import Encoded, encode_records, end_of_turn_id
from pipeline.evaluate import HeldoutMetrics, eos_logratio, heldout_metrics
from pipeline.fingerprint import model_fingerprint
from pipeline.kto import kto_loss, mismatched_kl
from pipeline.logps import (
    collate_continuations,
    collate_prompts,
    continuation_logps,
    continuation_logps_and_last,
    run_prompts,
    run_prompts_with_completions,
)
from pipeline.snapshot import RepeatPolicy, Snapshot
from pipeline.train_options import SELECTIONS, LoraOptions, TrainOptions

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# Fewer mismatched pairs than this per step make z_ref a noisy estimate.
MIN_KL_PAIRS = 4
# Held-out prompts whose sampled answers are checked for ending their turn, and the
# answers sampled per prompt.
END_CHECK_PROMPTS = 32
END_CHECK_SAMPLES = 2
# Sequences per no-grad forward when scoring the reference up front.
REFERENCE_BATCH = 16


class TrainError(RuntimeError):
    """The run cannot start or cannot go on; the message says why and what to do."""


class CheckpointMismatch(TrainError):
    """The checkpoint to resume belongs to a run with other data, model or options."""


class DivergedError(TrainError):
    """The loss or the gradients became NaN or infinite."""


class GeneralAbilityError(TrainError):
    """The general held-out NLL rose past the configured bound."""


Record = tuple[str | None, str | None, str, bool]  # prompt, messages_json, completion, desirable


@dataclass(frozen=True)
class TrainInputs:
    """What to train on and where the result goes."""

    base_model: Path
    train: Sequence[Record]
    out_dir: Path
    heldout: Sequence[Record] = ()
    general: Sequence[Record] = ()
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    balance_explanation: str = ""
    snapshot_id: str | None = None
    init_adapter: Path | None = None
    reference_adapter: Path | None = None
    chat_template: str | None = None
    resume: bool = False
    progress: bool = True
    plots: bool = True
    extra_manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_snapshot(
        cls,
        snap: Snapshot,
        balance: Balance,
        base_model: Path,
        out_dir: Path,
        repeats: RepeatPolicy = "keep",
        **more: Any,
    ) -> TrainInputs:
        """Train on the snapshot's train split, evaluate on its held-out split, with the
        class weights chosen for it (from `snap.class_counts("train", repeats)`), the
        votes of repeated answers counted as `repeats` says; `more` sets the other
        fields."""
        return cls(
            base_model=base_model,
            train=snap.records("train", repeats),
            heldout=snap.records("heldout", repeats),
            out_dir=out_dir,
            desirable_weight=balance.lambda_desirable,
            undesirable_weight=balance.lambda_undesirable,
            balance_explanation=balance.explanation,
            snapshot_id=snap.id,
            **more,
        )


@dataclass(frozen=True)
class TrainResult:
    """The outcome: where the adapter is (None when the run stopped early to resume
    later) and the manifest written beside it."""

    adapter_dir: Path | None
    manifest: dict[str, Any]


# ---------------------------------------------------------------- setup helpers


def resolve_device(options: TrainOptions) -> torch.device:
    if options.device != "auto":
        return torch.device(options.device)
    if torch.cuda.is_available():
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", rank)
    return torch.device("cpu")


def autocast_dtype(options: TrainOptions, device: torch.device) -> torch.dtype | None:
    if options.precision == "fp32":
        return None
    if options.precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def load_tokenizer(base_model: Path, chat_template: str | None = None) -> Any:
    """The base model's tokenizer, with a pad token and, if given, a chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise TrainError(f"base model directory {path} does not exist; pass --base-model DIR")
    if not (path / "config.json").is_file():
        raise TrainError(
            f"{path} holds no config.json: point --base-model at a transformers model "
            "directory (the one you serve with vLLM)"
        )


def _load_model(inputs: TrainInputs, lora: LoraOptions, device: torch.device, dtype: Any) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(inputs.base_model, dtype=dtype)
    base.config.use_cache = False
    if inputs.init_adapter is not None:
        model = PeftModel.from_pretrained(base, inputs.init_adapter, is_trainable=True)
    else:
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(base, config)
        except ValueError as exc:
            raise TrainError(
                f"cannot put LoRA on {list(lora.target_modules)}: {exc}. Set [lora] "
                "target_modules to linear layer names of this model"
            ) from None
    if inputs.reference_adapter is not None:
        model.load_adapter(inputs.reference_adapter, adapter_name="reference", is_trainable=False)
        model.set_adapter("default")
    return model.to(device)


@contextlib.contextmanager
def _reference(model: Any) -> Iterator[None]:
    """Run the reference: the previous adapter if one was loaded, else no adapter."""
    if "reference" in model.peft_config:
        model.set_adapter("reference")
        try:
            yield
        finally:
            model.set_adapter("default")
    else:
        with model.disable_adapter():
            yield


# ---------------------------------------------------------------- the batch plan


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
                classes = [
                    sorted((i for i in part if desirable[i] == label), key=lambda i: lengths[i])
                    for label in (True, False)
                ]
                for b in range(k):
                    batch = []
                    for members in classes:
                        lo, hi = b * len(members) // k, (b + 1) * len(members) // k
                        batch += members[lo:hi]
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


# ---------------------------------------------------------------- scoring


def score_pairs(
    model: Any,
    examples: Sequence[Encoded],
    pairs: Sequence[tuple[int, int]],
    pad_id: int,
    device: torch.device,
    autocast: torch.dtype | None,
    progress: str | None = None,
    with_last: bool = False,
) -> dict[tuple[int, int], Any]:
    """Summed completion log-probs of (prompt index, completion index) pairs, without
    gradient: each prompt runs once, in batches of prompts of similar length, and all
    its completions follow it. `progress` names a progress bar to show. With
    `with_last`, each value is (summed log-prob, last token's log-prob)."""
    by_prompt: dict[int, list[int]] = {}
    for i, j in pairs:
        by_prompt.setdefault(i, []).append(j)
    prompts = sorted(by_prompt, key=lambda i: len(examples[i].prompt_ids))
    out: dict[tuple[int, int], float] = {}
    bar = _progress(len(pairs), 0, progress is not None, progress or "", "pair")
    for s in range(0, len(prompts), REFERENCE_BATCH):
        chunk = prompts[s : s + REFERENCE_BATCH]
        batch = collate_prompts([examples[i].prompt_ids for i in chunk], pad_id)
        rows, completions, keys = [], [], []
        for row, i in enumerate(chunk):
            for j in by_prompt[i]:
                rows.append(row)
                completions.append(examples[j].completion_ids)
                keys.append((i, j))
        conts = collate_continuations(batch, rows, completions, pad_id)
        with torch.inference_mode(), _autocast(device, autocast):
            state = run_prompts(model, batch.to(device))
            sums, last = continuation_logps_and_last(model, state, conts.to(device))
        values = zip(sums.tolist(), last.tolist(), strict=True) if with_last else sums.tolist()
        out.update(zip(keys, values, strict=True))
        bar.update(len(keys))
    bar.close()
    return out


@contextlib.contextmanager
def _autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast(device.type, dtype=dtype):
            yield


def eval_pairs(n: int, batch_size: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Matched pairs of a held-out set and mismatched ones within fixed batches."""
    matched = [(i, i) for i in range(n)]
    mismatched = []
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        if len(idx) > 1:
            mismatched += [(i, idx[k - 1]) for k, i in enumerate(idx)]
    return matched, mismatched


def _sampled_end_rate(
    model: Any,
    prompts: Sequence[tuple[int, ...]],
    max_new_tokens: int,
    eot: int,
    pad_id: int,
    device: torch.device,
    seed: int,
) -> float:
    """Share of answers sampled (temperature 1) for the prompts that end with the
    end-of-turn token within max_new_tokens. Seeded apart from the training RNG."""
    batch = collate_prompts(prompts, pad_id)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=END_CHECK_SAMPLES,
            eos_token_id=eot,
            pad_token_id=pad_id,
            use_cache=True,
        )
    new = out[:, batch.input_ids.shape[1] :]
    return (new == eot).any(dim=1).float().mean().item()


def _mean_nll(
    model: Any, examples: Sequence[Encoded], pad_id: int, device: torch.device, autocast: Any
) -> float:
    """Mean per-token negative log-likelihood of the completions."""
    scores = score_pairs(
        model, examples, [(i, i) for i in range(len(examples))], pad_id, device, autocast
    )
    tokens = sum(len(e.completion_ids) for e in examples)
    return -sum(scores.values()) / tokens


# ---------------------------------------------------------------- the run


def train(
    inputs: TrainInputs, options: TrainOptions, lora: LoraOptions | None = None
) -> TrainResult:
    """Train, write the adapter and its manifest, and return them.

    Raises:
        TrainError: bad input (model dir, data, lengths), found before anything is
            written; DivergedError, GeneralAbilityError: the run failed, no adapter is
            written (the metrics and last checkpoint stay for inspection).
    """
    lora = lora or LoraOptions()
    started = time.monotonic()
    _validate(options)
    check_model_dir(inputs.base_model)
    rank, world = _dist()
    _seed_everything(options.seed)
    device = resolve_device(options)
    autocast = autocast_dtype(options, device)

    tokenizer = load_tokenizer(inputs.base_model, inputs.chat_template)
    if not inputs.train:
        raise TrainError("no training records: the snapshot or data file is empty")
    lengths = options.lengths()
    train_ex, train_report = encode_records(
        list(inputs.train), tokenizer, lengths, options.prompt_format
    )
    heldout_ex = (
        encode_records(list(inputs.heldout), tokenizer, lengths, options.prompt_format)[0]
        if inputs.heldout
        else []
    )
    general_ex = (
        encode_records(list(inputs.general), tokenizer, lengths, options.prompt_format)[0]
        if inputs.general
        else []
    )
    train_ex = _normalised_weights(train_ex)
    pad_id = tokenizer.pad_token_id
    n_d = sum(e.desirable for e in train_ex)
    counts = {"train_desirable": n_d, "train_undesirable": len(train_ex) - n_d}
    counts["heldout_desirable"] = sum(e.desirable for e in heldout_ex)
    counts["heldout_undesirable"] = len(heldout_ex) - counts["heldout_desirable"]

    plan = plan_batches(
        [len(e.prompt_ids) + len(e.completion_ids) for e in train_ex],
        [e.desirable for e in train_ex],
        options,
        rank,
        world,
    )
    out_dir = inputs.out_dir
    base_fingerprint = model_fingerprint(inputs.base_model)
    run_id = _run_fingerprint(base_fingerprint, options, lora, train_ex)
    if rank == 0:
        _prepare_out_dir(out_dir, inputs.resume)

    model = _load_model(inputs, lora, device, dtype=torch.bfloat16 if autocast else torch.float32)
    trainable = [p for p in model.parameters() if p.requires_grad]
    causal_lm = model.get_base_model()

    # The reference never changes: score every pair the run will use, once.
    with _reference(model):
        ref = score_pairs(
            causal_lm,
            train_ex,
            sorted(plan.pairs()),
            pad_id,
            device,
            autocast,
            "reference" if inputs.progress and rank == 0 else None,
        )
    ev_matched, ev_mismatched = eval_pairs(len(heldout_ex), options.batch_size)
    ev_pairs = ev_matched + ev_mismatched
    if heldout_ex:
        with _reference(model):
            ev_ref = score_pairs(
                causal_lm, heldout_ex, ev_pairs, pad_id, device, autocast, with_last=True
            )
    eot = end_of_turn_id(tokenizer)
    ends_turn = torch.tensor(
        [e.desirable and e.completion_ids[-1] == eot for e in heldout_ex], dtype=torch.bool
    )

    # The collapse KTO is known for shows when sampling, not in teacher-forced scores:
    # probability pushed off disliked answers goes to text that never ends its turn.
    # So a few answers to held-out prompts are sampled at each evaluation.
    check_prompts = list(dict.fromkeys(e.prompt_ids for e in heldout_ex))[:END_CHECK_PROMPTS]
    check_tokens = min(
        2 * max((len(e.completion_ids) for e in heldout_ex), default=1),
        options.max_length - max((len(p) for p in check_prompts), default=0),
    )

    def sampled_end_rate() -> float | None:
        if not check_prompts or check_tokens < 1:
            return None
        was_training = model.training
        model.eval()
        rate = _sampled_end_rate(
            model, check_prompts, check_tokens, eot, pad_id, device, options.seed
        )
        model.train(was_training)
        return rate

    def general_nll() -> float | None:
        return _mean_nll(causal_lm, general_ex, pad_id, device, autocast) if general_ex else None

    def evaluate() -> HeldoutMetrics | None:
        """Held-out metrics of the adapter as it is now (and the general NLL)."""
        if not heldout_ex:
            return None
        model.eval()
        pol = score_pairs(causal_lm, heldout_ex, ev_pairs, pad_id, device, autocast, with_last=True)
        general = general_nll()
        model.train()

        def t(d: dict, ps: list, k: int = 0) -> torch.Tensor:
            if not ps:
                return torch.zeros(1, dtype=torch.float64)
            return torch.tensor([d[p][k] for p in ps], dtype=torch.float64)

        metrics = heldout_metrics(
            t(pol, ev_matched),
            t(ev_ref, ev_matched),
            t(pol, ev_mismatched),
            t(ev_ref, ev_mismatched),
            torch.tensor([e.desirable for e in heldout_ex]),
            options.beta,
            inputs.desirable_weight,
            inputs.undesirable_weight,
        )
        eos = eos_logratio(t(pol, ev_matched, 1), t(ev_ref, ev_matched, 1), ends_turn)
        end_rate = sampled_end_rate() if options.eos_guard > 0 else None
        return replace(metrics, eos_logratio=eos, general_nll=general, sampled_end_rate=end_rate)

    def turned(metrics: HeldoutMetrics) -> str | None:
        """Why the run has turned for the worse, if it has."""
        if (
            options.eos_guard > 0
            and metrics.sampled_end_rate is not None
            and metrics.sampled_end_rate < reference_end_rate * (1 - options.eos_guard)
        ):
            return (
                f"{metrics.sampled_end_rate:.0%} of answers sampled for held-out prompts end "
                f"their turn, against {reference_end_rate:.0%} from the reference (eos_guard="
                f"{options.eos_guard:g}): the policy is losing the habit of stopping"
            )
        if (
            options.max_general_nll_increase is not None
            and general_before is not None
            and metrics.general_nll is not None
            and metrics.general_nll > general_before * (1 + options.max_general_nll_increase)
        ):
            return (
                f"the general held-out NLL rose from {general_before:.4f} to "
                f"{metrics.general_nll:.4f}, past max_general_nll_increase="
                f"{options.max_general_nll_increase:g}"
            )
        return None

    general_before = general_nll()
    reference_end_rate = 0.0
    if options.eos_guard > 0 and heldout_ex:
        with _reference(model):
            reference_end_rate = sampled_end_rate() or 0.0

    optimizer = torch.optim.AdamW(
        trainable, lr=options.learning_rate, weight_decay=options.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(options, plan.steps))

    state = _State()
    metrics_path = out_dir / METRICS
    if inputs.resume and (out_dir / CHECKPOINT / "state.pt").is_file():
        state = _load_checkpoint(out_dir, run_id, model, optimizer, scheduler, device)
        _truncate_metrics(metrics_path, state.step)
        log.info("resuming at step %d of %d", state.step, plan.steps)
    elif rank == 0:
        metrics_path.write_text("")
    resumed_from_step = state.step if state.step > 0 else None
    before = evaluate() if state.step == 0 else None
    if before is not None:
        # The starting point is a candidate too: a run that only gets worse on the
        # held-out set ends where it began.
        state.heldout_before = before.as_dict()
        state.best_loss, state.best_step = selection_score(before, options.selection), 0
        state.best_weights = _adapter_state(model)

    eval_every = options.eval_every or max(1, plan.steps // 10)
    checkpoint_every = options.checkpoint_every or eval_every
    stop_at = plan.steps
    if options.stop_after_steps is not None:
        stop_at = min(plan.steps, state.step + options.stop_after_steps)
    progress = _progress(plan.steps, state.step, inputs.progress and rank == 0)
    model.train()
    accum: list[dict[str, float]] = []
    micro = state.step * options.grad_accum
    while state.step < stop_at:
        batch_idx = plan.batches[micro]
        micro += 1
        step_stats = _micro_step(
            causal_lm, train_ex, batch_idx, ref, options, inputs, pad_id, device, autocast, world
        )
        accum.append(step_stats)
        if len(accum) < options.grad_accum:
            continue

        if world > 1:
            _all_reduce_grads(trainable, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, options.max_grad_norm).item()
        if not math.isfinite(grad_norm):
            raise DivergedError(
                _diverged_message("gradient norm", grad_norm, state.step + 1, options)
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        row = _aggregate(accum, state.step, scheduler.get_last_lr()[0], grad_norm)
        accum = []
        state.diagnostics.add(row)
        progress.update(1)
        progress.set_postfix(loss=f"{row['loss']:.4f}", kl=f"{row['kl']:.3f}")

        if state.step % eval_every == 0 or state.step == plan.steps:
            metrics = evaluate()
            reason = turned(metrics) if metrics is not None else None
            if metrics is not None:
                row.update(metrics.as_dict("heldout_"))
                score = selection_score(metrics, options.selection)
                if reason is None and (
                    state.best_loss is None
                    or options.selection == "final"
                    or score < state.best_loss - 1e-6
                ):
                    state.best_loss, state.best_step, state.stale = score, state.step, 0
                    state.best_weights = _adapter_state(model)
                else:
                    state.stale += 1
            if reason is not None:
                log.warning(
                    "stopping at step %d and keeping step %d: %s",
                    state.step,
                    state.best_step,
                    reason,
                )
                state.stopped_early, state.stop_reason = True, reason
        if rank == 0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if state.stopped_early:
            break
        if options.early_stopping_patience and state.stale >= options.early_stopping_patience:
            log.warning(
                "held-out KTO loss has not improved for %d evaluations; stopping at step %d "
                "and keeping step %d",
                state.stale,
                state.step,
                state.best_step,
            )
            state.stopped_early = True
            state.stop_reason = "held-out KTO loss stopped improving"
            break
        if state.step % checkpoint_every == 0 and rank == 0 and state.step < plan.steps:
            _save_checkpoint(out_dir, run_id, model, optimizer, scheduler, state)
    progress.close()

    if state.step < plan.steps and not state.stopped_early:
        # stop_after_steps: leave a resume point and no adapter.
        if rank == 0:
            _save_checkpoint(out_dir, run_id, model, optimizer, scheduler, state)
        return TrainResult(None, {"status": "paused", "step": state.step, "steps": plan.steps})

    if state.best_weights is not None:
        _load_adapter_state(model, state.best_weights)
    if world > 1:
        # Ranks that drifted apart would each evaluate a different adapter: say which.
        log.info("rank %d of %d: adapter checksum %s", rank, world, _checksum(model))
    after = evaluate()
    general_after = after.general_nll if after is not None else general_nll()
    warnings = state.diagnostics.warnings(options.batch_size * world)
    for w in warnings:
        log.warning(w)

    status, status_reason = run_status(state.best_step)
    if status_reason is not None:
        log.warning("%s: %s", status, status_reason)
    manifest = {
        "kind": "kto-loop.adapter",
        "status": status,
        "status_reason": status_reason,
        "base_model": str(inputs.base_model),
        "base_model_fingerprint": base_fingerprint,
        "snapshot_id": inputs.snapshot_id,
        "init_adapter": str(inputs.init_adapter) if inputs.init_adapter else None,
        "reference_adapter": str(inputs.reference_adapter) if inputs.reference_adapter else None,
        "counts": counts,
        "encoding": asdict(train_report),
        "lambdas": {
            "desirable": inputs.desirable_weight,
            "undesirable": inputs.undesirable_weight,
            "explanation": inputs.balance_explanation,
        },
        "beta": options.beta,
        "options": asdict(options),
        "lora": asdict(lora),
        "steps": state.step,
        "planned_steps": plan.steps,
        "resumed_from_step": resumed_from_step,
        "best_step": state.best_step,
        "stopped_early": state.stopped_early,
        "stop_reason": state.stop_reason,
        "world_size": world,
        "device": str(device),
        "precision": str(autocast or torch.float32),
        "metrics": {
            "train_final": state.diagnostics.last,
            "heldout_before": state.heldout_before,
            "heldout_after": after.as_dict() if after else None,
            "general_nll_before": general_before,
            "general_nll_after": general_after,
        },
        "diagnostics": state.diagnostics.summary(options.batch_size * world),
        "warnings": warnings,
        "seconds": round(time.monotonic() - started, 3),
        "versions": _versions(),
        **inputs.extra_manifest,
    }
    if (
        options.max_general_nll_increase is not None
        and general_before is not None
        and general_after is not None
        and general_after > general_before * (1 + options.max_general_nll_increase)
    ):
        raise GeneralAbilityError(
            f"general held-out NLL rose from {general_before:.4f} to {general_after:.4f} "
            f"(+{general_after / general_before - 1:.1%}), past the bound "
            f"max_general_nll_increase={options.max_general_nll_increase:.1%}; no adapter "
            "was written. Lower learning_rate, raise beta, or add sft_weight"
        )
    if rank == 0:
        _write_outputs(model, out_dir, manifest, metrics_path, inputs.plots)
    return TrainResult(out_dir, manifest)


def selection_score(metrics: HeldoutMetrics, selection: str) -> float:
    """What the best step minimises: the held-out KTO loss, minus the held-out margin or
    accuracy, or 0 for "final" (every step that passes the guards replaces the last)."""
    if selection == "heldout_loss":
        return metrics.loss
    if selection == "heldout_margin":
        return -metrics.margin if math.isfinite(metrics.margin) else 0.0
    if selection == "heldout_accuracy":
        return -metrics.accuracy
    return 0.0


def _normalised_weights(examples: list[Encoded]) -> list[Encoded]:
    """The examples with weights scaled to average 1, so that the learning rate means
    the same whether or not examples carry vote weights."""
    mean = sum(e.weight for e in examples) / len(examples)
    if mean == 1.0:
        return examples
    return [replace(e, weight=e.weight / mean) for e in examples]


def run_status(best_step: int | None) -> tuple[str, str | None]:
    """What a finished run's adapter is: ("trained", None), or ("no_gain", why) when
    the weights kept are the starting point (the selection kept step 0). The adapter is
    written either way; a no_gain one equals the start (a fresh LoRA is the base model,
    a warm start its init adapter), so nothing downstream should ship it as new."""
    if best_step == 0:
        return "no_gain", (
            "no evaluated step beat the starting point on the held-out selection signal; "
            "the adapter written is the starting point"
        )
    return "trained", None


def _micro_step(
    causal_lm: Any,
    examples: Sequence[Encoded],
    batch_idx: list[int],
    ref: dict[tuple[int, int], float],
    options: TrainOptions,
    inputs: TrainInputs,
    pad_id: int,
    device: torch.device,
    autocast: torch.dtype | None,
    world: int,
) -> dict[str, float]:
    """Forward and backward of one micro-batch; returns its statistics.

    The prompts and their own completions run in one forward with gradient; the
    mismatched completions (each prompt with the previous example's completion) then
    follow a detached copy of the prompts' cache, without gradient.
    """
    previous = [batch_idx[k - 1] for k in range(len(batch_idx))]
    prompts = collate_prompts([examples[i].prompt_ids for i in batch_idx], pad_id)
    rows = list(range(len(batch_idx)))
    matched = collate_continuations(
        prompts, rows, [examples[i].completion_ids for i in batch_idx], pad_id
    ).to(device)
    mismatched = collate_continuations(
        prompts, rows, [examples[j].completion_ids for j in previous], pad_id
    ).to(device)
    desirable = torch.tensor([examples[i].desirable for i in batch_idx], device=device)
    ref_logps = torch.tensor([ref[(i, i)] for i in batch_idx], device=device)
    ref_kl_logps = torch.tensor(
        [ref[(i, j)] for i, j in zip(batch_idx, previous, strict=True)], device=device
    )

    with _autocast(device, autocast):
        state, policy_logps = run_prompts_with_completions(causal_lm, prompts.to(device), matched)
        with torch.no_grad():
            policy_kl_logps = continuation_logps(causal_lm, state.detached(), mismatched)
    kl = mismatched_kl(policy_kl_logps, ref_kl_logps)
    if world > 1:
        torch.distributed.all_reduce(kl)
        kl /= world
    if not options.reference_point:
        # z_ref = 0: each answer is judged against the reference alone (what the clamp
        # does anyway whenever the mismatched-pair estimate is negative).
        kl = torch.zeros_like(kl)
    out = kto_loss(
        policy_logps,
        ref_logps,
        desirable,
        kl,
        options.beta,
        inputs.desirable_weight,
        inputs.undesirable_weight,
    )
    # Each example's term weighs what its votes weigh (1 each unless the repeats of an
    # answer are counted as weights): weights average 1 over the training set.
    weights = torch.tensor([examples[i].weight for i in batch_idx], device=device)
    kto_term = (out.losses * weights).mean()
    loss = kto_term
    sft = torch.zeros((), device=device)
    if options.sft_weight > 0 and desirable.any():
        # Mean per-token NLL of the desirable completions.
        tokens = torch.tensor([len(examples[i].completion_ids) for i in batch_idx], device=device)
        sft = -(policy_logps * weights)[desirable].sum() / (tokens * weights)[desirable].sum()
        loss = loss + options.sft_weight * sft
    if not torch.isfinite(loss):
        raise DivergedError(_diverged_message("loss", loss.item(), -1, options))
    (loss / options.grad_accum).backward()
    rewards = out.rewards
    distinct = sum(
        1
        for i, j in zip(batch_idx, previous, strict=True)
        if i != j
        and examples[i].prompt_ids != examples[j].prompt_ids
        and examples[i].completion_ids != examples[j].completion_ids
    )
    n_d = int(desirable.sum())
    return {
        "loss": kto_term.item(),
        "sft": sft.item(),
        "kl": out.kl.item(),
        "kl_clamped": float(out.kl_clamped),
        "reward_desirable_sum": rewards[desirable].sum().item(),
        "reward_undesirable_sum": rewards[~desirable].sum().item(),
        "n_desirable": n_d,
        "n_undesirable": len(batch_idx) - n_d,
        "kl_pairs": distinct,
        "tokens": int(
            prompts.attention_mask.sum()
            + matched.attention_mask[:, prompts.input_ids.shape[1] :].sum()
            + len(batch_idx)
        ),
    }


def _aggregate(
    accum: list[dict[str, float]], step: int, lr: float, grad_norm: float
) -> dict[str, Any]:
    n = len(accum)
    n_d = sum(a["n_desirable"] for a in accum)
    n_u = sum(a["n_undesirable"] for a in accum)
    return {
        "step": step,
        "loss": sum(a["loss"] for a in accum) / n,
        "sft": sum(a["sft"] for a in accum) / n,
        "kl": sum(a["kl"] for a in accum) / n,
        "kl_clamped": sum(a["kl_clamped"] for a in accum) / n,
        "reward_desirable": sum(a["reward_desirable_sum"] for a in accum) / n_d if n_d else None,
        "reward_undesirable": sum(a["reward_undesirable_sum"] for a in accum) / n_u
        if n_u
        else None,
        "n_desirable": n_d,
        "n_undesirable": n_u,
        "micro_batches": n,
        "one_class_batches": sum(
            1 for a in accum if a["n_desirable"] == 0 or a["n_undesirable"] == 0
        ),
        "kl_pairs": min(a["kl_pairs"] for a in accum),
        "tokens": sum(a["tokens"] for a in accum),
        "lr": lr,
        "grad_norm": grad_norm,
    }


def _diverged_message(what: str, value: float, step: int, options: TrainOptions) -> str:
    at = f" at step {step}" if step > 0 else ""
    return (
        f"the {what} became {value}{at}: training diverged and no adapter was written. "
        f"Lower learning_rate (now {options.learning_rate:g}) or max_grad_norm, or use "
        'precision = "fp32"; the last checkpoint and metrics.jsonl are kept for inspection'
    )


# ---------------------------------------------------------------- diagnostics


@dataclass
class _Diagnostics:
    """What the reference point rested on over the run."""

    steps: int = 0
    clamped: float = 0.0
    one_class: int = 0
    micro_batches: int = 0
    min_pairs: int | None = None
    last: dict[str, Any] = field(default_factory=dict)

    def add(self, row: dict[str, Any]) -> None:
        self.steps += 1
        self.clamped += row["kl_clamped"]
        self.one_class += row["one_class_batches"]
        self.micro_batches += row["micro_batches"]
        self.min_pairs = (
            row["kl_pairs"] if self.min_pairs is None else min(self.min_pairs, row["kl_pairs"])
        )
        self.last = {k: v for k, v in row.items() if not k.startswith("heldout_")}

    def summary(self, pairs_per_step: int) -> dict[str, Any]:
        return {
            "kl_pairs_per_step": pairs_per_step,
            "kl_distinct_pairs_min": self.min_pairs,
            "kl_clamp_rate": self.clamped / self.steps if self.steps else None,
            "one_class_steps": self.one_class,
            "one_class_rate": self.one_class / self.micro_batches if self.micro_batches else None,
        }

    def warnings(self, pairs_per_step: int) -> list[str]:
        out = []
        if pairs_per_step < MIN_KL_PAIRS:
            out.append(
                f"z_ref rests on {pairs_per_step} mismatched pairs per step (batch_size x "
                f"ranks): a noisy reference point; use a batch of at least {MIN_KL_PAIRS}"
            )
        elif self.min_pairs is not None and self.min_pairs < MIN_KL_PAIRS:
            out.append(
                f"some steps had only {self.min_pairs} distinct mismatched pairs (repeated "
                "prompts or completions in a batch): z_ref was noisy there"
            )
        if self.steps and self.clamped / self.steps > 0.5:
            out.append(
                f"the KL estimate was clamped at 0 in {self.clamped / self.steps:.0%} of steps: "
                "the reference point was mostly 0, so rewards were judged against the "
                "reference itself, not the policy's drift"
            )
        if self.micro_batches and self.one_class / self.micro_batches > 0.5:
            out.append(
                f"{self.one_class / self.micro_batches:.0%} of batches held one class only: "
                "desirable and undesirable losses rarely met in a step; a larger batch helps"
            )
        return out


@dataclass
class _State:
    step: int = 0
    best_loss: float | None = None
    best_step: int | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    stale: int = 0
    stopped_early: bool = False
    stop_reason: str | None = None
    heldout_before: dict[str, float] | None = None
    diagnostics: _Diagnostics = field(default_factory=_Diagnostics)


# ---------------------------------------------------------------- small helpers


def _validate(options: TrainOptions) -> None:
    options.lengths()
    if options.lr_schedule not in ("cosine", "linear", "constant"):
        raise TrainError(
            f"lr_schedule must be cosine, linear or constant, not {options.lr_schedule!r}"
        )
    if options.prompt_format not in ("chat", "raw"):
        raise TrainError(f"prompt_format must be chat or raw, not {options.prompt_format!r}")
    if options.selection not in SELECTIONS:
        raise TrainError(
            f"selection must be one of {', '.join(SELECTIONS)}, not {options.selection!r}"
        )
    if options.precision not in ("auto", "fp32", "bf16"):
        raise TrainError(f"precision must be auto, fp32 or bf16, not {options.precision!r}")
    if options.batch_size < 1 or options.grad_accum < 1 or options.epochs < 1:
        raise TrainError("batch_size, grad_accum and epochs must be at least 1")


def _schedule(options: TrainOptions, steps: int):
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


def _progress(
    total: int, initial: int, enabled: bool, desc: str = "KTO", unit: str = "step"
) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit=unit)


def _all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _adapter_state(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _checksum(model: Any) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(_adapter_state(model).items()):
        h.update(name.encode())
        h.update(tensor.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _load_adapter_state(model: Any, weights: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, weights)


def _run_fingerprint(
    base_fingerprint: str, options: TrainOptions, lora: LoraOptions, examples: Sequence[Encoded]
) -> str:
    """What a checkpoint must match to be resumed: options, adapter shape, base, data."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [asdict(options) | {"stop_after_steps": None}, asdict(lora)], sort_keys=True
        ).encode()
    )
    h.update(base_fingerprint.encode())
    for e in examples:
        h.update(repr((e.prompt_ids, e.completion_ids, e.desirable, e.weight)).encode())
    return h.hexdigest()[:16]


def _prepare_out_dir(out_dir: Path, resume: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / MANIFEST).exists():
        raise TrainError(
            f"{out_dir} already holds a finished adapter ({MANIFEST}); choose another --out"
        )
    if not resume and (out_dir / CHECKPOINT).exists():
        raise TrainError(
            f"{out_dir} holds a checkpoint of an unfinished run: pass --resume to continue "
            "it, or choose another --out"
        )


def _save_checkpoint(
    out_dir: Path, run_id: str, model: Any, optimizer: Any, scheduler: Any, state: _State
) -> None:
    """Write the resume point atomically: a crash mid-write leaves the previous one."""
    payload = {
        "run_id": run_id,
        "adapter": _adapter_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "state": {k: v for k, v in vars(state).items() if k != "diagnostics"},
        "diagnostics": vars(state.diagnostics),
    }
    target = out_dir / CHECKPOINT
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / "state.pt.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, target / "state.pt")


def _load_checkpoint(
    out_dir: Path, run_id: str, model: Any, optimizer: Any, scheduler: Any, device: torch.device
) -> _State:
    payload = torch.load(out_dir / CHECKPOINT / "state.pt", map_location=device, weights_only=False)
    if payload["run_id"] != run_id:
        raise CheckpointMismatch(
            f"the checkpoint in {out_dir / CHECKPOINT} belongs to a run with other data, "
            "model or options; resume with the same ones, or choose another --out"
        )
    _load_adapter_state(model, payload["adapter"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"].cpu())
    random.setstate(payload["python_rng"])
    state = _State(**payload["state"])
    state.diagnostics = _Diagnostics(**payload["diagnostics"])
    return state


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = [
        line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def _write_outputs(
    model: Any, out_dir: Path, manifest: dict[str, Any], metrics_path: Path, plots: bool
) -> None:
    """Adapter files by rename, plots, then the manifest last."""
    from pipeline.plots import plot_training

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".adapter-") as tmp:
        model.save_pretrained(tmp, selected_adapters=["default"])
        for name in ADAPTER_FILES:
            os.replace(Path(tmp) / name, out_dir / name)
    if plots:
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
        manifest["plots"] = [
            str(p.relative_to(out_dir)) for p in plot_training(rows, out_dir / "plots")
        ]
    tmp_manifest = out_dir / (MANIFEST + ".tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp_manifest, out_dir / MANIFEST)
    shutil.rmtree(out_dir / CHECKPOINT, ignore_errors=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("kto-loop", "torch", "transformers", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    commit = os.environ.get("KTO_LOOP_GIT_COMMIT")
    if commit is None:
        head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
        with contextlib.suppress(OSError):
            ref = head.read_text().strip()
            if ref.startswith("ref: "):
                ref = (head.parent / ref[5:]).read_text().strip()
            commit = ref
    out["git_commit"] = commit or "unknown"
    return out
