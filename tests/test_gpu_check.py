"""bench/gpu_check.py, the one command for a lent GPU, checked here on the CPU: its --dry-run runs every
part on a tiny model in a subprocess, as the GPU run will, and the JSON names every part with a status,
none failed; a part past its time limit is killed with what it started, keeping what it had saved."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"


def _gpu_check():
    if "gpu_check" not in sys.modules:  # its dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        assert spec and spec.loader
        sys.modules["gpu_check"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def test_dry_run_runs_every_part_and_none_fails(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}  # $OUT would take the JSON elsewhere
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--workdir", str(tmp_path / "work")]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]

    report = json.loads(out.read_text())
    assert report["schema"] == 1 and report["mode"] == "dry-run" and "crash" not in report
    assert list(report["parts"]) == _gpu_check().part_names(dry=True)
    for name, part in report["parts"].items():
        assert part["status"] in ("pass", "skip"), (name, part)
        assert isinstance(part["seconds"], float) and isinstance(part["numbers"], dict)
        assert part["status"] == "pass" or part["reason"], name
    # What the CPU cannot do is skipped with sftrainer's own reason; the rest runs.
    may_skip = {"install", "offload"} | (set() if importlib.util.find_spec("bitsandbytes") else {"qlora"})
    assert [n for n, p in report["parts"].items() if p["status"] == "skip" and n not in may_skip] == []
    assert report["parts"]["offload"]["reason"].startswith("sftrainer refuses it here")
    assert report["parts"]["packing"]["numbers"]["backends"]["sdpa"]["status"] == "pass"
    assert report["parts"]["resume"]["numbers"]["gaps"] == {"loss": 0.0, "grad_norm": 0.0, "weight": 0.0}
    assert {t["met"] for t in report["targets"]} == {None}  # shown, never judged, on a tiny CPU model
    assert report["versions"]["torch"] and report["device"]["matmul_tflops"] > 0
    # One table, last (the device's reply keeps only the end of the output), and the parts' logs beside.
    assert done.stdout.rstrip().splitlines()[-1].startswith("target")
    assert "longest/trl" in out.with_suffix(".log").read_text()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() in a process with threads
def test_a_part_past_its_limit_is_killed_with_its_children_and_keeps_what_it_saved(tmp_path):
    gpu_check = _gpu_check()
    for sub in ("results", "logs", "runs"):
        (tmp_path / sub).mkdir()
    marker = tmp_path / "grandchild"

    def slow(ctx):
        ctx.numbers["partial"] = 1
        ctx.save()
        subprocess.Popen([sys.executable, "-c", f"import time; time.sleep(3); open({str(marker)!r}, 'w')"])
        time.sleep(60)

    def broken(ctx):
        raise ValueError("boom")

    start = time.time()
    late = gpu_check.launch(gpu_check.Part("slow", slow, 10, 1), gpu_check.DRY, tmp_path, 1.5, spawn=False)
    assert late["status"] == "timeout" and time.time() - start < 10
    assert late["numbers"] == {"partial": 1} and late["reason"].startswith("killed at its")
    bad = gpu_check.launch(gpu_check.Part("broken", broken, 10, 1), gpu_check.DRY, tmp_path, 5, spawn=False)
    assert bad["status"] == "fail" and bad["reason"] == "ValueError: boom" and "boom" in bad["log_tail"]
    time.sleep(3.5)
    assert not marker.exists()  # the part's own child died with it
