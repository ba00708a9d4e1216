"""The command line on the zoo's codebases: ``--driver``, the ``(model, loop)`` form, and the exit codes.

Exit codes (docs/reports.md): 0 clean or within budget / verified, 1 over budget / not verified,
2 usage or input errors, including a convention graphfix cannot recognise and a model
``optimize`` refuses.
"""

from __future__ import annotations

import json

from graphfix.cli.app import main

GPT_FAST = "tests.zoo.gpt_fast_style"
RESEARCH = "tests.zoo.research_style"


def test_report_with_a_driver_counts_what_the_loop_compiled(capsys):
    code = main(["-q", "report", f"{GPT_FAST}:build", "--driver", f"{GPT_FAST}:loop", "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1  # gpt-fast's loop recompiles once (prefill to decode); no budget given
    assert report["driver"] == f"loop:{GPT_FAST}:loop" and report["stats"]["graph_runs"] > 0
    assert report["stats"]["forward_calls"] == 33 and report["decode_steps"] == 32
    assert [f["category"] for f in report["findings"]] == ["dynamic_cache_or_position"]
    assert main(["-q", "report", f"{GPT_FAST}:build", "--driver", f"{GPT_FAST}:loop", "--max-recompiles", "1"]) == 0


def test_report_of_a_builder_returning_model_and_loop(capsys):
    code = main(["-q", "report", f"{RESEARCH}:entry", "--format", "json", "--no-hidden"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["counts"]["graph_break"] > 0
    assert report["driver"].startswith("loop:")


def test_unknown_convention_is_one_line_naming_driver(capsys):
    code = main(["-q", "report", f"{RESEARCH}:build"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "ResearchLlama.forward(tokens" in err[0] and "--driver" in err[0]
    assert main(["-q", "optimize", f"{RESEARCH}:build"]) == 2


def test_driver_that_does_not_exist_is_one_line(capsys):
    for driver in (f"{GPT_FAST}:no_such_loop", "nopkg.nomod:loop", "not-a-spec"):
        assert main(["-q", "report", f"{GPT_FAST}:build", "--driver", driver]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("graphfix: error:") for line in lines)


def test_optimize_verify_with_a_driver_exits_0(capsys, tmp_path):
    out = tmp_path / "result.json"
    code = main(["-q", "optimize", f"{GPT_FAST}:build", "--driver", f"{GPT_FAST}:loop", "--verify", "--backend",
                 "aot_eager", "--format", "json", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["verified"] is True and data["kind"] == "generic"
    assert data["verification"]["recompiles"] == 0 and data["verification"]["graph_breaks"] == 0
    assert data["parity"]["tokens_match"] is True
