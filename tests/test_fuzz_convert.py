"""Bad checkpoint input for ``convert`` and Meta/GGUF/safetensors loading, as a table that grows with every format.

Each case builds one bad input from a tiny valid checkpoint (HF, Meta with 1
and 2 ranks, GGUF), runs the real CLI entry point (``graphfix.cli.app.main``)
and asserts the promise of docs/reliability.md: exit 2, exactly one
``graphfix: error:`` line on stderr naming what is wrong, no traceback, nothing
on stdout, and the folder it ran in byte-for-byte as it was (no partial output,
no temp folder, no file a pickle would have written). The size cases run again
in a subprocess that reports its peak RSS growth, which must stay under 1 GB.

To add a case: a builder ``fn(tmp, base) -> argv`` that writes the bad input
under ``tmp`` and a regex the error line must match; add it to ``CASES`` (and
to ``SIZE_CASES`` when the input sizes an allocation).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from graphfix.cli.app import main
from graphfix.convert import convert
from tests.conftest_convert import tiny_hf, write_gguf


@dataclass
class Base:
    """Valid tiny checkpoints the cases start from (built once per module)."""

    root: Path
    model: torch.nn.Module

    @property
    def hf(self) -> Path:
        return self.root / "hf"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    root = tmp_path_factory.mktemp("fuzzbase")
    model = tiny_hf(root / "hf", heads=4, kv_heads=2)
    convert(root / "hf", root / "meta1", to="meta", progress=False)
    convert(root / "hf", root / "meta2", to="meta", shards=2, progress=False)
    convert(root / "hf", root / "sharded", to="hf", shards=2, progress=False)
    return Base(root, model)


# ---------------------------------------------------------------- builders


def _copy(base: Base, name: str, tmp: Path, as_name: str = "src") -> Path:
    shutil.copytree(base.root / name, tmp / as_name)
    return tmp / as_name


def _edit_json(path: Path, value=None, **changes) -> None:
    doc = json.loads(path.read_text()) if value is None else value
    if value is None:
        doc.update(changes)
    path.write_text(json.dumps(doc))


def hf_config(value=None, to: str = "meta", **changes) -> Callable[[Path, Base], list[str]]:
    def build(tmp: Path, base: Base) -> list[str]:
        src = _copy(base, "hf", tmp)
        _edit_json(src / "config.json", value, **changes)
        return ["convert", str(src), str(tmp / "out"), "--to", to]
    return build


def hf_config_text(text: str) -> Callable[[Path, Base], list[str]]:
    def build(tmp: Path, base: Base) -> list[str]:
        src = _copy(base, "hf", tmp)
        (src / "config.json").write_text(text)
        return ["convert", str(src), str(tmp / "out"), "--to", "hf"]
    return build


def params(value=None, command: str = "convert", **changes) -> Callable[[Path, Base], list[str]]:
    def build(tmp: Path, base: Base) -> list[str]:
        src = _copy(base, "meta1", tmp)
        _edit_json(src / "params.json", value, **changes)
        if command == "report":
            return ["report", str(src), "--format", "json", "--no-hidden"]
        return ["convert", str(src), str(tmp / "out"), "--to", "hf"]
    return build


def gguf(qtype: str = "Q8_0", **metadata) -> Callable[[Path, Base], list[str]]:
    def build(tmp: Path, base: Base) -> list[str]:
        meta = {k.replace("__", "."): v for k, v in metadata.items()}
        write_gguf(tmp / "m.gguf", base.model, qtype_for=lambda n, a: qtype, metadata=meta)
        return ["convert", str(tmp / "m.gguf"), str(tmp / "out"), "--to", "hf"]
    return build


def missing_tensor(tmp: Path, base: Base) -> list[str]:
    src = _copy(base, "hf", tmp)
    sd = load_file(src / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    return ["convert", str(src), str(tmp / "out"), "--to", "meta"]


def index_entry(fname: str) -> Callable[[Path, Base], list[str]]:
    def build(tmp: Path, base: Base) -> list[str]:
        src = _copy(base, "sharded", tmp)
        index = json.loads((src / "model.safetensors.index.json").read_text())
        name = next(iter(index["weight_map"]))
        index["weight_map"][name] = fname.format(tmp=tmp)
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
        shutil.copy(src / "model-00001-of-00002.safetensors", tmp / "outside.safetensors")
        return ["convert", str(src), str(tmp / "out"), "--to", "meta"]
    return build


def huge_header(tmp: Path, base: Base) -> list[str]:
    src = _copy(base, "hf", tmp)
    data = bytearray((src / "model.safetensors").read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")
    (src / "model.safetensors").write_bytes(bytes(data))
    return ["convert", str(src), str(tmp / "out"), "--to", "meta"]


def meta_files(action: str) -> Callable[[Path, Base], list[str]]:
    """Rank-file damage: a copied rank, a rank number twice, a missing rank, an extra full copy, a pickle."""
    def build(tmp: Path, base: Base) -> list[str]:
        src = _copy(base, "meta2", tmp)
        r0, r1 = src / "consolidated.00.pth", src / "consolidated.01.pth"
        if action == "copied":
            shutil.copy(r0, r1)
        elif action == "renumbered":
            shutil.copy(r0, src / "consolidated.0.pth")
        elif action == "last-missing":
            r1.unlink()
        elif action == "first-missing":
            r0.unlink()
        elif action == "oversized":
            shutil.copy(base.root / "meta1" / "consolidated.00.pth", r1)
        elif action == "pickle":
            torch.save({"tok_embeddings.weight": _Payload(str(tmp / "PWNED"))}, r0)
        elif action == "list":
            torch.save([torch.zeros(2)], r0)
        elif action == "truncated":
            r1.write_bytes(r1.read_bytes()[:300])
        return ["convert", str(src), str(tmp / "out"), "--to", "hf"]
    return build


class _Payload:
    """Pickles as a call to ``open(path, "w")``: the file appears if anything unpickles it for real."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def meta_missing_tensor(command: str) -> Callable[[Path, Base], list[str]]:
    def build(tmp: Path, base: Base) -> list[str]:
        src = _copy(base, "meta1", tmp)
        sd = torch.load(src / "consolidated.00.pth", weights_only=True)
        del sd["layers.1.feed_forward.w3.weight"]
        torch.save(sd, src / "consolidated.00.pth")
        if command == "report":
            return ["report", str(src), "--format", "json", "--no-hidden"]
        return ["convert", str(src), str(tmp / "out"), "--to", "hf"]
    return build


def destination(kind: str) -> Callable[[Path, Base], list[str]]:
    def build(tmp: Path, base: Base) -> list[str]:
        src = _copy(base, "hf", tmp)
        args = {"no-parent": [str(tmp / "nope" / "out")],
                "exists": [str(tmp / "exists")],
                "inside-source": [str(src / "sub"), "--overwrite"],
                "file": [str(tmp / "afile"), "--overwrite"]}[kind]
        (tmp / "exists").mkdir()
        (tmp / "exists" / "keep.txt").write_text("mine")
        (tmp / "afile").write_text("not a folder")
        return ["convert", str(src), *args, "--to", "meta"]
    return build


def option(*extra: str, to: str = "meta") -> Callable[[Path, Base], list[str]]:
    def build(tmp: Path, base: Base) -> list[str]:
        src = _copy(base, "hf", tmp)
        return ["convert", str(src), str(tmp / "out"), "--to", to, *extra]
    return build


def not_gguf(tmp: Path, base: Base) -> list[str]:
    (tmp / "m.gguf").write_bytes(b"GGUG" + b"\0" * 64)
    return ["convert", str(tmp / "m.gguf"), str(tmp / "out"), "--to", "hf"]


def truncated_gguf(tmp: Path, base: Base) -> list[str]:
    write_gguf(tmp / "m.gguf", base.model, qtype_for=lambda n, a: "Q8_0")
    data = (tmp / "m.gguf").read_bytes()
    (tmp / "m.gguf").write_bytes(data[: len(data) // 2])
    return ["convert", str(tmp / "m.gguf"), str(tmp / "out"), "--to", "meta"]


# ---------------------------------------------------------------- the table

BIG = 10**9
CASES: dict[str, tuple[Callable[[Path, Base], list[str]], str]] = {
    # config.json
    "hf-config-list": (hf_config([1, 2]), r"config.json: holds a JSON list, not a JSON object"),
    "hf-config-not-json": (hf_config_text("{oops"), r"config.json: not readable JSON"),
    "hf-hidden-string": (hf_config(hidden_size="64"), r"config.json: hidden_size='64' must be an integer"),
    "hf-hidden-negative": (hf_config(hidden_size=-64), r"config.json: hidden_size=-64 must be a positive integer"),
    "hf-heads-zero": (hf_config(num_attention_heads=0), r"config.json: num_attention_heads=0 must be a positive"),
    "hf-heads-not-dividing": (hf_config(to="hf", num_attention_heads=5, num_key_value_heads=5),
                              r"config.json: hidden_size=64 is not a multiple of num_attention_heads=5"),
    "hf-kv-not-dividing": (hf_config(num_key_value_heads=3), r"num_attention_heads=4 is not a multiple of num_key_value_"),
    "hf-odd-head-dim": (hf_config(to="hf", head_dim=7), r"config.json: the head size is 7, an odd number"),
    "hf-hidden-huge": (hf_config(hidden_size=BIG), r"has shape \[128, 64\] but config.json implies \[128, 1000000000\]"),
    "hf-layers-huge": (hf_config(num_hidden_layers=BIG), r"config.json: num_hidden_layers=1000000000 but the weights have 2"),
    "hf-eos-outside-vocab": (hf_config(eos_token_id=999999), r"config.json: eos_token_id=999999 must be a token id"),
    "hf-eps-string": (hf_config(rms_norm_eps="tiny"), r"config.json: rms_norm_eps='tiny' must be a finite number"),
    "hf-rope-list": (hf_config(rope_scaling=[8]), r"config.json: rope_scaling: holds a JSON list"),
    # safetensors weights and index
    "hf-missing-tensor": (missing_tensor, r"tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
    "index-parent-path": (index_entry("../outside.safetensors"), r"index.json: weight_map names '../outside.safetensors', outside"),
    "index-absolute-path": (index_entry("{tmp}/outside.safetensors"), r"index.json: weight_map names '/.*', outside the"),
    "index-not-a-name": (index_entry(""), r"index.json: weight_map holds '' where a file name belongs"),
    "safetensors-huge-header": (huge_header, r"model.safetensors: corrupt safetensors file \(header length"),
    # params.json
    "params-list": (params(["dim"]), r"params.json: holds a JSON list"),
    "params-dim-wrong": (params(dim=128), r"params.json: dim=128 but the weights have hidden size 64 \(norm.weight\)"),
    "params-dim-negative": (params(dim=-64), r"params.json: dim=-64 must be a positive integer"),
    "params-heads-string": (params(n_heads="4"), r"params.json: n_heads='4' must be an integer"),
    "params-layers-huge": (params(n_layers=BIG), r"params.json: n_layers=1000000000 but the weights have 2 layers"),
    "params-no-dim": (params({"n_layers": 2, "n_heads": 4}), r"params.json: required key 'dim' is missing"),
    "params-vision-string": (params(vision_chunk_size="big"), r"params.json: vision_chunk_size='big' must be an integer"),
    "report-max-seq-len": (params(command="report", max_seq_len=8_000_000),
                           r"params.json: max_seq_len=8000000 sizes a .* KV cache"),
    "report-max-seq-len-1e12": (params(command="report", max_seq_len=10**12),
                                r"params.json: max_seq_len=1000000000000 is too large"),
    "report-batch-huge": (params(command="report", max_batch_size=BIG), r"params.json: max_batch_size=1000000000 sizes"),
    "report-meta-missing-tensor": (meta_missing_tensor("report"), r"tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
    # Meta rank files
    "meta-missing-tensor": (meta_missing_tensor("convert"), r"tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
    "meta-rank-copied": (meta_files("copied"), r"consolidated.01.pth: holds the same .* rows as consolidated.00.pth"),
    "meta-rank-twice": (meta_files("renumbered"), r"consolidated.00.pth: rank 0 is also in consolidated.0.pth"),
    "meta-last-rank-missing": (meta_files("last-missing"), r"split 2 ways .* consolidated.01.pth and later are missing"),
    "meta-first-rank-missing": (meta_files("first-missing"), r"consolidated.00.pth: shard missing \(1 of 2 present\)"),
    "meta-oversized-rank": (meta_files("oversized"), r"hold 96 attention rows where params.json \(dim=64\) implies 64"),
    "meta-pickle-code": (meta_files("pickle"), (r"consolidated.00.pth: not a plain tensor checkpoint \(its pickle calls "
                                                r"[\w.]*open, which could run code\), so it was not loaded")),
    "meta-not-a-dict": (meta_files("list"), r"consolidated.00.pth: holds a list, not a state dict"),
    "meta-truncated": (meta_files("truncated"), r"consolidated.01.pth: not a readable PyTorch checkpoint"),
    # GGUF
    "gguf-q8_1": (gguf("Q8_1"), r"m.gguf: tensor '.*' is quantized as Q8_1, which the gguf package cannot"),
    "gguf-head-count-zero": (gguf(llama__attention__head_count=0), r"llama.attention.head_count=0 must be a positive"),
    "gguf-block-count-string": (gguf(llama__block_count="2"), r"m.gguf: llama.block_count='2' must be an integer"),
    "gguf-block-count-huge": (gguf(llama__block_count=BIG), r"m.gguf: llama.block_count=1000000000 but the weights"),
    "gguf-kv-heads-zero": (gguf(llama__attention__head_count_kv=0), r"head_count_kv=0 must be a positive integer"),
    "gguf-key-length-huge": (gguf(llama__attention__key_length=BIG), r"implies 4000000000 query rows but blk.0.attn_q"),
    "gguf-eos-outside-vocab": (gguf(**{"tokenizer.ggml.eos_token_id": 5000}), r"eos_token_id=5000 must be a token id"),
    "gguf-bad-magic": (not_gguf, r"m.gguf: not a GGUF file \(bad magic"),
    "gguf-truncated": (truncated_gguf, r"m.gguf: not a readable GGUF file"),
    # destination and options
    "dst-parent-missing": (destination("no-parent"), r"nope: the destination's parent folder does not exist"),
    "dst-exists": (destination("exists"), r"exists already exists; pass --overwrite"),
    "dst-inside-source": (destination("inside-source"), r"the destination overlaps the source"),
    "dst-is-a-file": (destination("file"), r"afile exists and is not a folder"),
    "shards-zero": (option("--shards", "0"), r"shards must be a positive integer, got 0"),
    "shards-not-dividing": (option("--shards", "3"), r"--shards 3 does not divide n_heads=4"),
    "max-shard-size-bad": (option("--max-shard-size", "5XB", to="hf"), r"cannot read size '5XB'"),
}
#: cases whose input sizes an allocation: rerun in a subprocess that measures its peak memory
SIZE_CASES = ["hf-hidden-huge", "hf-layers-huge", "params-layers-huge", "report-max-seq-len", "report-max-seq-len-1e12",
              "report-batch-huge", "gguf-block-count-huge", "gguf-key-length-huge"]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``root`` (hidden ones too) with its size and modification time."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line_and_changes_nothing(name, base, tmp_path, capsys):
    build, expect = CASES[name]
    argv = ["-q", *build(tmp_path, base)]
    capsys.readouterr()
    before = snapshot(tmp_path)
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("graphfix: error: "), err
    assert re.search(expect, lines[0]), lines[0]
    assert "Traceback" not in err and "weights_only" not in err and out == ""
    assert snapshot(tmp_path) == before  # no output, no temp folder, no file a pickle would have written
    assert not (tmp_path / "PWNED").exists()


def test_size_cases_stay_under_1gb(base, tmp_path):
    """The size cases in a fresh process: one clear line each, and peak RSS growth under 1 GB in all."""
    runs = []
    for name in SIZE_CASES:
        case_dir = tmp_path / name
        case_dir.mkdir()
        runs.append([name, ["-q", *CASES[name][0](case_dir, base)]])
    script = (
        "import contextlib, io, json, resource, sys\n"
        "import torch, transformers, gguf, safetensors\n"
        "from graphfix.cli.app import main\n"
        "import graphfix.convert.api, graphfix.diagnose.sources, graphfix.diagnose.meta_loader\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = {}\n"
        "for name, argv in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        code = main(argv)\n"
        "    out[name] = [code, err.getvalue()]\n"
        "growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(json.dumps({'growth_kb': growth, 'results': out}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(runs)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (code, err) in report["results"].items():
        assert code == 2 and re.search(CASES[name][1], err) and err.count("\n") == 1, (name, err)
    assert report["growth_kb"] < 2**20, f"peak RSS grew {report['growth_kb'] / 1024:.0f} MB"

