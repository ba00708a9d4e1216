"""Decode benchmark: copy bandwidth, HF eager, HF static (compiled) and graphfix on the same weights.

The implementation lives in ``graphfix.bench.decode`` (so that ``graphfix bench`` works from an
installed package); this script is the same command:

    python benchmarks/bench_decode.py --quick --json out.json --markdown out.md
    python benchmarks/bench_decode.py --model llama-3-8b --batch-sizes 1,8 --ttft-lengths 512,2048
    python benchmarks/bench_decode.py --model /path/to/hf-checkpoint --systems copy,graphfix

Options and the measured figures: docs/benchmarks.md.
"""

from __future__ import annotations

import sys

from graphfix.bench.decode import main

if __name__ == "__main__":
    sys.exit(main())
