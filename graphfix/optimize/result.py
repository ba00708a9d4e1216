"""``OptimizeResult``: what ``optimize`` did and measured, as a before/after table, a summary and JSON."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from torch import nn

from graphfix.diagnose.report import Report
from graphfix.optimize.parity import ParityResult
from graphfix.optimize.verification import VerifyResult
from graphfix.rewrite.pass_manager import PassResult

SCHEMA = "graphfix.optimize"
SCHEMA_VERSION = 2
"""2: ``parity`` measured against a high-precision run of the original (``graphfix.optimize.parity``)."""


@dataclasses.dataclass
class OptimizeResult:
    """What ``optimize`` did and measured; ``model`` is the optimized model (the same object)."""

    model: nn.Module
    before: Report
    after: Report
    passes: list[PassResult]
    parity: ParityResult | None
    verified: bool
    notes: list[str] = dataclasses.field(default_factory=list)
    verification: VerifyResult | None = None
    name: str = ""
    kind: str = ""
    backend: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    compiled: bool = False
    compile_seconds: float | None = None
    inductor_scan: bool = False
    seconds: float = 0.0
    tensor_parallel: str | None = None
    """``optimize(tp=N)``: this rank's group (``TPGroup.describe()``); the verification ran on its shard."""

    def rows(self) -> list[tuple[str, str, str]]:
        """The before/after table: ``(what, before, after)``, cells already formatted."""
        v = self.verification

        def cell(report: Report, field: str, verified: int | None = None) -> str:
            if verified is not None:
                return str(verified)
            return str(getattr(report.stats, field)) if diagnosed(report) else "-"

        scan = self.inductor_scan
        rows = [
            ("graphs", cell(self.before, "graphs"), cell(self.after, "graphs", v.total_graphs if v and self.compiled
                                                         else None)),
            ("graph breaks", cell(self.before, "graph_breaks"), cell(self.after, "graph_breaks",
                                                                     v.graph_breaks if v else None)),
            ("recompiles", cell(self.before, "recompiles"), cell(self.after, "recompiles", v.recompiles if v else None)),
            ("compile failures", cell(self.before, "compile_failures"),
             cell(self.after, "compile_failures", v.compile_failures if v else None)),
            ("inductor fallbacks", cell(self.before, "inductor_fallbacks") if scan else "-",
             cell(self.after, "inductor_fallbacks") if scan else "-"),
        ]
        rows.extend(parity_rows(self.parity))
        tps_b = v.reference_tokens_per_second if v else None
        tps_a = v.tokens_per_second if v else None
        rows.append(("tokens/s", f"{tps_b:.1f}" if tps_b else "-", f"{tps_a:.1f}" if tps_a else "-"))
        return rows

    def summary(self) -> str:
        """A short aligned before/after table, the passes, and the verdict."""
        what = f"{self.name} ({self.kind}, {self.dtype}, {self.device}, backend {self.backend or 'none'})"
        header = ("", "before", "after")
        rows = [header, *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [what]
        for r in rows:
            lines.append(f"  {r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}".rstrip())
        v = self.verification
        before = (f"diagnose ({self.before.backend}), prefill {self.before.prefill_tokens} + "
                  f"{self.before.decode_steps} decode steps" if diagnosed(self.before) else "not diagnosed")
        again = ", twice" + (", and another prompt length" if v and v.other_prompt_length else "") if v else ""
        if v:
            after = f"verify, prefill {v.prefill_tokens} + {v.decode_steps} decode steps{again}"
        elif diagnosed(self.after):
            after = f"diagnose, prefill {self.after.prefill_tokens} + {self.after.decode_steps} decode steps"
        else:
            after = "not diagnosed"
        lines.append(f"  before: {before}; after: {after}")
        if self.compile_seconds is not None:
            lines.append(f"  compile (warm-up prefill + decode): {self.compile_seconds:.1f}s")
        for p in self.passes:
            lines.append(f"  pass {p.name}: {p.rewritten} rewritten, {len(p.skipped)} skipped"
                         + (f" ({p.notes[0]})" if p.notes and not p.rewritten else ""))
        if self.parity is not None:
            lines.append(f"  parity: {parity_method(self.parity)}")
        verdict = "yes" if self.verified else "NO" if v else "not run"
        if self.tensor_parallel and v:
            verdict += f" (tensor parallel, {self.tensor_parallel}: this rank's shard against the original)"
        lines.append(f"  verified: {verdict}")
        if v and not v.ok:
            lines.extend(f"    - {f}" for f in v.failures)
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "model": self.name,
            "kind": self.kind,
            "backend": self.backend,
            "device": self.device,
            "dtype": self.dtype,
            "compiled": self.compiled,
            "verified": self.verified,
            "compile_seconds": self.compile_seconds,
            "seconds": self.seconds,
            "tensor_parallel": self.tensor_parallel,
            "table": [{"what": w, "before": b, "after": a} for w, b, a in self.rows()],
            "passes": [dataclasses.asdict(p) for p in self.passes],
            "parity": self.parity.to_dict() if self.parity else None,
            "verification": self.verification.to_dict() if self.verification else None,
            "notes": list(self.notes),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def diagnosed(report: Report) -> bool:
    """Whether ``report`` comes from a diagnosis (``diagnose=False`` leaves an empty one)."""
    return report.stats.calls > 0


def parity_rows(p: ParityResult | None) -> list[tuple[str, str, str]]:
    """The parity rows of the before/after table: *before* is the original's own error in its dtype (``e_orig``),
    *after* the optimized model's (``e_opt``) against the bound; the greedy tokens and the step checked to."""
    if p is None:
        return [("parity (max rel err)", "-", "-"), ("greedy tokens", "-", "-")]
    if p.method != "reference":
        return [("parity (max rel err)", "-", f"{p.relative_error:.1e} (tol {p.tolerance:.0e})"),
                ("greedy tokens", "-", f"{p.greedy_match}/{p.greedy_steps} identical")]
    sign = "<=" if p.logits_ok else ">"
    e_opt = f"{p.e_opt:.1e}" if p.e_opt is not None and p.e_opt < float("inf") else "inf"
    return [(f"parity vs {p.reference_dtype} (rel RMS)", f"{p.e_orig:.1e}", f"{e_opt} ({sign} {p.bound:.1e})"),
            ("greedy tokens", "-", f"{p.greedy_match}/{p.greedy_steps} identical ({p.tokens_checked_to} checked)")]


def parity_method(p: ParityResult) -> str:
    """One line: how parity was decided."""
    if p.method != "reference":
        return f"fixed tolerance {p.tolerance:.0e} of the logit scale against the original ({p.note})"
    return (f"e_opt <= {p.multiplier:g} x e_orig + {p.floor:g}, e_orig the original's own error in {p.dtype} "
            f"against {p.note or 'a ' + str(p.reference_dtype) + ' run'}; logits compared over {p.compared_steps} "
            f"steps, greedy tokens checked to step {p.tokens_checked_to} ({p.stop_reason})")
