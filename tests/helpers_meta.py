"""Build a tiny Meta reference Llama 3 ``Transformer`` (fairscale model parallel) for tests.

Meta's layers are built with ``init_method=lambda x: x``, which leaves their
weights uninitialized. Here every parameter is filled from a *master* (unsharded)
tensor drawn from a generator seeded by ``(seed, parameter name)``, and each rank
keeps its fairscale shard of it. So the same ``seed`` gives the same model at any
model-parallel world size, and ``meta_state_dict(seed)`` is the full checkpoint
that a world-size-1 model holds.

Used by the pass tests and by other tests (optimize, verify, convert).
"""

from __future__ import annotations

import hashlib
import socket
import time

import torch

TINY_ARGS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 128,
    "multiple_of": 16,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
    "max_batch_size": 2,
    "max_seq_len": 64,
}
"""The tiny configuration the tests use (dim 64, 2 layers, 4 heads / 2 KV heads, vocab 128)."""


def free_port() -> int:
    """A TCP port no one listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(worker, args: tuple, nprocs: int = 2, timeout_s: float = 120) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes; fail the test if they do not end in time."""
    import pytest
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{nprocs} worker processes did not finish in {timeout_s:.0f} s")


def init_model_parallel(world_size: int = 1, rank: int = 0, port: int | None = None) -> None:
    """A gloo process group and fairscale model parallelism of ``world_size``, if not set up yet."""
    from graphfix.diagnose.meta_loader import ensure_model_parallel

    ensure_model_parallel(world_size, rank, port=port)


def model_args(**overrides):
    """``ModelArgs`` for the tiny configuration, with ``overrides``."""
    from llama_models.llama3.args import ModelArgs

    return ModelArgs(**{**TINY_ARGS, **overrides})


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _shard_spec(module: torch.nn.Module, pname: str) -> tuple[tuple[int, ...], int | None]:
    """The full (master) shape of ``module.<pname>`` and the dim fairscale splits it along."""
    from fairscale.nn.model_parallel import layers as fs

    p = getattr(module, pname)
    if isinstance(module, fs.ColumnParallelLinear):
        return ((module.out_features, module.in_features) if pname == "weight" else (module.out_features,)), 0
    if isinstance(module, fs.RowParallelLinear):
        if pname == "weight":
            return (module.out_features, module.in_features), 1
        return tuple(p.shape), None
    if isinstance(module, fs.VocabParallelEmbedding):
        return (module.num_embeddings, module.embedding_dim), 0
    if isinstance(module, fs.ParallelEmbedding):
        return (module.num_embeddings, module.embedding_dim), 1
    return tuple(p.shape), None


def _master(seed: int, name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    t = torch.randn(shape, generator=_generator(seed, name), dtype=torch.float32) * std
    if name.endswith("norm.weight"):
        t = 1.0 + t  # RMSNorm gains around 1
    return t


def _std(name: str, shape: tuple[int, ...]) -> float:
    if name.endswith("norm.weight"):
        return 0.1
    if len(shape) == 2 and not name.startswith("tok_embeddings"):
        return shape[1] ** -0.5  # keeps activations O(1) through the layers
    return 1.0


def fill_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter with this rank's shard of a deterministic master tensor."""
    from fairscale.nn.model_parallel import initialize as fs_init

    ws = fs_init.get_model_parallel_world_size()
    rank = fs_init.get_model_parallel_rank()
    with torch.no_grad():
        for mname, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                full_name = f"{mname}.{pname}" if mname else pname
                shape, dim = _shard_spec(module, pname)
                master = _master(seed, full_name, shape, _std(full_name, shape))
                if dim is not None and ws > 1:
                    size = shape[dim] // ws
                    master = master.narrow(dim, rank * size, size)
                p.copy_(master.to(p.dtype))


def build_meta_transformer(seed: int = 0, **overrides):
    """A tiny Meta ``Transformer`` at the current fairscale world size (1 if not initialized).

    ``overrides`` change ``TINY_ARGS`` (e.g. ``n_layers=1``, ``use_scaled_rope=False``).
    The model is in eval mode, float32, on CPU.
    """
    from llama_models.llama3.model import Transformer

    init_model_parallel(1)
    torch.manual_seed(seed)
    model = Transformer(model_args(**overrides))
    fill_weights(model, seed)
    return model.eval()


def meta_state_dict(seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    """The full (world-size-1) state dict that ``build_meta_transformer(seed, **overrides)`` holds."""
    from fairscale.nn.model_parallel import initialize as fs_init

    init_model_parallel(1)
    if fs_init.get_model_parallel_world_size() != 1:
        raise RuntimeError("meta_state_dict needs model parallelism of size 1")
    return {k: v.detach().clone() for k, v in build_meta_transformer(seed, **overrides).state_dict().items()}


def run_decode(forward, prompt: torch.Tensor, steps: int, feed: list[torch.Tensor] | None = None):
    """A prefill of ``prompt`` then ``steps`` decode steps through ``forward(tokens, start_pos)``.

    Each decode step feeds the greedy next token, or ``feed[i]`` when given (so two
    models can be compared on the same tokens). Returns ``(logits per call, fed tokens)``.
    """
    outs = [forward(prompt, 0)]
    fed: list[torch.Tensor] = []
    pos = prompt.shape[1]
    for i in range(steps):
        nxt = feed[i] if feed is not None else outs[-1][:, -1].argmax(-1, keepdim=True)
        fed.append(nxt)
        outs.append(forward(nxt, pos))
        pos += 1
    return outs, fed


META_PASSES = ("functional-collectives", "real-rope", "sdpa-attention", "static-kv-cache", "inference-mode")
"""The passes that give a Meta ``Transformer`` graphfix's contract (``graphfix_step`` etc.), in order."""


def pass_classes() -> dict:
    """The built-in pass classes by name (imported directly, not through entry points)."""
    from passes.collectives import FunctionalCollectivesPass
    from passes.inference_mode import InferenceModePass
    from passes.kv_cache import StaticKVCachePass
    from passes.rope import RealRopePass
    from passes.sdpa import SdpaAttentionPass, SdpaContextPass
    from passes.side_effects import SideEffectsPass

    classes = (FunctionalCollectivesPass, RealRopePass, SdpaAttentionPass, SdpaContextPass, StaticKVCachePass,
               InferenceModePass, SideEffectsPass)
    return {c.name: c for c in classes}


def apply_passes(model, names=META_PASSES, ctx=None) -> list:
    """Apply the named passes in order; returns their ``PassResult``s."""
    from graphfix.rewrite.pass_manager import PassContext

    ctx = ctx or PassContext()
    classes = pass_classes()
    return [classes[n]().apply(model, ctx) for n in names]


def max_decode_diff(ref_model, model, prompt: torch.Tensor, steps: int = 8) -> float:
    """Largest logit difference between two models over a prefill and ``steps`` decode steps on the same tokens."""
    ref, fed = run_decode(ref_model.forward, prompt, steps)
    out, _ = run_decode(model.forward, prompt, steps, fed)
    return max((a - b).abs().max().item() for a, b in zip(ref, out))


def parameters_by_name(model) -> dict[str, torch.nn.Parameter]:
    """``{name: parameter object}``, to check that a pass moved parameters rather than copied them."""
    return dict(model.named_parameters())


def assert_parameters_moved(before: dict[str, torch.nn.Parameter], model) -> None:
    """Every parameter is the same object under the same name, and nothing was added."""
    after = parameters_by_name(model)
    assert set(after) == set(before), set(after) ^ set(before)
    for name, p in before.items():
        assert after[name] is p, f"{name} was copied, not moved"


def meta_generate_greedy(forward, prompts: list[list[int]], max_seq_len: int, max_gen_len: int,
                         pad_id: int = -1, stop_tokens=()) -> torch.Tensor:
    """The token loop of ``llama_models.llama3.generation.Llama3.generate`` (temperature 0, text only).

    Same calls as Meta's: a batch padded with ``pad_id`` to one length, a prefill of
    the shortest prompt, then ``forward(tokens[:, prev_pos:cur_pos], prev_pos)`` one
    position at a time, prompt tokens kept where a longer prompt still has them.
    Kept here because importing generation.py needs PIL, termcolor and tiktoken.
    """
    bsz = len(prompts)
    min_prompt_len = min(len(t) for t in prompts)
    max_prompt_len = max(len(t) for t in prompts)
    total_len = min(max_gen_len + max_prompt_len, max_seq_len)
    tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long)
    for k, t in enumerate(prompts):
        tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long)
    eos_reached = torch.tensor([False] * bsz)
    input_text_mask = tokens != pad_id
    stop = torch.tensor(list(stop_tokens), dtype=torch.long)
    prev_pos = 0
    with torch.inference_mode():  # generate() is decorated with it
        for cur_pos in range(min_prompt_len, total_len):
            logits = forward(tokens[:, prev_pos:cur_pos], prev_pos)
            next_token = torch.argmax(logits[:, -1], dim=-1).reshape(-1)
            next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            eos_reached |= (~input_text_mask[:, cur_pos]) & torch.isin(next_token, stop)
            prev_pos = cur_pos
            if all(eos_reached):
                break
    return tokens


def attention_pair(seed: int = 0, layer: int = 0):
    """``(model, attn, converted)``: a tiny Meta ``Transformer``, its ``Attention`` of ``layer`` and a graphfix
    ``MetaAttention`` moved from it, with its own cache copy."""
    from graphfix.rewrite.blocks.meta_llama import MetaAttention

    model = build_meta_transformer(seed)
    attn = model.layers[layer].attention
    converted = MetaAttention.from_meta(attn)
    converted.cache_k, converted.cache_v = attn.cache_k.clone(), attn.cache_v.clone()
    return model, attn, converted


def apply_beside_reference(pass_, ctx=None, seed: int = 0, **overrides):
    """``(reference, model, result)``: ``pass_`` applied to a tiny Meta ``Transformer`` and an untouched twin
    built the same way; the pass must have moved the model's parameters, not copied them."""
    from graphfix.rewrite.pass_manager import PassContext

    reference = build_meta_transformer(seed, **overrides)
    model = build_meta_transformer(seed, **overrides)
    before = parameters_by_name(model)
    result = pass_.apply(model, ctx or PassContext())
    assert_parameters_moved(before, model)
    return reference, model, result


def meta_mask(seqlen: int, start_pos: int = 0) -> torch.Tensor | None:
    """The additive mask Meta's ``Transformer.forward`` passes to its layers."""
    if seqlen == 1:
        return None
    mask = torch.triu(torch.full((seqlen, seqlen), float("-inf")), diagonal=1)
    return torch.hstack([torch.zeros((seqlen, start_pos)), mask])


def attention_max_diff(model, attn, converted, *, real_freqs: bool = False, static_cache: bool = False) -> float:
    """Largest output difference of Meta's ``attn`` and ``converted`` over a prefill of 5 and chunks of 1 and 2.

    ``converted`` gets what its parts expect: the real table for real RoPE, tensor
    positions and ``causal_mask`` for a static cache.
    """
    from graphfix.rewrite.blocks.kv_cache import causal_mask

    torch.manual_seed(0)
    diffs = []
    for seqlen, start in ((5, 0), (1, 5), (2, 6)):
        x = torch.randn(attn.cache_k.shape[0], seqlen, model.params.dim)
        freqs = model.freqs_cis[start : start + seqlen]
        with torch.no_grad():
            ref = attn(x, start, freqs, meta_mask(seqlen, start))
            table = torch.view_as_real(freqs) if real_freqs else freqs
            if static_cache:
                pos = torch.arange(start, start + seqlen)
                out = converted(x, pos, table, causal_mask(pos, converted.kv_cache.max_seq_len))
            else:
                out = converted(x, start, table, meta_mask(seqlen, start))
        diffs.append((out - ref).abs().max().item())
    return max(diffs)
