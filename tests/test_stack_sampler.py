"""``StackSampler``: the warm-start benchmark's record of where a process start spends its time."""

from __future__ import annotations

import time

from graphfix.bench.stack_sampler import StackSampler


def _waits_on_io(seconds: float) -> None:
    time.sleep(seconds)


def _spins(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_sampler_attributes_wall_time_to_the_functions_on_the_stack():
    with StackSampler(interval=0.005) as sampler:
        _waits_on_io(0.3)
        _spins(0.2)
    inclusive, innermost = dict(sampler.top(50)), dict(sampler.top(50, inclusive=False))
    waits = next(v for k, v in inclusive.items() if k.endswith("(_waits_on_io)"))
    spins = next(v for k, v in innermost.items() if k.endswith("(_spins)"))
    caller = next(v for k, v in inclusive.items() if k.endswith("(test_sampler_attributes_wall_time_to_the_functions_on_the_stack)"))
    assert 0.2 < waits < 0.45 and 0.1 < spins < 0.35  # seconds, within one GIL switch of the truth
    assert caller >= waits + spins - 0.05  # inclusive: the caller holds both
