"""``graphfix.verify``: the public module of ``verify`` (its code lives in ``graphfix.optimize.verification``, the
parity method in ``graphfix.optimize.parity``)."""

from graphfix.optimize.parity import ParityResult, compare, default_floor, default_multiplier, default_tolerance
from graphfix.optimize.verification import (
    Trace,
    VerificationError,
    VerifyResult,
    runner_for,
    verify,
)

__all__ = ["ParityResult", "Trace", "VerificationError", "VerifyResult", "compare", "default_floor",
           "default_multiplier", "default_tolerance", "runner_for", "verify"]
