"""Which slice of every full weight a rank holds: the sharding plan, independent of where weights come from.

Megatron's layout, chosen so a layer needs two all-reduces and nothing else:

- attention heads split evenly: q/k/v are **column**-parallel (a rank computes its heads
  end to end: RoPE, cache, attention), ``wo`` is **row**-parallel (each rank's heads give a
  partial sum of the output, all-reduced);
- gate/up column-parallel, down row-parallel (SiLU·mul is element-wise, so it stays local);
- KV heads: ``n_kv_heads / tp`` per rank; with fewer KV heads than ranks each rank keeps
  the one KV head its query heads use (replicated on ``tp / n_kv_heads`` ranks), because a
  query head and its KV head must live on the same rank;
- the LM head split along the vocabulary (padded to a multiple of ``tp``) and all-gathered,
  the embedding replicated (a step reads only B rows of it, so splitting it saves memory
  but costs one more all-reduce per step) or vocabulary-parallel when memory matters;
- norms replicated.

Weights are named the way Meta's checkpoints name them (``layers.3.attention.wq.weight``);
``readers`` map other layouts onto these names.
"""

from __future__ import annotations

import dataclasses

from graphfix.engine.llama import DecoderConfig
from graphfix.errors import InputError

Ranges = tuple[tuple[int, int], ...]
"""``(start, length)`` pieces along one dim, concatenated in order."""


@dataclasses.dataclass(frozen=True)
class Slice:
    """Rows (``dim=0``) or columns (``dim=1``) of a full tensor; ``dim=None``: the whole tensor."""

    dim: int | None
    ranges: Ranges = ()
    pad_to: int | None = None
    """Zero-pad along ``dim`` to this length (the last vocabulary shard)."""


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """The plan for ``rank`` of ``world_size`` over a model of shape ``full``."""

    full: DecoderConfig
    rank: int
    world_size: int
    vocab_parallel_embedding: bool = False

    def __post_init__(self) -> None:
        cfg, ws = self.full, self.world_size
        problems = []
        if cfg.n_heads % ws:
            problems.append(f"{cfg.n_heads} attention heads")
        if cfg.n_kv_heads >= ws and cfg.n_kv_heads % ws:
            problems.append(f"{cfg.n_kv_heads} KV heads")
        if cfg.n_kv_heads < ws and ws % cfg.n_kv_heads:
            problems.append(f"{cfg.n_kv_heads} KV heads (fewer than ranks: tp must be a multiple of them)")
        if cfg.intermediate_size % ws:
            problems.append(f"intermediate size {cfg.intermediate_size}")
        if problems:
            raise InputError(f"tp={ws} does not divide {', '.join(problems)}",
                             hint="pick a tensor-parallel size that divides the head counts and the MLP width")

    @property
    def heads(self) -> int:
        """Query heads per rank."""
        return self.full.n_heads // self.world_size

    @property
    def kv_heads(self) -> int:
        """KV heads per rank (1 when KV heads are replicated)."""
        return max(1, self.full.n_kv_heads // self.world_size)

    @property
    def first_head(self) -> int:
        return self.rank * self.heads

    @property
    def first_kv_head(self) -> int:
        """The first KV head this rank's query heads use: query head ``h`` uses KV head ``h // n_rep``."""
        return self.first_head // self.full.n_rep

    @property
    def kv_replicas(self) -> int:
        """How many ranks hold each KV head."""
        return max(1, self.world_size // self.full.n_kv_heads)

    @property
    def ffn(self) -> int:
        return self.full.intermediate_size // self.world_size

    @property
    def vocab_shard(self) -> int:
        """Rows of the LM head per rank (the vocabulary rounded up to a multiple of ``world_size``)."""
        return -(-self.full.vocab_size // self.world_size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_shard

    def local_config(self) -> DecoderConfig:
        """The shape each rank's decoder has: its heads, KV heads and MLP width (the vocabulary stays whole)."""
        return dataclasses.replace(self.full, n_heads=self.heads, n_kv_heads=self.kv_heads,
                                   intermediate_size=self.ffn)

    def slice_for(self, name: str) -> Slice:
        """The part of the full tensor ``name`` (Meta naming) this rank holds."""
        hd = self.full.head_dim
        q = ((self.first_head * hd, self.heads * hd),)
        kv = ((self.first_kv_head * hd, self.kv_heads * hd),)
        ffn = ((self.rank * self.ffn, self.ffn),)
        leaf = name.split(".")[-2] if "." in name else name
        if name == "output.weight":
            length = max(0, min(self.vocab_shard, self.full.vocab_size - self.vocab_start))
            return Slice(0, ((self.vocab_start, length),), pad_to=self.vocab_shard)
        if name == "tok_embeddings.weight":
            if not self.vocab_parallel_embedding:
                return Slice(None)
            length = max(0, min(self.vocab_shard, self.full.vocab_size - self.vocab_start))
            return Slice(0, ((self.vocab_start, length),), pad_to=self.vocab_shard)
        if leaf == "wq":
            return Slice(0, q)
        if leaf in ("wk", "wv"):
            return Slice(0, kv)
        if leaf == "wo":
            return Slice(None) if name.endswith(".bias") else Slice(1, q)
        if leaf in ("w1", "w3"):
            return Slice(0, ffn)
        if leaf == "w2":
            return Slice(1, ffn)
        return Slice(None)  # norms

    def describe(self) -> str:
        cfg = self.full
        kv = (f"{self.kv_heads} KV head(s) (each on {self.kv_replicas} ranks)" if self.kv_replicas > 1
              else f"{self.kv_heads} KV head(s)")
        return (f"rank {self.rank}/{self.world_size}: heads {self.first_head}..{self.first_head + self.heads - 1} "
                f"of {cfg.n_heads}, {kv}, MLP {self.ffn} of {cfg.intermediate_size}, "
                f"vocab rows {self.vocab_start}..{self.vocab_start + self.vocab_shard - 1} of {cfg.vocab_size}")
