"""AL metrics: the paper's RLPA and SFT rows, unscored turns, constant curves, numpy cross-checks; the
table of metrics, with a metric registered in it reaching the result, the report and the plot."""

import math

import numpy as np
import pytest

from rlpa_jax.eval import metrics, plots
from rlpa_jax.eval.report import format_table
from rlpa_jax.eval.result import EvalResult

# Table rows of the paper (AL(1..10), then N-IR and N-R2 as printed, to 3 decimals).
PAPER_ROWS = {
    "RLPA": ([62.16, 68.92, 70.27, 74.32, 72.97, 74.32, 75.68, 78.38, 77.03, 79.73], 0.090, 0.855),
    "SFT": ([2.7, 24.32, 41.89, 40.54, 59.46, 56.76, 54.05, 54.05, 54.05, 55.41], 0.083, 0.628),
}


@pytest.mark.parametrize("row", sorted(PAPER_ROWS))
def test_paper_rows_to_printed_precision(row):
    al, paper_nir, paper_r2 = PAPER_ROWS[row]
    assert round(metrics.n_ir(al), 3) == paper_nir
    assert round(metrics.n_r2(al), 3) == paper_r2
    report = metrics.summary(al)
    assert report["AL"] == pytest.approx(al) and report["AVG"] == pytest.approx(np.mean(al))
    assert (round(report["N-IR"], 3), round(report["N-R2"], 3)) == (paper_nir, paper_r2)


@pytest.mark.parametrize("seed", range(5))
def test_fit_matches_numpy_polyfit(seed):
    al = np.random.default_rng(seed).uniform(0, 100, size=12)
    normalized = (al - al.min()) / (al.max() - al.min())
    turns = np.arange(1, 13)
    slope, intercept = np.polyfit(turns, normalized, 1)
    predicted = slope * turns + intercept
    r2 = 1 - np.sum((normalized - predicted) ** 2) / np.sum((normalized - normalized.mean()) ** 2)
    np.testing.assert_allclose(metrics.normalized_al(al), normalized)
    assert metrics.n_ir(al) == pytest.approx(slope, rel=1e-9)
    assert metrics.n_r2(al) == pytest.approx(r2, rel=1e-9)


def test_normalization_is_scale_free():
    al = np.array([10.0, 30.0, 20.0, 50.0])
    assert metrics.normalized_al(al).tolist() == [0.0, 0.5, 0.25, 1.0]
    assert metrics.n_ir(al) == pytest.approx(metrics.n_ir(2 * al + 7))


def test_constant_curve_is_defined_as_zero_without_nan():
    # max == min: N-AL is defined as 0 at every turn, so the slope and R^2 are 0 too.
    for constant in (0.0, 55.0, 100.0):
        al = np.full(10, constant)
        assert metrics.normalized_al(al).tolist() == [0.0] * 10
        report = metrics.summary(al)
        assert (report["N-IR"], report["N-R2"], report["AVG"]) == (0.0, 0.0, constant)
        assert not any(math.isnan(value) for value in (report["N-IR"], report["N-R2"]))


def test_al_per_turn_skips_unscored_and_counts_them():
    nan = np.nan
    judgments = np.array([
        [1, 0, 1, nan],
        [1, 1, nan, nan],
        [0, 1, 1, nan],
        [1, 0, 0, nan],
    ])
    per_turn = metrics.al_per_turn(judgments)
    np.testing.assert_allclose(per_turn.al[:3], [75.0, 50.0, 100 * 2 / 3])
    assert math.isnan(per_turn.al[3])
    assert per_turn.unscored.tolist() == [0, 0, 1, 4]
    report = metrics.summary(per_turn.al)
    assert report["AL"][3] is None
    assert report["AVG"] == pytest.approx(np.mean([75.0, 50.0, 100 * 2 / 3]))
    # The fit uses the scored turns at their own turn numbers (1, 2, 3).
    assert report["N-IR"] == pytest.approx(np.polyfit([1, 2, 3], metrics.normalized_al(per_turn.al[:3]), 1)[0])


def test_al_per_turn_from_a_paper_sized_table():
    # 74 users: AL values are multiples of 100/74, as in the paper's tables.
    rng = np.random.default_rng(0)
    judgments = (rng.random((74, 10)) < np.linspace(0.2, 0.8, 10)).astype(float)
    per_turn = metrics.al_per_turn(judgments)
    np.testing.assert_allclose(per_turn.al, 100 * judgments.mean(axis=0))
    assert per_turn.unscored.tolist() == [0] * 10


def test_al_per_turn_rejects_non_binary_and_wrong_shapes():
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        metrics.al_per_turn(np.array([[0.5, 1.0]]))
    with pytest.raises(ValueError, match=r"\(users, turns\)"):
        metrics.al_per_turn(np.array([1.0, 0.0]))


# --- The table of AL metrics ---------------------------------------------------------------------


def test_the_table_keeps_the_result_files_keys():
    judgments = np.array([[1, 0, 1], [0, 1, np.nan]])
    report = metrics.al_report(judgments)
    assert list(metrics.AL_METRICS) == ["AVG", "N-IR", "N-R2"]
    assert list(report.to_json()) == ["AL", "AVG", "N-IR", "N-R2", "unscored", "users"]
    assert report.to_json() == metrics.summary(metrics.al_per_turn(judgments).al) | {"unscored": [0, 0, 1],
                                                                                     "users": 2}
    assert metrics.ALReport.from_json(report.to_json()) == report
    with pytest.raises(ValueError, match="r.json.*lacks users"):
        metrics.ALReport.from_json({"AL": [50.0], "unscored": [0]}, "r.json")


# docs/ARCHITECTURE.md "Extending": a new evaluation metric is one AL_METRICS entry.
def half_gain(al):
    half = len(al) // 2
    return float(np.nanmean(al[len(al) - half:]) - np.nanmean(al[:half]))


def test_a_metric_registered_in_the_table_reaches_the_result_the_report_and_the_plot(monkeypatch, tmp_path):
    rng = np.random.default_rng(3)
    judgments = (rng.random((7, 9)) < np.linspace(0.1, 0.9, 9)).astype(float)
    judgments[rng.random((7, 9)) < 0.2] = np.nan
    judgments[:, 4] = np.nan  # a turn nobody was scored at
    before = EvalResult("before", "vanilla", judgments, metrics.al_report(judgments))
    saved = before.save(tmp_path / "before.json")  # written while the table had no GAIN

    gain = metrics.ALMetric(half_gain, digits=2, description="mean AL of the last half minus the first half")
    monkeypatch.setitem(metrics.AL_METRICS, "GAIN", gain)
    # By hand: AL(k) over the users scored at turn k; turns 1-4 against turns 6-9, turn 5 has no AL.
    scored = ~np.isnan(judgments)
    with np.errstate(invalid="ignore"):
        al = 100 * np.nansum(judgments, axis=0) / scored.sum(axis=0)
    expected = np.mean(al[5:]) - np.mean(al[:4])

    result = EvalResult("gain", "vanilla", judgments, metrics.al_report(judgments))
    assert result.al.metrics["GAIN"] == pytest.approx(expected, rel=1e-12)
    assert result.al.metrics["AVG"] == pytest.approx(np.nanmean(al))  # the paper's three are unchanged
    written = result.to_json()["al"]
    assert list(written) == ["AL", "AVG", "N-IR", "N-R2", "GAIN", "unscored", "users"]
    assert written["GAIN"] == result.al.metrics["GAIN"]
    loaded = EvalResult.load(saved)  # an earlier file gets the new metric from its curve
    assert loaded.al.metrics["GAIN"] == pytest.approx(expected, rel=1e-12)
    assert loaded.al.metrics["N-IR"] == before.al.metrics["N-IR"]

    table = format_table([result, loaded]).splitlines()
    gain_row = next(line for line in table if line.startswith("GAIN"))
    assert gain_row.split()[1:] == [f"{expected:.2f}"] * 2
    assert f"GAIN {expected:.2f}" in plots._label(result)
    assert plots.plot_al_curves([result, before.to_json()], tmp_path / "al.png").stat().st_size > 0
