"""Tensor parallelism for graphfix's decoder: one process per GPU, the model's heads and MLP split over them.

    # torchrun --nproc-per-node 2 script.py
    from graphfix.engine import Generator
    from graphfix.engine.tp import choose_all_reduce, init_tp, load_sharded

    tp = init_tp()                                   # NCCL on CUDA, gloo on CPU; a world of 1 without torchrun
    model = load_sharded("Llama-2-70b-hf", tp, max_seq_len=4096)   # each rank reads only its slices
    choose_all_reduce(tp, model)                     # one-shot (symmetric memory) or NCCL, measured
    gen = Generator(model)                           # the same engine: one graph per step, CUDA graphs

See docs/tensor_parallel.md.
"""

from graphfix.engine.tp.allreduce import AllReduceChoice, choose_all_reduce
from graphfix.engine.tp.api import load_sharded, shard
from graphfix.engine.tp.group import TPGroup, init_tp, main_print
from graphfix.engine.tp.plan import ShardPlan

__all__ = ["AllReduceChoice", "ShardPlan", "TPGroup", "choose_all_reduce", "init_tp", "load_sharded", "main_print",
           "shard"]
