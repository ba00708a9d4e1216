"""Meta's checkpoint format: ``params.json`` plus one ``consolidated.NN.pth`` per model-parallel rank.

Meta's reference code runs a model split over N ranks and stores each rank's
slice in its own file (70B: 8 files). The split follows fairscale's layers:
column-parallel weights (wq, wk, wv, w1, w3, output) are cut along dim 0,
row-parallel ones (wo, w2) along dim 1, the embedding along the vocabulary
(dim 0, VocabParallelEmbedding; Llama 2 files used dim 1, detected from the
shapes) and the norms are copied to every rank. Reading merges the slices;
writing cuts them for the requested rank count.

Sources are opened with ``torch.load(mmap=True, weights_only=True)``: nothing
is read until a tensor is needed and no pickled code can run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from graphfix.convert.checks import cfg_int
from graphfix.convert.formats.meta_params import (
    META_FIELDS,
    check_params,
    ffn_hidden_dim,
    params_to_spec,
    spec_to_params,
)
from graphfix.convert.formats.pth_io import PthWriter, load_tensor_file
from graphfix.convert.formats.sidecar import apply_sidecar, write_sidecar
from graphfix.convert.layout import (
    hf_to_meta_name,
    hf_to_meta_rope,
    meta_split_dim,
    meta_to_hf_name,
    meta_to_hf_rope,
    rope_heads,
)
from graphfix.convert.pages import release_mapped
from graphfix.convert.progress import Progress
from graphfix.convert.spec import Checkpoint, TensorEntry
from graphfix.errors import InputError, UnsupportedModelError

#: Tensors of Meta checkpoints that are not weights (Llama 2 stored its RoPE table).
_IGNORED = ("rope.freqs",)


def shard_files(folder: Path) -> list[Path]:
    """``consolidated.00.pth`` .. ``consolidated.NN.pth`` in rank order; a gap in the numbering is an error."""
    found: dict[int, Path] = {}
    for p in sorted(folder.glob("consolidated.*.pth")):
        mid = p.name[len("consolidated."):-len(".pth")]
        if mid.isdigit():
            if int(mid) in found:
                raise InputError(f"{p}: rank {int(mid)} is also in {found[int(mid)].name}; a rank file is "
                                 "duplicated: keep one of them")
            found[int(mid)] = p
    if not found:
        raise InputError(f"{folder}: no consolidated.NN.pth files beside params.json; the Meta checkpoint is incomplete")
    for i in range(max(found) + 1):
        if i not in found:
            width = len(next(iter(found.values())).name.split(".")[1])
            raise InputError(f"{folder / f'consolidated.{i:0{width}d}.pth'}: shard missing "
                             f"({len(found)} of {max(found) + 1} present); re-download the checkpoint")
    return [found[i] for i in range(len(found))]


def read_params(folder: Path) -> dict[str, Any]:
    """Parse params.json and check every value's type and range, naming the file and the key when one is wrong."""
    path = folder / "params.json"
    try:
        params = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable JSON ({str(exc).splitlines()[0]}); fix or re-download it") from None
    check_params(params, path)
    if params.get("moe_args") or params.get("vision_model") or cfg_int(params, "vision_chunk_size", path, default=-1,
                                                                        minimum=-(2**31)) > 0:
        raise UnsupportedModelError(f"{path}: vision and MoE Llama models are not supported; only text Llama converts")
    return params


@dataclass
class MetaShards:
    """The memory-mapped rank files of one Meta checkpoint, merged on demand."""

    folder: Path
    params: dict[str, Any]
    files: list[Path]
    states: list[dict[str, torch.Tensor]]

    @classmethod
    def open(cls, folder: Path) -> MetaShards:
        params = read_params(folder)
        files = shard_files(folder)
        states = []
        for f in files:
            states.append(load_tensor_file(f))
        names = [n for n in states[0] if n not in _IGNORED]
        for f, sd in zip(files[1:], states[1:]):
            if [n for n in sd if n not in _IGNORED] != names:
                raise InputError(f"{f}: holds different tensors than {files[0].name}; the shards do not belong together")
        _check_distinct_ranks(files, states)
        return cls(folder, params, files, states)

    @property
    def names(self) -> list[str]:
        return [n for n in self.states[0] if n not in _IGNORED]

    def axis(self, name: str) -> int | None:
        """Axis the rank slices of ``name`` are concatenated along (None: replicated)."""
        if len(self.states) == 1:
            return None
        if name == "tok_embeddings.weight":  # Llama 3 split the vocabulary, Llama 2 the features
            return 0 if self.states[0][name].shape[1] == int(self.params["dim"]) else 1
        return meta_split_dim(name)

    def shape(self, name: str) -> tuple[int, ...]:
        parts = [sd[name].shape for sd in self.states]
        axis = self.axis(name)
        shape = list(parts[0])
        if axis is not None:
            shape[axis] = sum(p[axis] for p in parts)
        return tuple(shape)

    def load(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full (merged) tensor ``name`` in Meta layout, as a new tensor, converted to ``dtype``.

        Slices are copied in blocks of rows, each block's mapped pages given
        back right after, so the source never adds more than a block to RSS.
        """
        parts = [sd[name] for sd in self.states]
        axis = self.axis(name)
        if axis is None:
            if len(parts) > 1 and parts[0].ndim == 1 and not all(torch.equal(parts[0], p) for p in parts[1:]):
                raise InputError(f"{self.folder}: replicated tensor {name!r} differs between shards; "
                                 "the shards do not belong together")
            parts, axis = parts[:1], 0
        out = torch.empty(self.shape(name) if len(parts) > 1 else parts[0].shape, dtype=dtype or parts[0].dtype)
        at = 0
        for p in parts:
            width = p.shape[axis] if p.ndim else 1
            _copy_releasing(out.narrow(axis, at, width) if p.ndim else out, p)
            at += width
        return out

    def equal(self, a: str, b: str, *, block_bytes: int = 64 * 2**20) -> bool:
        """Whether tensors ``a`` and ``b`` are identical, compared in blocks so memory stays small.

        Used to detect tied embeddings (Meta stores ``output`` separately even
        when it is a copy of ``tok_embeddings``) without holding both.
        """
        if self.shape(a) != self.shape(b) or self.axis(a) != self.axis(b):
            return False
        for sa, sb in ((sd[a], sd[b]) for sd in self.states):
            if sa.shape != sb.shape or sa.dtype != sb.dtype:
                return False
            rows = max(1, block_bytes // max(1, sa[0].numel() * sa.element_size()))
            for r in range(0, sa.shape[0], rows):
                ba, bb = sa[r:r + rows], sb[r:r + rows]
                same = torch.equal(ba, bb)
                for blk in (ba, bb):
                    release_mapped(blk.data_ptr(), blk.numel() * blk.element_size())
                if not same:
                    return False
        return True


def _check_distinct_ranks(files: list[Path], states: list[dict[str, torch.Tensor]]) -> None:
    """Refuse a rank file that is a copy of another (same slice twice): merging it would build a wrong model.

    Rank files of one checkpoint hold different rows of every split tensor,
    so comparing the first rows of one of them is enough and costs a few KB.
    """
    if len(states) < 2:
        return
    probe = next((n for n in states[0] if meta_split_dim(n) == 0 and states[0][n].ndim == 2), None)
    if probe is None:
        return
    heads = [sd[probe][:4] for sd in states]
    for i in range(len(heads)):
        for j in range(i):  # slices of different sizes are not copies (extra rows are reported from the shapes)
            if states[i][probe].shape == states[j][probe].shape and torch.equal(heads[i], heads[j]):
                raise InputError(f"{files[i]}: holds the same {probe!r} rows as {files[j].name}; a rank file was "
                                 "copied over another: re-download the checkpoint")


def _copy_releasing(dst: torch.Tensor, src: torch.Tensor, block_bytes: int = 64 * 2**20) -> None:
    """``dst.copy_(src)`` in row blocks, dropping each block of the memory-mapped ``src`` once copied."""
    if src.ndim == 0 or src.shape[0] == 0:
        dst.copy_(src)
        return
    rows = max(1, block_bytes // max(1, src[0].numel() * src.element_size()))
    for r in range(0, src.shape[0], rows):
        block = src[r:r + rows]
        dst[r:r + rows].copy_(block)
        release_mapped(block.data_ptr(), block.numel() * block.element_size())


def read_merged_state_dict(folder: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole model as one rank's state dict (Meta names and layout), merging rank files.

    This holds the model in memory; it is for running a checkpoint, not for
    converting one (conversion streams through :class:`MetaShards`).
    """
    shards = MetaShards.open(Path(folder))
    try:
        return {name: shards.load(name, dtype) for name in shards.names}
    finally:
        shards.states.clear()


def open_meta(folder: Path) -> Checkpoint:
    """Open a Meta checkpoint folder as a canonical (HF-named, HF-layout) :class:`Checkpoint`."""
    shards = MetaShards.open(folder)
    params = shards.params
    names = shards.names
    for need in ("tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.feed_forward.w1.weight"):
        if need not in names:
            raise InputError(f"{shards.files[0]}: tensor {need!r} is missing; this is not a Llama checkpoint")
    n_heads = int(params["n_heads"])
    n_kv = int(params.get("n_kv_heads") or n_heads)
    dim = int(params["dim"])
    _check_dim(shards, folder / "params.json", dim)
    ffn_rows = shards.shape("layers.0.feed_forward.w1.weight")[0]
    want_ffn = ffn_hidden_dim(dim, cfg_int(params, "multiple_of", folder / "params.json", default=256),
                              params.get("ffn_dim_multiplier"))
    if ffn_rows != want_ffn:
        raise InputError(f"{folder / 'params.json'}: implies an MLP width of {want_ffn} but the weights have "
                         f"{ffn_rows}; params.json does not belong to these weights")
    tied = False
    if "output.weight" in names:
        tied = shards.equal("output.weight", "tok_embeddings.weight")
    spec = params_to_spec(params, vocab_rows=shards.shape("tok_embeddings.weight")[0], ffn_rows=ffn_rows, tied=tied,
                          where=folder / "params.json")
    notes: list[str] = []
    spec = apply_sidecar(spec, folder, notes)

    tensors: dict[str, TensorEntry] = {}
    for name in names:
        hf = meta_to_hf_name(name)
        if hf is None:
            hf = name  # validate() reports it as not part of a Llama model
        if tied and hf == "lm_head.weight":
            continue
        heads = rope_heads(hf, n_heads, n_kv)
        src = shards.files[0] if len(shards.files) == 1 else folder
        tensors[hf] = TensorEntry(hf, shards.shape(name), shards.states[0][name].dtype,
                                  partial(_load_canonical, shards, name, heads), source=str(src))
    from graphfix.convert.tokenizer import side_files

    return Checkpoint("meta", folder, spec, tensors, side_files=side_files(folder),
                      closers=[shards.states.clear], source_shards=len(shards.files),
                      config_path=folder / "params.json", fields=META_FIELDS, notes=notes)


def _check_dim(shards: MetaShards, params_path: Path, dim: int) -> None:
    """params.json's ``dim`` against the weights, telling a wrong ``dim`` from missing or extra rank files.

    The norms are replicated in every rank file, so their width is the true
    hidden size; the attention rows are split, so their total counts ranks.
    """
    norm = shards.states[0].get("norm.weight")
    if norm is not None and norm.ndim == 1 and norm.shape[0] != dim:
        raise InputError(f"{params_path}: dim={dim} but the weights have hidden size {norm.shape[0]} (norm.weight); "
                         "params.json does not belong to these weights")
    n = len(shards.files)
    per_rank = shards.states[0]["layers.0.attention.wq.weight"].shape[0]
    q_rows = shards.shape("layers.0.attention.wq.weight")[0]
    if q_rows < dim and per_rank and dim % per_rank == 0:
        want = dim // per_rank
        raise InputError(f"{shards.folder}: holds {n} rank file(s) but the weights are split {want} ways "
                         f"({per_rank} of {dim} attention rows each); consolidated.{n:02d}.pth and later are "
                         "missing: re-download them")
    if q_rows != dim:
        raise InputError(f"{shards.folder}: the {n} rank file(s) hold {q_rows} attention rows where params.json "
                         f"(dim={dim}) implies {dim}; the rank files are duplicated, mixed from different checkpoints "
                         "or params.json is wrong")


def _load_canonical(shards: MetaShards, name: str, heads: int | None, dtype: torch.dtype | None) -> torch.Tensor:
    t = shards.load(name, dtype)
    return meta_to_hf_rope(t, heads) if heads is not None else t


# ---------------------------------------------------------------- writing


def _meta_plan(ckpt: Checkpoint) -> list[tuple[str, TensorEntry]]:
    """Meta names in the order Meta's own files list them, each with the canonical entry it comes from."""
    plan = []
    for hf, entry in ckpt.tensors.items():
        plan.append((hf_to_meta_name(hf) or hf, entry))
        if hf == "model.norm.weight" and ckpt.spec.tie_word_embeddings:
            # Meta's Transformer always has its own output projection: write a copy of the embedding
            plan.append(("output.weight", ckpt.tensors["model.embed_tokens.weight"]))
    order = {"tok_embeddings.weight": 0, "norm.weight": 2, "output.weight": 3}
    return sorted(plan, key=lambda p: order.get(p[0], 1))  # stable: layers keep their order


def check_shards(spec_params: dict[str, Any], intermediate: int, shards: int) -> None:
    """Refuse a rank count the model's dimensions cannot be divided by (fairscale requires exact division)."""
    if shards < 1:
        raise InputError(f"--shards must be at least 1, got {shards}")
    dims = {"n_heads": spec_params["n_heads"], "n_kv_heads": spec_params["n_kv_heads"],
            "vocab_size": spec_params["vocab_size"], "MLP width": intermediate}
    for what, value in dims.items():
        if value % shards:
            raise InputError(f"--shards {shards} does not divide {what}={value}; choose a divisor of it")


def write_meta(ckpt: Checkpoint, out: Path, *, dtype: torch.dtype | None, shards: int = 1,
               progress: Progress | None = None) -> list[Path]:
    """Write ``params.json`` and ``consolidated.NN.pth`` for ``shards`` ranks into ``out``.

    All rank files are written side by side, tensor by tensor: each source
    tensor is read once, cut into its rank slices and appended to every file,
    so peak memory is one tensor plus its slices whatever the rank count.
    """
    spec = ckpt.spec
    params = spec_to_params(spec)
    check_shards(params, spec.intermediate_size, shards)
    plan = _meta_plan(ckpt)

    def out_dtype(entry: TensorEntry) -> torch.dtype:
        return dtype or entry.dtype

    rank_plans: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[] for _ in range(shards)]
    for meta_name, entry in plan:
        shape = list(entry.shape)
        axis = meta_split_dim(meta_name) if shards > 1 else None
        if axis is not None:
            shape[axis] //= shards
        for rp in rank_plans:
            rp.append((meta_name, tuple(shape), out_dtype(entry)))
    paths = [out / f"consolidated.{r:02d}.pth" for r in range(shards)]
    writers: list[PthWriter] = []
    try:
        for p, rp in zip(paths, rank_plans):
            writers.append(PthWriter(p, rp))
        for meta_name, entry in plan:
            heads = rope_heads(entry.name, spec.num_attention_heads, spec.num_key_value_heads)
            if meta_name == "output.weight":
                heads = None
            t = entry.load(dtype)
            if heads is not None:
                t = hf_to_meta_rope(t, heads)
            axis = meta_split_dim(meta_name) if shards > 1 else None
            pieces = t.chunk(shards, dim=axis) if axis is not None else [t] * shards
            for w, piece in zip(writers, pieces):
                w.write(meta_name, piece)
            if progress:
                progress.update(meta_name, t.numel() * t.element_size())
            del t, pieces
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:  # every rank file: an unfinalised torch writer aborts the process when collected
            w.abandon()
        raise
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    write_sidecar(spec, out, dtype=_main_dtype(plan, dtype))
    return paths


def _main_dtype(plan: list[tuple[str, TensorEntry]], dtype: torch.dtype | None) -> torch.dtype:
    by_dtype: dict[torch.dtype, int] = {}
    for _, e in plan:
        d = dtype or e.dtype
        by_dtype[d] = by_dtype.get(d, 0) + e.nbytes // e.dtype.itemsize * d.itemsize
    return max(by_dtype, key=lambda d: by_dtype[d])
