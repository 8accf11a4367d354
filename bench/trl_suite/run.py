"""Run TRL's own SFT test file against sftrainer, offline.

    git clone --branch v1.16.0 https://github.com/huggingface/trl /tmp/trl
    PYTHONPATH=$PWD python bench/trl_suite/run.py /tmp/trl/tests/test_sft_trainer.py
    python bench/trl_suite/run.py FILE --against trl       # the same file against TRL itself
    python bench/trl_suite/run.py FILE -k "test_train and not vlm" --json out.json

``from trl import SFTTrainer, SFTConfig`` (and ``trl.trainer.sft_trainer.DataCollatorForLanguageModeling``)
resolve to sftrainer's classes through a stand-in ``trl`` package (``pytest_side/trl_shim``); TRL's
file is copied, unchanged, into a temporary package beside the harness's ``testing_utils.py`` and
``conftest.py``. The hub models and data sets the tests name are served from stand-ins built
locally (``standin_*.py``; what differs from the hub's is listed in bench/trl_suite/README.md) with
``HF_HUB_OFFLINE=1``. Nothing of TRL is kept in this repository.

The result: a table of every test (passed / failed / error / skipped / documented difference / newer
than TRL 1.16.0 / not counted), the count of public-API tests (``expectations.py`` says what is not
counted and why) and a JSON file. Exit status 1 when a counted test fails without a documented reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import expectations  # noqa: E402
import standin_hub  # noqa: E402

COUNTED_OUTCOMES = ("passed", "documented difference", "failed", "error", "skipped", "xfailed")
NEWER = "newer than TRL 1.16.0"
UNCOUNTED = ("not counted", NEWER)


def default_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "sftrainer" / "trl-suite"


def _suite_dir(test_file: Path, work: Path) -> Path:
    """A package holding TRL's test file (unchanged) and the harness's helpers next to it."""
    package = work / "trl_tests"
    shutil.copytree(HERE / "pytest_side", package, ignore=shutil.ignore_patterns("trl_shim", "__pycache__"))
    (package / "__init__.py").write_text("", encoding="utf-8")
    shutil.copy(test_file, package / test_file.name)
    (work / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    return package


def run_pytest(test_file: Path, against: str, cache: Path, keyword: str | None, run_all: bool) -> list[dict]:
    env = {**os.environ, **standin_hub.build(cache)}
    with tempfile.TemporaryDirectory(prefix="trl-suite-") as tmp:
        work = Path(tmp)
        package = _suite_dir(test_file, work)
        results = work / "results.jsonl"
        paths = [str(REPO)]
        if against == "sftrainer":
            paths.insert(0, str(HERE / "pytest_side" / "trl_shim"))
        env.update(
            PYTHONPATH=os.pathsep.join([*paths, env.get("PYTHONPATH", "")]),
            TRL_SUITE_TARGET=against,
            TRL_SUITE_RESULTS=str(results),
            TRL_SUITE_SKIP="{}" if run_all else json.dumps(expectations.NOT_COUNTED),
            TOKENIZERS_PARALLELISM="false",
        )
        command = [
            sys.executable,
            "-m",
            "pytest",
            str(package / test_file.name),
            "-c",
            str(work / "pytest.ini"),
        ]
        command += ["--rootdir", str(work), "-p", "no:cacheprovider", "-q", "--no-header", "-rN"]
        command += ["-W", "ignore::DeprecationWarning"]
        if keyword:
            command += ["-k", keyword]
        subprocess.run(command, env=env, cwd=work, check=False)
        if not results.is_file():
            raise SystemExit("pytest recorded no result (see its output above)")
        return [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]


def _reason(table: dict[str, str], test: str) -> str | None:
    return expectations.reason(table, test)


def classify(rows: list[dict]) -> list[dict]:
    """Each row with ``status``: its outcome; "documented difference" for a documented failure; "newer
    than TRL 1.16.0" (not counted, its outcome kept in ``detail``) for a test TRL 1.16.0 itself fails."""
    out = []
    for row in rows:
        documented = _reason(expectations.DOCUMENTED, row["test"])
        newer = _reason(expectations.NEWER_THAN_TRL, row["test"])
        status = row["outcome"]
        if newer and status != "not counted":
            status, row = NEWER, {**row, "detail": f"{status} here; {newer}"}
        elif documented and status in ("failed", "error"):
            status, row = "documented difference", {**row, "detail": f"{documented} ({row['detail']})"}
        elif documented and status == "passed":
            row = {**row, "detail": "a documented difference that passed: remove it from expectations.py"}
        out.append({**row, "status": status})
    return out


def summarize(rows: list[dict]) -> dict:
    counted = [r for r in rows if r["status"] not in UNCOUNTED]
    return {"public_api_tests": len(counted), **Counter(r["status"] for r in rows)}


def print_table(rows: list[dict], summary: dict, against: str) -> None:
    width = max((len(r["test"]) for r in rows), default=10)
    print(f"\nTRL 1.16 tests/test_sft_trainer.py against {against}\n")
    shown = [r for r in rows if r["status"] != "not counted"]
    for r in sorted(shown, key=lambda r: (r["status"] == NEWER, r["test"])):
        detail = f"  {r['detail']}" if r["status"] != "passed" and r["detail"] else ""
        print(f"{r['status']:<22} {r['test']:<{width}}{detail[:300]}")
    reasons = Counter(r["detail"] for r in rows if r["status"] == "not counted")
    for reason, n in reasons.items():
        print(f"{'not counted':<22} {n} tests: {reason}")
    counted = summary["public_api_tests"]
    parts = [f"{summary.get(k, 0)} {k}" for k in COUNTED_OUTCOMES if summary.get(k)]
    uncounted = sum(summary.get(k, 0) for k in UNCOUNTED)
    print(f"\npublic-API tests: {counted} ({', '.join(parts)}); not counted: {uncounted}")


def outcomes(against: str, summary: dict, rows: list[dict]) -> dict:
    """The run as ``{test: status}`` (tests not counted left out), with the summary: what
    bench/trl_suite/outcomes-*.json keep, without the failure messages (which quote TRL's tests)."""
    statuses = {
        r["test"]: r["status"] for r in sorted(rows, key=lambda r: r["test"]) if r["status"] != "not counted"
    }
    return {"against": against, "summary": summary, "tests": statuses}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("test_file", type=Path, help="TRL's tests/test_sft_trainer.py (from a v1.16.0 clone)")
    parser.add_argument("--against", choices=["sftrainer", "trl"], default="sftrainer")
    parser.add_argument("--json", type=Path, help="write the per-test results here (with failure messages)")
    parser.add_argument("--outcomes", type=Path, help="write each test's status only (no test text)")
    parser.add_argument("--cache", type=Path, default=default_cache(), help="where the stand-ins are built")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression (a subset)")
    parser.add_argument("--all", action="store_true", help="also run the tests that are not counted")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.test_file.is_file():
        parser.error(f"no such file: {args.test_file} (clone TRL: see the usage above)")
    rows = classify(run_pytest(args.test_file.resolve(), args.against, args.cache, args.keyword, args.all))
    summary = summarize(rows)
    print_table(rows, summary, args.against)
    if args.json:
        payload = {
            "against": args.against,
            "test_file": str(args.test_file),
            "summary": summary,
            "tests": rows,
        }
        args.json.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    if args.outcomes:
        args.outcomes.write_text(json.dumps(outcomes(args.against, summary, rows), indent=1) + "\n")
    return 1 if summary.get("failed") or summary.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
