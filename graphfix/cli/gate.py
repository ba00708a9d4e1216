"""The CI gate: do these reports pass, given a baseline and budgets?

Exit codes (``GateResult.exit_code``; the CLI uses them as its own):

* ``0`` (``EXIT_OK``): within budget;
* ``1`` (``EXIT_FAILED``): over budget, or a compile failure;
* ``2`` (``EXIT_USAGE``): not set here; the CLI uses it for usage and input
  errors (``GraphfixError.exit_code``), such as a missing baseline file.

Rules, per model:

* With a baseline, only findings whose key the baseline does not hold for
  that model count; without one, every finding counts.
* A counted compile failure always fails.
* Graph breaks: the number of counted graph-break *sites* (distinct findings,
  not occurrences) must not exceed ``max_graph_breaks``, which is 0 when not
  given. The same for recompiles with ``max_recompiles``.
* Inductor fallbacks are informational unless ``max_fallbacks`` is given.

So with no flags and no baseline, any graph break, compile failure or
recompile fails; with only a baseline, any new one does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from graphfix.cli.baseline import Baseline, fixed_entries, new_findings
from graphfix.diagnose.findings import Finding, Kind
from graphfix.diagnose.report import Report
from graphfix.errors import InputError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_LISTED = 5
"""How many sites a reason names before it says "and N more"."""


@dataclasses.dataclass
class GateResult:
    """The verdict: ``exit_code``, one line per reason it failed, and notes that do not fail."""

    exit_code: int = EXIT_OK
    reasons: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    counted: dict[str, list[Finding]] = dataclasses.field(default_factory=dict)
    """Per model, the findings the gate judged (the new ones when a baseline is given)."""

    @property
    def passed(self) -> bool:
        return self.exit_code == EXIT_OK

    def summary(self) -> str:
        """Lines for stderr: ``graphfix gate: passed`` or ``failed`` and each reason, then notes."""
        head = "graphfix gate: passed" if self.passed else "graphfix gate: FAILED"
        lines = [head] + [f"  - {r}" for r in self.reasons] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _sites(findings: list[Finding]) -> str:
    locs = [f.location.short() if f.location else f.category.value for f in findings]
    shown = ", ".join(locs[:_LISTED])
    return shown + (f" and {len(locs) - _LISTED} more" if len(locs) > _LISTED else "")


def _check_budget(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise InputError(f"--{name} must be a whole number >= 0, got {value!r}")


def evaluate(
    reports: Report | Sequence[Report],
    *,
    baseline: Baseline | None = None,
    max_graph_breaks: int | None = None,
    max_recompiles: int | None = None,
    max_fallbacks: int | None = None,
) -> GateResult:
    """Judge the reports (see the module docstring for the rules); budgets apply per model."""
    _check_budget("max-graph-breaks", max_graph_breaks)
    _check_budget("max-recompiles", max_recompiles)
    _check_budget("max-fallbacks", max_fallbacks)
    reports = [reports] if isinstance(reports, Report) else list(reports)
    result = GateResult()
    new = " new" if baseline is not None else ""
    budgets = [
        (Kind.GRAPH_BREAK, "graph-break site", "max-graph-breaks", max_graph_breaks or 0),
        (Kind.RECOMPILE, "recompile", "max-recompiles", max_recompiles or 0),
    ]
    if max_fallbacks is not None:
        budgets.append((Kind.INDUCTOR_FALLBACK, "inductor fallback", "max-fallbacks", max_fallbacks))

    for report in reports:
        model = report.model
        if baseline is not None and model not in baseline:
            known = ", ".join(sorted(baseline.models)) or "no models"
            where = f" {baseline.path}" if baseline.path else ""
            result.notes.append(f"{model}: not in the baseline{where} (it has: {known}); every finding counts as new")
        counted = new_findings(report, baseline)
        result.counted[model] = counted

        failures = [f for f in counted if f.kind == Kind.COMPILE_FAILURE]
        if failures:
            result.reasons.append(
                f"{model}: {len(failures)}{new} compile failure{'s' if len(failures) != 1 else ''}"
                f" (always fatal): {_sites(failures)}"
            )
        for kind, noun, flag, budget in budgets:
            sites = [f for f in counted if f.kind == kind]
            if len(sites) > budget:
                plural = noun + ("s" if len(sites) != 1 else "")
                result.reasons.append(
                    f"{model}: {len(sites)}{new} {plural}, over the budget of {budget} (--{flag}): {_sites(sites)}"
                )
        fallbacks = [f for f in counted if f.kind == Kind.INDUCTOR_FALLBACK]
        if fallbacks and max_fallbacks is None:
            result.notes.append(
                f"{model}: {len(fallbacks)}{new} inductor fallback(s), informational (gate with --max-fallbacks N)"
            )
        if baseline is not None and model in baseline:
            gone = fixed_entries(report, baseline)
            if gone:
                result.notes.append(
                    f"{model}: {len(gone)} baselined finding(s) no longer occur; refresh with --write-baseline"
                )
    if result.reasons:
        result.exit_code = EXIT_FAILED
    return result


__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "GateResult", "evaluate"]
