"""Training curves from `metrics.jsonl`, offline: `python -m train.report RUN_DIR [RUN_DIR...] [--out PNG]`.

One figure, six panels against the optimizer step: the overall loss, the loss per task (`loss/<task>`),
the learning rate, the gradient norm, throughput (`tokens_per_s`) and the held-out loss per task
(`eval/<task>`). Several runs are overlaid for comparison: each run has its own colour (with one run the
colour tells the tasks apart instead) and tasks get their own line style. `write_curves(run_dir)` is what
the training loop calls at the end of a run to leave `curves.png` beside `metrics.jsonl`.

Robust to what real logs hold: keys missing from some or all rows (an empty panel says "no data"), NaN/inf
values (gaps), a run with a single step (drawn as markers), steps logged twice after a resume (the last
record wins), and malformed lines (skipped and counted).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot global state, Agg canvas, no display needed

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
CURVES = "curves.png"
FIG_SIZE = (15.0, 8.0)  # inches
DPI = 100  # -> 1500 x 800 px
STYLES = ("-", "--", ":", "-.")
# (title, y label, metric key or a prefix ending in "/" for per-task series)
PANELS = (
    ("loss", "train loss", "loss"),
    ("loss per task", "train loss", "loss/"),
    ("learning rate", "lr", "lr"),
    ("gradient norm", "grad norm (before clipping)", "grad_norm"),
    ("throughput", "tokens / s", "tokens_per_s"),
    ("held-out loss per task", "eval loss", "eval/"),
)


@dataclass
class Run:
    """One run's metrics: key -> {step: value} (the last record of a step wins), plus what was skipped."""

    label: str
    path: Path
    series: dict[str, dict[int, float]] = field(default_factory=dict)
    bad_lines: int = 0

    def points(self, key: str) -> tuple[list[int], list[float]]:
        s = self.series.get(key, {})
        steps = sorted(s)
        return steps, [s[k] for k in steps]

    def tasks(self, prefix: str) -> list[str]:
        return sorted(k[len(prefix):] for k in self.series if k.startswith(prefix) and "/" not in k[len(prefix):])


def _metrics_file(run_dir: Path) -> Path:
    p = Path(run_dir)
    f = p if p.is_file() else p / METRICS
    if not f.is_file():
        raise FileNotFoundError(f"{p}: no {METRICS} (pass a run's output_dir or the metrics file itself)")
    return f


def _number(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else math.nan  # inf would flatten the axis; a gap says more


def read_run(run_dir: Path, label: str | None = None) -> Run:
    """Parse `run_dir/metrics.jsonl` (or a metrics file path). Raises FileNotFoundError naming the path."""
    f = _metrics_file(Path(run_dir))
    run = Run(label or (f.parent.name if f.name == METRICS else f.stem), f)
    with open(f, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):  # a torn last line, a stray row
                run.bad_lines += 1
                continue
            for k, v in rec.items():
                x = _number(v)
                if k != "step" and x is not None:
                    run.series.setdefault(k, {})[step] = x
    return run


def _labels(paths: Sequence[Path]) -> list[str]:
    """Run names for the legend: the directory name, or the whole path where names clash."""
    names = [(p.parent.name if p.is_file() else p.name) or str(p) for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def plot_runs(runs: Sequence[Run]) -> Figure:
    """The comparison figure: one colour per run (per task when there is one run), one panel per metric."""
    fig = Figure(figsize=FIG_SIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (title, ylabel, key) in zip(axes, PANELS):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        for run, colour in zip(runs, colours):
            keys = [key] if not key.endswith("/") else [key + t for t in run.tasks(key)]
            for j, k in enumerate(keys):
                steps, values = run.points(k)
                if not steps:
                    continue
                name = k[len(key):] if key.endswith("/") else ""
                label = " ".join(x for x in ((run.label if len(runs) > 1 else ""), name) if x) or run.label
                c = colour if len(runs) > 1 or not name else f"C{j % 10}"
                ls = STYLES[j % len(STYLES)] if len(runs) > 1 and name else "-"
                few = len(steps) <= 50 or key == "eval/"  # a 1-step run or a few evals: points, not lines
                ax.plot(steps, values, color=c, linestyle=ls, marker="o" if few else None, markersize=3,
                        linewidth=1.8 if not name else 1.2, label=label)
        if ax.lines:
            if len(ax.lines) > 1 or len(runs) > 1 or key.endswith("/"):  # name the task even when alone
                ax.legend(fontsize="x-small", ncols=2 if len(ax.lines) > 6 else 1)
            if key == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(" vs ".join(r.label for r in runs) if len(runs) <= 4 else f"{len(runs)} runs")
    return fig


def draw(run_dirs: Sequence[Path], out: Path) -> Path:
    """Read the runs, draw the figure, write `out` (PNG, atomically). Returns `out`."""
    paths = [Path(p) for p in run_dirs]
    runs = [read_run(p, label) for p, label in zip(paths, _labels(paths))]
    for r in runs:
        if r.bad_lines:
            log.warning("%s: skipped %d malformed line(s)", r.path, r.bad_lines)
    fig = plot_runs(runs)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(out)  # a reader (or a crash mid-write) never sees half a PNG
    return out


def write_curves(run_dir: Path) -> Path:
    """`run_dir/curves.png` from `run_dir/metrics.jsonl`; the training loop calls this at the end of a run."""
    return draw([Path(run_dir)], Path(run_dir) / CURVES)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.split("\n\n")[0],
                                 epilog="panels: " + ", ".join(t for t, _, _ in PANELS))
    ap.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                    help="a run's output_dir (holding metrics.jsonl), or a metrics.jsonl file")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"PNG to write (default: RUN_DIR/{CURVES} for one run, ./compare.png for several)")
    args = ap.parse_args(argv)
    one = args.runs[0] if args.runs[0].is_dir() else args.runs[0].parent
    out = args.out or (one / CURVES if len(args.runs) == 1 else Path("compare.png"))
    try:
        path = draw(args.runs, out)
    except (FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
