"""train.report: curves from hand-written metrics.jsonl files (several runs, missing keys, NaN, 1 step)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from matplotlib.colors import to_hex
from PIL import Image

from train.report import CURVES, DPI, FIG_SIZE, PANELS, main, plot_runs, read_run, write_curves

TASKS = ("caption", "vqa", "ocr")


def _write(run: Path, rows: list[dict], junk: str = "") -> Path:
    run.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + junk
    (run / "metrics.jsonl").write_text(text)
    return run


def _rows(steps: int, scale: float = 1.0, tasks: tuple[str, ...] = TASKS) -> list[dict]:
    rows = [{"step": 0, **{f"eval/{t}": 5.0 * scale for t in tasks}}]
    for s in range(1, steps + 1):
        r = {"step": s, "loss": scale * 5.0 / s, "lr": 1e-3 * min(1.0, s / 3), "grad_norm": 1.0 + 0.1 * s,
             "tokens_per_s": 1000.0 + s, "mem/rss_gb": 1.0}
        r[f"loss/{tasks[s % len(tasks)]}"] = scale * 5.1 / s  # tasks alternate between steps, as in real logs
        rows.append(r)
    rows.append({"step": steps, **{f"eval/{t}": 4.0 * scale for t in tasks}})
    return rows


def _panel(fig, title: str):
    (ax,) = [a for a in fig.axes if a.get_title() == title]
    return ax


def test_write_curves_png_size_and_decodes(tmp_path):
    run = _write(tmp_path / "run_a", _rows(12))
    out = write_curves(run)
    assert out == run / CURVES and out.is_file()
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.size == (int(FIG_SIZE[0] * DPI), int(FIG_SIZE[1] * DPI))
        assert len(im.convert("RGB").getcolors(1 << 24)) > 10  # something was drawn
    assert not list(run.glob("*.tmp"))


def test_one_line_per_run_and_task(tmp_path):
    a = read_run(_write(tmp_path / "a", _rows(9)))
    b = read_run(_write(tmp_path / "b", _rows(9, scale=0.5, tasks=("caption", "vqa"))))
    fig = plot_runs([a, b])
    assert len(fig.axes) == len(PANELS)
    for title in ("loss", "learning rate", "gradient norm", "throughput"):
        lines = _panel(fig, title).lines
        assert len(lines) == 2 and [ln.get_label() for ln in lines] == ["a", "b"]
        assert to_hex(lines[0].get_color()) != to_hex(lines[1].get_color())  # runs are told apart
    per_task = _panel(fig, "loss per task").lines
    assert sorted(ln.get_label() for ln in per_task) == sorted(
        [f"a {t}" for t in TASKS] + ["b caption", "b vqa"])
    colour = {ln.get_label(): to_hex(ln.get_color()) for ln in per_task}
    assert colour["a caption"] == colour["a vqa"] != colour["b caption"]  # colour = run, style = task
    assert len(_panel(fig, "held-out loss per task").lines) == 5
    # the per-task series hold the values written
    (line,) = [ln for ln in per_task if ln.get_label() == "b vqa"]
    assert list(line.get_xdata()) == [1, 3, 5, 7, 9]
    assert list(line.get_ydata()) == [0.5 * 5.1 / s for s in (1, 3, 5, 7, 9)]


def test_one_run_colours_tasks(tmp_path):
    fig = plot_runs([read_run(_write(tmp_path / "a", _rows(6)))])
    lines = _panel(fig, "loss per task").lines
    assert len(lines) == 3 and len({to_hex(ln.get_color()) for ln in lines}) == 3


def test_missing_keys_nan_one_step_and_bad_lines(tmp_path):
    rows = [{"step": 1, "loss": float("nan"), "lr": 1e-4, "note": "text is ignored", "grad_norm": float("inf")}]
    run = read_run(_write(tmp_path / "tiny", rows, junk='{"step": 2, "loss": 1.0\n{"no_step": 1}\n'))
    assert run.bad_lines == 2
    assert run.points("lr") == ([1], [1e-4])
    assert math.isnan(run.points("grad_norm")[1][0])  # inf -> a gap, not a squashed axis
    fig = plot_runs([run])
    assert len(_panel(fig, "learning rate").lines) == 1
    assert _panel(fig, "learning rate").lines[0].get_marker() == "o"  # a single point stays visible
    empty = _panel(fig, "held-out loss per task")
    assert not empty.lines and any(t.get_text() == "no data" for t in empty.texts)
    assert write_curves(tmp_path / "tiny").is_file()


def test_resumed_steps_keep_the_last_record(tmp_path):
    rows = _rows(4) + [{"step": 3, "loss": 9.0}, {"step": 4, "loss": 8.0}]  # steps 3-4 redone after a resume
    steps, values = read_run(_write(tmp_path / "r", rows)).points("loss")
    assert steps == [1, 2, 3, 4] and values[2:] == [9.0, 8.0]


def test_cli_compares_runs_and_reports_errors(tmp_path, capsys):
    a, b = _write(tmp_path / "x" / "run", _rows(5)), _write(tmp_path / "y" / "run", _rows(5, 0.8))
    out = tmp_path / "cmp.png"
    assert main([str(a), str(b), "--out", str(out)]) == 0
    assert Path(capsys.readouterr().out.strip()) == out.resolve()
    with Image.open(out) as im:
        assert im.size == (int(FIG_SIZE[0] * DPI), int(FIG_SIZE[1] * DPI))
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_entry_point_writes_curves_beside_the_metrics(tmp_path):
    run = _write(tmp_path / "run", _rows(3))
    proc = subprocess.run([sys.executable, "-m", "train.report", str(run)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (run / CURVES).is_file() and proc.stdout.strip() == str((run / CURVES).resolve())
