"""The CI gate: exit codes, budgets, baselines."""

from __future__ import annotations

import dataclasses

import pytest

from graphfix.cli.baseline import Baseline
from graphfix.cli.gate import EXIT_FAILED, EXIT_OK, EXIT_USAGE, evaluate
from graphfix.diagnose.findings import Category, Finding, Kind, Location, Severity
from graphfix.errors import InputError
from tests.test_render import clean_report, make_report


def finding(kind: Kind, line: int, occurrences: int = 1) -> Finding:
    severity = {Kind.COMPILE_FAILURE: Severity.ERROR, Kind.INDUCTOR_FALLBACK: Severity.NOTE}.get(kind, Severity.WARNING)
    return Finding(kind, Category.OTHER, f"{kind.value} at {line}", Location("/repo/model.py", line),
                   occurrences=occurrences, severity=severity)


def report_of(*findings: Finding, model: str = "m"):
    return make_report(model=model, findings=list(findings))


def test_exit_codes_are_documented_values():
    assert (EXIT_OK, EXIT_FAILED, EXIT_USAGE) == (0, 1, 2)


def test_clean_report_passes():
    result = evaluate([clean_report()])
    assert result.exit_code == 0 and result.passed and result.reasons == []
    assert result.summary() == "graphfix gate: passed"


@pytest.mark.parametrize("kind", [Kind.GRAPH_BREAK, Kind.RECOMPILE, Kind.COMPILE_FAILURE])
def test_without_flags_any_break_failure_or_recompile_fails(kind):
    result = evaluate(report_of(finding(kind, 10)))
    assert result.exit_code == 1
    assert len(result.reasons) == 1 and result.reasons[0].startswith("m: 1 ")
    assert "/repo/model.py:10" in result.reasons[0]
    assert "FAILED" in result.summary()


def test_fallbacks_are_informational_unless_budgeted():
    report = report_of(finding(Kind.INDUCTOR_FALLBACK, 5), finding(Kind.INDUCTOR_FALLBACK, 6))
    result = evaluate(report)
    assert result.exit_code == 0 and "informational" in result.notes[0]
    assert evaluate(report, max_fallbacks=2).exit_code == 0
    over = evaluate(report, max_fallbacks=1)
    assert over.exit_code == 1 and "2 inductor fallbacks, over the budget of 1 (--max-fallbacks)" in over.reasons[0]


def test_graph_break_budget_counts_sites_not_occurrences():
    report = report_of(finding(Kind.GRAPH_BREAK, 1, occurrences=500), finding(Kind.GRAPH_BREAK, 2, occurrences=30))
    assert evaluate(report, max_graph_breaks=2).exit_code == 0
    result = evaluate(report, max_graph_breaks=1)
    assert result.exit_code == 1
    assert result.reasons == [
        "m: 2 graph-break sites, over the budget of 1 (--max-graph-breaks): /repo/model.py:1, /repo/model.py:2"
    ]
    # A graph-break budget does not excuse recompiles (their budget is still 0).
    both = report_of(finding(Kind.GRAPH_BREAK, 1), finding(Kind.RECOMPILE, 9))
    assert evaluate(both, max_graph_breaks=5).exit_code == 1
    assert evaluate(both, max_graph_breaks=5, max_recompiles=1).exit_code == 0


def test_compile_failures_always_fail_unless_baselined():
    report = report_of(finding(Kind.COMPILE_FAILURE, 3))
    assert evaluate(report, max_graph_breaks=99, max_recompiles=99).exit_code == 1
    assert "always fatal" in evaluate(report).reasons[0]
    assert evaluate(report, baseline=Baseline.from_reports(report)).exit_code == 0


def test_baseline_fails_only_on_new_findings():
    old = report_of(finding(Kind.GRAPH_BREAK, 1), finding(Kind.RECOMPILE, 2))
    baseline = Baseline.from_reports(old)
    assert evaluate(old, baseline=baseline).exit_code == 0

    new_break = finding(Kind.GRAPH_BREAK, 7)
    now = report_of(*old.findings, new_break)
    result = evaluate(now, baseline=baseline)
    assert result.exit_code == 1
    assert result.reasons == ["m: 1 new graph-break site, over the budget of 0 (--max-graph-breaks): /repo/model.py:7"]
    assert result.counted["m"] == [new_break]
    # Budgets apply to what is left after the baseline: one new site fits a budget of one.
    assert evaluate(now, baseline=baseline, max_graph_breaks=1).exit_code == 0


def test_fixed_baseline_entries_are_a_note_not_a_failure():
    old = report_of(finding(Kind.GRAPH_BREAK, 1), finding(Kind.GRAPH_BREAK, 2))
    result = evaluate(report_of(finding(Kind.GRAPH_BREAK, 1)), baseline=Baseline.from_reports(old))
    assert result.exit_code == 0
    assert any("1 baselined finding(s) no longer occur" in n for n in result.notes)


def test_budgets_apply_per_model_and_reasons_name_the_model():
    a = report_of(finding(Kind.GRAPH_BREAK, 1), model="a")
    b = report_of(finding(Kind.GRAPH_BREAK, 1), finding(Kind.GRAPH_BREAK, 2), model="b")
    result = evaluate([a, b], max_graph_breaks=1)
    assert result.exit_code == 1 and len(result.reasons) == 1 and result.reasons[0].startswith("b: 2 ")


def test_model_missing_from_baseline_counts_everything_and_says_so():
    baseline = Baseline.from_reports(report_of(finding(Kind.GRAPH_BREAK, 1), model="a"))
    baseline.path = "ci/baseline.json"
    result = evaluate(report_of(finding(Kind.GRAPH_BREAK, 1), model="b"), baseline=baseline)
    assert result.exit_code == 1
    assert result.notes[0] == "b: not in the baseline ci/baseline.json (it has: a); every finding counts as new"


def test_many_sites_are_summarised():
    report = report_of(*[finding(Kind.GRAPH_BREAK, i) for i in range(1, 9)])
    assert evaluate(report).reasons[0].endswith("/repo/model.py:5 and 3 more")


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_bad_budget_is_an_input_error(bad):
    with pytest.raises(InputError, match="--max-graph-breaks must be a whole number"):
        evaluate(clean_report(), max_graph_breaks=bad)


def test_occurrence_changes_do_not_change_keys():
    f = finding(Kind.RECOMPILE, 4)
    assert dataclasses.replace(f, occurrences=7).key() == f.key()
