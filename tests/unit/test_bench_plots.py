"""bench/plots.py renders a benchmark's samples into a PNG (headless, Agg)."""

from __future__ import annotations

import argparse
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _samples(seed: int, centre: float, n: int = 60) -> list[float]:
    rng = random.Random(seed)
    return [rng.lognormvariate(0, 0.3) * centre for _ in range(n)]


def test_write_renders_a_png_of_every_panel(tmp_path: Path) -> None:
    panels = [
        plots.Panel(
            cmd,
            [
                plots.Series("(a) Plexus built-ins", _samples(1, 20)),
                plots.Series("(c) reference plugins", _samples(2, 40), reference=True),
            ],
        )
        for cmd in ("ADD", "DEL")
    ]
    when = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)
    path = plots.write("builtins", "synthetic", panels, out_dir=tmp_path / "out", when=when)
    assert path == tmp_path / "out" / "builtins-20261204T120000Z.png"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 20_000  # two panels of curves, not an empty canvas


def test_a_wide_span_goes_logarithmic_and_renders(tmp_path: Path) -> None:
    series = [
        plots.Series("/bin/true", _samples(3, 0.8), reference=True),
        plots.Series("Python shim", _samples(4, 12)),
    ]
    path = plots.write("shim", "span", [plots.Panel("exec", series)], out_dir=tmp_path)
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_legend_percentiles_match_the_tables_method() -> None:
    values = [float(v) for v in range(1, 101)]
    inclusive = plots.percentiles(values)
    assert inclusive[50] == 50.5
    assert inclusive[90] == pytest.approx(90.1)
    assert inclusive[99] == pytest.approx(99.01)
    assert plots.percentiles(values, "exclusive")[99] == pytest.approx(99.99)


def test_a_row_without_samples_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        plots.write("x", "t", [plots.Panel("p", [plots.Series("empty", [])])], out_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_emit_prints_the_path_and_no_plot_skips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    plots.add_arguments(parser)
    panels = [plots.Panel("p", [plots.Series("row", _samples(5, 3))])]
    path = plots.emit(parser.parse_args(["--plot", str(tmp_path)]), "b", "t", panels)
    assert path is not None and path.parent == tmp_path
    assert capsys.readouterr().out == f"plot: {path}\n"
    assert plots.emit(parser.parse_args(["--no-plot"]), "b", "t", panels) is None
    assert parser.parse_args([]).plot == plots.OUT_DIR
