"""GGUF reading: synthetic files of every supported tensor type, and the real SmolLM2 file run by three implementations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from graphfix.convert import convert, open_checkpoint
from graphfix.convert.layout import meta_to_hf_rope
from graphfix.diagnose import sources
from graphfix.diagnose.drivers import cache_kwarg
from graphfix.errors import InputError, UnsupportedModelError
from tests.conftest_convert import hf_logits, smollm2_gguf, tiny_hf, write_gguf

TOKENS = torch.tensor([[3, 17, 99, 42, 7, 64, 1, 120, 5, 33]])
_CYCLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32"]


def _mixed_types(name: str, arr: np.ndarray) -> str:
    """A different GGML type for successive 2-D tensors, so one file exercises all of them."""
    _mixed_types.i = getattr(_mixed_types, "i", -1) + 1
    return _CYCLE[_mixed_types.i % len(_CYCLE)]


@pytest.fixture(scope="module")
def meta_model():
    from graphfix.convert.meta_reference import init_model_parallel, load_meta_transformer

    init_model_parallel()
    return load_meta_transformer


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gguf_to_hf_matches_transformers_gguf_loader(tmp_path, tied):
    model = tiny_hf(tmp_path / "src", heads=4, kv_heads=2, hidden=64, tied=tied)
    gguf_path = tmp_path / "tiny.gguf"
    write_gguf(gguf_path, model, qtype_for=_mixed_types)
    convert(gguf_path, tmp_path / "hf", to="hf", dtype="float32", progress=False)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tied and cfg["num_key_value_heads"] == 2
    ours = hf_logits(tmp_path / "hf", TOKENS)
    theirs = hf_logits(tmp_path, TOKENS, gguf_file=gguf_path.name)
    assert torch.equal(ours, theirs)
    # every tensor is the original up to quantization noise (a wrong Q/K permutation would be ~140% off)
    got = load_file(tmp_path / "hf" / "model.safetensors")
    for name, want in model.state_dict().items():
        if name in got:
            assert (got[name] - want).norm() <= 0.15 * want.norm(), name


def test_gguf_keep_dtype_per_tensor(tmp_path):
    model = tiny_hf(tmp_path / "src")
    types = {"blk.0.attn_q.weight": "F16", "blk.0.attn_k.weight": "BF16", "blk.0.attn_v.weight": "Q8_0"}
    write_gguf(tmp_path / "t.gguf", model, qtype_for=lambda n, a: types.get(n, "F32"))
    convert(tmp_path / "t.gguf", tmp_path / "hf", to="hf", progress=False)
    got = load_file(tmp_path / "hf" / "model.safetensors")
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float16
    assert got["model.layers.0.self_attn.k_proj.weight"].dtype == torch.bfloat16
    assert got["model.layers.0.self_attn.v_proj.weight"].dtype == torch.float32  # dequantized
    want = model.state_dict()["model.layers.0.self_attn.k_proj.weight"].to(torch.bfloat16)
    assert torch.equal(got["model.layers.0.self_attn.k_proj.weight"], want)


def test_gguf_to_meta_runs_in_llama_models(tmp_path, meta_model):
    model = tiny_hf(tmp_path / "src", heads=8, kv_heads=2, tied=True)
    write_gguf(tmp_path / "t.gguf", model, qtype_for=lambda n, a: "Q8_0")
    convert(tmp_path / "t.gguf", tmp_path / "hf", to="hf", progress=False)
    convert(tmp_path / "t.gguf", tmp_path / "meta", to="meta", progress=False)
    want = hf_logits(tmp_path / "hf", TOKENS)
    got = meta_model(tmp_path / "meta", max_seq_len=32)(TOKENS, 0)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("kind", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_dequantize_like_gguf(tmp_path, kind):
    import gguf

    model = tiny_hf(tmp_path / "src", hidden=256, heads=4, kv_heads=2, inter=512, layers=1)
    stored = write_gguf(tmp_path / "k.gguf", model, qtype_for=lambda n, a: kind)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    with open_checkpoint(tmp_path / "k.gguf") as ckpt:
        q = ckpt.tensors["model.layers.0.self_attn.q_proj.weight"].load(None)
        k = ckpt.tensors["model.layers.0.self_attn.k_proj.weight"].load(None)
        down = ckpt.tensors["model.layers.0.mlp.down_proj.weight"].load(None)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    ref = {n: torch.from_numpy(gguf.quants.dequantize(stored[n], qtype)) for n in
           ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight")}
    assert torch.equal(q, meta_to_hf_rope(ref["blk.0.attn_q.weight"], 4))
    assert torch.equal(k, meta_to_hf_rope(ref["blk.0.attn_k.weight"], 2))
    assert down.shape == (256, 512) and torch.equal(down, ref["blk.0.ffn_down.weight"])


def test_non_llama_gguf_is_refused(tmp_path):
    model = tiny_hf(tmp_path / "src")
    write_gguf(tmp_path / "q.gguf", model, arch="qwen2")
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'qwen2' is not supported") as err:
        convert(tmp_path / "q.gguf", tmp_path / "out", to="hf", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.97, 0.5, 0.001], ids=["tail", "half", "header"])
def test_truncated_gguf(tmp_path, keep):
    model = tiny_hf(tmp_path / "src")
    path = tmp_path / "t.gguf"
    write_gguf(path, model, qtype_for=lambda n, a: "Q8_0")
    data = path.read_bytes()
    path.write_bytes(data[: max(int(len(data) * keep), 5)])
    with pytest.raises(InputError, match=f"{path}: not a readable GGUF file") as err:
        convert(path, tmp_path / "out", to="meta", progress=False)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "t.gguf"]


# ---------------------------------------------------------------- the real SmolLM2 file


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2-135M Q4_1 converted once to HF, and that to Meta (float32): GGUF -> HF -> Meta."""
    src = smollm2_gguf()
    base = tmp_path_factory.mktemp("smol")
    convert(src, base / "hf", to="hf", dtype="float32", progress=False)
    convert(base / "hf", base / "meta", to="meta", progress=False)
    return src, base


def _greedy_hf(model, prompt: torch.Tensor, steps: int) -> list[int]:
    tokens, past, out = prompt, None, []
    name = cache_kwarg(model)  # past_key_values, or cache from transformers 5.24 on (its output field too)
    with torch.no_grad():
        for _ in range(steps):  # plain argmax decoding: no generation-config rules (EOS, min length)
            res = model(tokens, **{name: past}, use_cache=True)
            past = getattr(res, name)
            out.append(int(res.logits[0, -1].argmax()))
            tokens = torch.tensor([[out[-1]]])
    return out


def _greedy_meta(model, prompt: torch.Tensor, steps: int) -> list[int]:
    tokens, pos, out = prompt, 0, []
    for _ in range(steps):
        logits = model(tokens, pos)
        pos += tokens.shape[1]
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        tokens = torch.tensor([[nxt]])
    return out


@pytest.mark.slow
def test_smollm2_three_implementations_agree(smol, meta_model):
    from transformers import AutoTokenizer, LlamaForCausalLM

    src, base = smol
    cfg = json.loads((base / "hf" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["tie_word_embeddings"]) == (30, 576, 9, 3, True)
    params = json.loads((base / "meta" / "params.json").read_text())
    assert params["rope_theta"] == 100000.0 and params["n_kv_heads"] == 3

    tok = AutoTokenizer.from_pretrained(str(base / "hf"))  # the tokenizer exported from the GGUF
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    ours = LlamaForCausalLM.from_pretrained(str(base / "hf"), dtype=torch.float32).eval()
    # transformers' own GGUF loading, through graphfix's per-process copy of it (a later SmolLM2 load copies it)
    theirs = sources.load_gguf(src, dtype=torch.float32).model
    assert type(theirs) is LlamaForCausalLM and not theirs.training
    meta = meta_model(base / "meta", max_seq_len=128)
    with torch.no_grad():
        want = ours(prompt).logits
        assert torch.equal(theirs(prompt).logits, want)  # transformers' own GGUF loading: same weights
    del theirs
    got = meta(prompt, 0)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()

    steps = 16
    hf_tokens = _greedy_hf(ours, prompt, steps)
    meta_tokens = _greedy_meta(meta_model(base / "meta", max_seq_len=128), prompt, steps)
    assert hf_tokens == meta_tokens
    assert "Paris" in tok.decode(hf_tokens)


#: what a user's generate() depends on besides the weights: all must come back byte for byte
_USER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.mark.slow
def test_smollm2_round_trip_keeps_what_generate_depends_on(smol, tmp_path):
    """GGUF -> HF -> Meta -> HF: same weights, config, generation config, tokenizer, and the same greedy answer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    _, base = smol
    out = convert(base / "meta", tmp_path / "hf", to="hf", progress=False)
    a, b = load_file(base / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # tied embeddings restored
    for name in _USER_FILES:
        assert (out / name).read_bytes() == (base / "hf" / name).read_bytes(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 8192 and cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)  # from the GGUF
    assert cfg["rope_parameters"]["rope_theta"] == 100000.0

    answers = []
    for folder in (base / "hf", out):
        tok = AutoTokenizer.from_pretrained(str(folder))
        prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)
        model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        with torch.no_grad():
            ids = model.generate(**prompt, do_sample=False, max_new_tokens=48)[0, prompt["input_ids"].shape[1]:]
        answers.append((ids.tolist(), tok.decode(ids, skip_special_tokens=True)))
        assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") and len(ids) < 48  # stopped at the end of turn
    assert answers[0] == answers[1] and "Paris" in answers[0][1]
