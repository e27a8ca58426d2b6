"""`edgefleet report`: PNG plots of a run (matplotlib, Agg) and one self-contained HTML page showing them
with the summary table. Everything is read from the run directory: metrics.jsonl (RoundLogs) and, once
the run finished, summary.json (per-device personalization)."""
from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fleet.metrics import FleetMetrics  # noqa: E402
from fleet.records import read_round_logs  # noqa: E402
from fleet.roundlog import RoundLog  # noqa: E402
from fleet.runs import SUMMARY  # noqa: E402

FIGSIZE_IN = (8.0, 4.5)
DPI = 100
PNG_SIZE = (int(FIGSIZE_IN[0] * DPI), int(FIGSIZE_IN[1] * DPI))   # width, height in pixels
PLOT_FRAME = "#3a5f8a"                 # the frame around each plot on the page (tests find plots by it)
STAGES = ("base", "global", "personalized")


@dataclass(frozen=True)
class Report:
    html: Path
    pngs: tuple[Path, ...]


@dataclass
class RunData:
    logs: list[RoundLog]
    summary: dict[str, Any]
    metrics: FleetMetrics                 # the run's records replayed: per-device latest numbers

    @property
    def metric_name(self) -> str:
        return self.summary.get("metric", "metric")


def load_run(run_dir: str | os.PathLike) -> RunData:
    logs = read_round_logs(run_dir)
    path = Path(run_dir) / SUMMARY
    summary = json.loads(path.read_text()) if path.exists() else {}
    metrics = FleetMetrics()
    metrics.restore(logs)
    return RunData(logs, summary, metrics)


# ---- plots (each draws onto one figure; an empty run gives a figure saying so) -----------------------------

def plot_personalization_sorted(run: RunData, fig) -> None:
    ax = fig.subplots()
    per_device = run.summary.get("personalization", {}).get("per_device", {})
    for stage in STAGES:
        values = np.sort(_finite(per_device.get(stage, [])))
        if len(values):
            ax.plot(np.arange(len(values)), values, label=f"{stage} (mean {values.mean():.3f})", lw=1.6)
    ax.set(xlabel="devices, sorted by value", ylabel=run.metric_name,
           title=f"Per-device {run.metric_name}: base model, global adapters, personalized")
    _legend_or_empty(ax, "no personalization yet (the run has not finished)")


def plot_personalization_distribution(run: RunData, fig) -> None:
    ax = fig.subplots()
    per_device = run.summary.get("personalization", {}).get("per_device", {})
    data = [(stage, _finite(per_device.get(stage, []))) for stage in STAGES]
    data = [(s, v) for s, v in data if len(v)]
    if data:
        lo = min(v.min() for _, v in data)
        hi = max(v.max() for _, v in data)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 25)
        for stage, values in data:
            ax.hist(values, bins=bins, histtype="stepfilled", alpha=0.35, label=stage)
            ax.hist(values, bins=bins, histtype="step", lw=1.4, color=ax.patches[-1].get_facecolor()[:3])
    ax.set(xlabel=run.metric_name, ylabel="devices", title=f"Distribution of per-device {run.metric_name}")
    _legend_or_empty(ax, "no personalization yet (the run has not finished)")


def plot_loss_metric(run: RunData, fig) -> None:
    left, right = fig.subplots(1, 2)
    rounds = [log.round for log in run.logs]
    summaries = [log.summary() for log in run.logs]
    if rounds:
        left.plot(rounds, [s["train_loss"] for s in summaries], "o-", label="train loss")
        for key, label in (("metric_before", "before local training"), ("metric_after", "after local training"),
                           ("global_metric", "global adapters (evaluated)")):
            values = [s[key] for s in summaries]
            if any(math.isfinite(v) for v in values):
                right.plot(rounds, values, "o-", label=label)
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set(xlabel="round", ylabel="loss", title="Training loss over rounds")
    right.set(xlabel="round", ylabel=run.metric_name, title=f"{run.metric_name} over rounds")
    _legend_or_empty(left, "no finished round")
    _legend_or_empty(right, "no finished round")


def plot_memory(run: RunData, fig) -> None:
    ax = fig.subplots()
    devices = [d for d in run.metrics.snapshot() if d.peak]
    if devices:
        levels = sorted({level for d in devices for level in d.peak})
        order = sorted(devices, key=lambda d: sum(d.peak.values()))
        x = np.arange(len(order))
        stacks = [np.array([d.peak.get(level, 0) for d in order], float) / 1024 for level in levels]
        ax.stackplot(x, *stacks, labels=[f"peak {level}" for level in levels], step="mid", alpha=0.8)
        budget = np.array([d.budget_bytes for d in order], float) / 1024
        if budget.any():
            ax.step(x, np.where(budget > 0, budget, np.nan), where="mid", color="black", lw=1.5, ls="--",
                    label="budget")
        ax.set_xlim(-0.5, len(order) - 0.5)
    ax.set(xlabel="devices, sorted by peak memory", ylabel="KiB",
           title="Peak memory per device by level, against its budget")
    _legend_or_empty(ax, "no device telemetry")


def plot_throughput(run: RunData, fig) -> None:
    left, right = fig.subplots(1, 2)
    devices = run.metrics.snapshot()
    for ax, attr, where in ((left, "modelled_ips", "on the target (cost model)"),
                            (right, "measured_ips", "measured on the host")):
        values = _finite([getattr(d, attr) for d in devices])
        if len(values):
            ax.hist(values, bins=25, color="C0" if ax is left else "C2", label=f"{len(values)} devices")
        ax.set(xlabel="images per second", ylabel="devices", title=f"Throughput {where}")
        _legend_or_empty(ax, "no training telemetry")


def plot_failures(run: RunData, fig) -> None:
    ax = fig.subplots()
    rounds = [log.round for log in run.logs]
    per_round = [{**log.failures, **log.unavailable} for log in run.logs]
    causes = sorted({c for counts in per_round for c in counts})
    bottom = np.zeros(len(rounds))
    for cause in causes:
        counts = np.array([counts.get(cause, 0) for counts in per_round], float)
        ax.bar(rounds, counts, bottom=bottom, label=cause)
        bottom += counts
    ax.set(xlabel="round", ylabel="jobs", title="Failed or missed jobs per round, by cause")
    if rounds:
        ax.set_xticks(rounds)
    _legend_or_empty(ax, "no failures" if rounds else "no finished round")


def plot_round_duration(run: RunData, fig) -> None:
    ax = fig.subplots()
    rounds = [log.round for log in run.logs]
    if rounds:
        ax.bar(rounds, [log.duration_s for log in run.logs], color="C4", label="round")
        phases = sorted({k for log in run.logs for k in log.timings})
        for phase in phases:
            ax.plot(rounds, [log.timings.get(phase, math.nan) for log in run.logs], "o-", lw=1, label=phase)
        ax.set_xticks(rounds)
    ax.set(xlabel="round", ylabel="seconds", title="Round duration")
    _legend_or_empty(ax, "no finished round")


PLOTS: tuple[tuple[str, str, Callable[[RunData, Any], None]], ...] = (
    ("personalization_sorted", "Per-device metric, sorted", plot_personalization_sorted),
    ("personalization_distribution", "Per-device metric, distributions", plot_personalization_distribution),
    ("loss_metric", "Loss and metric over rounds", plot_loss_metric),
    ("memory", "Peak memory against budget", plot_memory),
    ("throughput", "Throughput", plot_throughput),
    ("failures", "Failures per round", plot_failures),
    ("round_duration", "Round duration", plot_round_duration),
)


def write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Report:
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    pngs = []
    for name, _, draw in PLOTS:
        fig = plt.figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
        try:
            draw(run, fig)
            path = out / f"{name}.png"
            fig.savefig(path, dpi=DPI)
        finally:
            plt.close(fig)
        pngs.append(path)
    page = out / "index.html"
    page.write_text(render_html(run, Path(run_dir), pngs))
    return Report(page, tuple(pngs))


# ---- the page ----------------------------------------------------------------------------------------------

def summary_rows(run: RunData) -> list[tuple[str, str]]:
    s, p = run.summary, run.summary.get("personalization", {})
    failures: dict[str, int] = {}
    for log in run.logs:
        for cause, count in {**log.failures, **log.unavailable}.items():
            failures[cause] = failures.get(cause, 0) + count
    rows = [("scenario", s.get("scenario", "(running)")),
            ("rounds finished", str(s.get("rounds_completed", len(run.logs)))),
            ("devices", str(s.get("devices", len(run.metrics.snapshot()))))]
    metric = run.metric_name
    for stage in STAGES:
        value = p.get(f"{stage}_{metric}_mean", p.get(f"{stage}_accuracy_mean"))
        if value is not None:
            rows.append((f"{stage} {metric} (mean over devices)", _fmt(value)))
    if "share_of_devices_improved" in p:
        rows.append(("devices improved by personalization", f"{100 * p['share_of_devices_improved']:.0f} %"))
    timing = s.get("timing", {})
    if timing:
        rows.append(("seconds per round", _fmt(timing.get("seconds_per_round"))))
        rows.append(("wall time (s)", _fmt(timing.get("wall_seconds"))))
    rows.append(("failed or missed jobs", ", ".join(f"{k} {v}" for k, v in sorted(failures.items())) or "none"))
    return rows


def render_html(run: RunData, run_dir: Path, pngs: Sequence[Path]) -> str:
    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary_rows(run))
    figures = []
    for (name, title, _), path in zip(PLOTS, pngs):
        data = base64.b64encode(path.read_bytes()).decode()
        figures.append(f'<figure id="{name}"><img class="plot" src="data:image/png;base64,{data}" '
                       f'data-file="{path.name}" width="{PNG_SIZE[0]}" height="{PNG_SIZE[1]}" alt="{html.escape(title)}">'
                       f'<figcaption>{html.escape(title)} — <a href="{path.name}">{path.name}</a></figcaption></figure>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>edgefleet report: {html.escape(str(run_dir))}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; background: #fff; }}
table {{ border-collapse: collapse; margin-bottom: 24px; }}
th, td {{ text-align: left; padding: 4px 12px; border-bottom: 1px solid #ddd; }}
figure {{ margin: 0 0 24px 0; }}
img.plot {{ display: block; border: 4px solid {PLOT_FRAME}; }}
</style></head>
<body>
<h1>edgefleet run report</h1>
<p>{html.escape(str(run_dir))}</p>
<table>
{rows}
</table>
{chr(10).join(figures)}
</body></html>
"""


def _finite(values: Sequence[float]) -> np.ndarray:
    v = np.asarray([x for x in values if x is not None], float)
    return v[np.isfinite(v)]


def _legend_or_empty(ax, message: str) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and math.isfinite(value) else str(value)
