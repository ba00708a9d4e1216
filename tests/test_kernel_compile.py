"""The engine's Triton kernels compile for a Hopper GPU (sm_90) on this CPU-only machine.

The interpreter tests run the kernels' Python; only Triton's compiler refuses what it cannot
lower (a helper with two differently shaped returns passed every interpreter test and failed
on the H200). Compiling to a cubin needs no driver, so the suite catches that class here.
"""

import pytest

from graphfix.bench.kernel_compile import CASES, KernelCase, compile_case, main, reason


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_kernel_compiles_to_a_cubin_for_sm90(case):
    assert compile_case(case, 90) >= 0.0


def test_a_kernel_that_cannot_compile_is_reported_with_its_cause(capsys):
    bad = KernelCase("no such argument", "graphfix.engine.kernels:_gemv_kernel", {"NOT_AN_ARG": 1})
    with pytest.raises(TypeError, match="NOT_AN_ARG"):
        compile_case(bad)
    assert reason(RuntimeError("a\nb")) == "RuntimeError: b"
    assert main(["--only", "attention combine"]) == 0
    assert "ok     attention combine" in capsys.readouterr().out
