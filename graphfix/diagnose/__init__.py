"""Diagnosis: run Dynamo over a real prefill + decode loop and turn what it logs into findings.

``capture`` reads Dynamo's logs, ``taxonomy`` names causes, ``modulemap`` finds module paths,
``drivers`` run a model the way its code is run, ``sources`` load what the user names, and
``diagnosis`` puts them together as ``diagnose(model)``.
"""

from graphfix.diagnose.diagnosis import diagnose

__all__ = ["diagnose"]
