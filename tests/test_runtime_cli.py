"""``graphfix generate`` / ``graphfix bench`` (graphfix.cli.generate_cmd) and the compile cache, on CPU."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from graphfix.cli.generate_cmd import add_parser
from graphfix.engine import CompileCache
from graphfix.engine.compile_cache import precompile_supported
from graphfix.errors import InputError
from tests.test_runtime import hf_greedy, tiny_hf


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="graphfix")
    parser.add_argument("--quiet", "-q", action="store_true")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = tiny_hf("llama", seed=3)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path, model


def test_generate_from_an_hf_folder_equals_hf_greedy(hf_dir, capsys):
    path, model = hf_dir
    prompts = [[5, 7, 9, 11], [3, 4, 100, 22, 9, 8]]
    refs = [hf_greedy(model, p, 6) for p in prompts]
    args = _parse(["-q", "generate", str(path), "--prompt-ids", "5,7,9,11", "--prompt-ids", "3, 4,100,22,9,8",
                   "--max-new-tokens", "6", "--device", "cpu", "--dtype", "fp32", "--no-compile", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"] == refs and out["text"] == [None, None]
    # batch 1 through the decode kernels' path (their eager references on CPU)
    args = _parse(["-q", "generate", str(path), "--prompt-ids", "5,7,9,11", "--max-new-tokens", "6", "--device", "cpu",
                   "--dtype", "fp32", "--no-compile", "--json", "--decode-kernels"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] == refs[:1]


def test_generate_bad_inputs_are_input_errors(hf_dir):
    path, _ = hf_dir
    for argv, match in (([], "nothing to generate"), (["--prompt-ids", "1,x"], "comma-separated integers"),
                        (["--prompt", "hello"], "no tokenizer"), (["--prompt-ids", "1", "--top-p", "2"], "top_p")):
        args = _parse(["-q", "generate", str(path), "--device", "cpu", "--no-compile", *argv])
        with pytest.raises(InputError, match=match):
            args.func(args)


@pytest.fixture
def cache_env(monkeypatch):
    """Undo what CompileCache.activate sets process-wide when the test ends."""
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TRITON_PTXAS_PATH"):
        if var in os.environ:
            monkeypatch.setenv(var, os.environ[var])
        else:
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "pycache_prefix", sys.pycache_prefix)
    precompile = torch._dynamo.config.caching_precompile  # a config module: monkeypatch's undo would hide the entry
    yield
    torch._dynamo.config.caching_precompile = precompile


def test_bench_runs_on_cpu_and_writes_json_and_markdown(tmp_path, monkeypatch, cache_env):
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    args = _parse(["bench", "--device", "cpu", "--model", "tiny", "--layers", "1", "--dtype", "fp32",
                   "--systems", "copy,graphfix", "--variants", "fused", "--batch-sizes", "1", "--prompt-len", "3",
                   "--new-tokens", "4", "--runs", "1", "--ttft-lengths", "8", "--backend", "eager", "--no-warm-start",
                   "--no-profile", "--time-budget", "120", "--cache-dir", str(tmp_path / "cache"),
                   "--json", str(js), "--markdown", str(md)])
    assert args.func(args) == 0
    doc = json.loads(js.read_text())
    assert doc["schema"] == "graphfix.bench_decode/1" and doc["copy_bandwidth"]["gb_per_s"] > 0
    (row,) = doc["runs"]
    assert row["system"] == "graphfix" and row["variant"] == "fused" and row["tok_per_s"] > 0
    assert row["kv_len"] == 64 and doc["ttft"][0]["prompt_len"] == 8
    assert "| graphfix (fused) | 1 |" in md.read_text()
    phases = doc["warmup"]["fused"]["phases"]  # where a warmup goes: compiling or the rest
    assert set(phases) == {"prefill_and_first", "decode"} and all(p["requests"] for p in phases.values())
    for p in phases.values():
        assert p["compile_s"] > 0 and p["outside_compile_s"] == pytest.approx(p["seconds"] - p["compile_s"])
        assert p["compile_timers"]["dynamo_and_backend_s"] == p["compile_s"]


def test_bench_hands_over_to_the_next_variant_when_one_cannot_run(tmp_path, monkeypatch, cache_env):
    """``pdl`` needs CUDA and sm_90+: on CPU it is recorded as skipped and ``fused`` becomes the measured variant."""
    js = tmp_path / "b.json"
    args = _parse(["bench", "--device", "cpu", "--model", "tiny", "--layers", "1", "--dtype", "fp32",
                   "--systems", "graphfix", "--variants", "pdl,fused", "--batch-sizes", "1", "--prompt-len", "3",
                   "--new-tokens", "3", "--runs", "1", "--ttft-lengths", "", "--backend", "eager", "--no-warm-start",
                   "--no-profile", "--time-budget", "120", "--cache-dir", str(tmp_path / "cache"), "--json", str(js)])
    assert args.func(args) == 0
    doc = json.loads(js.read_text())
    assert [s["what"] for s in doc["skipped"]] == ["graphfix pdl"]
    assert [(r["system"], r["variant"]) for r in doc["runs"]] == [("graphfix", "fused")]


def test_bench_measures_the_drop_in_last_on_the_same_model(tmp_path, monkeypatch, cache_env):
    js = tmp_path / "b.json"
    args = _parse(["bench", "--device", "cpu", "--model", "tiny", "--layers", "1", "--dtype", "fp32",
                   "--systems", "graphfix,optimize", "--variants", "fused", "--batch-sizes", "1,2", "--prompt-len", "3",
                   "--new-tokens", "4", "--runs", "1", "--ttft-lengths", "", "--backend", "eager", "--no-warm-start",
                   "--no-profile", "--time-budget", "300", "--cache-dir", str(tmp_path / "cache"), "--json", str(js)])
    assert args.func(args) == 0
    doc = json.loads(js.read_text())
    assert doc["optimize"]["verified"] is True and doc["optimize"]["seconds"] > 0, doc["notes"]
    rows = {(r["system"], r["batch"]): r for r in doc["runs"]}
    assert rows[("optimize", 1)]["tok_per_s"] > 0 and rows[("optimize", 2)]["tok_per_s"] > 0


def test_compile_cache_points_torch_at_the_folder(tmp_path, monkeypatch, cache_env):
    cache = CompileCache(tmp_path / "cc")
    info = cache.activate()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cc" / "inductor")
    assert info["megacache_loaded"] is False
    size = cache.save()
    assert size == 0 or cache.megacache_path.stat().st_size == size
    if size:
        assert cache.activate()["megacache_loaded"] is True


def test_compile_cache_keeps_one_setup_per_folder(tmp_path, monkeypatch, cache_env):
    assert CompileCache(tmp_path / "plain", key={"model": "a"}).activate()["precompile"] is False  # opt-in
    info = CompileCache(tmp_path / "cc", key={"model": "a", "dtype": "bf16"}, precompile=True).activate()
    assert info["precompile"] is precompile_supported() is torch._dynamo.config.caching_precompile
    with pytest.raises(ValueError, match="needs a key"):
        CompileCache(tmp_path / "nokey", precompile=True)
    assert json.loads((tmp_path / "cc" / "key.json").read_text())["model"] == "a"
    CompileCache(tmp_path / "cc", key={"model": "a", "dtype": "bf16"}).activate()  # the same setup: accepted
    with pytest.raises(InputError, match="another setup.*model"):
        CompileCache(tmp_path / "cc", key={"model": "b", "dtype": "bf16"}).activate()
    (tmp_path / "cc" / "key.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        CompileCache(tmp_path / "cc", key={"model": "a", "dtype": "bf16"}).activate()


def test_compile_cache_gives_children_its_bytecode_prefix(tmp_path, monkeypatch, cache_env):
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    cache = CompileCache(tmp_path / "cc")
    inductor = tmp_path / "cc" / "inductor"
    assert cache.child_env({"A": "1"}) == {"A": "1", "PYTHONPYCACHEPREFIX": str(tmp_path / "cc" / "pycache"),
                                           "TORCHINDUCTOR_CACHE_DIR": str(inductor),
                                           "TRITON_CACHE_DIR": str(inductor / "triton")}
    assert cache.child_env({"PYTHONPYCACHEPREFIX": "/x"})["PYTHONPYCACHEPREFIX"] == "/x"  # the caller's own wins
    monkeypatch.setattr(sys, "pycache_prefix", None)
    info = cache.activate()
    expected = None if sys.flags.dont_write_bytecode else str(cache.pycache_dir)  # PYTHONDONTWRITEBYTECODE is honoured
    assert info["pycache_prefix"] == expected == sys.pycache_prefix


def test_main_cli_registers_the_commands():
    from graphfix.cli import app as cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"generate", "bench"} <= set(sub.choices)
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--help"])
    assert exc.value.code == 0


def test_triton_gemv_falls_back_off_cuda():
    from graphfix.engine.kernels import GemvLinear, use_cublas, use_triton_gemv

    lin = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(4, 2))
    x = torch.randn(1, 1, 8)
    ref = lin(x)
    assert use_triton_gemv(lin) == 1 and type(lin[0]) is GemvLinear and type(lin[1]) is torch.nn.Linear
    assert torch.equal(lin(x), ref)
    assert use_cublas(lin) == 1 and type(lin[0]) is torch.nn.Linear


def test_compile_cache_pins_one_ptxas_for_the_whole_process(tmp_path, monkeypatch, cache_env):
    """Triton keys its caches on the ptxas version: the path in force at activation is the one every compile uses."""
    from graphfix.engine.compile_cache import pin_triton_ptxas

    monkeypatch.setenv("TRITON_PTXAS_PATH", "/opt/cuda/bin/ptxas")  # the user's choice stands
    assert pin_triton_ptxas() == "/opt/cuda/bin/ptxas"
    assert CompileCache(tmp_path / "cc").activate()["ptxas"] == "/opt/cuda/bin/ptxas"
    monkeypatch.delenv("TRITON_PTXAS_PATH")
    bundled = Path(torch._inductor.__file__).parent / "bin" / "ptxas"  # what Inductor would pick (CUDA builds)
    expected = str(bundled) if bundled.is_file() else None
    assert CompileCache(tmp_path / "cc2").activate()["ptxas"] == expected == os.environ.get("TRITON_PTXAS_PATH")
