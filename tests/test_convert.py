"""Checkpoint conversion between Hugging Face and Meta formats, checked by running each format's own code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from graphfix.convert import convert, open_checkpoint
from graphfix.convert.formats.hf import plan_shards
from graphfix.convert.formats.meta_params import ffn_hidden_dim, solve_ffn
from graphfix.convert.layout import hf_to_meta_rope, meta_split_dim, meta_to_hf_rope
from graphfix.errors import InputError, UnsupportedModelError
from tests.conftest_convert import hf_logits, tiny_hf

TOKENS = torch.tensor([[3, 17, 99, 42, 7, 64, 1, 120, 5, 33]])


def hf_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def leftovers(parent) -> list[str]:
    return [p.name for p in parent.iterdir() if ".graphfix-tmp-" in p.name]


@pytest.fixture(scope="module")
def meta_model():
    """Meta's reference Transformer loader, with model parallelism initialised once for this process."""
    from graphfix.convert.meta_reference import init_model_parallel, load_meta_transformer

    init_model_parallel()
    return load_meta_transformer


# ---------------------------------------------------------------- layout units


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_rope_permutations_are_inverse(heads):
    w = torch.randn(heads * 8, 24)
    assert torch.equal(meta_to_hf_rope(hf_to_meta_rope(w, heads), heads), w)
    # Meta pairs adjacent channels (0,1); HF pairs channel i with i + head_dim/2
    meta = hf_to_meta_rope(w, heads)
    assert torch.equal(meta[1], w[4])


def test_split_axes_follow_fairscale():
    assert meta_split_dim("tok_embeddings.weight") == 0  # VocabParallelEmbedding splits the vocabulary
    assert meta_split_dim("output.weight") == 0
    assert meta_split_dim("layers.3.attention.wk.weight") == 0
    assert meta_split_dim("layers.3.attention.wo.weight") == 1
    assert meta_split_dim("layers.3.feed_forward.w2.weight") == 1
    assert meta_split_dim("layers.3.ffn_norm.weight") is None


@pytest.mark.parametrize("dim,inter", [(4096, 11008), (4096, 14336), (8192, 28672), (576, 1536), (64, 160),
                                       (2048, 8192), (3072, 8192), (64, 7), (100, 333)])
def test_ffn_solver_reproduces_intermediate_size(dim, inter):
    multiple_of, mult = solve_ffn(dim, inter)
    assert ffn_hidden_dim(dim, multiple_of, mult) == inter


def test_shard_planning():
    assert plan_shards([5, 5, 5, 5], shards=None, max_shard_bytes=10) == [0, 0, 1, 1]
    assert plan_shards([50, 5], shards=None, max_shard_bytes=10) == [0, 1]
    assert plan_shards([1] * 9, shards=3, max_shard_bytes=0) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_progress_line_only_on_a_terminal():
    import io

    from graphfix.convert.progress import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = Progress(2, 3000, stream=stream)
        bar.update("a.weight", 1000)
        bar.update("b.weight", 2000)
        bar.close()
    assert "[1/2] 1.0 KB/3.0 KB" in tty.getvalue() and "[2/2] 3.0 KB/3.0 KB" in tty.getvalue()
    assert tty.getvalue().endswith("\n") and pipe.getvalue() == ""


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("heads,kv_heads,tied", [(4, 4, False), (8, 2, False), (4, 1, True)],
                         ids=["mha", "gqa", "mqa-tied"])
def test_hf_meta_hf_round_trip_is_bit_exact(tmp_path, heads, kv_heads, tied):
    tiny_hf(tmp_path / "hf", heads=heads, kv_heads=kv_heads, tied=tied, dtype=torch.bfloat16)
    convert(tmp_path / "hf", tmp_path / "meta", to="meta", progress=False)
    convert(tmp_path / "meta", tmp_path / "back", to="hf", progress=False)
    a, b = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "back")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]), k
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg == json.loads((tmp_path / "hf" / "config.json").read_text())  # through Meta's sidecar, every field
    assert cfg["tie_word_embeddings"] is tied
    assert cfg["num_key_value_heads"] == kv_heads and cfg["intermediate_size"] == 160
    meta = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True, mmap=True)
    assert "output.weight" in meta  # Meta always has its own output projection
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("heads,kv_heads,tied", [(4, 4, False), (8, 2, True)], ids=["mha", "gqa-tied"])
def test_hf_to_meta_logits_match_llama_models(tmp_path, meta_model, heads, kv_heads, tied):
    model = tiny_hf(tmp_path / "hf", heads=heads, kv_heads=kv_heads, tied=tied)
    convert(tmp_path / "hf", tmp_path / "meta", to="meta", progress=False)
    with torch.no_grad():
        want = model(TOKENS).logits
    got = meta_model(tmp_path / "meta", max_seq_len=32)(TOKENS, 0)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_meta_to_hf_carries_tokenizer_and_detects_tied_output(tmp_path):
    tiny_hf(tmp_path / "hf", tied=True)
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"not really sentencepiece")
    convert(tmp_path / "hf", tmp_path / "meta", to="meta", progress=False)
    assert (tmp_path / "meta" / "tokenizer.model").read_bytes() == b"not really sentencepiece"
    convert(tmp_path / "meta", tmp_path / "back", to="hf", progress=False)
    assert "lm_head.weight" not in hf_tensors(tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer.model").is_file()
    assert (tmp_path / "back" / "generation_config.json").is_file()
    assert torch.allclose(hf_logits(tmp_path / "back", TOKENS), hf_logits(tmp_path / "hf", TOKENS))


def test_dtype_option_and_hf_sharding(tmp_path):
    tiny_hf(tmp_path / "hf", kv_heads=2)
    convert(tmp_path / "hf", tmp_path / "h16", to="hf", dtype="float16", shards=3, progress=False)
    index = json.loads((tmp_path / "h16" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    for f in (tmp_path / "h16").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:  # the reference reader accepts our streamed files
            assert all(st.get_tensor(k).dtype == torch.float16 for k in st.keys())  # noqa: SIM118 - safe_open is not iterable
    assert json.loads((tmp_path / "h16" / "config.json").read_text())["dtype"] == "float16"
    convert(tmp_path / "h16", tmp_path / "h32", to="hf", dtype="float32", max_shard_size="20KB", progress=False)
    assert len(list((tmp_path / "h32").glob("*.safetensors"))) > 3
    a, b = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "h32")
    assert all(torch.equal(a[k].half().float(), b[k]) for k in a)
    assert torch.allclose(hf_logits(tmp_path / "h32", TOKENS), hf_logits(tmp_path / "hf", TOKENS), atol=1e-2)


# ---------------------------------------------------------------- model parallel


def test_two_rank_meta_checkpoint_splits_and_merges(tmp_path, meta_model):
    tiny_hf(tmp_path / "hf", heads=4, kv_heads=2)
    convert(tmp_path / "hf", tmp_path / "m1", to="meta", progress=False)
    convert(tmp_path / "hf", tmp_path / "m2", to="meta", shards=2, progress=False)
    one = torch.load(tmp_path / "m1" / "consolidated.00.pth", weights_only=True)
    r0, r1 = (torch.load(tmp_path / "m2" / f"consolidated.0{r}.pth", weights_only=True, mmap=True) for r in (0, 1))
    assert list(one) == list(r0) == list(r1)
    for name, full in one.items():
        axis = meta_split_dim(name)
        if axis is None:
            assert torch.equal(r0[name], full) and torch.equal(r1[name], full), name
        else:
            assert torch.equal(torch.cat([r0[name], r1[name]], dim=axis), full), name
            assert r0[name].shape[axis] * 2 == full.shape[axis]
    # reading merges: back to HF gives the original weights
    convert(tmp_path / "m2", tmp_path / "back", to="hf", progress=False)
    a, b = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "back")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a 2-rank checkpoint runs at world size 1 in Meta's code by merging
    want = meta_model(tmp_path / "m1", max_seq_len=32)(TOKENS, 0)
    got = meta_model(tmp_path / "m2", max_seq_len=32)(TOKENS, 0)
    assert torch.equal(got, want)


def test_meta_reshard_and_indivisible_shard_count(tmp_path):
    tiny_hf(tmp_path / "hf", heads=4, kv_heads=2)
    convert(tmp_path / "hf", tmp_path / "m2", to="meta", shards=2, progress=False)
    convert(tmp_path / "m2", tmp_path / "m1", to="meta", shards=1, progress=False)
    assert [p.name for p in (tmp_path / "m1").glob("*.pth")] == ["consolidated.00.pth"]
    with pytest.raises(InputError, match="--shards 4 does not divide n_kv_heads=2"):
        convert(tmp_path / "hf", tmp_path / "m4", to="meta", shards=4, progress=False)
    assert not (tmp_path / "m4").exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------- refusals


def test_unexpressible_models_are_refused_before_writing(tmp_path):
    tiny_hf(tmp_path / "hf", head_dim=32)  # head_dim != hidden/heads: Meta's code cannot build it
    with pytest.raises(UnsupportedModelError, match="head_dim=32"):
        convert(tmp_path / "hf", tmp_path / "meta", to="meta", progress=False)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="model_type 'mistral'"):
        convert(tmp_path / "hf", tmp_path / "meta", to="meta", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_missing_source(tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path / 'nope'}: no such file or folder"):
        convert(tmp_path / "nope", tmp_path / "out", progress=False)


def test_corrupt_safetensors_header(tmp_path):
    tiny_hf(tmp_path / "hf")
    st = tmp_path / "hf" / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[8:20] = b"garbage!{{{{"
    st.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"{st}: corrupt safetensors file") as err:
        convert(tmp_path / "hf", tmp_path / "out", to="meta", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_truncated_safetensors(tmp_path):
    tiny_hf(tmp_path / "hf")
    st = tmp_path / "hf" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(InputError, match=f"{st}: corrupt safetensors file"):
        convert(tmp_path / "hf", tmp_path / "out", to="meta", progress=False)
    assert not leftovers(tmp_path)


def test_missing_hf_shard(tmp_path):
    tiny_hf(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "sharded", to="hf", shards=2, progress=False)
    victim = tmp_path / "sharded" / "model-00002-of-00002.safetensors"
    victim.unlink()
    with pytest.raises(InputError, match=f"{victim}: shard listed in model.safetensors.index.json is missing"):
        convert(tmp_path / "sharded", tmp_path / "out", to="meta", progress=False)
    assert not leftovers(tmp_path)


def test_missing_and_corrupt_meta_shards(tmp_path):
    tiny_hf(tmp_path / "hf", heads=4, kv_heads=2)
    convert(tmp_path / "hf", tmp_path / "m", to="meta", shards=2, progress=False)
    last = tmp_path / "m" / "consolidated.01.pth"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=f"{last}: not a readable PyTorch checkpoint"):
        convert(tmp_path / "m", tmp_path / "out", to="hf", progress=False)
    last.unlink()  # the last rank missing leaves no gap in the numbering: caught from the shapes
    with pytest.raises(InputError, match=r"split 2 ways .*consolidated.01.pth and later are missing"):
        convert(tmp_path / "m", tmp_path / "out", to="hf", progress=False)
    (tmp_path / "m" / "consolidated.00.pth").rename(tmp_path / "m" / "consolidated.01.pth")
    with pytest.raises(InputError, match=f"{tmp_path / 'm' / 'consolidated.00.pth'}: shard missing"):
        convert(tmp_path / "m", tmp_path / "out", to="hf", progress=False)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_existing_destination_needs_overwrite(tmp_path):
    tiny_hf(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match=f"{tmp_path / 'out'} already exists; pass --overwrite"):
        convert(tmp_path / "hf", tmp_path / "out", to="meta", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine" and not leftovers(tmp_path)
    convert(tmp_path / "hf", tmp_path / "out", to="meta", overwrite=True, progress=False)
    assert (tmp_path / "out" / "params.json").is_file() and not (tmp_path / "out" / "keep.txt").exists()
    with pytest.raises(InputError, match="overlaps the source"):
        convert(tmp_path / "hf", tmp_path / "hf", to="hf", overwrite=True, progress=False)
    assert not leftovers(tmp_path)


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    tiny_hf(tmp_path / "hf")
    ckpt = open_checkpoint(tmp_path / "hf")
    name = "model.layers.1.mlp.up_proj.weight"
    real = ckpt.tensors[name].load

    def broken(dtype):
        raise OSError(28, "No space left on device")

    from graphfix.convert import api

    def opened(src):
        ckpt.tensors[name].load = broken
        return ckpt

    monkeypatch.setattr(api, "open_checkpoint", opened)
    with pytest.raises(OSError):
        convert(tmp_path / "hf", tmp_path / "out", to="meta", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert real(None).shape == (160, 64)  # the source is untouched


# ---------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    code = ("import argparse, sys\n"
            "from graphfix.errors import GraphfixError\n"
            "from graphfix.cli import convert_cmd as cli\n"
            "p = argparse.ArgumentParser(prog='graphfix'); sub = p.add_subparsers(required=True)\n"
            "cli.add_parser(sub); a = p.parse_args(sys.argv[1:])\n"
            "try:\n    sys.exit(a.func(a))\n"
            "except GraphfixError as e:\n    print(f'graphfix: error: {e}', file=sys.stderr); sys.exit(e.exit_code)\n")
    return subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})


@pytest.mark.slow
def test_cli_convert_and_errors(tmp_path):
    tiny_hf(tmp_path / "hf", kv_heads=2)
    ok = _cli("convert", str(tmp_path / "hf"), str(tmp_path / "meta"), "--to", "meta", "--dtype", "bfloat16")
    assert ok.returncode == 0, ok.stderr
    assert "meta" in ok.stdout and ok.stderr == ""  # not a TTY: no progress line
    again = _cli("convert", str(tmp_path / "hf"), str(tmp_path / "meta"), "--to", "meta")
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "--overwrite" in again.stderr
    missing = _cli("convert", str(tmp_path / "nope"), str(tmp_path / "x"), "--to", "hf", "--quiet")
    assert missing.returncode == 2 and str(tmp_path / "nope") in missing.stderr
