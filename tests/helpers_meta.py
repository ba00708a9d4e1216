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
import os
import socket

import torch
import torch.distributed as dist

TINY_ARGS = dict(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=128,
    multiple_of=16,
    norm_eps=1e-5,
    rope_theta=500000.0,
    use_scaled_rope=True,
    max_batch_size=2,
    max_seq_len=64,
)
"""The tiny configuration the tests use (dim 64, 2 layers, 4 heads / 2 KV heads, vocab 128)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_model_parallel(world_size: int = 1, rank: int = 0, port: int | None = None) -> None:
    """A gloo process group and fairscale model parallelism of ``world_size``, if not set up yet."""
    from fairscale.nn.model_parallel import initialize as fs_init

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if port is not None:
            os.environ["MASTER_PORT"] = str(port)
        else:
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(world_size)


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
