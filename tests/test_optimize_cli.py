"""``graphfix optimize MODEL [--verify]`` and ``graphfix verify MODEL``: table, JSON, exit codes."""

from __future__ import annotations

import json

from graphfix.cli.app import main

HERE = "tests.test_optimize_cli"


def start_pos_model():
    from tests.test_optimize_meta import StartPosModel

    return StartPosModel()


def growing_cache_model():
    from tests.test_optimize_meta import StartPosModel

    return StartPosModel(growing=True)


def noisy_model():
    """Logits with fresh random noise on every call: no run can match the reference, so verification fails."""
    import torch

    from tests.test_optimize_meta import StartPosModel

    class Noisy(StartPosModel):
        def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
            out = super().forward(tokens, start_pos)
            return out + 10 * torch.randn_like(out)

    return Noisy()


def test_verify_prints_an_aligned_table_and_exits_0(capsys, tmp_path):
    out = tmp_path / "table.txt"
    code = main(["verify", f"{HERE}:start_pos_model", "--backend", "aot_eager", "--no-diagnose", "--decode-steps",
                 "8", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    text = out.read_text()
    lines = text.splitlines()
    assert lines[1].split() == ["before", "after"]
    assert lines[2].split()[-2:] == ["-", "2"]  # graphs: not diagnosed before; prefill + decode after
    assert {len(ln) for ln in lines[1:7]} == {len(lines[1])}
    assert "greedy tokens" in text and "9/9 identical" in text and "verified: yes" in text
    assert "verify: prefill of 8 tokens + 8 decode steps" in captured.err  # progress on stderr
    assert captured.out == ""


def test_optimize_verify_json_exits_1_when_verification_fails(capsys):
    code = main(["--quiet", "optimize", f"{HERE}:noisy_model", "--verify", "--format", "json", "--backend",
                 "aot_eager", "--diagnose-steps", "2"])
    captured = capsys.readouterr()
    assert code == 1
    data = json.loads(captured.out)
    assert data["schema"] == "graphfix.optimize" and data["schema_version"] == 2
    assert data["verified"] is False and data["kind"] == "generic"
    assert any(f.startswith("parity") for f in data["verification"]["failures"])
    assert data["compiled"] is False and "returned as it was" in data["notes"][-1]
    assert {row["what"] for row in data["table"]} >= {"graphs", "graph breaks", "recompiles", "tokens/s"}
    assert data["before"]["schema"] == "graphfix.diagnose.report"
    assert "is not verified" in captured.err


def test_optimize_without_verify_and_input_errors(capsys, tmp_path):
    cache = tmp_path / "cache"
    assert main(["--quiet", "optimize", f"{HERE}:growing_cache_model", "--no-diagnose", "--backend", "aot_eager",
                 "--cache-dir", str(cache), "--diagnose-layers", "all"]) == 0
    assert "verified: not run" in capsys.readouterr().out
    assert cache.is_dir() and any(cache.iterdir())  # the compile cache was kept
    assert main(["optimize", f"{HERE}:start_pos_model", "--cache-dir", __file__]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("graphfix: error: --cache-dir")
    assert main(["optimize", f"{HERE}:start_pos_model", "--passes", "real-rope,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("graphfix: error: unknown pass 'nope'")
    assert main(["verify", f"{HERE}:start_pos_model", "--decode-steps", "0"]) == 2
