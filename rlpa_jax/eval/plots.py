"""Figures of evaluation results: AL(k) curves of several runs, and long-term profile scores.

Both functions take EvalResult objects or the dicts launch/eval.py writes as JSON, so earlier
results can be drawn next to a new one without rerunning them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: evaluation runs on headless hosts
import matplotlib.pyplot as plt  # noqa: E402

from rlpa_jax.eval.metrics import AL_METRICS  # noqa: E402
from rlpa_jax.eval.report import format_number  # noqa: E402
from rlpa_jax.eval.result import EvalResult  # noqa: E402


def _as_result(result: EvalResult | dict) -> EvalResult:
    return result if isinstance(result, EvalResult) else EvalResult.from_json(result, f"result {result.get('name')!r}")


def _label(result: EvalResult) -> str:
    """Name, setting and every AL_METRICS value."""
    values = ", ".join(f"{key} {format_number(result.al.metrics[key], metric.digits)}"
                       for key, metric in AL_METRICS.items())
    return f"{result.name} [{result.setting}]  {values}"


def plot_al_curves(results: Sequence[EvalResult | dict], path: str | Path, title: str | None = None) -> Path:
    """AL(k) against turn k for every result on one figure; the legend gives every AL_METRICS value."""
    results = [_as_result(result) for result in results]
    if not results:
        raise ValueError("plot_al_curves: no results to plot")
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for result in results:
        values = [float("nan") if value is None else value for value in result.al.per_turn]
        axes.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=_label(result))
    axes.set_xlabel("turn k")
    axes.set_ylabel("AL(k)")
    axes.set_ylim(-2, 102)
    axes.grid(alpha=0.3)
    axes.set_title(title or "Alignment level per turn")
    axes.legend(fontsize=8, loc="best")
    return _save(figure, path)


def plot_profile_scores(results: Sequence[EvalResult | dict], path: str | Path, title: str | None = None) -> Path:
    """Long-term profile score (F1 x 100) at each check; dashed: the ceiling (F1 x 100 of stating
    exactly the items revealed so far); dotted: the share of items revealed."""
    results = [result for result in map(_as_result, results) if result.profile_scores]
    if not results:
        raise ValueError("plot_profile_scores: no result has profile scores (only a setting with profile checks, "
                         "long_term, has them)")
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for result in results:
        checks = result.profile_scores
        turns = [check["turn"] for check in checks]
        scores = [float("nan") if check["score"] is None else check["score"] for check in checks]
        (line,) = axes.plot(turns, scores, marker="o", label=f"{result.name} profile F1 x 100")
        for key, style, label in (("ceiling", "--", "ceiling (F1 of the revealed items)"),
                                  ("revealed_share", ":", "items revealed (%)")):
            values = [float("nan") if check.get(key) is None else check[key] for check in checks]
            axes.plot(turns, values, linestyle=style, color=line.get_color(), alpha=0.7,
                      label=f"{result.name} {label}")
    axes.set_xlabel("turn k")
    axes.set_ylabel("score")
    axes.set_ylim(-2, 102)
    axes.grid(alpha=0.3)
    axes.set_title(title or "Long-term profile scores")
    axes.legend(fontsize=8, loc="best")
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


__all__ = ["plot_al_curves", "plot_profile_scores"]
