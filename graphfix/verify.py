"""``graphfix.verify``: the public module of ``verify`` (its code lives in ``graphfix.optimize.verification``)."""

from graphfix.optimize.verification import (
    ParityResult,
    Trace,
    VerificationError,
    VerifyResult,
    compare,
    default_tolerance,
    runner_for,
    verify,
)

__all__ = ["ParityResult", "Trace", "VerificationError", "VerifyResult", "compare", "default_tolerance",
           "runner_for", "verify"]
