"""The report of a run: ``report.png`` (train / eval loss and learning rate against the step) and
``report.html``, one self-contained file (inline SVG charts and CSS, no scripts, no external assets)
with the config, data statistics, a masking preview, metric curves and generation samples.

Written at the end of ``train()`` and by ``sftrainer report RUN_DIR``, from the files of the run
directory, each optional:

- ``metrics.jsonl`` (every log event), else the ``log_history`` of ``trainer_state.json`` (the
  output directory's, else the latest checkpoint's)
- ``sftrainer_config.yaml``, ``all_results.json``
- ``data_stats.json`` and ``masking_preview.json`` (``save_run_inputs`` writes them at train end)
- ``eval_samples/step-<N>.jsonl`` (the latest step), else ``eval_samples.jsonl``
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sftrainer.constants import FIRST_ROWS, IGNORE_INDEX, ROW_TOKEN_LIMIT
from sftrainer.errors import SFTrainerError
from sftrainer.png import Series, nice_ticks, tick_labels, write_charts
from sftrainer.run import (
    CHECKPOINT_PREFIX,
    CONFIG_FILE,
    DATA_STATS,
    EVAL_SAMPLES_DIR,
    EVAL_SAMPLES_FILE,
    MASKING_PREVIEW,
    METRICS_FILE,
    REPORT_HTML,
    REPORT_PNG,
    RESULTS_FILE,
    TRAINER_STATE,
)

BLUE, ORANGE, GREEN = (31, 119, 180), (255, 127, 14), (44, 160, 44)
MAX_SAMPLES = 50  # sample rows shown in the HTML
# The metrics the results open with, before training -> after, in this order (eval_<name> in
# all_results.json); the others follow in one table.
HEADLINE_METRICS = ("loss", "mean_token_accuracy", "perplexity", "exact_match", "normalized_match")


# ---- reading a run directory ---------------------------------------------------------------


def load_history(run_dir: Path) -> list[dict[str, Any]]:
    """The log events of a run, oldest first."""
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        return [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    states = [run_dir / TRAINER_STATE]
    checkpoints = sorted(
        run_dir.glob(f"{CHECKPOINT_PREFIX}*"),
        key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1,
    )
    states += [c / TRAINER_STATE for c in reversed(checkpoints)]
    for state in states:
        if state.is_file():
            return list(json.loads(state.read_text(encoding="utf-8")).get("log_history", []))
    return []


def curves(history: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Metric name -> [(step, value)], sorted by step. The last record of a step wins (a resumed run
    logs the steps after its checkpoint again). Eval metrics keep their ``eval_`` prefix."""
    by_key: dict[str, dict[float, float]] = {}
    for record in history:
        step = record.get("step")
        if not isinstance(step, int | float) or "train_runtime" in record:
            continue
        for key, value in record.items():
            if (
                key in ("step", "epoch", "timestamp")
                or isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)  # trainer_state.json keeps NaN; metrics.jsonl writes null
            ):
                continue
            by_key.setdefault(key, {})[step] = value
    return {key: sorted(points.items()) for key, points in by_key.items()}


def load_samples(run_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    """(where from, rows) of the latest generation samples."""
    steps = []
    for path in (run_dir / EVAL_SAMPLES_DIR).glob("step-*.jsonl"):
        match = re.fullmatch(r"step-(\d+)\.jsonl", path.name)
        if match:
            steps.append((int(match.group(1)), path))
    path = max(steps)[1] if steps else run_dir / EVAL_SAMPLES_FILE
    if not path.is_file():
        return "", []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return str(path.relative_to(run_dir)), rows


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# ---- what train() saves for the report -----------------------------------------------------


def masking_preview(
    dataset: Any, tokenizer: Any, rows: int = FIRST_ROWS, max_tokens: int = ROW_TOKEN_LIMIT
) -> list[list[dict]]:
    """The first ``rows`` prepared examples as spans ``{"text", "trained"}`` (trained: label !=
    IGNORE_INDEX). A packed row is split into its examples at each ``position_ids`` restart."""
    examples: list[tuple[list[int], list[int]]] = []
    for row in itertools.islice(dataset, rows):
        ids, labels = list(row["input_ids"]), list(row.get("labels") or row["input_ids"])
        positions = row.get("position_ids")
        starts = [i for i, p in enumerate(positions) if p == 0] if positions else [0]
        for a, b in zip(starts, [*starts[1:], len(ids)]):
            examples.append((ids[a:b], labels[a:b]))
    preview = []
    for ids, labels in examples[:rows]:
        spans = []
        cut = ids[:max_tokens]
        for trained, group in itertools.groupby(range(len(cut)), key=lambda i: labels[i] != IGNORE_INDEX):
            spans.append({"text": tokenizer.decode([cut[i] for i in group]), "trained": trained})
        if len(ids) > max_tokens:
            spans.append({"text": f" … ({len(ids) - max_tokens} more tokens)", "trained": False})
        preview.append(spans)
    return preview


def save_run_inputs(trainer: Any, output_dir: str | Path) -> None:
    """``data_stats.json`` (what preparing the data counted) and ``masking_preview.json``."""
    out = Path(output_dir)
    stats = {
        "prepare": {k: dataclasses.asdict(v) for k, v in getattr(trainer, "data_stats", {}).items()},
        "pack": {k: dataclasses.asdict(v) for k, v in getattr(trainer, "pack_stats", {}).items()},
    }
    (out / DATA_STATS).write_text(json.dumps(stats, indent=2), encoding="utf-8")
    # The first rows as prepared, before shuffling and packing: those `sftrainer data` shows first.
    rows = getattr(getattr(trainer, "data_pipeline", None), "first_rows", {}).get("train data")
    if rows is None:
        rows = trainer.train_dataset  # prepared elsewhere (skip_prepare_dataset) or streamed
    if rows is not None:
        from sftrainer.vision.processor import preview_decoder  # image tokens written once per image

        preview = masking_preview(rows, preview_decoder(trainer.processing_class), FIRST_ROWS)
        (out / MASKING_PREVIEW).write_text(json.dumps(preview, indent=1), encoding="utf-8")


# ---- charts --------------------------------------------------------------------------------


def chart_specs(c: dict[str, list[tuple[float, float]]]) -> list[tuple[str, list[Series]]]:
    """(title, series) of each chart: loss, learning rate, and token accuracy when logged."""
    eval_loss = sorted(c.get("eval_before_loss", []) + c.get("eval_loss", []))  # before training: step 0
    specs = [
        ("loss", [("train", BLUE, c.get("loss", [])), ("eval", ORANGE, eval_loss)]),
        ("learning rate", [("lr", GREEN, c.get("learning_rate", []))]),
    ]
    if c.get("mean_token_accuracy") or c.get("eval_mean_token_accuracy"):
        specs.append(("token accuracy", [("train", BLUE, c.get("mean_token_accuracy", [])),
                                         ("eval", ORANGE, c.get("eval_mean_token_accuracy", []))]))  # fmt: skip
    return [(title, [s for s in series if s[2]]) for title, series in specs]


def svg_chart(title: str, series: Sequence[Series], width: int = 440, height: int = 260) -> str:
    """One line chart as inline SVG: axes with tick labels, a legend, a polyline per series."""
    left, right, top, bottom = 64, 12, 34, 36
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    out = [f'<svg class="chart" role="img" aria-label="{html.escape(title)}" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
           f'<text x="{left}" y="18" class="title">{html.escape(title)}</text>']  # fmt: skip
    points = [p for _, _, pts in series for p in pts]
    if not points:
        out.append(f'<text x="{left + 10}" y="{height // 2}">no data</text></svg>')
        return "".join(out)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xlo, xhi = (min(xs), max(xs)) if max(xs) > min(xs) else (min(xs) - 1, max(xs) + 1)
    ylo, yhi = min(ys), max(ys)
    pad = (yhi - ylo) * 0.05 or abs(yhi) * 0.1 or 1.0
    ylo, yhi = ylo - pad, yhi + pad

    def px(x: float, y: float) -> str:
        return (
            f"{x0 + (x - xlo) / (xhi - xlo) * (x1 - x0):.1f},{y1 - (y - ylo) / (yhi - ylo) * (y1 - y0):.1f}"
        )

    ys, xs = nice_ticks(ylo, yhi), nice_ticks(xlo, xhi, whole=True)
    for fy, label in zip(ys, tick_labels(ys)):
        gy = float(px(xlo, fy).split(",")[1])
        out.append(f'<line x1="{x0}" y1="{gy:.1f}" x2="{x1}" y2="{gy:.1f}" class="grid"/>')
        out.append(f'<text x="{x0 - 6}" y="{gy + 4:.1f}" text-anchor="end" class="tick">{label}</text>')
    for fx, label in zip(xs, tick_labels(xs)):
        gx = float(px(fx, ylo).split(",")[0])
        out.append(f'<text x="{gx:.1f}" y="{y1 + 16}" text-anchor="middle" class="tick">{label}</text>')
    out.append(f'<text x="{x1}" y="{height - 4}" text-anchor="end" class="axis-name">step</text>')
    out.append(f'<path d="M{x0},{y0} V{y1} H{x1}" class="axis"/>')
    lx = x1
    for label, color, pts in reversed(series):
        rgb = "rgb({},{},{})".format(*color)
        lx -= 12 + 8 * len(label) + 16
        out.append(f'<rect x="{lx}" y="9" width="10" height="10" fill="{rgb}"/>')
        out.append(f'<text x="{lx + 14}" y="18">{html.escape(label)}</text>')
        coords = " ".join(px(x, y) for x, y in sorted(pts))
        out.append(f'<polyline class="series" data-series="{html.escape(label)}" points="{coords}" '
                   f'fill="none" stroke="{rgb}" stroke-width="2"/>')  # fmt: skip
        if len(pts) <= 30:
            out += [
                f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="3" fill="{rgb}"/>'
                for p in coords.split()
            ]
    out.append("</svg>")
    return "".join(out)


# ---- HTML ----------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px;vertical-align:top;text-align:left}
pre,.masked{background:#f6f6f6;padding:8px;overflow:auto;white-space:pre-wrap;font:12px/1.4 monospace}
mark.trained{background:#bfe3bf;color:#000}.untrained{color:#777}
svg.chart text{font:11px sans-serif;fill:#333}svg.chart .title{font-weight:bold;font-size:13px}
svg.chart .grid{stroke:#e4e4e4}svg.chart .axis{stroke:#333;fill:none}
tr.match td.prediction{background:#e6f4e6}tr.miss td.prediction{background:#fbeaea}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None, attrs: str = "") -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{attrs}>{head}{body}</table>"


def _number(value: Any, sign: bool = False) -> Any:
    if isinstance(value, float) or (sign and isinstance(value, int)):
        return f"{value:{'+' if sign else ''}.4g}"
    return value


def _section(key: str, title: str, body: str) -> str:
    return f'<h2>{title}</h2><section id="{key}">{body}</section>'


def before_after(results: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(metric, before, after) of the ``HEADLINE_METRICS`` the run evaluated: ``eval_before_<m>``
    (before training; None when not measured) and ``eval_<m>`` (after)."""
    return [
        (metric, results.get(f"eval_before_{metric}"), results[f"eval_{metric}"])
        for metric in HEADLINE_METRICS
        if isinstance(results.get(f"eval_{metric}"), int | float)
    ]


def _results(run_dir: Path, history: list[dict[str, Any]]) -> str:
    results = _read_json(run_dir / RESULTS_FILE)
    results = results or next((r for r in reversed(history) if "train_runtime" in r), None)
    if not results:
        return f"<p>No {RESULTS_FILE} (the run has not finished).</p>"
    rows = before_after(results)
    shown = {f"eval{p}_{m}" for m, _, _ in rows for p in ("", "_before")}
    if rows:
        changes = [
            (
                m,
                "not measured" if b is None else _number(b),
                _number(a),
                "" if b is None else _number(a - b, sign=True),
            )
            for m, b, a in rows
        ]
        head = _table(changes, ["metric", "before training", "after", "change"], ' id="before-after"')
    else:
        head = '<p id="before-after">No evaluation data: nothing to compare before and after training.</p>'
    rest = [(k, _number(v)) for k, v in results.items() if k not in shown]
    return (
        head + "<p>The rest of all_results.json:</p>" + _table(rest, ["metric", "value"], ' id="all-results"')
    )


def _samples(run_dir: Path) -> str:
    source, samples = load_samples(run_dir)
    if not samples:
        return "<p>No generation samples (set <code>exact_match_samples</code> to score generations).</p>"
    shown = f", the first {MAX_SAMPLES} shown" if len(samples) > MAX_SAMPLES else ""
    rows = []
    for s in samples[:MAX_SAMPLES]:
        match = str(s.get("prediction", "")).strip() == str(s.get("reference", "")).strip()
        cells = "".join(f'<td class="{c}">{_e(s.get(c))}</td>' for c in ("prompt", "reference", "prediction"))
        rows.append(f'<tr class="sample {"match" if match else "miss"}">{cells}</tr>')
    header = "<tr><th>prompt</th><th>reference</th><th>prediction</th></tr>"
    intro = f"<p>{len(samples)} samples from <code>{_e(source)}</code>{shown}</p>"
    return f'{intro}<table id="samples-table">{header}{"".join(rows)}</table>'


def _masking(run_dir: Path) -> str:
    preview = _read_json(run_dir / MASKING_PREVIEW)
    if not preview:
        return f"<p>No {MASKING_PREVIEW} in the run directory.</p>"
    out = [
        '<p>The first prepared training rows; <mark class="trained">highlighted</mark> tokens are '
        "trained (the loss covers them), the grey ones are not.</p>"
    ]
    for spans in preview:
        html_spans = (
            f'<mark class="trained">{_e(s["text"])}</mark>'
            if s["trained"]
            else f'<span class="untrained">{_e(s["text"])}</span>'
            for s in spans
        )
        out.append('<div class="masked">' + "".join(html_spans) + "</div>")
    return "".join(out)


def _data(run_dir: Path) -> str:
    stats = _read_json(run_dir / DATA_STATS) or {}
    tables = []
    for kind, entries in stats.items():  # "prepare": PrepareStats per data set, "pack": PackStats
        if entries:
            fields = list(next(iter(entries.values())))
            rows = [[name, *(e.get(f) for f in fields)] for name, e in entries.items()]
            tables.append(_table(rows, [kind, *fields]))
    return "".join(tables) or f"<p>No {DATA_STATS} in the run directory.</p>"


def render_html(run_dir: Path, history: list[dict[str, Any]]) -> str:
    name = _e(run_dir.resolve().name)
    config = run_dir / CONFIG_FILE
    sections = [
        f"<h1>sftrainer run: {name}</h1><p>{_e(run_dir.resolve())}</p>",
        _section("results", "Results", _results(run_dir, history)),
        _section("curves", "Metric curves", "".join(svg_chart(t, s) for t, s in chart_specs(curves(history)))),
        _section("samples", "Generation samples", _samples(run_dir)),
        _section("masking", "Masking preview", _masking(run_dir)),
        _section("data", "Data", _data(run_dir)),
        _section("config", "Config", f"<pre>{_e(config.read_text(encoding='utf-8'))}</pre>"
                 if config.is_file() else f"<p>No {CONFIG_FILE}.</p>"),
    ]  # fmt: skip
    head = f'<meta charset="utf-8"><title>sftrainer report: {name}</title><style>{CSS}</style>'
    return (
        f'<!DOCTYPE html><html lang="en"><head>{head}</head><body>\n'
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.html`` into ``run_dir``; returns their paths."""
    run = Path(run_dir)
    if not run.is_dir():
        raise SFTrainerError(f"report: no such run directory: {run}")
    history = load_history(run)
    if not history:
        raise SFTrainerError(
            f"report: {run} holds no {METRICS_FILE} or {TRAINER_STATE}: is it the output_dir of a training run?"
        )
    c = curves(history)
    png, page = run / REPORT_PNG, run / REPORT_HTML
    write_charts(str(png), chart_specs(c)[:2])
    page.write_text(render_html(run, history), encoding="utf-8")
    return png, page
