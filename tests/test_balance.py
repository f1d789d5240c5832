"""KTO class weights: the ratio (lambda_D n_D) / (lambda_U n_U) lands in [1, 4/3], the
minority class gets the larger weight, one class alone is valid, small data is skipped
with a reason. Expected numbers are worked out by hand in each docstring."""

from __future__ import annotations

from pathlib import Path

import pytest

from connectors.config import ConfigError, load_settings
from pipeline.feedback.balance import BalanceOptions, choose_weights

LOOSE = BalanceOptions(min_examples=1, min_per_class=1)


def test_fewer_likes_raise_lambda_d_to_the_target() -> None:
    """n_D = 200, n_U = 600, target 7/6: lambda_U = 1 and
    lambda_D = 7/6 * 600 / 200 = 3.5; ratio = 3.5 * 200 / (1 * 600) = 700 / 600 = 7/6."""
    b = choose_weights(200, 600)
    assert b.lambda_desirable == pytest.approx(3.5)
    assert b.lambda_undesirable == 1.0
    assert b.ratio == pytest.approx(7 / 6)
    assert b.skip_reason is None
    assert "200 desirable and 600 undesirable" in b.explanation
    assert "lambda_D = 3.500, lambda_U = 1.000" in b.explanation
    assert "= 1.167" in b.explanation


def test_fewer_dislikes_raise_lambda_u_to_the_target() -> None:
    """n_D = 900, n_U = 300: n_D / n_U = 3 > 4/3, so lambda_D = 1 and
    lambda_U = 900 / (7/6 * 300) = 900 / 350 = 18/7 = 2.5714...;
    ratio = 900 / (18/7 * 300) = 900 * 7 / 5400 = 7/6."""
    b = choose_weights(900, 300)
    assert (b.lambda_desirable, b.lambda_undesirable) == (1.0, pytest.approx(18 / 7))
    assert b.ratio == pytest.approx(7 / 6)
    assert "lambda_U = 2.571" in b.explanation


def test_counts_already_in_the_band_keep_equal_weights() -> None:
    """n_D / n_U = 120 / 100 = 1.2 and 100 / 100 = 1.0 lie in [1, 4/3]: both lambdas 1.0,
    the ratio is the counts' own."""
    for n_d, n_u in ((120, 100), (100, 100), (400, 300)):
        b = choose_weights(n_d, n_u)
        assert (b.lambda_desirable, b.lambda_undesirable) == (1.0, 1.0)
        assert b.ratio == pytest.approx(n_d / n_u)
        assert "already in [1, 4/3]" in b.explanation


def test_just_below_the_band_is_reweighted() -> None:
    """n_D = 99, n_U = 100: 0.99 < 1, so lambda_D = 7/6 * 100 / 99 = 700 / 594 = 1.1785..."""
    b = choose_weights(99, 100)
    assert b.lambda_desirable == pytest.approx(700 / 594)
    assert b.lambda_undesirable == 1.0


def test_target_ratio_is_configurable() -> None:
    """target 1.0, n_D = 50, n_U = 200: lambda_D = 1.0 * 200 / 50 = 4; ratio = 4*50/200 = 1.
    target 4/3, n_D = 1000, n_U = 250: lambda_U = 1000 / (4/3 * 250) = 3; ratio = 4/3."""
    b = choose_weights(50, 200, BalanceOptions(target_ratio=1.0))
    assert (b.lambda_desirable, b.ratio) == (pytest.approx(4.0), pytest.approx(1.0))
    b = choose_weights(1000, 250, BalanceOptions(target_ratio=4 / 3))
    assert (b.lambda_undesirable, b.ratio) == (pytest.approx(3.0), pytest.approx(4 / 3))


def test_the_raised_weight_is_capped_and_the_explanation_says_the_band_is_missed() -> None:
    """n_D = 10, n_U = 1000: lambda_D would be 7/6 * 1000 / 10 = 116.67; capped at 10,
    the ratio is 10 * 10 / 1000 = 0.1."""
    b = choose_weights(10, 1000, LOOSE)
    assert b.lambda_desirable == 10.0
    assert b.ratio == pytest.approx(0.1)
    assert "outside [1, 4/3]" in b.explanation
    assert "would need 116.667" in b.explanation


@pytest.mark.parametrize(("n_d", "n_u", "only"), [(0, 50, "undesirable"), (50, 0, "desirable")])
def test_one_class_alone_trains_with_unit_weights(n_d: int, n_u: int, only: str) -> None:
    b = choose_weights(n_d, n_u)
    assert (b.lambda_desirable, b.lambda_undesirable) == (1.0, 1.0)
    assert b.ratio is None
    assert b.skip_reason is None
    assert "ratio is undefined" in b.explanation
    assert f"trains on {only} examples alone" in b.explanation


def test_too_few_examples_skip_the_run_with_a_reason() -> None:
    b = choose_weights(10, 15, BalanceOptions(min_examples=32))
    assert b.skip_reason is not None
    assert "only 25 training examples" in b.skip_reason
    assert "min_examples = 32" in b.skip_reason
    assert b.explanation.startswith("skipped: only 25")


def test_a_tiny_class_skips_but_an_absent_one_does_not() -> None:
    options = BalanceOptions(min_examples=10, min_per_class=8)
    tiny = choose_weights(3, 200, options)
    assert tiny.skip_reason is not None and "only 3 desirable examples" in tiny.skip_reason
    assert "min_per_class = 8" in tiny.skip_reason
    assert choose_weights(0, 200, options).skip_reason is None


def test_bad_options_and_counts_are_refused() -> None:
    with pytest.raises(ValueError, match=r"target_ratio\n.*less than or equal to 1.33"):
        BalanceOptions(target_ratio=1.5)
    with pytest.raises(ValueError, match=r"min_per_class\n.*greater than or equal to 1"):
        BalanceOptions(min_per_class=0)
    with pytest.raises(ValueError, match="non-negative"):
        choose_weights(-1, 3)


def test_balance_config_becomes_the_pipeline_options(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[balance]\ntarget_ratio = 1.25\nmin_examples = 10\nmax_weight = 5\n")
    options = load_settings(path).balance
    assert options == BalanceOptions(1.25, 10, 8, 5.0)
    path.write_text("[balance]\ntarget_ratio = 1.5\n")
    with pytest.raises(ConfigError, match=r"\[balance\] target_ratio: .*(got 1.5)"):
        load_settings(path)
