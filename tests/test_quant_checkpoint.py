"""Quantized checkpoints: ``convert --quantize`` writes packed weights that load without re-quantizing, and GGUF
Q8_0 / Q4_0 / Q4_1 blocks re-pack to the engine's schemes exactly (no trip through float)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

import graphfix
from graphfix.convert import convert, open_checkpoint
from graphfix.diagnose.sources import load, smollm2_gguf_path
from graphfix.engine import Generator, from_hf
from graphfix.errors import InputError
from graphfix.quant import QuantLinear
from graphfix.quant.checkpoint import QUANT_JSON, load_quantized, repack_gguf
from graphfix.quant.scheme import dequantize_packed
from tests.test_runtime import PROMPTS, tiny_hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "tiny"
    tiny_hf("llama").save_pretrained(path)
    return path


@pytest.mark.parametrize("scheme", ["int8", "int4:32"])
def test_convert_quantize_loads_what_quantize_computes(hf_dir, tmp_path, scheme):
    dst = convert(hf_dir, tmp_path / "out", to="hf", quantize=scheme, progress=False)
    info = json.loads((dst / QUANT_JSON).read_text())
    assert info["scheme_name"] == scheme and len(info["modules"]) == 7 * 2 and info["repacked_from_gguf"] == 0
    loaded = load_quantized(dst)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QuantLinear)
    expected = load(str(hf_dir)).model
    graphfix.quantize(expected, scheme)
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)
        dec = from_hf(loaded, max_batch_size=1, max_seq_len=32)
        assert Generator(dec, compile=False).generate(PROMPTS[:1], 6).tokens == \
            Generator(from_hf(expected, max_batch_size=1, max_seq_len=32), compile=False).generate(PROMPTS[:1], 6).tokens
    assert load(str(dst)).source == "hf (quantized)"  # what the CLI loads


def test_quantize_needs_the_hf_target_and_writes_nothing_else(hf_dir, tmp_path):
    with pytest.raises(InputError, match="--to hf"):
        convert(hf_dir, tmp_path / "m", to="meta", quantize="int8", progress=False)
    assert not (tmp_path / "m").exists()


def test_smollm2_q4_1_and_q8_0_repack_exactly():
    """The real SmolLM2 GGUF: Q4_1 projections (q/k with GGUF's RoPE row order) and the Q8_0 embedding."""
    from gguf import GGUFReader

    path = smollm2_gguf_path()
    reader = GGUFReader(path)
    raw = {t.name: t for t in reader.tensors}
    with open_checkpoint(path) as ckpt:
        spec = ckpt.spec
        for gguf_name, hf_name, heads in (("blk.2.attn_q.weight", "model.layers.2.self_attn.q_proj.weight", 9),
                                          ("blk.2.attn_k.weight", "model.layers.2.self_attn.k_proj.weight", 3),
                                          ("blk.5.ffn_down.weight", "model.layers.5.mlp.down_proj.weight", None),
                                          ("token_embd.weight", "model.embed_tokens.weight", None)):
            entry = ckpt.tensors[hf_name]
            assert heads in (None, spec.num_attention_heads, spec.num_key_value_heads)
            packed = repack_gguf(raw[gguf_name], entry.shape, heads)
            assert packed.scheme.name == ("int8:32" if gguf_name.startswith("token") else "int4:32")
            assert torch.equal(dequantize_packed(packed, torch.float32), entry.load(torch.float32)), gguf_name


@pytest.mark.parametrize("kind", ["Q4_0", "Q8_0", "Q4_1"])
def test_each_block_type_repacks_to_what_gguf_dequantizes(kind):
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[kind]
    w = np.random.default_rng(0).standard_normal((8, 96)).astype(np.float32)
    blocks = quants.quantize(w, qtype)
    fake = types.SimpleNamespace(tensor_type=qtype, data=blocks)
    packed = repack_gguf(fake, (8, 96), None)
    ref = torch.from_numpy(quants.dequantize(blocks, qtype)).reshape(8, 96)
    assert torch.allclose(dequantize_packed(packed, torch.float32), ref, rtol=0, atol=1e-6)
