"""Input statistics: bins, PSI against hand-computed values, running moments, NaN/inf, and the
baseline.npz format."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gateway.monitoring.stats import (
    PSI_FLOOR,
    TENSOR,
    RunningStats,
    bin_counts,
    build_baseline,
    proportions,
    psi,
    quantile_edges,
    read_baseline,
    write_baseline,
)

# ---- PSI ------------------------------------------------------------------------------------


def test_psi_matches_a_hand_computed_value():
    # (0.1-0.25)ln(0.1/0.25) + (0.2-0.25)ln(0.2/0.25) + (0.3-0.25)ln(0.3/0.25)
    #   + (0.4-0.25)ln(0.4/0.25) = 0.137444 + 0.011157 + 0.009116 + 0.070501
    assert psi(np.array([0.25] * 4), np.array([0.1, 0.2, 0.3, 0.4])) == pytest.approx(0.228217,
                                                                                       abs=1e-6)


def test_psi_of_identical_distributions_is_zero_and_it_is_symmetric():
    p = np.array([0.1, 0.6, 0.3])
    q = np.array([0.3, 0.3, 0.4])
    assert psi(p, p) == 0.0
    assert psi(p, q) == pytest.approx(psi(q, p))
    assert psi(p, q) > 0


def test_psi_clamps_empty_bins_to_the_floor():
    # actual [1, 0] vs expected [0.5, 0.5]: the empty bin counts as 1e-4
    #   (1 - 0.5) ln(1 / 0.5) + (1e-4 - 0.5) ln(1e-4 / 0.5) = 0.346574 + 4.257745
    assert PSI_FLOOR == 1e-4
    assert psi(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(4.604318, abs=1e-6)
    # both empty: no contribution
    assert psi(np.array([0.0, 1.0]), np.array([0.0, 1.0])) == 0.0


def test_psi_is_per_row_and_nan_for_a_row_without_observations():
    expected = np.array([[0.5, 0.5], [0.5, 0.5]])
    actual = proportions(np.array([[5, 5], [0, 0]]))
    scores = psi(expected, actual)
    assert scores[0] == 0.0
    assert math.isnan(scores[1])


# ---- bins -----------------------------------------------------------------------------------


def test_values_on_an_edge_go_right_and_infinities_to_the_outer_bins():
    edges = np.array([[0.0, 1.0, 2.0, 3.0, 4.0]])  # inner edges 1, 2, 3: four bins
    values = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 10.0, -np.inf, np.inf, np.nan]).reshape(-1, 1)
    assert bin_counts(values, edges).tolist() == [[2, 2, 1, 3]]


def test_bins_are_per_feature():
    edges = np.array([[0, 0.5, 1], [0, 10, 20]], dtype=float)  # two bins each
    values = np.array([[0.2, 15], [0.7, 5], [0.9, 25]])
    assert bin_counts(values, edges).tolist() == [[1, 2], [1, 2]]


def test_empty_values_give_zero_counts():
    edges = quantile_edges(np.arange(10.0).reshape(-1, 1), 4)
    assert bin_counts(np.empty((0, 1)), edges).tolist() == [[0, 0, 0, 0]]


def test_quantile_edges_split_continuous_data_evenly():
    values = np.random.default_rng(0).standard_normal((10_000, 1))
    edges = quantile_edges(values, 10)
    counts = bin_counts(values, edges)[0]
    assert counts.sum() == 10_000
    assert counts.min() >= 990 and counts.max() <= 1010
    assert edges[0, 0] == values.min() and edges[0, -1] == values.max()


def test_repeated_edges_of_discrete_data_leave_bins_empty_on_both_sides():
    values = np.array([0.0] * 70 + [1.0] * 30).reshape(-1, 1)
    baseline = build_baseline(values, [0], 100, bins=10)
    assert baseline.expected.sum() == pytest.approx(1.0)
    assert sorted(baseline.expected[0].tolist(), reverse=True)[:2] == [0.7, 0.3]
    same = proportions(bin_counts(values, baseline.edges))
    assert psi(baseline.expected, same)[0] == pytest.approx(0.0)
    flipped = np.array([0.0] * 30 + [1.0] * 70).reshape(-1, 1)
    assert psi(baseline.expected, proportions(bin_counts(flipped, baseline.edges)))[0] > 0.25


def test_a_constant_feature_has_all_mass_in_one_bin():
    baseline = build_baseline(np.full((50, 1), 3.0), [0], 50, bins=5)
    assert baseline.expected[0].tolist().count(1.0) == 1
    below = proportions(bin_counts(np.full((50, 1), 2.0), baseline.edges))
    assert psi(baseline.expected, below)[0] > 1


def test_a_column_without_finite_values_still_bins():
    values = np.array([np.nan, np.inf, -np.inf]).reshape(-1, 1)
    edges = quantile_edges(values, 4)
    assert np.isfinite(edges).all()
    assert bin_counts(values, edges).tolist() == [[1, 0, 0, 1]]  # NaN left out


def test_shifted_data_scores_high_and_same_distribution_low():
    rng = np.random.default_rng(1)
    baseline = build_baseline(rng.standard_normal((5000, 3)), np.arange(3), 5000)
    same = proportions(bin_counts(rng.standard_normal((2000, 3)), baseline.edges))
    shifted_data = rng.standard_normal((2000, 3))
    shifted_data[:, 1] += 1.0
    shifted = proportions(bin_counts(shifted_data, baseline.edges))
    assert psi(baseline.expected, same).max() < 0.05
    scores = psi(baseline.expected, shifted)
    assert scores[1] > 0.5 and scores[0] < 0.05 and scores[2] < 0.05


# ---- running moments --------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 40), st.integers(1, 4)),
                  elements=st.floats(-1e6, 1e6) | st.sampled_from([np.nan, np.inf, -np.inf])),
       st.integers(1, 5))
def test_running_moments_match_numpy_over_finite_values(values, chunks):
    stats = RunningStats(values.shape[1])
    for part in np.array_split(values, chunks):
        stats.update(part)
    finite = np.isfinite(values)
    assert stats.count.tolist() == finite.sum(axis=0).tolist()
    assert stats.nonfinite.tolist() == (~finite).sum(axis=0).tolist()
    for f in range(values.shape[1]):
        column = values[finite[:, f], f]
        if column.size:
            assert stats.mean[f] == pytest.approx(column.mean(), rel=1e-9, abs=1e-6)
            assert stats.std[f] == pytest.approx(column.std(), rel=1e-6, abs=1e-4)
            assert stats.minimum[f] == column.min() and stats.maximum[f] == column.max()
        else:
            assert math.isnan(stats.std[f])


def test_running_moments_are_stable_far_from_zero():
    stats = RunningStats(1)
    rng = np.random.default_rng(2)
    for _ in range(100):
        stats.update(1e9 + rng.standard_normal((100, 1)))
    assert stats.std[0] == pytest.approx(1.0, rel=0.05)


# ---- baseline.npz ---------------------------------------------------------------------------


def test_write_and_read_a_baseline(tmp_path):
    rng = np.random.default_rng(3)
    tabular = rng.normal(5.0, 2.0, (1000, 4)).astype(np.float32)
    image = rng.random((50, 3, 20, 20))  # 1200 values per sample: pooled only
    path = write_baseline(tmp_path / "1" / "baseline.npz", {"features": tabular, "image": image})
    assert path.name == "baseline.npz" and path.is_file()
    assert not list(path.parent.glob(".*"))  # no temporary left behind
    baselines = read_baseline(path)
    assert set(baselines) == {"features", "image"}
    b = baselines["features"]
    assert b.features.tolist() == [TENSOR, 0, 1, 2, 3]
    assert b.samples == 1000 and b.bins == 10
    assert b.expected.shape == (5, 10) and b.edges.shape == (5, 11)
    assert np.allclose(b.expected.sum(axis=1), 1.0)
    assert np.allclose(b.mean[1:], tabular.mean(axis=0), atol=1e-4)
    assert np.allclose(b.std[1:], tabular.std(axis=0), atol=1e-3)
    assert b.count[0] == 4000
    assert baselines["image"].features.tolist() == [TENSOR]
    selected = b.select(np.array([2, 0]))
    assert selected.features.tolist() == [2, 0]
    assert np.array_equal(selected.edges[0], b.edges[3])
    assert b.select(np.array([7])) is None


def test_write_baseline_refuses_unusable_data(tmp_path):
    with pytest.raises(ValueError):
        write_baseline(tmp_path / "b.npz", {})
    with pytest.raises(ValueError, match="no finite"):
        write_baseline(tmp_path / "b.npz", {"x": np.full((10, 2), np.nan)})
    with pytest.raises(TypeError):
        write_baseline(tmp_path / "b.npz", {"x": np.array([["a"], ["b"]], dtype=object)})


def test_read_baseline_explains_bad_files(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="npz"):
        read_baseline(garbage)
    good = write_baseline(tmp_path / "good.npz", {"x": np.arange(100.0).reshape(50, 2)})
    arrays = dict(np.load(good))

    def broken(name, **changes):
        path = tmp_path / name
        with open(path, "wb") as handle:
            np.savez(handle, **{**arrays, **changes})
        return path

    with pytest.raises(ValueError, match="format 2"):
        read_baseline(broken("v2.npz", format=np.array(2)))
    with pytest.raises(ValueError, match="sum to 1"):
        read_baseline(broken("sum.npz", expected_0=arrays["expected_0"] * 2))
    with pytest.raises(ValueError, match="sorted"):
        read_baseline(broken("edges.npz", edges_0=arrays["edges_0"][:, ::-1]))
    with pytest.raises(ValueError, match="shapes"):
        read_baseline(broken("shape.npz", mean_0=np.zeros(9)))
    del arrays["count_0"]
    with pytest.raises(ValueError, match="count_0"):
        read_baseline(broken("missing.npz"))
