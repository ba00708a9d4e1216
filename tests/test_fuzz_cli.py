"""Bad input to ``report``, ``optimize`` and ``generate``: one line, exit 2, nothing written, no code run.

Each case builds one bad input beside a tiny model (a 2-layer Llama in HF and Meta layouts, a
hand-written GGUF header) and runs the CLI in-process with ``-q``. Every case asserts: exit
code 2; exactly one line on stderr, ``graphfix: error: ...``, that names what is wrong; no
traceback; nothing on stdout; no file created, changed or removed anywhere in the case's
folder or the shared models; and that no code from a user's file or checkpoint ran (the
marker file stays absent: ``tests.fixtures.fuzz_builders``). The sizes that used to allocate
gigabytes run in one subprocess that measures its peak RSS (``test_bad_sizes_stay_small``).

Add a case here for every new input format or flag (docs/reliability.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from graphfix.cli.app import main
from tests.fixtures.fuzz_builders import MARKER_ENV, Evil

ROOT = Path(__file__).resolve().parents[1]
BUILDERS = "tests.fixtures.fuzz_builders"


@dataclasses.dataclass
class Zoo:
    """Good tiny models, shared by every case (read-only: a case copies what it breaks)."""

    root: Path
    hf: Path
    meta: Path
    marker: Path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    from graphfix.convert import convert
    from tests.fixtures.tiny_hf import tiny_hf

    root = tmp_path_factory.mktemp("fuzz-zoo")
    hf = root / "hf"
    tiny_hf("llama").save_pretrained(hf)
    meta = convert(hf, root / "meta", to="meta", progress=False)
    return Zoo(root, hf, Path(meta), root / "code-ran.marker")


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file under the folders with its size and modification time."""
    out = {}
    for folder in folders:
        for dirpath, _dirs, files in os.walk(folder):
            for name in files:
                p = Path(dirpath) / name
                st = p.lstat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
            out[dirpath] = (0, 0)
    return out


# ----------------------------------------------------------------------------- bad inputs


def hf_copy(z: Zoo, tmp: Path, **config_changes) -> Path:
    """A copy of the tiny HF folder with ``config.json`` fields replaced (``None`` deletes one)."""
    dst = tmp / "hf"
    dst.mkdir()
    for f in z.hf.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def hf_config_text(z: Zoo, tmp: Path, text: str) -> Path:
    dst = hf_copy(z, tmp)
    (dst / "config.json").write_text(text)
    return dst


def bare_config(tmp: Path, **changes) -> Path:
    """A lone config.json (no weights: built on the meta device, where memory bounds nothing)."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 128, "max_position_embeddings": 64, **changes}
    path = tmp / "config.json"
    path.write_text(json.dumps(config))
    return path


def meta_copy(z: Zoo, tmp: Path, params: object = None, **changes) -> Path:
    dst = tmp / "meta"
    dst.mkdir()
    for f in z.meta.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if params is None:
        params = {**json.loads((z.meta / "params.json").read_text()), **changes}
    (dst / "params.json").write_text(json.dumps(params))
    return dst


def hf_without_tensor(z: Zoo, tmp: Path) -> Path:
    from safetensors.torch import load_file, save_file

    dst = hf_copy(z, tmp)
    state = load_file(dst / "model.safetensors")
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def hf_index(z: Zoo, tmp: Path, target: str) -> Path:
    dst = hf_copy(z, tmp)
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": target}}))
    return dst


def hf_truncated_weights(z: Zoo, tmp: Path) -> Path:
    dst = hf_copy(z, tmp)
    (dst / "model.safetensors").write_bytes(b"\xff" * 8 + b"{not json")
    return dst


def meta_evil_pickle(z: Zoo, tmp: Path) -> Path:
    dst = meta_copy(z, tmp)
    torch.save({"tok_embeddings.weight": Evil(str(z.marker))}, dst / "consolidated.00.pth")
    return dst


def meta_truncated(z: Zoo, tmp: Path) -> Path:
    dst = meta_copy(z, tmp)
    data = (dst / "consolidated.00.pth").read_bytes()
    (dst / "consolidated.00.pth").write_bytes(data[: len(data) // 3])
    return dst


def auto_map_code(z: Zoo, tmp: Path) -> Path:
    """A config asking for its own modeling code (``auto_map``), which would touch the marker if imported."""
    dst = hf_copy(z, tmp, model_type="evil", auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"})
    (dst / "modeling_evil.py").write_text(f"from pathlib import Path\nPath({str(z.marker)!r}).touch()\n")
    return dst


def gguf_file(tmp: Path, **fields) -> Path:
    """A GGUF header for a 1-block Llama (width 8, 2 heads) with ``fields`` (``llama.`` keys) overridden."""
    import gguf
    import numpy as np

    path = tmp / "bad.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    values = {"block_count": 1, "embedding_length": 8, "attention.head_count": 2, "context_length": 64, **fields}
    for key, value in values.items():
        if isinstance(value, str):
            writer.add_string(f"llama.{key}", value)
        else:
            writer.add_uint32(f"llama.{key}", value)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def readonly_output() -> str:
    """A path whose folder cannot take a new file on any Linux machine, as root or not."""
    return "/proc/graphfix-fuzz-output.json"


@dataclasses.dataclass
class Case:
    id: str
    argv: Callable[[Zoo, Path], list[str]]
    needle: str


M = f"{BUILDERS}:marker_model"  # a builder that leaves the marker when it runs: loading must not start

CASES = [
    # ---- config.json
    Case("config-list", lambda z, t: ["report", str(hf_config_text(z, t, "[1, 2]"))], "got a JSON list"),
    Case("config-truncated", lambda z, t: ["report", str(hf_config_text(z, t, '{"model_type": "llama", '))],
         "not valid JSON"),
    Case("hidden-string", lambda z, t: ["report", str(hf_copy(z, t, hidden_size="64"))],
         "hidden_size must be a whole number"),
    Case("hidden-negative", lambda z, t: ["report", str(hf_copy(z, t, hidden_size=-64))], "hidden_size must be"),
    Case("heads-zero", lambda z, t: ["report", str(hf_copy(z, t, num_attention_heads=0))],
         "num_attention_heads must be"),
    Case("heads-not-dividing", lambda z, t: ["report", str(hf_copy(z, t, num_attention_heads=6, head_dim=None))],
         "num_attention_heads 6 does not divide hidden_size 64"),
    Case("kv-heads-not-dividing", lambda z, t: ["report", str(hf_copy(z, t, num_key_value_heads=3))],
         "num_key_value_heads 3 does not divide"),
    Case("vocab-zero", lambda z, t: ["report", str(hf_copy(z, t, vocab_size=0))], "vocab_size must be"),
    Case("eps-string", lambda z, t: ["report", str(hf_copy(z, t, rms_norm_eps="tiny"))],
         "rms_norm_eps must be a positive number"),
    Case("hidden-1e9-with-weights", lambda z, t: ["report", str(hf_copy(z, t, hidden_size=10**9, head_dim=16))],
         "more than any model has"),
    Case("hidden-1e9-bare-config", lambda z, t: ["report", str(bare_config(t, hidden_size=10**9))],
         "more than any model has"),
    Case("wrong-hidden", lambda z, t: ["report", str(hf_copy(z, t, hidden_size=128))],
         "does not match the weights"),
    Case("unsupported-arch", lambda z, t: ["report", str(hf_copy(z, t, model_type="bert"))], "not supported"),
    Case("auto-map-code", lambda z, t: ["report", str(auto_map_code(z, t))], "not supported"),
    # ---- weights
    Case("missing-tensor", lambda z, t: ["report", str(hf_without_tensor(z, t))],
         "lacks tensor model.layers.1.mlp.down_proj.weight"),
    Case("index-escapes-folder", lambda z, t: ["report", str(hf_index(z, t, "../model.safetensors"))],
         "not a .safetensors file in"),
    Case("index-missing-shard", lambda z, t: ["report", str(hf_index(z, t, "model-00002.safetensors"))],
         "which is not in"),
    Case("safetensors-garbage", lambda z, t: ["report", str(hf_truncated_weights(z, t))], "not a safetensors file"),
    # ---- params.json and Meta checkpoints
    Case("params-list", lambda z, t: ["report", str(meta_copy(z, t, params=[1]))], "JSON list"),
    Case("params-dim-wrong", lambda z, t: ["report", str(meta_copy(z, t, dim=128))], "dim=128 but the weights"),
    Case("params-dim-negative", lambda z, t: ["report", str(meta_copy(z, t, dim=-64))], "dim=-64 must be"),
    Case("params-heads-zero", lambda z, t: ["report", str(meta_copy(z, t, n_heads=0))], "n_heads=0 must be"),
    Case("params-layers-wrong", lambda z, t: ["report", str(meta_copy(z, t, n_layers=5))],
         "n_layers=5 but the weights have 2 layers"),
    Case("params-max-seq-len-8e6", lambda z, t: ["report", str(meta_copy(z, t, max_seq_len=8_000_000))],
         "max_seq_len=8000000"),
    Case("params-max-seq-len-1e12", lambda z, t: ["report", str(meta_copy(z, t, max_seq_len=10**12))],
         "max_seq_len=1000000000000"),
    Case("pickle-with-code", lambda z, t: ["report", str(meta_evil_pickle(z, t))], "not a plain tensor checkpoint"),
    Case("pth-truncated", lambda z, t: ["report", str(meta_truncated(z, t))], "truncated or corrupt"),
    # ---- GGUF
    Case("gguf-head-count-zero", lambda z, t: ["report", str(gguf_file(t, **{"attention.head_count": 0}))],
         "llama.attention.head_count must be"),
    Case("gguf-block-count-string", lambda z, t: ["report", str(gguf_file(t, block_count="two"))],
         "llama.block_count must be a whole number"),
    Case("gguf-block-count-wrong", lambda z, t: ["report", str(gguf_file(t, block_count=1000))],
         "block_count is 1000"),
    # ---- report arguments and outputs (all before the builder runs: the marker stays absent)
    Case("baseline-missing", lambda z, t: ["report", M, "--baseline", str(t / "nope.json")], "baseline file not found"),
    Case("baseline-malformed", lambda z, t: ["report", M, "--baseline", str(_write(t / "b.json", "{oops"))],
         "is not valid JSON"),
    Case("baseline-not-a-baseline", lambda z, t: ["report", M, "--baseline", str(_write(t / "b.json", "[]"))],
         "is malformed"),
    Case("max-recompiles-negative", lambda z, t: ["report", M, "--max-recompiles", "-1"],
         "--max-recompiles must be a whole number >= 0"),
    Case("output-folder-missing", lambda z, t: ["report", M, "--output", str(t / "no" / "r.json")],
         "does not exist"),
    Case("output-is-folder", lambda z, t: ["report", M, "--output", str(t)], "is a folder"),
    Case("output-read-only", lambda z, t: ["report", M, "--output", readonly_output()], "cannot write in"),
    Case("also-folder-missing", lambda z, t: ["report", M, "--also", f"sarif={t / 'no' / 'r.sarif'}"],
         "does not exist"),
    Case("also-unknown-format", lambda z, t: ["report", M, "--also", f"yaml={t / 'r.yaml'}"], "unknown report format"),
    Case("also-no-file", lambda z, t: ["report", M, "--also", "sarif"], "expects FORMAT=FILE"),
    Case("write-baseline-read-only", lambda z, t: ["report", M, "--write-baseline", "/proc/graphfix/base.json"],
         "cannot write in"),
    Case("same-file-twice", lambda z, t: ["report", M, "-o", str(t / "r"), "--also", f"sarif={t / 'r'}"],
         "also the file of"),
    Case("prefill-zero", lambda z, t: ["report", M, "--prefill", "0"], "--prefill must be"),
    Case("prefill-huge", lambda z, t: ["report", M, "--prefill", str(10**9)], "--prefill must be"),
    Case("unknown-flag", lambda z, t: ["report", M, "--max-breaks", "3"], "unrecognized arguments"),
    Case("hub-id-not-cached", lambda z, t: ["report", "no-such-org/no-such-model-xyz"],
         "nor a Hugging Face model in the local cache"),
    # ---- builders (package.module:function)
    Case("builder-pair-with-int", lambda z, t: ["report", f"{BUILDERS}:pair_with_int"], "returned (model, int)"),
    Case("builder-system-exit", lambda z, t: ["report", f"{BUILDERS}:exits_7"], "raised SystemExit"),
    Case("builder-not-module", lambda z, t: ["report", f"{BUILDERS}:not_a_module"], "not an nn.Module"),
    Case("builder-missing-module", lambda z, t: ["report", "tests.fixtures.no_such_module:build"], "cannot import"),
    # ---- optimize / verify
    Case("optimize-config-json", lambda z, t: ["optimize", str(z.hf / "config.json")], "needs weights"),
    Case("optimize-dtype-unknown", lambda z, t: ["optimize", M, "--dtype", "bf17"], "invalid choice"),
    Case("optimize-device-unknown", lambda z, t: ["optimize", M, "--device", "gpu9"], "is not a device"),
    Case("optimize-tolerance-nan", lambda z, t: ["optimize", M, "--tolerance", "nan"], "--tolerance must be"),
    Case("optimize-parity-multiplier-negative", lambda z, t: ["optimize", M, "--parity-multiplier", "-1"],
         "--parity-multiplier must be a finite number > 0"),
    Case("optimize-output-missing", lambda z, t: ["optimize", M, "-o", str(t / "no" / "o.txt")], "does not exist"),
    Case("optimize-unknown-pass", lambda z, t: ["optimize", M, "--passes", "real-rope,nope"], "unknown pass 'nope'"),
    Case("verify-decode-steps-zero", lambda z, t: ["verify", M, "--decode-steps", "0"], "--decode-steps must be"),
    Case("optimize-max-seq-too-small", lambda z, t: ["optimize", M, "--max-seq-len", "8"], "do not fit"),
    # ---- generate
    Case("prompt-ids-outside-vocab", lambda z, t: ["generate", str(z.hf), "--prompt-ids", "1,999999", "--no-compile"],
         "token id 999999 is outside the vocabulary"),
    Case("prompt-ids-negative", lambda z, t: ["generate", str(z.hf), "--prompt-ids", "1,-3", "--no-compile"],
         "token id -3 is negative"),
    Case("prompt-ids-not-numbers", lambda z, t: ["generate", str(z.hf), "--prompt-ids", "1,x"],
         "comma-separated integers"),
    Case("generate-config-json", lambda z, t: ["generate", str(z.hf / "config.json"), "--prompt-ids", "1"],
         "needs weights"),
    Case("prompt-longer-than-positions",
         lambda z, t: ["generate", str(z.hf), "--prompt-ids", ",".join(["5"] * 300), "--no-compile"],
         "more than the 256 positions"),
    Case("prompt-plus-new-past-positions",
         lambda z, t: ["generate", str(z.hf), "--prompt-ids", ",".join(["5"] * 250), "--max-new-tokens", "10",
                       "--no-compile"], "use --max-new-tokens 6 or less"),
    Case("max-seq-len-too-small", lambda z, t: ["generate", str(z.hf), "--prompt-ids", "1,2,3", "--max-seq-len", "4",
                                                "--no-compile"], "does not fit in --max-seq-len 4"),
    Case("max-new-tokens-zero", lambda z, t: ["generate", str(z.hf), "--prompt-ids", "1", "--max-new-tokens", "0"],
         "--max-new-tokens must be"),
    Case("top-p-two", lambda z, t: ["generate", str(z.hf), "--prompt-ids", "1", "--top-p", "2"], "top_p"),
    Case("text-without-tokenizer", lambda z, t: ["generate", str(z.hf), "--prompt", "hello"], "no tokenizer found"),
    Case("generate-dtype-unknown", lambda z, t: ["generate", str(z.hf), "--prompt-ids", "1", "--dtype", "fp8"],
         "invalid choice"),
    Case("cache-dir-is-file", lambda z, t: ["generate", str(z.hf), "--prompt-ids", "1",
                                            "--cache-dir", str(_write(t / "f", "x"))], "is a file"),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_suite_covers_enough_inputs() -> None:
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)
    assert {"report", "optimize", "generate"} <= {_command_of(c) for c in CASES}


def _command_of(case: Case) -> str:
    for const in case.argv.__code__.co_consts:
        if const in ("report", "optimize", "verify", "generate"):
            return const
    return "?"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: Case, zoo: Zoo, tmp_path: Path, capsys,
                                                         monkeypatch) -> None:
    monkeypatch.setenv(MARKER_ENV, str(zoo.marker))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    argv = case.argv(zoo, tmp_path)
    before = snapshot(tmp_path, zoo.root)
    try:
        code = main(["-q", *argv])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("graphfix: error: "), captured.err
    assert case.needle in lines[0], lines[0]
    advice = ("weights_only=False", "torch.serialization", "Please use", "report a bug")
    assert not any(a in lines[0] for a in advice), lines[0]  # torch's advice after a refusal would undo it
    assert "Traceback" not in captured.err and captured.out == ""
    assert snapshot(tmp_path, zoo.root) == before, "the failed command wrote, changed or removed a file"
    assert not zoo.marker.exists(), "code from a user's file or checkpoint ran"


SIZE_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from graphfix.cli.app import main

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    import graphfix.cli.generate_cmd, graphfix.cli.optimize_cmd  # noqa: E401, F401 - imports count in the base
    from graphfix.diagnose import sources
    sources.load(sys.argv[1])  # and one load of the good model
    base = rss_mb()
    codes = {}
    for argv in json.loads(sys.argv[2]):
        codes[" ".join(argv)] = main(["-q", *argv])
    print(json.dumps({"growth_mb": rss_mb() - base, "codes": codes}))
""")


def test_bad_sizes_stay_small(zoo: Zoo, tmp_path: Path) -> None:
    """Each size that used to allocate gigabytes: exit 2, and the process's peak RSS grows by under 1 GB."""
    cases = [
        ["report", str(meta_copy(zoo, _mk(tmp_path / "a"), max_seq_len=8_000_000))],
        ["report", str(meta_copy(zoo, _mk(tmp_path / "b"), max_seq_len=10**12))],
        ["report", str(hf_copy(zoo, _mk(tmp_path / "c"), hidden_size=10**9, head_dim=16))],
        ["report", str(gguf_file(_mk(tmp_path / "d"), block_count=10**6))],
        ["report", f"{BUILDERS}:marker_model", "--prefill", str(10**9)],
        ["generate", str(zoo.hf), "--prompt-ids", "1,2", "--max-seq-len", str(2**24), "--no-compile"],
        ["generate", str(zoo.hf), "--prompt-ids", "1,2", "--max-new-tokens", str(10**6), "--no-compile"],
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", SIZE_SCRIPT, str(zoo.hf), json.dumps(cases)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["codes"].values()) == {2}, result
    assert result["growth_mb"] < 1024, result
    assert "Traceback" not in proc.stderr


def _mk(path: Path) -> Path:
    path.mkdir()
    return path
