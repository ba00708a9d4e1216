"""Tensor-parallel decode benchmark (``graphfix.bench.tp``): 7B/70B Llama shapes, random bf16 weights, any tp.

    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --shapes llama-2-7b,llama-2-70b,llama-3-70b
    python benchmarks/bench_tp.py                  # tp=1 on one GPU: the same tensor-parallel path

Same as ``graphfix bench --tp N``. See docs/tensor_parallel.md.
"""

import sys

from graphfix.bench.tp import main

if __name__ == "__main__":
    sys.exit(main())
