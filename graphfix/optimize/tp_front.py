"""``optimize(model, tp=N)``: the HF and Meta front doors' engine over this rank's shard of the model.

Run under ``torchrun --nproc-per-node N``, every rank calls ``optimize(model, tp=N)`` on the same
single-device model. Everything ``optimize`` does without ``tp`` happens as before (diagnosis,
passes, the compiled front door, verification); the one difference is the engine behind the
front door: its decoder is this rank's shard (``graphfix.engine.tp.shard``) instead of a decoder
sharing the model's storage, and the all-reduce is chosen before it compiles.

- **Hugging Face** Llama, Mistral, Qwen2: ``model.generate`` is served by the sharded engine
  (``hf_engine.build(tp=...)``); a caller's own loop calls ``forward``, which stays unsharded, so
  a custom ``driver`` is refused.
- **Meta's reference** ``Transformer`` (``llama_models``, fairscale at model-parallel size 1):
  ``model.forward(tokens, start_pos)``, Meta's own convention, is served by the sharded engine
  through the same ``meta_front`` as on one device (prefill and decode compiled apart, decode
  graphs per attended length bucket); only the decoder it wraps is the shard. A Meta model
  that is model-parallel already (fairscale initialised at N, each rank holding its slices, as
  Meta's ``Llama.build`` loads ``consolidated.NN.pth``) is served at ``tp=N``: its slices are the
  plan's shard for that rank (the same layout), so they are copied as they are
  (``graphfix.engine.tp.shard``). At another tp it is refused, with
  ``graphfix.engine.tp.load_sharded``, which re-shards its checkpoint folder, as the hint.

Verification then runs the front door on the sharded engine on every rank against the original
model's tokens and logits (fullgraph, no recompile after warm-up, parity), so a verified result
is a verified tensor-parallel model. The ranks take every keep-or-undo decision together
(``agree``): one rank putting its model back while another serves would leave the other waiting
in a collective forever.

The shard's weights are copies: each process holds the model plus its shard (``1 + 1/N`` of it).
For models that do not fit one device, ``graphfix.engine.tp.load_sharded`` reads the shard alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graphfix.errors import InputError, UnsupportedModelError

KINDS = ("hf", "meta")
"""The front doors that serve a sharded engine."""


def prepare(model: nn.Module, kind: str, tp: int, driver: Any, compile: bool) -> Any:
    """Check ``optimize``'s arguments for ``tp`` and join the process group; returns the ``TPGroup``."""
    from graphfix.engine.tp import init_tp

    if kind not in KINDS:
        raise InputError(f"optimize(tp={tp}) serves Hugging Face Llama/Mistral/Qwen2 models and Meta's reference "
                         f"Transformer (this one is {kind!r})",
                         hint="graphfix.shard(model, tp) or graphfix.engine.tp.load_sharded(folder) with the Generator")
    if driver is not None:
        door = "generate()" if kind == "hf" else "forward(tokens, start_pos)"
        raise InputError(f"optimize(tp={tp}) shards the engine behind {door}; a custom driver is not verified on it",
                         hint="drop driver=, or use graphfix.shard(model) and graphfix's Generator")
    if not compile:
        raise InputError(f"optimize(tp={tp}) needs compile=True (the sharded engine is compiled)")
    if kind != "meta":
        return init_tp(tp)
    from graphfix.engine.tp.api import check_model_parallel, meta_slices

    slices = meta_slices(model)  # fairscale's slices: served where they are, at the tp they were cut for
    if slices > 1 and slices != tp:
        raise UnsupportedModelError(f"the Meta model holds fairscale model-parallel slices for {slices} ranks, "
                                    f"not {tp}", hint=f"run it at tp={slices}, or load its checkpoint folder with "
                                    "graphfix.engine.tp.load_sharded(folder, tp), which re-shards it at any tp")
    group = init_tp(tp)
    if slices > 1:
        check_model_parallel(slices, group)
    return group


def sharded_decoder(model: nn.Module, tp: Any, *, max_batch_size: int, max_seq_len: int) -> Any:
    """This rank's decoder of ``model`` with the all-reduce chosen; ``tp_note`` on it says what was done."""
    from graphfix.engine.tp import choose_all_reduce, shard

    decoder = shard(model, tp, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    choice = choose_all_reduce(tp, decoder)
    decoder.tp_note = f"tensor parallel: {tp.describe()}; {decoder.shard_plan.describe()}; {choice.describe()}"
    return decoder


def agree(tp: Any, flag: bool) -> bool:
    """Whether ``flag`` holds on every rank: the ranks keep or undo the optimized model together."""
    import torch.distributed as dist

    if tp is None or tp.world_size == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=tp.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=tp.group)
    return bool(value.item())


def verification_on_every_rank(tp: Any, run: Callable[[], Any]) -> Any:
    """``run()`` (this rank's verification); when it raises, the peers are told before it propagates.

    They wait in ``verified_on_every_rank``'s agreement once their own verification is done: without this
    vote a rank that failed outside the sharded forward would leave them waiting for it. (A rank that fails
    inside a collective of the forward still leaves its peers in that collective.)
    """
    try:
        return run()
    except BaseException:
        agree(tp, False)
        raise


def verified_on_every_rank(tp: Any, verified: bool, verification: Any) -> bool:
    """``verified`` agreed over the ranks; a rank that passed but whose peer did not says so in its failures."""
    everywhere = agree(tp, verified)
    if verified and not everywhere:
        verification.failures.append("another rank did not verify its shard (its summary says why)")
        verification.ok = False
    return everywhere


def slower_on_any_rank(tp: Any, slower: str | None) -> str | None:
    """This rank's keep-the-original note, or one saying another rank measured it slower (then all ranks undo)."""
    if agree(tp, slower is None):
        return None
    return slower or ("kept the original: another rank measured the optimized model slower than the original "
                      "(the ranks keep or undo it together; keep_if_slower=False to keep it)")
