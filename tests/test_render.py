"""Renderers: every format from hand-built reports, parsed back where the format allows."""

from __future__ import annotations

import io
import json
import os
import re
import xml.etree.ElementTree as ET

import pytest

from graphfix.diagnose.findings import Category, Finding, Kind, Location, Severity
from graphfix.diagnose.report import Report, RunStats
from graphfix.errors import InputError
from graphfix.render import (
    FORMATS,
    RENDERERS,
    render,
    render_json,
    render_junit,
    render_markdown,
    render_sarif,
    render_text,
    reports_from_json,
    sarif_dict,
    want_color,
)
from graphfix.render.text import COLUMNS, RIGHT_ALIGNED

SITE = os.path.join(os.sep, "venv", "lib", "python3.11", "site-packages")


def make_findings(root: str) -> list[Finding]:
    """One finding of each kind, plus a second break; ``root`` is where the user's model file lives."""
    model_py = os.path.join(root, "models", "model.py")
    llama_py = os.path.join(SITE, "transformers", "models", "llama", "modeling_llama.py")
    return [
        Finding(
            Kind.GRAPH_BREAK, Category.COMPLEX_ROPE,
            "torch.view_as_complex is not supported\n  Explanation: complex tensors are not traced",
            Location(model_py, 120, "apply_rotary_emb", "xq_ = torch.view_as_complex(xq.float().reshape(-1, 2))"),
            module_paths=["layers.*.attention"], gb_type="Unsupported op", fix_pass="rope_real",
            suggestion="Use the real-valued rotary embedding.", occurrences=12345,
        ),
        Finding(
            Kind.GRAPH_BREAK, Category.PYTHON_SIDE_EFFECT, "Failed to trace builtin operator `print`",
            Location(model_py, 77, "forward", 'print(f"shape | {x.shape}")'),
            module_paths=["<root>"], gb_type="Failed to trace builtin operator", occurrences=1,
        ),
        Finding(
            Kind.RECOMPILE, Category.DYNAMIC_CACHE, "recompiled: start_pos changed",
            Location(llama_py, 388, "forward", "if past_key_values is not None:"),
            guard="L['start_pos'] == 7  # attention.py:12", module_paths=["layers.*.self_attn"], occurrences=16,
            suggestion="Use a static cache with a tensor position.",
        ),
        Finding(
            Kind.COMPILE_FAILURE, Category.COLLECTIVE, "\x1b[31mall_reduce is not traceable\x1b[0m\x07",
            None, severity=Severity.ERROR, fix_pass="functional_collectives",
        ),
        Finding(
            Kind.INDUCTOR_FALLBACK, Category.UNSUPPORTED_OP, "aten._fft_r2c has no Inductor lowering",
            Location("<eval_with_key>.3", 5), severity=Severity.NOTE,
        ),
    ]


def make_report(root: str = ".", model: str = "smollm2-135m", findings: list[Finding] | None = None) -> Report:
    return Report(
        model=model, source="hf", backend="aot_eager", device="cpu", driver="generate",
        prefill_tokens=32, decode_steps=16,
        findings=make_findings(os.path.abspath(root)) if findings is None else findings,
        stats=RunStats(calls=17, graphs=5, graph_breaks=12346, recompiles=16),
        versions={"torch": "2.13.0"}, wall_seconds=12.34, peak_memory_mb=2100.0,
    )


def clean_report(model: str = "tiny-llama") -> Report:
    return make_report(model=model, findings=[])


# -- registry ---------------------------------------------------------------------------------------------------


def test_registry_names_every_format():
    assert set(RENDERERS) == {"text", "json", "markdown", "junit", "sarif"} == set(FORMATS)
    report = make_report()
    for fmt in FORMATS:
        single, several = render(fmt, report), render(fmt, [report, clean_report()])
        assert isinstance(single, str) and single.endswith("\n") and "smollm2-135m" in single
        assert "tiny-llama" in several


def test_unknown_format_is_an_input_error():
    with pytest.raises(InputError, match="unknown report format 'yaml'"):
        render("yaml", make_report())


def test_renderers_reject_non_reports():
    with pytest.raises(TypeError):
        render_text([{"model": "x"}])


# -- text -------------------------------------------------------------------------------------------------------


def _table(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("#  KIND"))
    end = lines.index("", start)
    return lines[start:end]


def test_text_header_and_summary(tmp_path):
    text = render_text(make_report(tmp_path))
    head = text.splitlines()[:4]
    assert head[0] == "graphfix report: smollm2-135m  [4 problems]"
    assert head[1] == "source hf, backend aot_eager, device cpu"
    assert head[2] == "driver generate: prefill 32 tokens + 16 decode steps; wall time 12.3 s; peak memory 2.1 GiB"
    assert head[3] == (
        "graphs 5 | graph breaks 2 sites / 12346 occurrences | compile failures 1 | recompiles 1"
        " | inductor fallbacks 1"
    )


def test_text_table_columns_are_aligned(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = _table(render_text(make_report(tmp_path)))
    assert len(rows) == 1 + 5
    header = rows[0]
    spans = {}
    for name in COLUMNS:
        at = header.index(name) if name != "#" else 0
        spans[name] = (at, at + len(name))
    for row in rows[1:]:
        for name, (start, end) in spans.items():
            if name in RIGHT_ALIGNED:  # right-aligned: the cell ends where the header ends
                assert row[end - 1] != " " and (end == len(row) or row[end] == " "), (name, row)
            else:  # left-aligned: the cell starts where the header starts, after the separator
                assert row[start] != " " and (start == 0 or row[start - 2:start] == "  "), (name, row)
    first = rows[1]  # compile failure sorts first (error)
    assert first.split()[:3] == ["1", "compile_failure", "collective"]
    assert re.search(r"models/model\.py:120 +layers\.\*\.attention +12345 +rope_real$", rows[2])
    assert rows[3].rstrip().endswith("1  -")  # no fix pass -> "-"


def test_text_details_message_guard_suggestion(tmp_path):
    text = render_text(make_report(tmp_path))
    assert "torch.view_as_complex is not supported" in text
    assert "Explanation: complex tensors" not in text  # first line of the message only
    assert "guard: L['start_pos'] == 7  # attention.py:12" in text
    assert "suggestion: Use a static cache with a tensor position." in text
    assert "fix pass: rope_real" in text
    assert "source in apply_rotary_emb: xq_ = torch.view_as_complex" in text
    assert "\x1b" not in text and "\x07" not in text  # colour codes in messages are removed
    assert "all_reduce is not traceable" in text


def test_text_clean_and_several_reports():
    text = render_text([make_report(), clean_report()])
    assert "graphfix report: tiny-llama  [clean]" in text
    assert "No findings" in text
    assert text.rstrip().splitlines()[-1] == "2 models, 1 clean: smollm2-135m: 4 problems; tiny-llama: clean"


def test_text_long_cells_are_clipped(tmp_path):
    deep = os.path.join(str(tmp_path), *["very_long_directory_name"] * 6, "model.py")
    f = Finding(Kind.GRAPH_BREAK, Category.OTHER, "x", Location(deep, 1), module_paths=["a" * 80])
    rows = _table(render_text(make_report(findings=[f])))
    assert all(len(r) < 200 for r in rows)
    cells = [c.strip() for c in rows[1].split("  ") if c.strip()]
    location = next(c for c in cells if c.endswith("/model.py:1"))
    assert location.startswith("...") and len(location) == 60  # clipped from the left: the file name stays
    assert "a" * 37 + "..." in cells  # module paths are clipped from the right


def test_text_colour_only_when_asked(monkeypatch):
    report = make_report()
    assert "\x1b[" not in render_text(report)
    coloured = render_text(report, color=True)
    assert "\x1b[31m" in coloured
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured) == render_text(report)  # colour never moves a column

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    assert want_color(Tty()) and not want_color(io.StringIO()) and not want_color(None)
    monkeypatch.setenv("NO_COLOR", "1")
    assert not want_color(Tty())


# -- json -------------------------------------------------------------------------------------------------------


def test_json_single_round_trip():
    report = make_report()
    data = json.loads(render_json(report))
    assert data["schema"] == "graphfix.diagnose.report"
    assert Report.from_dict(data).to_dict() == report.to_dict()
    assert json.loads(render_json([report])) == data  # a list of one is the plain report


def test_json_several_reports():
    reports = [make_report(), clean_report()]
    text = render_json(reports)
    data = json.loads(text)
    assert data["schema"] == "graphfix.reports" and data["schema_version"] == 1
    assert [r["model"] for r in data["reports"]] == ["smollm2-135m", "tiny-llama"]
    back = reports_from_json(text)
    assert [r.to_dict() for r in back] == [r.to_dict() for r in reports]
    with pytest.raises(ValueError, match="not a graphfix report"):
        reports_from_json('{"schema": "other"}')


# -- markdown ---------------------------------------------------------------------------------------------------


def _cells(row: str) -> list[str]:
    """Split a GFM table row on unescaped pipes."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def test_markdown_summary_and_findings_tables(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    md = render_markdown([make_report(tmp_path), clean_report()])
    lines = md.splitlines()
    tables: list[list[str]] = []
    current: list[str] = []
    for ln in lines + [""]:
        if ln.startswith("|"):
            current.append(ln)
        elif current:
            tables.append(current)
            current = []
    summary, findings = tables  # one summary table; one findings table (the clean model has none)
    assert len(summary) == 2 + 2
    assert _cells(summary[2])[:7] == ["`smollm2-135m`", "\u274c 4 problems", "5", "2 / 12346", "1", "1", "1"]
    assert _cells(summary[3])[1] == "\u2705 clean"
    assert len(findings) == 2 + 5
    width = len(_cells(findings[0]))
    assert all(len(_cells(r)) == width for r in findings)  # the '|' in a source line is escaped
    rope = _cells(findings[3])
    assert rope[3] == "`models/model.py:120`"
    assert rope[4] == "`xq_ = torch.view_as_complex(xq.float().reshape(-1, 2))`"
    assert rope[5:] == ["`layers.*.attention`", "12345", "`rope_real`"]
    printed = _cells(findings[4])
    assert printed[4] == '`print(f"shape \\| {x.shape}")`'
    assert "### smollm2-135m: 4 problems" in md and "### tiny-llama" not in md
    assert "<details><summary>Details</summary>" in md and "guard: `L['start_pos'] == 7 # attention.py:12`" in md


def test_markdown_code_spans_with_backticks_and_row_cap():
    f = Finding(Kind.GRAPH_BREAK, Category.OTHER, "m", Location("x.py", 3, "f", "s = `cmd` + ``x``"))
    md = render_markdown(make_report(findings=[f] * 3), max_findings=2)
    assert "``` s = `cmd` + ``x`` ```" in md
    assert "... and 1 more findings" in md


# -- junit ------------------------------------------------------------------------------------------------------


def test_junit_suites_testcases_failures():
    reports = [make_report(), clean_report()]
    root = ET.fromstring(render_junit(reports))
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["smollm2-135m", "tiny-llama"]
    for suite in suites:
        cases = suite.findall("testcase")
        assert [c.get("name") for c in cases] == [
            "no graph breaks", "no compile failures", "no recompiles", "no inductor fallbacks"]
        assert {c.get("classname") for c in cases} == {suite.get("name")}
    bad, good = suites
    per_case = {c.get("name"): c.findall("failure") for c in bad.findall("testcase")}
    assert [len(per_case[n]) for n in per_case] == [2, 1, 1, 1]
    assert bad.get("tests") == "4" and bad.get("failures") == "4"
    assert good.get("failures") == "0" and not good.findall(".//failure")
    assert root.get("tests") == "8" and root.get("failures") == "4"
    rope = per_case["no graph breaks"][0]
    assert rope.get("message") == "complex_rope at models/model.py:120"
    assert rope.get("type") == "graph_break"
    assert "occurrences: 12345" in rope.text and "fix pass: rope_real" in rope.text
    failure = per_case["no compile failures"][0]
    assert failure.get("message") == "collective at -"
    assert "\x1b" not in failure.text and "\x07" not in failure.text
    props = {p.get("name"): p.get("value") for p in bad.find("properties")}
    assert props["backend"] == "aot_eager" and props["torch"] == "2.13.0"


def test_junit_survives_characters_xml_forbids():
    f = Finding(Kind.GRAPH_BREAK, Category.OTHER, "bad \x00\x1b[1m byte \ufffe", Location("a.py", 1))
    root = ET.fromstring(render_junit(make_report(model="m\x01odel", findings=[f])))
    assert root.find("testsuite").get("name") == "model"
    assert "bad" in root.find(".//failure").text


# -- sarif ------------------------------------------------------------------------------------------------------


def test_sarif_log_structure(tmp_path):
    log = json.loads(render_sarif([make_report(tmp_path), clean_report()], root=tmp_path))
    assert log["$schema"] == "https://json.schemastore.org/sarif-2.1.0.json"
    assert log["version"] == "2.1.0"
    assert len(log["runs"]) == 1
    run = log["runs"][0]
    driver = run["tool"]["driver"]
    assert driver["name"] == "graphfix" and driver["version"]
    rules = driver["rules"]
    assert [r["id"] for r in rules] == [f"graphfix/{c.value}" for c in Category]
    for rule in rules:
        assert rule["shortDescription"]["text"] and rule["help"]["text"] and rule["fullDescription"]["text"]
    rope_rule = rules[[r["id"] for r in rules].index("graphfix/complex_rope")]
    assert "rope_real" in rope_rule["help"]["text"]

    results = run["results"]
    assert len(results) == 5
    for res in results:
        assert rules[res["ruleIndex"]]["id"] == res["ruleId"]
        assert res["level"] in {"error", "warning", "note"}
        assert res["message"]["text"].strip()
        assert len(res["locations"]) == 1  # code scanning rejects results without one
        art = res["locations"][0]["physicalLocation"]["artifactLocation"]
        assert art["uri"] and not art["uri"].startswith("/")
        assert re.fullmatch(r"[0-9a-f]{16}", res["partialFingerprints"]["graphfixKey/v1"])
        region = res["locations"][0]["physicalLocation"].get("region")
        if region is not None:
            assert isinstance(region["startLine"], int) and region["startLine"] >= 1
    for base in run.get("originalUriBaseIds", {}).values():
        assert base["uri"].startswith("file:///") and base["uri"].endswith("/")


def test_sarif_results_levels_paths_lines(tmp_path):
    report = make_report(tmp_path)
    run = sarif_dict(report, root=tmp_path)["runs"][0]
    by_kind = {r["properties"]["kind"]: r for r in run["results"]}
    rope = next(r for r in run["results"] if r["ruleId"] == "graphfix/complex_rope")
    loc = rope["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"] == {"uri": "models/model.py", "uriBaseId": "%SRCROOT%"}
    assert loc["region"]["startLine"] == 120
    assert loc["region"]["snippet"]["text"].startswith("xq_ = torch.view_as_complex")
    assert rope["level"] == "warning" and rope["occurrenceCount"] == 12345
    assert rope["partialFingerprints"]["graphfixKey/v1"] == report.findings[0].key()
    assert run["originalUriBaseIds"]["%SRCROOT%"]["uri"] == tmp_path.resolve().as_uri() + "/"

    recompile = by_kind["recompile"]
    art = recompile["locations"][0]["physicalLocation"]["artifactLocation"]
    assert art == {"uri": "transformers/models/llama/modeling_llama.py", "uriBaseId": "SITE_PACKAGES"}
    assert recompile["locations"][0]["physicalLocation"]["region"]["startLine"] == 388
    assert "L['start_pos'] == 7" in recompile["message"]["text"]
    assert run["originalUriBaseIds"]["SITE_PACKAGES"]["uri"].endswith("/site-packages/")

    assert by_kind["compile_failure"]["level"] == "error"
    assert "\x1b" not in by_kind["compile_failure"]["message"]["text"]
    assert by_kind["compile_failure"]["locations"][0]["physicalLocation"]["artifactLocation"]["uriBaseId"] == "MODEL"
    assert by_kind["inductor_fallback"]["level"] == "note"


def test_sarif_file_outside_root_is_an_absolute_file_uri(tmp_path):
    outside = tmp_path / "elsewhere" / "m.py"
    f = Finding(Kind.GRAPH_BREAK, Category.OTHER, "x", Location(str(outside), 9))
    run = sarif_dict(make_report(findings=[f]), root=tmp_path / "repo")["runs"][0]
    art = run["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]
    assert art == {"uri": outside.as_uri()}


def test_markdown_pipes_are_escaped_only_inside_tables():
    md = render_markdown(make_report())
    table_row = next(ln for ln in md.splitlines() if ln.startswith("|") and "print(" in ln)
    detail = next(ln for ln in md.splitlines() if ln.lstrip().startswith("- source in forward: `print("))
    assert '`print(f"shape \\| {x.shape}")`' in table_row
    assert detail.endswith('`print(f"shape | {x.shape}")`')
