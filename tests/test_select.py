import numpy as np
import pytest

from varalign.select import at_least, count_for_fraction, datacomp_threshold, top_k_mask


def _datacomp_keep(scores: np.ndarray, fraction: float) -> np.ndarray:
    """DataComp baselines.py: sort descending, threshold = sorted[int(N*f)], keep >=."""
    threshold = -np.sort(-scores)[int(len(scores) * fraction)]
    return scores >= threshold


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.29, 0.3, 0.5, 0.999])
def test_datacomp_threshold_with_float16_ties(fraction: float) -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(0.25, 0.04, 50_000).astype(np.float16).astype(np.float32)  # many exact ties
    keep = at_least(scores, datacomp_threshold(scores, fraction))
    assert np.array_equal(keep, _datacomp_keep(scores, fraction))
    assert keep.sum() >= int(len(scores) * fraction) + 1


def test_fraction_count_truncates_like_python() -> None:
    assert count_for_fraction(50_000, 0.29) == 14499  # 50000 * 0.29 = 14499.999...
    assert count_for_fraction(12_800_000, 0.3) == 3_840_000


def test_fraction_one_keeps_everything() -> None:
    scores = np.array([0.3, 0.1, 0.2], dtype=np.float32)
    assert at_least(scores, datacomp_threshold(scores, 1.0)).all()


def test_threshold_compares_in_float32() -> None:
    scores = np.array([0.7, 0.6999999], dtype=np.float32)  # float32(0.7) < 0.7 in float64
    assert float(scores[0]) < 0.7
    assert at_least(scores, 0.7).tolist() == [True, False]


def test_top_k_exact_count_ties_to_earliest() -> None:
    scores = np.array([0.5, 0.2, 0.5, 0.9, 0.5, 0.1], dtype=np.float32)
    mask = top_k_mask(scores, 3)
    assert mask.tolist() == [True, False, True, True, False, False]
    assert top_k_mask(scores, 0).sum() == 0
    assert top_k_mask(scores, 10).all()


def test_top_k_matches_stable_argsort() -> None:
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 50, 5000).astype(np.float32)
    for k in (1, 17, 2500, 4999):
        expected = np.zeros(len(scores), bool)
        expected[np.argsort(-scores, kind="stable")[:k]] = True
        assert np.array_equal(top_k_mask(scores, k), expected)
