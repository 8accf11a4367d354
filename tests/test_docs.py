"""The manual (``docs/``, built with MkDocs) stays true to the code: the generated reference pages are the
ones ``docs/gen_reference.py`` renders now, every repository path the README and the manual name exists,
and ``mkdocs build --strict`` (broken links and anchors fail) succeeds."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# A repository path as the pages write it: in backticks or as a link target, under a top-level folder
# (or BENCHMARKS.md). Paths inside runs (outputs/...) and the user's own files (data/...) are not ours.
PATH = re.compile(
    r"(?:`|\]\()((?:\.\./)*(?:configs|examples|bench|sftrainer|tests|docs)/[^`)\s#*]*|BENCHMARKS\.md)"
)


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def test_generated_reference_pages_are_current():
    gen = _generator()
    stale = [rel for rel, text in gen.render().items() if _read(DOCS / rel) != text]
    assert not stale, f"stale generated page(s) {stale}: run `{gen.COMMAND}` and commit the result"


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def test_every_repository_path_the_docs_name_exists():
    missing = []
    for page in _pages():
        for match in PATH.finditer(page.read_text(encoding="utf-8")):
            name = match.group(1)
            # In backticks a path is written from the repository root; a link resolves from the page's folder.
            bases = [page.parent] if match.group(0).startswith("](") else [ROOT]
            if not any((base / name).resolve().exists() for base in bases):
                missing.append(f"{page.relative_to(ROOT)}: {name}")
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


def test_the_path_check_sees_backticks_and_links():
    text = "see `configs/qlora.yaml`, [the data](examples/data/chat.jsonl) and `outputs/run`"
    assert [m.group(1) for m in PATH.finditer(text)] == ["configs/qlora.yaml", "examples/data/chat.jsonl"]


@pytest.mark.skipif(
    shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed (pip install -e '.[dev]')",
)
def test_mkdocs_build_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
