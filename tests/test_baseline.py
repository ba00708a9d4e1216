"""Baseline files: write, read back, corrupt input, and which findings are new."""

from __future__ import annotations

import dataclasses
import json
import os
import stat

import pytest

from graphfix.cli.baseline import Baseline, fixed_entries, load_baseline, new_findings, write_baseline
from graphfix.diagnose.findings import Category, Finding, Kind, Location
from graphfix.errors import InputError
from tests.test_render import clean_report, make_report


def test_round_trip(tmp_path):
    report = make_report(tmp_path)
    path = tmp_path / "graphfix-baseline.json"
    written = write_baseline([report, clean_report()], path)
    data = json.loads(path.read_text())
    assert data["schema"] == "graphfix.cli.baseline" and data["schema_version"] == 1
    assert set(data["models"]) == {"smollm2-135m", "tiny-llama"} and data["models"]["tiny-llama"] == []
    entries = data["models"]["smollm2-135m"]
    assert {e["key"] for e in entries} == {f.key() for f in report.findings}
    rope = next(e for e in entries if e["category"] == "complex_rope")
    assert rope["kind"] == "graph_break"
    assert rope["location"].endswith("model.py:120")
    assert rope["message"] == "torch.view_as_complex is not supported"  # first line only
    loaded = load_baseline(path)
    assert loaded.models == written.models and loaded.path == str(path)
    assert new_findings(report, loaded) == []


def test_write_is_atomic_and_shareable(tmp_path):
    path = tmp_path / "b.json"
    path.write_text("old")
    write_baseline(make_report(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]  # no temporary file left behind
    assert json.loads(path.read_text())["schema"] == "graphfix.cli.baseline"
    new = tmp_path / "new.json"
    write_baseline(make_report(), new)
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o644


def test_write_into_missing_directory_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot write baseline"):
        write_baseline(make_report(), tmp_path / "no" / "such" / "b.json")


def test_same_model_twice_is_merged_without_duplicates():
    report = make_report()
    baseline = Baseline.from_reports([report, report])
    assert len(baseline.models["smollm2-135m"]) == len(report.findings)


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "baseline file not found"),
        ("{not json", "is not valid JSON \\(line 1, column 2"),
        ('{"schema": "graphfix.diagnose.report"}', "malformed: not a graphfix baseline"),
        ('{"schema": "graphfix.cli.baseline", "schema_version": 9, "models": {}}', "version 9 is newer"),
        ('{"schema": "graphfix.cli.baseline", "schema_version": 1, "models": []}', "'models' must be an object"),
        ('{"schema": "graphfix.cli.baseline", "schema_version": 1, "models": {"m": [{"kind": "x"}]}}', "no string 'key'"),
        ("[1, 2]", "not a graphfix baseline"),
    ],
)
def test_load_errors_are_one_line(tmp_path, content, match):
    path = tmp_path / "baseline.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=match) as info:
        load_baseline(path)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_new_finding_is_new_and_baselined_one_is_not(tmp_path):
    report = make_report(tmp_path)
    baseline = write_baseline(report, tmp_path / "b.json")
    moved = dataclasses.replace(report.findings[0], location=dataclasses.replace(report.findings[0].location, line=121))
    extra = Finding(Kind.GRAPH_BREAK, Category.DATA_DEPENDENT, "item()", Location(str(tmp_path / "m.py"), 3))
    more = dataclasses.replace(report.findings[1], occurrences=999)  # a known break hit more often is not new
    later = make_report(tmp_path, findings=[moved, extra, more, *report.findings[2:]])
    assert new_findings(later, baseline) == [moved, extra]
    gone = fixed_entries(later, baseline)
    assert [e.key for e in gone] == [report.findings[0].key()]


def test_model_missing_from_baseline_has_only_new_findings(tmp_path):
    baseline = write_baseline(make_report(tmp_path), tmp_path / "b.json")
    other = make_report(tmp_path, model="other-model")
    assert "other-model" not in baseline and baseline.keys("other-model") is None
    assert new_findings(other, baseline) == other.findings
    assert new_findings(other, None) == other.findings
