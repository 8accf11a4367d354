"""``report.png`` and ``report.html``: from a real run (``sftrainer train`` writes them, ``sftrainer
report`` rewrites them), checked in pure Python and, where Debian's ``chromium`` is installed, as a
headless browser renders the page."""

from __future__ import annotations

import json
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
from sftrainer.report import curves, load_history, masking_preview, write_report

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sftrainer_home) -> Path:
    """The built-in demo cut to 8 steps, evaluated every 4, with 6 generation samples."""
    out = tmp_path_factory.mktemp("run")
    code = main(["train", f"output_dir={out}", "max_steps=8", "logging_steps=2", "eval_strategy=steps",
                 "eval_steps=4", "exact_match_samples=6", "warmup_steps=2"])  # fmt: skip
    assert code == 0
    return out


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
def test_html_renders_in_headless_chromium(run_dir, tmp_path):
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
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1200,1800", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    assert shot.is_file() and shot.stat().st_size > 20_000  # a blank page compresses to a few kB
