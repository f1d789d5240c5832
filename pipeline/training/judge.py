"""Judge a candidate by the answers it samples, not by the likelihood of held-out votes.

Likelihood signals (held-out KTO loss, implied-reward accuracy) score the answers users
voted on; they can improve while the answers the policy now samples get worse. So the
candidate's own sampled answers are judged, each given the probability that a user
would like it, by a `Judge`:

- a taste model learnt from the same votes (`fit_taste_judge`): a regularised logistic
  regression on the frozen reference's hidden states of each (prompt, answer), trusted
  only if it separates likes from dislikes it was not fit on (held-out votes, and
  training votes scored by models fit without their prompt) well enough;
- or a user's judge: anything with `probabilities(items)`, such as an LLM asked whether
  the user would like the answer (connectors/training/llm_judge.py), or a plain
  `(messages or prompt, answer) -> float` function through `callable_judge`.

Statistics.

AUC: the probability that a held-out like scores above a held-out dislike, ties counting
half (the Mann-Whitney U statistic on midranks, divided by n_likes * n_dislikes). Its
standard error is DeLong's: with V10_i the share of dislikes that like i outscores and
V01_j the share of likes that outscore dislike j (ties half),
Var(AUC) = s²(V10) / n_likes + s²(V01) / n_dislikes, s² the sample variance. It assumes
no score distribution, but it is 0 at AUC 1 and rough with few votes of a class.

Trust: the taste model judges only when held-out AUC - z * SE >= min_auc (z = 1.645 by
default: a one-sided 95% lower bound) on votes it was not fit on, with at least
min_per_class likes and dislikes among them. A taste that cannot rank held-out votes
would turn any change of style into noise, or into a confident wrong verdict.

Liked share: answers to one prompt are not independent draws (the prompt sets much of
what is liked), so each prompt's answers are averaged to one p_k and the share is the
mean of the P prompt means, with SE s(p) / sqrt(P) (the cluster-robust SE for equal
cluster sizes) and interval share ± z * SE clipped to [0, 1]. It covers the sampling
of prompts and answers; the judge is taken as given, its errors are not in it.

Comparison: candidate and serving answer the same prompts, so the difference is paired:
d_k = p_k(candidate) - p_k(serving), estimate mean(d), SE s(d) / sqrt(P), interval
mean(d) ± z * SE (z = 1.96: two-sided 95%). How easy a prompt is cancels in d_k, so the
paired SE is usually well below sqrt(SE_c² + SE_s²). `better` iff the interval lies
above 0, `worse` iff below; with fewer than two prompts the SE is infinite and neither
holds.

Caveats: the L2 penalty shrinks probabilities towards the training votes' base rate, so
differences in liked share are understated (their sign is what the verdicts use); and
answers unlike any voted one are scored by extrapolation.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from pipeline.training.encode import Encoded
from pipeline.training.logps import collate, head_logps
from pipeline.training.scoring import autocast_to, reference

Messages = list[dict[str, Any]]
# Likelihood features after the hidden states (see _logp_features).
LOGP_FEATURES = 4
# L2 strengths (per example, on standardised features) the cross-validation picks from.
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)
CV_FOLDS = 4


# ---------------------------------------------------------------- what a judge sees


@dataclass(frozen=True)
class JudgeItem:
    """One answer to judge, with its prompt as tokens and, when known, as text.

    Attributes:
        prompt_ids, answer_ids: the tokens, as encode.py makes them.
        answer: the answer's text.
        prompt: the rendered prompt text, if known.
        messages: the chat turns sent, if known (preferred by text judges).
    """

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    answer: str = ""
    prompt: str | None = None
    messages: Messages | None = None


class Judge(Protocol):
    """Gives each answer the probability that a user would like it."""

    def probabilities(self, items: Sequence[JudgeItem]) -> list[float]: ...


def judge_items(
    answers: Sequence[Encoded],
    decode: Callable[[Sequence[int]], str],
    messages: Mapping[tuple[int, ...], Messages] | None = None,
) -> list[JudgeItem]:
    """Items for sampled answers (scoring.sampled_answers): texts from `decode` (e.g. the
    tokenizer's decode with skip_special_tokens), turns looked up by prompt ids."""
    turns = messages or {}
    return [
        JudgeItem(
            a.prompt_ids,
            a.completion_ids,
            decode(a.completion_ids),
            decode(a.prompt_ids),
            turns.get(a.prompt_ids),
        )
        for a in answers
    ]


@dataclass(frozen=True)
class _CallableJudge:
    fn: Callable[[Any, str], float]

    def probabilities(self, items: Sequence[JudgeItem]) -> list[float]:
        out = []
        for item in items:
            asked = item.messages if item.messages is not None else item.prompt
            if asked is None:
                raise ValueError(
                    "a judge function needs the prompt's messages or text: build the items "
                    "with judge_items (or set JudgeItem.prompt)"
                )
            value = float(self.fn(asked, item.answer))
            if not 0.0 <= value <= 1.0:  # also refuses NaN
                raise ValueError(
                    f"the judge function returned {value!r} for the answer "
                    f"{item.answer[:60]!r}: it must return a probability in [0, 1] or a bool"
                )
            out.append(value)
        return out


def callable_judge(fn: Callable[[Any, str], float]) -> Judge:
    """A Judge from a function `(messages or prompt text, answer) -> probability or bool`,
    the shape of the gate's scorer and the simulator's taste."""
    return _CallableJudge(fn)


# ---------------------------------------------------------------- features


@torch.no_grad()
def answer_features(
    causal_lm: Any,
    items: Sequence[Encoded],
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
    batch_size: int = 32,
    layers: Sequence[int] = (-1,),
) -> torch.Tensor:
    """Hidden-state features of each (prompt, completion) under the model as called.

    For each layer in `layers` (indices into the backbone's hidden states: 0 the
    embeddings, -1 the last layer after its norm), the hidden state at the last
    completion token (it has read the whole answer) and the mean over the completion's
    tokens. An empty completion uses the last prompt token for both. Sequences run in
    right-padded batches of similar length; causal attention keeps padding from
    changing any real position's state.

    Args:
        causal_lm: a transformers causal LM, or a peft model (its base model is run with
            whatever adapter state the caller set: wrap in scoring.reference for the
            frozen reference).
        items: the pairs; `desirable` and `weight` are ignored.
    Returns:
        (N, 2 * len(layers) * hidden_size + LOGP_FEATURES) float32 on the CPU, in the
        order of `items`: the hidden-state features, then the likelihood features.
    """
    if hasattr(causal_lm, "get_base_model"):
        causal_lm = causal_lm.get_base_model()
    config = causal_lm.config
    hidden = (
        config.get_text_config() if hasattr(config, "get_text_config") else config
    ).hidden_size
    out = torch.zeros((len(items), 2 * len(layers) * hidden + LOGP_FEATURES), dtype=torch.float32)
    order = sorted(range(len(items)), key=lambda i: _length(items[i]))
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        out[rows] = _batch_features(
            causal_lm, [items[i] for i in rows], pad_id, device, dtype, layers
        )
    return out


def _length(e: Encoded) -> int:
    return len(e.prompt_ids) + len(e.completion_ids)


def _batch_features(
    causal_lm: Any,
    items: Sequence[Encoded],
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype | None,
    layers: Sequence[int],
) -> torch.Tensor:
    if any(not e.prompt_ids and not e.completion_ids for e in items):
        raise ValueError("an item has neither prompt nor completion tokens: nothing to read")
    batch = collate([(e.prompt_ids, e.completion_ids) for e in items], pad_id)
    width = batch.input_ids.shape[1]
    # The completion's span [start, end); an empty one reads the last prompt token.
    ends = torch.tensor([_length(e) for e in items])
    starts = torch.tensor(
        [len(e.prompt_ids) if e.completion_ids else _length(e) - 1 for e in items]
    )
    columns = torch.arange(width).unsqueeze(0)
    span = ((columns >= starts.unsqueeze(1)) & (columns < ends.unsqueeze(1))).to(device)
    all_states = tuple(layers) != (-1,)
    with autocast_to(device, dtype):
        out = causal_lm.base_model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            use_cache=False,
            output_hidden_states=all_states,
        )
    states = [out.hidden_states[i] for i in layers] if all_states else [out.last_hidden_state]
    rows = torch.arange(len(items), device=device)
    feats = []
    for h in states:
        h = h.float().masked_fill(~span.unsqueeze(-1), 0.0)  # pads out, whatever they hold
        feats.append(h[rows, ends.to(device) - 1])
        feats.append(h.sum(1) / span.sum(1, keepdim=True))
    feats.append(_logp_features(causal_lm, out.last_hidden_state, batch, len(items)))
    return torch.cat(feats, dim=1).cpu()


def _logp_features(causal_lm: Any, last: torch.Tensor, batch: Any, n: int) -> torch.Tensor:
    """How likely the model finds each answer: the sum, mean and least of its tokens'
    log-probs, and log(1 + its length) (zeros for an empty answer). A model often knows
    the right fact better than the wrong one, so this is where a taste for facts shows;
    the taste model learns from the votes which way each counts."""
    device = last.device
    out = torch.zeros((n, LOGP_FEATURES), dtype=torch.float32, device=device)
    if len(batch.targets) == 0:
        return out
    rows = batch.rows.to(device)
    logps = head_logps(
        causal_lm, last[rows, batch.cols.to(device)].float(), batch.targets.to(device)
    ).float()
    counts = torch.bincount(rows, minlength=n).float()
    sums = torch.zeros(n, device=device).index_add(0, rows, logps)
    least = torch.zeros(n, device=device).scatter_reduce(
        0, rows, logps, reduce="amin", include_self=False
    )
    has = counts > 0
    out[:, 0] = sums
    out[:, 1] = torch.where(has, sums / counts.clamp(min=1), 0.0)
    out[:, 2] = torch.where(has, least, 0.0)
    out[:, 3] = torch.log1p(counts)
    return out


@dataclass(frozen=True)
class Featurizer:
    """answer_features of a peft model's frozen reference (scoring.reference: the
    previous adapter if loaded, else the base), or of a plain causal LM as it is; run in
    eval mode, the model's mode restored after."""

    model: Any
    pad_id: int
    device: torch.device
    dtype: torch.dtype | None = None
    batch_size: int = 32
    layers: tuple[int, ...] = (-1,)

    def __call__(self, items: Sequence[Encoded]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        frozen = reference if hasattr(self.model, "peft_config") else _as_is
        try:
            with frozen(self.model):
                return answer_features(
                    self.model,
                    items,
                    self.pad_id,
                    self.device,
                    self.dtype,
                    self.batch_size,
                    self.layers,
                )
        finally:
            self.model.train(was_training)


def _as_is(model: Any) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


# ---------------------------------------------------------------- the taste model


@dataclass(frozen=True)
class TasteModel:
    """A logistic regression on standardised features: P(liked) = sigmoid(x_std · coef +
    intercept). Fit by L-BFGS in float64 from zero, so the same inputs give the same
    model.

    Attributes:
        mean, scale: (F,) the training features' mean and standard deviation.
        coef: (F,) weights on standardised features.
        intercept: the bias.
        l2: the penalty strength used (l2 / 2 * |coef|² added to the mean log loss).
    """

    mean: torch.Tensor
    scale: torch.Tensor
    coef: torch.Tensor
    intercept: float
    l2: float

    @classmethod
    def fit(
        cls,
        features: torch.Tensor,
        labels: Sequence[bool] | torch.Tensor,
        weights: Sequence[float] | torch.Tensor | None = None,
        l2: float | Sequence[float] = L2_GRID,
        folds: int = CV_FOLDS,
    ) -> TasteModel:
        """Fit on (N, F) features and liked labels, each example's log loss weighted by
        `weights` (vote weights; mean-normalised). With several `l2` values, the one
        with the lowest out-of-fold weighted log loss over `folds` stratified folds is
        used (the strongest when a class is too small to fold).

        Raises:
            ValueError: the labels hold one class only, or shapes disagree.
        """
        x = features.detach().to(torch.float64).cpu()
        y = torch.as_tensor(labels, dtype=torch.float64).reshape(-1)
        w = torch.ones_like(y) if weights is None else torch.as_tensor(weights).to(y)
        if x.ndim != 2 or len(x) != len(y) or len(w) != len(y):
            raise ValueError(f"features {tuple(x.shape)}, {len(y)} labels, {len(w)} weights")
        if not 0 < int(y.sum()) < len(y):
            raise ValueError(
                f"{int(y.sum())} likes among {len(y)} votes: a taste model needs both classes"
            )
        w = w / w.mean()
        grid = [float(l2)] if isinstance(l2, int | float) else [float(v) for v in l2]
        chosen = grid[0] if len(grid) == 1 else _cross_validate(x, y, w, grid, folds)
        mean, scale = _standardisation(x)
        coef, intercept = _fit_logistic((x - mean) / scale, y, w, chosen)
        return cls(mean, scale, coef, intercept, chosen)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F) -> (N,) float64 log-odds of a like."""
        x = (features.detach().to(torch.float64).cpu() - self.mean) / self.scale
        return x @ self.coef + self.intercept

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F) -> (N,) float64 probabilities of a like."""
        return torch.sigmoid(self.logits(features))


def _standardisation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    scale = x.std(0, unbiased=False)
    # A constant feature carries nothing; dividing it by 1 keeps it at 0.
    return mean, torch.where(scale > 1e-12, scale, torch.ones_like(scale))


def _fit_logistic(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, l2: float
) -> tuple[torch.Tensor, float]:
    """Minimise mean(w * logloss) + l2 / 2 * |coef|² (the intercept unpenalised)."""
    coef = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    rate = float((w * y).sum() / w.sum())
    bias = torch.tensor(math.log(rate / (1 - rate)), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [coef, bias],
        max_iter=200,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ coef + bias
        loss = (w * F.binary_cross_entropy_with_logits(logits, y, reduction="none")).mean()
        loss = loss + 0.5 * l2 * coef.dot(coef)
        loss.backward()
        return loss

    optimizer.step(closure)
    return coef.detach(), float(bias.detach())


def _cross_validate(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, grid: Sequence[float], folds: int
) -> float:
    """The grid value with the lowest out-of-fold weighted log loss; ties go to the
    stronger penalty."""
    smallest = int(min(y.sum(), len(y) - y.sum()))
    k = min(folds, smallest)
    if k < 2:
        return max(grid)
    fold = _stratified_folds(y, k)
    losses = {}
    for l2 in grid:
        total = 0.0
        for f in range(k):
            train, test = fold != f, fold == f
            mean, scale = _standardisation(x[train])
            coef, bias = _fit_logistic((x[train] - mean) / scale, y[train], w[train], l2)
            logits = ((x[test] - mean) / scale) @ coef + bias
            lost = F.binary_cross_entropy_with_logits(logits, y[test], reduction="none")
            total += float((w[test] * lost).sum())
        losses[l2] = total
    return min(sorted(grid, reverse=True), key=lambda v: losses[v])


def _stratified_folds(y: torch.Tensor, k: int) -> torch.Tensor:
    """A fold index per example: each class dealt round-robin over k folds in a seeded
    shuffle, so every fold holds both classes and the split repeats."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    fold = torch.empty(len(y), dtype=torch.long)
    for cls in (0.0, 1.0):
        members = order[y[order] == cls]
        fold[members] = torch.arange(len(members)) % k
    return fold


# ---------------------------------------------------------------- AUC


def _midranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _split(scores: Sequence[float], labels: Sequence[bool]) -> tuple[list[float], list[float]]:
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    pos = [float(s) for s, liked in zip(scores, labels, strict=True) if liked]
    neg = [float(s) for s, liked in zip(scores, labels, strict=True) if not liked]
    return pos, neg


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """The share of (like, dislike) pairs where the like scores higher, ties counting
    half; NaN without both classes."""
    pos, neg = _split(scores, labels)
    if not pos or not neg:
        return math.nan
    ranks = _midranks(pos + neg)
    u = sum(ranks[: len(pos)]) - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def auc_standard_error(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """DeLong's standard error of `auc`; infinite with fewer than two of a class."""
    pos, neg = _split(scores, labels)
    if len(pos) < 2 or len(neg) < 2:
        return math.inf
    ranks = _midranks(pos + neg)
    within_pos, within_neg = _midranks(pos), _midranks(neg)
    # A like's rank among all, less its rank among likes, counts the dislikes below it.
    v10 = [(ranks[i] - within_pos[i]) / len(neg) for i in range(len(pos))]
    v01 = [1 - (ranks[len(pos) + j] - within_neg[j]) / len(pos) for j in range(len(neg))]
    return math.sqrt(statistics.variance(v10) / len(pos) + statistics.variance(v01) / len(neg))


# ---------------------------------------------------------------- trusting the taste


@dataclass(frozen=True)
class TrustOptions:
    """When a taste model may judge answers.

    Attributes:
        min_auc: the held-out AUC's lower bound must reach this.
        z: standard errors below the AUC for that bound (1.645: one-sided 95%).
        min_per_class: held-out likes and dislikes needed, each.
    """

    min_auc: float = 0.6
    z: float = 1.645
    min_per_class: int = 8

    def __post_init__(self) -> None:
        if not 0.5 <= self.min_auc < 1:
            raise ValueError(f"min_auc must be in [0.5, 1), got {self.min_auc}")
        if not (math.isfinite(self.z) and self.z >= 0):
            raise ValueError(f"z must be a finite number >= 0, got {self.z}")
        if self.min_per_class < 2:
            raise ValueError(f"min_per_class must be at least 2, got {self.min_per_class}")


@dataclass(frozen=True)
class TasteJudge:
    """A taste model over reference features, with the verdict on whether to trust it.

    Attributes:
        model: the fitted model; None when the training votes hold one class only.
        features: turns (prompt, answer) pairs into the model's features (a Featurizer).
        heldout_auc, heldout_se: on held-out votes (NaN / inf when not measurable).
        heldout_likes, heldout_dislikes: the held-out votes of each class.
        trusted: whether answers may be judged by it.
        reason: one sentence saying why, or why not.
    """

    model: TasteModel | None
    features: Callable[[Sequence[Encoded]], torch.Tensor]
    heldout_auc: float
    heldout_se: float
    heldout_likes: int
    heldout_dislikes: int
    trusted: bool
    reason: str

    def probabilities(self, items: Sequence[JudgeItem]) -> list[float]:
        """P(liked) of each answer. Check `trusted` first: this answers either way.

        Raises:
            ValueError: no model could be fit (one class of training votes).
        """
        if self.model is None:
            raise ValueError(f"no taste model: {self.reason}")
        if not items:
            return []
        pairs = [Encoded(i.prompt_ids, i.answer_ids, True) for i in items]
        return self.model.probabilities(self.features(pairs)).tolist()


def out_of_fold_logits(
    x: torch.Tensor,
    labels: Sequence[bool],
    weights: Sequence[float],
    groups: Sequence[Hashable],
    l2: float,
    folds: int = CV_FOLDS,
) -> list[float] | None:
    """Each vote's logit from a taste model fit without its group (its prompt): the
    votes of one prompt share a fold, so no vote is scored by a model that saw another
    vote on the same prompt. None when there are fewer than two groups or a fold's
    training part holds one class."""
    keys = list(dict.fromkeys(groups))
    k = min(folds, len(keys))
    if k < 2:
        return None
    fold_of = {g: i % k for i, g in enumerate(keys)}
    fold = torch.tensor([fold_of[g] for g in groups])
    out = torch.zeros(len(labels), dtype=torch.float64)
    for f in range(k):
        train, test = fold != f, fold == f
        y = [v for v, t in zip(labels, train.tolist(), strict=True) if t]
        if not 0 < sum(y) < len(y):
            return None
        model = TasteModel.fit(
            x[train], y, [w for w, t in zip(weights, train.tolist(), strict=True) if t], l2
        )
        out[test] = model.logits(x[test])
    return out.tolist()


def fit_taste_judge(
    features: Callable[[Sequence[Encoded]], torch.Tensor],
    train: Sequence[Encoded],
    heldout: Sequence[Encoded],
    options: TrustOptions | None = None,
    l2: float | Sequence[float] = L2_GRID,
) -> TasteJudge:
    """Fit the taste model on the training votes (labels `desirable`, weights `weight`)
    and decide whether it may judge answers from votes it was not fit on: the held-out
    votes, and each training vote scored by a model fit without its prompt's votes
    (out_of_fold_logits). A held-out split of a few conversations alone is too small to
    tell a good taste model from a lucky one."""
    options = options or TrustOptions()
    likes = sum(e.desirable for e in train)
    if not 0 < likes < len(train):
        reason = (
            f"the {len(train)} training votes hold {likes} likes and {len(train) - likes} "
            "dislikes: a taste model needs both, refusing to judge by answers"
        )
        return TasteJudge(None, features, math.nan, math.inf, 0, 0, False, reason)
    x = features(train)
    train_labels = [e.desirable for e in train]
    train_weights = [e.weight for e in train]
    model = TasteModel.fit(x, train_labels, train_weights, l2)
    labels = [e.desirable for e in heldout]
    scores = model.logits(features(heldout)).tolist() if heldout else []
    oof = out_of_fold_logits(
        x, train_labels, train_weights, [e.prompt_ids for e in train], model.l2
    )
    if oof is not None:
        scores, labels = scores + oof, labels + train_labels
    trusted, reason, value, se = trust(scores, labels, options)
    n_likes = sum(labels)
    return TasteJudge(model, features, value, se, n_likes, len(labels) - n_likes, trusted, reason)


def trust(
    scores: Sequence[float], labels: Sequence[bool], options: TrustOptions
) -> tuple[bool, str, float, float]:
    """Whether held-out scores rank likes above dislikes well enough to judge by.

    Returns:
        (trusted, one-sentence reason, AUC, its standard error).
    """
    likes = sum(bool(v) for v in labels)
    dislikes = len(labels) - likes
    if min(likes, dislikes) < options.min_per_class:
        reason = (
            f"only {likes} likes and {dislikes} dislikes the taste model was not fit on to "
            f"check it on (needs {options.min_per_class} of each): refusing to judge by answers"
        )
        return False, reason, auc(scores, labels), auc_standard_error(scores, labels)
    value, se = auc(scores, labels), auc_standard_error(scores, labels)
    low = value - options.z * se
    said = (
        f"the taste model separates likes from dislikes it was not fit on with AUC {value:.2f} ± "
        f"{se:.2f} (n={len(labels)}); its lower bound {low:.2f}"
    )
    if low >= options.min_auc:
        return True, f"{said} reaches {options.min_auc:g}: judging by answers", value, se
    reason = f"{said} is below {options.min_auc:g}: refusing to judge by answers"
    return False, reason, value, se


# ---------------------------------------------------------------- liked share


@dataclass(frozen=True)
class LikedShare:
    """The share of answers users would like, over prompts (each prompt weighs the same).

    Attributes:
        share: the mean of the per-prompt mean probabilities.
        se: its standard error over prompts (inf with fewer than two).
        low, high: share ± z * se, clipped to [0, 1].
        prompts, answers: what it was estimated from.
    """

    share: float
    se: float
    low: float
    high: float
    prompts: int
    answers: int


def by_prompt(
    prompts: Sequence[Hashable], probabilities: Sequence[float]
) -> dict[Hashable, list[float]]:
    """Group answers' probabilities by their prompt (e.g. JudgeItem.prompt_ids)."""
    if len(prompts) != len(probabilities):
        raise ValueError(f"{len(prompts)} prompts for {len(probabilities)} probabilities")
    out: dict[Hashable, list[float]] = {}
    for key, p in zip(prompts, probabilities, strict=True):
        out.setdefault(key, []).append(float(p))
    return out


def _prompt_means(per_prompt: Mapping[Hashable, Sequence[float]]) -> dict[Hashable, float]:
    means = {}
    for key, probs in per_prompt.items():
        if not probs:
            raise ValueError(f"prompt {key!r} has no judged answers: leave it out")
        if not all(0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"prompt {key!r} has a probability outside [0, 1]")
        means[key] = sum(probs) / len(probs)
    return means


def _mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.inf
    return mean, se


def liked_share(per_prompt: Mapping[Hashable, Sequence[float]], z: float = 1.96) -> LikedShare:
    """The liked share of answers grouped by prompt, with its interval clustered by
    prompt (see the module docstring).

    Raises:
        ValueError: no prompts, a prompt without answers, or a probability outside [0, 1].
    """
    means = _prompt_means(per_prompt)
    if not means:
        raise ValueError("no judged answers: sample answers for at least one prompt")
    share, se = _mean_and_se(list(means.values()))
    answers = sum(len(p) for p in per_prompt.values())
    low, high = max(0.0, share - z * se), min(1.0, share + z * se)
    return LikedShare(share, se, low, high, len(means), answers)


@dataclass(frozen=True)
class Comparison:
    """Candidate against serving on the same prompts: the paired difference in liked
    share, candidate - serving, and what it allows to say.

    Attributes:
        candidate, serving: each side's liked share.
        difference, se, low, high: the mean per-prompt difference, its SE and interval.
        better: the interval lies above 0. worse: it lies below 0.
    """

    candidate: LikedShare
    serving: LikedShare
    difference: float
    se: float
    low: float
    high: float
    prompts: int
    better: bool
    worse: bool

    def summary(self, serving_name: str = "serving") -> str:
        """One sentence for people."""
        verdict = "better" if self.better else "worse" if self.worse else "no clear difference"
        c, s = self.candidate, self.serving
        return (
            f"liked share {c.share:.2f} [{c.low:.2f}, {c.high:.2f}] against {s.share:.2f} "
            f"[{s.low:.2f}, {s.high:.2f}] for {serving_name}: paired difference "
            f"{self.difference:+.2f} [{self.low:+.2f}, {self.high:+.2f}] over {self.prompts} "
            f"prompts: {verdict}"
        )


def compare(
    candidate: Mapping[Hashable, Sequence[float]],
    serving: Mapping[Hashable, Sequence[float]],
    z: float = 1.96,
) -> Comparison:
    """Compare two sets of judged answers to the same prompts, paired by prompt.

    Raises:
        ValueError: the prompts differ, or liked_share refuses a side.
    """
    if set(candidate) != set(serving):
        raise ValueError(
            f"candidate answered {len(candidate)} prompts and serving {len(serving)}, "
            f"{len(set(candidate) ^ set(serving))} of them not both: sample both sides for "
            "the same prompts"
        )
    c_means, s_means = _prompt_means(candidate), _prompt_means(serving)
    diffs = [c_means[k] - s_means[k] for k in c_means]
    if not diffs:
        raise ValueError("no judged answers: sample answers for at least one prompt")
    difference, se = _mean_and_se(diffs)
    low, high = difference - z * se, difference + z * se
    return Comparison(
        liked_share(candidate, z),
        liked_share(serving, z),
        difference,
        se,
        low,
        high,
        len(diffs),
        low > 0,
        high < 0,
    )
