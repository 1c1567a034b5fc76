"""Latency-distribution pictures for the benchmarks: one PNG next to each printed table.

A benchmark hands over the per-call samples it already measured (never numbers derived again
from its table), grouped in panels (ADD and DEL, RunPodSandbox and the CNI phase, ...). Each
panel draws every row's empirical CDF, so whole distributions compare at a glance (a median
hides a slow tail; a box plot hides where most calls land), with the median, p90 and p99
marked on each curve and written in the legend. Plexus rows are solid, the reference plugins'
rows of the same run dashed and grey-toned. The x axis is in ms, logarithmic when the rows
span more than a decade (the shim benchmark's /bin/true next to a Python start-up).

Matplotlib runs headless (the Agg backend): benchmarks run as root on machines without a
display. Files go to `bench/out/` (gitignored) unless `--plot DIR` says otherwise.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, no GUI toolkit import

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

OUT_DIR = Path(__file__).resolve().parent / "out"
# Plexus rows take the saturated colours, the reference rows the muted ones.
PLEXUS_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf")
REFERENCE_COLOURS = ("#555555", "#999999", "#8c564b")
MARKERS = ((50, "o"), (90, "s"), (99, "^"))
LOG_SPAN = 10.0  # largest / smallest median beyond which the axis goes logarithmic


@dataclass(frozen=True)
class Series:
    """One row of a benchmark table: its label and every sample it measured, in ms."""

    label: str
    samples_ms: Sequence[float]
    reference: bool = False  # a reference plugin's row (or the harness floor): drawn muted


@dataclass(frozen=True)
class Panel:
    title: str
    series: Sequence[Series]


Method = Literal["inclusive", "exclusive"]


def percentiles(samples: Sequence[float], method: Method = "inclusive") -> dict[int, float]:
    """p50, p90 and p99 as the benchmark's table computes them (its `statistics.quantiles`
    method), so the legend and the table agree to the digit."""
    if len(samples) == 1:
        return dict.fromkeys((p for p, _ in MARKERS), float(samples[0]))
    q = statistics.quantiles(samples, n=100, method=method)
    return {50: statistics.median(samples), 90: q[89], 99: q[98]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plot",
        metavar="DIR",
        type=Path,
        default=OUT_DIR,
        help=f"write the latency-distribution PNG into DIR (default {OUT_DIR})",
    )
    parser.add_argument("--no-plot", action="store_true", help="print the table only")


def emit(
    opts: argparse.Namespace,
    name: str,
    title: str,
    panels: Sequence[Panel],
    *,
    method: Method = "inclusive",
) -> Path | None:
    """Write the PNG the options ask for and print its path (after the table)."""
    if opts.no_plot:
        return None
    path = write(name, title, panels, out_dir=opts.plot, method=method)
    print(f"plot: {path}")
    return path


def write(
    name: str,
    title: str,
    panels: Sequence[Panel],
    *,
    out_dir: Path = OUT_DIR,
    when: datetime | None = None,
    method: Method = "inclusive",
) -> Path:
    """Render the panels side by side into `out_dir/<name>-<UTC timestamp>.png`."""
    if not panels or not all(p.series and all(s.samples_ms for s in p.series) for p in panels):
        raise ValueError("every panel needs at least one row, every row at least one sample")
    when = when or datetime.now(UTC)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{when.strftime('%Y%m%dT%H%M%SZ')}.png"
    counts = sorted({len(s.samples_ms) for p in panels for s in p.series})
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    fig, axes = plt.subplots(
        1, len(panels), figsize=(7.5 * len(panels), 6.0), squeeze=False, layout="constrained"
    )
    try:
        for ax, panel in zip(axes[0], panels, strict=True):
            _draw(ax, panel, method)
        fig.suptitle(f"{title}\nn={n} per row, {when.strftime('%Y-%m-%d %H:%M UTC')}")
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def _draw(ax: Axes, panel: Panel, method: Method) -> None:
    medians = [statistics.median(s.samples_ms) for s in panel.series]
    lows = [min(s.samples_ms) for s in panel.series]
    if min(lows) > 0 and max(medians) / min(medians) > LOG_SPAN:
        ax.set_xscale("log")
        # Plain ms at 1-2-5 steps: 10^0 and 10^1 alone say little to someone reading latencies.
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    plexus = iter(PLEXUS_COLOURS * 3)
    reference = iter(REFERENCE_COLOURS * 6)
    for series in panel.series:
        colour = next(reference) if series.reference else next(plexus)
        ordered = sorted(series.samples_ms)
        # The curve rises from 0 at the fastest call: every step is one sample.
        xs = [ordered[0], *ordered]
        ys = [0.0, *((i + 1) / len(ordered) for i in range(len(ordered)))]
        marks = percentiles(series.samples_ms, method)
        label = f"{series.label}: p50 {marks[50]:.1f} / p90 {marks[90]:.1f} / p99 {marks[99]:.1f}"
        ax.step(
            xs,
            ys,
            where="post",
            color=colour,
            linestyle="--" if series.reference else "-",
            linewidth=1.6,
            label=label,
        )
        for p, marker in MARKERS:
            ax.plot(marks[p], p / 100, marker=marker, color=colour, markersize=6, linestyle="")
    ax.set_title(panel.title)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of calls at most x")
    ax.set_ylim(0, 1.02)
    for p, _ in MARKERS:
        ax.axhline(p / 100, color="#dddddd", linewidth=0.8, zorder=0)
    ax.grid(True, which="major", axis="x", color="#eeeeee")
    # Below the axes: a legend inside would hide the tails it describes.
    ax.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -0.13),
        fontsize=7.5,
        title="ms; markers: o p50, s p90, ^ p99",
        title_fontsize=7.5,
    )
