"""The package's public names: ``graphfix.optimize(model)`` and ``graphfix.verify(result)``."""

from __future__ import annotations

import importlib
import subprocess
import sys

import graphfix
from tests.test_optimize_meta import StartPosModel


def test_optimize_and_verify_are_the_functions():
    assert graphfix.optimize is importlib.import_module("graphfix.optimize").optimize
    assert graphfix.verify is importlib.import_module("graphfix.verify").verify
    assert graphfix.OptimizeResult is importlib.import_module("graphfix.optimize").OptimizeResult
    assert graphfix.VerifyResult is importlib.import_module("graphfix.verify").VerifyResult
    assert set(graphfix.__all__) <= set(dir(graphfix))


def test_optimize_a_tiny_model_through_the_package():
    result = graphfix.optimize(StartPosModel().eval(), backend="aot_eager", diagnose=False, decode_steps=4)
    assert isinstance(result, graphfix.OptimizeResult) and result.verified, result.summary()
    again = graphfix.verify(result, measure_speed=False, other_prompt_length=False)
    assert isinstance(again, graphfix.VerifyResult) and again.ok, again.failures


def test_importing_the_submodules_keeps_the_functions_and_import_graphfix_cheap():
    code = (
        "import sys, graphfix\n"
        "assert 'graphfix.optimize.api' not in sys.modules and 'transformers' not in sys.modules\n"
        "from graphfix.optimize import default_backend\n"  # Python would set graphfix.optimize = <module>
        "import graphfix.verify\nimport graphfix.diagnose\n"
        "assert graphfix.optimize.__name__ == 'optimize' and graphfix.verify.__name__ == 'verify'\n"
        "assert graphfix.diagnose.__name__ == 'diagnose'\n"
        "assert graphfix.optimize.__module__ == 'graphfix.optimize.api'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
