"""``report.png`` and ``report.html``: from a real run (``sftrainer train`` writes them, ``sftrainer
report`` rewrites them), checked in pure Python and, where Debian's ``chromium`` is installed, as a
headless browser renders the page."""

from __future__ import annotations

import contextlib
import html
import io
import json
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from tiny_models import ROWS, quick_args

from sftrainer import SFTTrainer
from sftrainer.cli import main
from sftrainer.report import (
    HEADLINE_METRICS,
    curves,
    load_history,
    masking_preview,
    save_run_inputs,
    svg_chart,
    write_report,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sftrainer_home) -> Path:
    """The built-in demo cut to 8 steps, evaluated every 4, with 6 generation samples."""
    out = tmp_path_factory.mktemp("run")
    code = main(["train", f"output_dir={out}", "max_steps=8", "logging_steps=2", "eval_strategy=steps",
                 "eval_steps=4", "exact_match_samples=6", "warmup_steps=2"])  # fmt: skip
    assert code == 0
    return out


def data_command_rows(*argv: str) -> list[tuple[str, list[str]]]:
    """(text, trained spans) of the rows ``sftrainer data ARGV`` renders, in its order."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # an encoding that writes ⟦ ⟧
    with contextlib.redirect_stdout(out):
        assert main(["data", *argv]) == 0
    out.seek(0)
    rows: list[list[str]] = []
    inside = False
    for line in out.read().splitlines():
        if line.startswith("--- row "):  # "--- row k: N tokens, M trained", then the row, then "---"
            rows.append([])
            inside = True
        elif line == "---":
            inside = False
        elif inside:
            rows[-1].append(line)
    texts = ["\n".join(row) for row in rows]
    return [(re.sub("[⟦⟧]", "", t), re.findall("⟦(.*?)⟧", t, flags=re.S)) for t in texts]


def preview_rows(path: Path) -> list[tuple[str, list[str]]]:
    """(text, trained spans) of each row of a masking_preview.json."""
    preview = json.loads(path.read_text())
    return [
        ("".join(s["text"] for s in spans), [s["text"] for s in spans if s["trained"]]) for spans in preview
    ]


@pytest.fixture(scope="module")
def data_rows(run_dir) -> list[tuple[str, list[str]]]:
    """The first rows `sftrainer data` shows for the run's config (the built-in demo)."""
    rows = data_command_rows("--rows", "3")
    assert len(rows) == 3
    return rows


def masked_rows(page: str) -> list[tuple[str, list[str]]]:
    """(text, trained spans) of each row of the report's masking preview."""
    rows = re.findall(r'<div class="masked">(.*?)</div>', page, flags=re.S)
    return [
        (html.unescape(re.sub(r"<[^>]+>", "", row)),
         [html.unescape(t) for t in re.findall(r'<mark class="trained">(.*?)</mark>', row, flags=re.S)])
        for row in rows
    ]  # fmt: skip


def tick_texts(page: str) -> list[tuple[list[str], list[str]]]:
    """(y tick labels, x tick labels) of each chart."""
    charts = re.findall(r"<svg[^>]*>.*?</svg>", page, flags=re.S)
    return [
        (re.findall(r'text-anchor="end" class="tick">([^<]*)<', svg),
         [t for t in re.findall(r'text-anchor="middle" class="tick">([^<]*)<', svg)])
        for svg in charts
    ]  # fmt: skip


class Dom(HTMLParser):
    """Tags with their attributes, and the text inside each element of interest."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[tuple[str, dict]] = []
        self.texts: dict[str, list[str]] = {}
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in ("rect", "circle", "line", "path", "polyline", "meta"):
            self.stack.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        for tag, attrs in self.stack:
            for key in (tag, *(f"{tag}.{c}" for c in (attrs.get("class") or "").split())):
                self.texts.setdefault(key, []).append(data)

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def png_pixels(path: Path) -> tuple[int, int, bytes]:
    """Width, height and RGB rows (filter bytes included) of an 8-bit RGB PNG without filters."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    assert (depth, color) == (8, 2)
    idat, pos = b"", 8
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def test_train_writes_the_run_files(run_dir):
    for name in ("metrics.jsonl", "data_stats.json", "masking_preview.json", "report.png", "report.html"):
        assert (run_dir / name).is_file(), f"{name} not written"
    stats = json.loads((run_dir / "data_stats.json").read_text())
    assert stats["prepare"]["train data"]["rows"] == 6000 and stats["prepare"]["eval data"]["kept"] == 200


def test_png_plots_loss_and_learning_rate(run_dir):
    width, height, raw = png_pixels(run_dir / "report.png")
    assert (width, height) == (960, 320)
    assert len(raw) == height * (1 + 3 * width)
    colors = {bytes(c) for c in ((31, 119, 180), (255, 127, 14), (44, 160, 44))}  # train, eval, lr
    found = {
        raw[i : i + 3]
        for row in range(height)
        for i in range(row * (1 + 3 * width) + 1, (row + 1) * (1 + 3 * width), 3)
    }
    assert colors <= found, "a curve is missing from report.png"


def test_html_holds_curves_samples_masking_config_and_data(run_dir):
    page = (run_dir / "report.html").read_text()
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert "<script" not in page and "<link" not in page  # self-contained
    dom = Dom(page)
    assert [a["aria-label"] for a in dom.find("svg")] == ["loss", "learning rate", "token accuracy"]
    series = [a["data-series"] for a in dom.find("polyline")]
    assert sorted(series) == ["eval", "eval", "lr", "train", "train"]
    eval_points = next(a for a in dom.find("polyline") if a["data-series"] == "eval")["points"].split()
    assert len(eval_points) == 3  # before training (step 0), steps 4 and 8 (the final evaluation: same step)
    samples = [line for line in (run_dir / "eval_samples.jsonl").read_text().splitlines()]
    assert (
        len(dom.find("tr", **{"class": "sample match"})) + len(dom.find("tr", **{"class": "sample miss"}))
        == 6
    )
    first = json.loads(samples[0])
    assert first["reference"] in dom.texts["td.reference"]
    trained = "".join(dom.texts["mark.trained"])
    preview = json.loads((run_dir / "masking_preview.json").read_text())
    assert len(preview) == 3 and trained.count("<|im_end|>") == 3
    assert ("Reverse the words" not in trained and "Reverse the words" in page) or "Sort the words" in page
    assert "max_steps: 8" in "".join(dom.texts["pre"])
    assert "train data" in "".join(dom.texts["td"])


def test_results_open_with_before_and_after(run_dir):
    page = (run_dir / "report.html").read_text()
    results = page[page.index('<section id="results">') :]
    assert results.startswith('<section id="results"><table id="before-after">')
    table = results[: results.index("</table>")]
    assert re.findall(r"<tr><td>([a-z_]+)</td>", table) == list(HEADLINE_METRICS)  # the demo measures all
    assert "<th>before training</th><th>after</th><th>change</th>" in table
    all_results = json.loads((run_dir / "all_results.json").read_text())
    assert f"<td>{all_results['eval_loss']:.4g}</td>" in table
    rest = results[results.index('<table id="all-results">') :]
    assert "<td>train_runtime</td>" in rest and "<td>eval_loss</td>" not in rest  # shown once


def test_tick_labels_are_distinct_and_exact():
    chart = svg_chart("loss", [("train", (0, 0, 0), [(1, 11.92), (2, 11.88), (3, 11.85)])])
    (ys, xs), = tick_texts(chart)  # fmt: skip
    assert len(ys) >= 3 and len(set(ys)) == len(ys), ys
    assert all(11.84 < float(y) < 11.93 for y in ys)
    assert xs == ["1", "2", "3"]
    chart = svg_chart("learning rate", [("lr", (0, 0, 0), [(2, 1e-3), (4, 1.87e-3), (8, 1.3e-4)])])
    (ys, _), = tick_texts(chart)  # fmt: skip
    assert "1.5e-03" in ys and len(set(ys)) == len(ys), ys  # 0.0015 is not written "2e-03"


def test_masking_preview_shows_the_first_rows_of_sftrainer_data(run_dir, data_rows):
    assert preview_rows(run_dir / "masking_preview.json") == data_rows


def test_masking_preview_of_a_packed_shuffled_run_is_still_what_sftrainer_data_shows(
    tiny_model_dir, tmp_path
):
    """Training packs and shuffles; the preview shows the rows as prepared, before either."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({**row, "prompt": f"{k}. {row['prompt']}"}) + "\n"
                            for k, row in enumerate(ROWS * 3)))  # fmt: skip
    args = quick_args(tmp_path / "out", packing=True, shuffle_dataset=True, max_length=256)
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=str(data))
    save_run_inputs(trainer, tmp_path)
    expected = data_command_rows(str(data), "--model", "builtin", "--rows", "3", "packing=true",
                                 "shuffle_dataset=true", "max_length=256", "seed=0")  # fmt: skip
    assert "0. What is the capital" in expected[0][0]  # the file's first row, first
    assert preview_rows(tmp_path / "masking_preview.json") == expected


def test_report_command_rewrites_the_report(run_dir, capsys):
    (run_dir / "report.html").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert f"Wrote {run_dir / 'report.html'}" in capsys.readouterr().out
    assert (run_dir / "report.html").is_file()


def test_report_of_a_directory_without_metrics_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no metrics.jsonl or trainer_state.json" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_trainer_state_is_the_fallback_and_the_last_record_of_a_step_wins(tmp_path):
    history = [{"loss": 3.0, "step": 1}, {"loss": 2.0, "step": 2}, {"eval_loss": 2.5, "step": 2},
               {"loss": 1.5, "step": 2}, {"grad_norm": float("nan"), "step": 2},
               {"train_runtime": 1.0, "step": 2}]  # fmt: skip
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert len(load_history(tmp_path)) == len(history)
    assert curves(history) == {"loss": [(1, 3.0), (2, 1.5)], "eval_loss": [(2, 2.5)]}
    png, page = write_report(tmp_path)
    assert png.is_file() and 'data-series="train"' in page.read_text()


def test_masking_preview_of_packed_rows_splits_the_examples(tiny_model_dir, tokenizer, tmp_path):
    args = quick_args(tmp_path, packing=True, max_length=256)
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS, processing_class=tokenizer)
    assert len(trainer.train_dataset) < len(ROWS)  # packed
    preview = masking_preview(trainer.train_dataset, tokenizer, rows=len(ROWS))
    assert len(preview) == len(ROWS)
    trained = sorted("".join(s["text"] for s in spans if s["trained"]) for spans in preview)
    assert trained == sorted(row["response"] + "<|im_end|>" for row in ROWS)


# ---- in a browser --------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it when it can)",
)
def test_html_renders_in_headless_chromium(run_dir, data_rows, tmp_path):
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    url = (run_dir / "report.html").as_uri()
    dom = subprocess.run(
        [*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    parsed = Dom(dom)  # the DOM chromium built, serialised back
    assert len(parsed.find("svg")) == 3 and len(parsed.find("polyline")) == 5
    assert len([a for t, a in parsed.tags if t == "tr" and "sample" in (a.get("class") or "")]) == 6
    assert len(parsed.texts["mark.trained"]) >= 3
    # the results open with before -> after training, for the metrics that matter
    results = dom[dom.index('<section id="results">') :]
    assert results.startswith('<section id="results"><table id="before-after"><tbody><tr><th>metric</th>')
    first = results[: results.index("</table>")]
    assert re.findall(r"<tr><td>([a-z_]+)</td>", first) == list(HEADLINE_METRICS)
    # every axis labels its ticks once each
    for ys, xs in tick_texts(dom):
        assert len(ys) >= 2 and len(set(ys)) == len(ys), ys
        assert len(xs) >= 2 and len(set(xs)) == len(xs), xs
    # the masking preview: the rows `sftrainer data` shows first, in its order
    assert masked_rows(dom) == data_rows
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1200,1800", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    assert shot.is_file() and shot.stat().st_size > 20_000  # a blank page compresses to a few kB
