"""``graphfix report`` end to end: formats, budgets, baselines, exit codes and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from graphfix.cli.app import main
from graphfix.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = "tests.fixtures.synthetic:build"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "graphfix.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def synthetic_json(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("r") / "report.json"
    proc = run_cli("report", SYNTHETIC, "--backend", "eager", "--format", "json", "--output", str(out))
    assert proc.returncode == 1, proc.stderr  # it has breaks: over the default budget of 0
    return json.loads(out.read_text())


def test_json_report_is_versioned_and_complete(synthetic_json: dict) -> None:
    assert synthetic_json["schema"] == "graphfix.diagnose.report" and synthetic_json["schema_version"] == 1
    cats = {f["category"] for f in synthetic_json["findings"] if f["kind"] == "graph_break"}
    assert {"python_side_effect", "data_dependent_control_flow", "sdpa_context_manager", "collective"} <= cats
    for f in synthetic_json["findings"]:
        assert f["location"]["file"] and f["location"]["line"] > 0 and f["key"]


def test_machine_output_on_stdout_is_not_corrupted_by_model_prints() -> None:
    proc = run_cli("--quiet", "report", SYNTHETIC, "--backend", "eager", "--format", "json", "--no-fullgraph-check")
    data = json.loads(proc.stdout)  # the model prints in forward: that text must go to stderr
    assert data["model"] == SYNTHETIC
    assert "forward at position" in proc.stderr


def test_baseline_then_no_new_findings_passes(tmp_path: Path, capsys) -> None:
    # In-process (main's return value is the process's exit code): the subprocess runs above cover the entry point,
    # and each of these would pay another interpreter start and torch import.
    base = tmp_path / "baseline.json"
    first = main(["-q", "report", SYNTHETIC, "--backend", "eager", "--no-fullgraph-check", "--write-baseline", str(base)])
    assert first == 0 and base.exists(), capsys.readouterr().err
    again = main(["-q", "report", SYNTHETIC, "--backend", "eager", "--no-fullgraph-check", "--baseline", str(base),
                  "--format", "junit", "--output", str(tmp_path / "junit.xml")])
    assert again == 0, capsys.readouterr().err
    suites = ET.parse(tmp_path / "junit.xml").getroot()
    assert suites.iter("testcase")


def test_budget_exit_codes(tmp_path: Path, capsys) -> None:
    loose = main(["-q", "report", SYNTHETIC, "--backend", "eager", "--no-fullgraph-check",
                  "--max-graph-breaks", "50", "--max-recompiles", "50", "--also", f"sarif={tmp_path / 'r.sarif'}"])
    assert loose == 0, capsys.readouterr().err
    sarif = json.loads((tmp_path / "r.sarif").read_text())
    assert sarif["version"] == "2.1.0" and sarif["runs"][0]["results"]
    capsys.readouterr()
    tight = main(["-q", "report", SYNTHETIC, "--backend", "eager", "--no-fullgraph-check", "--max-graph-breaks", "1"])
    assert tight == 1
    assert "graph-break sites, over the budget of 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["report", "/no/such/model"], "no such file or directory"),
        (["report", "tests.fixtures.nope:build"], "cannot import"),
        (["report", "tests.fixtures.bad_models:raises"], "raised RuntimeError"),
        (["report", "tests.fixtures.bad_models:broken_forward"], "fails in eager mode"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], needle: str, capsys) -> None:
    code = main(["-q", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_malformed_config_json(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "llama", "hidden_size": ')
    assert main(["-q", "report", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "not valid JSON" in err and str(cfg) in err


def test_unsupported_architecture_config(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "bert"}))
    assert main(["-q", "report", str(cfg)]) == 2
    assert "not supported" in capsys.readouterr().err


def test_non_llama_gguf_is_rejected(tmp_path: Path, capsys) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert main(["-q", "report", str(path)]) == 2
    assert "'gpt2' is not supported" in capsys.readouterr().err


def test_debug_shows_the_traceback() -> None:
    with pytest.raises(InputError, match="/no/such/model"):
        main(["--debug", "-q", "report", "/no/such/model"])


def test_config_json_on_meta_device(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "vocab_size": 32000, "hidden_size": 8192,
                               "intermediate_size": 28672, "num_hidden_layers": 2, "num_attention_heads": 64,
                               "num_key_value_heads": 8}))
    proc = run_cli("-q", "report", str(cfg), "--backend", "eager", "--format", "json", "--max-recompiles", "5")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["device"] == "meta" and data["source"] == "config.json (meta device)"
    assert data["counts"]["graph_break"] == 0
