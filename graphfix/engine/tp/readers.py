"""Sources of full weights, read one slice at a time: a model in memory, safetensors files, Meta shards.

Every source answers ``read(name, dim, start, length)`` for Meta-named weights
(``plan.ShardPlan`` names), returning only that slice. From files this is what lets a
rank load a 70B model without holding it: safetensors' ``get_slice`` reads just the
requested rows or columns, and Meta's ``consolidated.NN.pth`` files are memory-mapped,
so narrowing a shard touches only its pages. A Meta checkpoint written for N ranks is
read at any tp: a rank's slice may span several files (fewer ranks than files) or be a
part of one (more ranks), and a tensor the files split along another dim (Llama 2's
embedding, split along features) is narrowed in each file and concatenated.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch

from graphfix.convert.layout import meta_split_dim, meta_to_hf_name
from graphfix.engine.tp.plan import Slice
from graphfix.errors import InputError


class TensorSource(Protocol):
    def has(self, name: str) -> bool: ...

    def read(self, name: str, dim: int | None, start: int = 0, length: int = 0) -> torch.Tensor:
        """The full tensor (``dim=None``) or ``length`` rows/columns from ``start`` along ``dim``."""


def read_slice(source: TensorSource, name: str, sl: Slice, dtype: torch.dtype | None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """``sl`` of tensor ``name``: a new tensor of ``dtype`` on ``device`` (never a view into the source)."""
    if sl.dim is None:
        parts = [source.read(name, None)]
    else:
        parts = [source.read(name, sl.dim, start, length) for start, length in sl.ranges if length > 0]
    dtype = dtype or parts[0].dtype
    out = torch.cat([p.to(device=device, dtype=dtype) for p in parts], dim=sl.dim or 0) if len(parts) > 1 \
        else parts[0].to(device=device, dtype=dtype, copy=True).contiguous()  # row-major: what the GEMVs need
    if sl.pad_to is not None and out.shape[sl.dim] < sl.pad_to:
        pad_shape = list(out.shape)
        pad_shape[sl.dim] = sl.pad_to - out.shape[sl.dim]
        out = torch.cat([out, out.new_zeros(pad_shape)], dim=sl.dim)
    return out


def _narrow(t: torch.Tensor, dim: int | None, start: int, length: int) -> torch.Tensor:
    return t if dim is None else t.narrow(dim, start, length)


def hf_name(name: str) -> str | None:
    """The Hugging Face key of a Meta-named weight or bias (Qwen2's q/k/v biases included)."""
    if name.endswith(".bias"):
        weight = meta_to_hf_name(name[:-len(".bias")] + ".weight")
        return None if weight is None else weight[:-len(".weight")] + ".bias"
    return meta_to_hf_name(name)


class MappingSource:
    """Tensors in memory under other names: ``names(meta_name)`` gives the key (HF ``state_dict``, Meta model)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], names: Callable[[str], str | None] = lambda n: n,
                 tied: bool = False) -> None:
        self.tensors = tensors
        self.names = names
        self.tied = tied

    def _key(self, name: str) -> str | None:
        if name == "output.weight" and (self.tied or self.names(name) not in self.tensors):
            name = "tok_embeddings.weight"
        key = self.names(name)
        return key if key in self.tensors else None

    def has(self, name: str) -> bool:
        return self._key(name) is not None

    def read(self, name: str, dim: int | None, start: int = 0, length: int = 0) -> torch.Tensor:
        key = self._key(name)
        if key is None:
            raise InputError(f"weight {name!r} is missing from the model")
        return _narrow(self.tensors[key].detach(), dim, start, length)


class RankSliceSource:
    """This rank's fairscale slices of Meta's tensors (a model-parallel ``Transformer`` at the tp size), read in full
    coordinates: a read must fall inside the slice the rank holds, which the plan's slices do when the model was
    cut for the same ranks (the same Megatron layout: heads, MLP columns, vocabulary rows by rank)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], rank: int) -> None:
        self.tensors = tensors
        self.rank = rank

    def has(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str, dim: int | None, start: int = 0, length: int = 0) -> torch.Tensor:
        if name not in self.tensors:
            raise InputError(f"weight {name!r} is missing from the model")
        local = self.tensors[name].detach()
        axis = meta_split_dim(name)
        if axis is None:
            return _narrow(local, dim, start, length)
        held = local.shape[axis]
        first = self.rank * held
        if dim == axis and first <= start and start + length <= first + held:
            return local.narrow(axis, start - first, length)
        asked = "the whole tensor" if dim is None else f"{start}..{start + length - 1} along dim {dim}"
        raise InputError(f"{name}: rank {self.rank} holds {first}..{first + held - 1} along dim {axis}, not {asked}",
                         hint="load the checkpoint folder with load_sharded, which reads any slice at any tp")


class DecoderSource:
    """A world-size-1 ``LlamaDecoder``: fused ``wqkv``/``w13`` are cut back into q/k/v and gate/up."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        self.params = dict(decoder.named_parameters(remove_duplicate=False))
        self.fused = decoder.fused
        cfg = decoder.config
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.qkv = {"wq": (0, q), "wk": (q, kv), "wv": (q + kv, kv)}
        self.gate_up = {"w1": (0, cfg.intermediate_size), "w3": (cfg.intermediate_size, cfg.intermediate_size)}

    def _locate(self, name: str) -> tuple[str, int, int] | None:
        parts = name.split(".")
        if self.fused and len(parts) == 5 and parts[3] in self.qkv:
            return ".".join(parts[:3] + ["wqkv", parts[4]]), *self.qkv[parts[3]]
        if self.fused and len(parts) == 5 and parts[3] in self.gate_up:
            return ".".join(parts[:3] + ["w13", parts[4]]), *self.gate_up[parts[3]]
        return (name, 0, -1) if name in self.params else None

    def has(self, name: str) -> bool:
        found = self._locate(name)
        return found is not None and found[0] in self.params

    def read(self, name: str, dim: int | None, start: int = 0, length: int = 0) -> torch.Tensor:
        key, offset, rows = self._locate(name)
        t = self.params[key].detach()
        if rows >= 0:
            t = t.narrow(0, offset, rows)
        return _narrow(t, dim, start, length)


class SafetensorsSource:
    """An HF folder of ``*.safetensors`` (with or without ``model.safetensors.index.json``), read by slices."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise InputError(f"{folder}: no .safetensors files", hint="convert the checkpoint with graphfix convert")
        self.handles = [safe_open(str(folder / f), framework="pt") for f in files]
        self.where = {key: h for h in self.handles for key in h.keys()}  # noqa: SIM118 - a safe_open handle is not iterable
        self.tied = "lm_head.weight" not in self.where

    def _key(self, name: str) -> str | None:
        if name == "output.weight" and self.tied:
            name = "tok_embeddings.weight"
        key = hf_name(name)
        return key if key in self.where else None

    def has(self, name: str) -> bool:
        return self._key(name) is not None

    def read(self, name: str, dim: int | None, start: int = 0, length: int = 0) -> torch.Tensor:
        key = self._key(name)
        if key is None:
            raise InputError(f"weight {name!r} ({hf_name(name)}) is missing from the safetensors files")
        if dim is None:
            return self.where[key].get_tensor(key)
        part = self.where[key].get_slice(key)
        return part[start:start + length] if dim == 0 else part[:, start:start + length]


class MetaSource:
    """Meta's ``consolidated.NN.pth`` files, memory-mapped; a slice at any tp, whatever N the files were cut for."""

    def __init__(self, folder: str | Path) -> None:
        from graphfix.convert.formats.meta import MetaShards

        self.shards = MetaShards.open(Path(folder))

    def has(self, name: str) -> bool:
        return name in self.shards.states[0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shards.shape(name)

    def read(self, name: str, dim: int | None, start: int = 0, length: int = 0) -> torch.Tensor:
        parts = [sd[name] for sd in self.shards.states]
        axis = self.shards.axis(name)
        if axis is None:
            return _narrow(parts[0], dim, start, length)
        if dim is None:
            return torch.cat(parts, dim=axis)
        if dim != axis:  # split along the other dim in the files: narrow each, then join them
            return torch.cat([p.narrow(dim, start, length) for p in parts], dim=axis)
        pieces, at = [], 0
        for p in parts:
            lo, hi = max(start, at), min(start + length, at + p.shape[axis])
            if lo < hi:
                pieces.append(p.narrow(axis, lo - at, hi - lo))
            at += p.shape[axis]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=axis)
