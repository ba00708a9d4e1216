"""What a new user meets in the first hour: clean stdout, progress, baselines in reports, the next step.

* stdout holds only the requested output (JSON from ``report``, ``generate --json``, ``optimize
  --format json``), also when fairscale or the model print, from Python or C; ``-q`` hides the
  libraries' progress bars;
* Markdown and SARIF against a baseline count and mark only what is new;
* the text report ends with the ``graphfix optimize`` command that applies its fix passes;
* a long phase gets heartbeat lines saying what is running;
* ``generate`` finds the ``tokenizer.json`` that ``convert`` puts in a Meta folder, prints no
  special tokens (once, while streaming), and counts the tokens it returns.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from graphfix.cli.generate_cmd import TextStream, eos_ids
from graphfix.cli.next_step import next_step
from graphfix.cli.progress import Progress, describe_stack
from graphfix.diagnose.findings import Category, Finding, Kind, Location
from graphfix.diagnose.grouping import past_decorators
from graphfix.render import render_markdown, sarif_dict
from tests.test_render import make_report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_meta(tmp_path_factory) -> Path:
    """A 1-layer Meta folder with a word-level tokenizer.json and no config.json, as convert leaves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from graphfix.convert import convert
    from tests.fixtures.tiny_hf import tiny_hf

    root = tmp_path_factory.mktemp("first-hour")
    tiny_hf("llama", num_hidden_layers=1).save_pretrained(root / "hf")
    meta = Path(convert(root / "hf", root / "meta", to="meta", progress=False))
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(126)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<eos>"])
    tok.save(str(meta / "tokenizer.json"))
    return meta


STDOUT_SCRIPT = textwrap.dedent("""
    import os, sys
    from graphfix.cli.app import main
    meta, hf = sys.argv[1], sys.argv[2]
    runs = [
        ["report", meta, "--format", "json", "--no-hidden", "--no-fullgraph-check", "--prefill", "2",
         "--decode-steps", "1", "--backend", "eager", "--max-graph-breaks", "99", "--max-recompiles", "99"],
        ["report", "tests.fixtures.fuzz_builders:noisy_tiny_hf", "--format", "json", "--no-hidden",
         "--no-fullgraph-check", "--prefill", "2", "--decode-steps", "1", "--backend", "eager",
         "--max-graph-breaks", "99", "--max-recompiles", "99"],
        ["generate", meta, "--prompt", "w3 w4", "--max-new-tokens", "3", "--no-compile", "--json"],
        ["optimize", hf, "--no-diagnose", "--backend", "eager", "--prefill", "2", "--decode-steps", "2",
         "--format", "json"],
    ]
    for argv in runs:
        code = main(["-q", *argv])
        sys.stdout.flush()
        os.write(1, f"\\x1e{code}\\x1e".encode())
""")


def test_stdout_is_only_the_requested_output(tiny_meta: Path) -> None:
    """``graphfix -q CMD ... | python -m json.tool`` works: fairscale's and the model's prints go elsewhere."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", STDOUT_SCRIPT, str(tiny_meta), str(tiny_meta.parent / "hf")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = proc.stdout.split("\x1e")
    documents, codes = parts[0:-1:2], parts[1::2]
    assert codes == ["0", "0", "0", "0"], proc.stderr[-3000:]
    report, noisy, generated, optimized = (json.loads(d) for d in documents)
    assert report["schema"] == "graphfix.diagnose.report" and report["source"] == "meta"
    assert noisy["schema"] == "graphfix.diagnose.report"
    assert isinstance(generated["text"][0], str) and optimized["schema"] == "graphfix.optimize"
    assert "initializing model parallel" not in proc.stdout + proc.stderr  # fairscale's lines: dropped
    assert "noise from print" in proc.stderr and "noise from fd 1" in proc.stderr  # the model's: on stderr
    assert "Loading weights" not in proc.stderr  # transformers' progress bar: -q hides it


# -- reports against a baseline -----------------------------------------------------------------------------------


def test_markdown_and_sarif_count_and_mark_only_new_findings() -> None:
    report = make_report()
    problems = [f for f in report.findings if f.kind != Kind.INDUCTOR_FALLBACK]
    known = {report.model: {f.key() for f in report.findings}}
    markdown = render_markdown(report, baseline_keys=known)
    assert "no new problems (4 in the baseline)" in markdown and "4 problems" not in markdown
    assert markdown.count("| unchanged |") == len(report.findings)
    sarif = sarif_dict(report, baseline_keys=known)
    assert {r["baselineState"] for r in sarif["runs"][0]["results"]} == {"unchanged"}

    one_new = {report.model: {f.key() for f in report.findings} - {problems[0].key()}}
    markdown = render_markdown(report, baseline_keys=one_new)
    assert "1 new problem (3 in the baseline)" in markdown and markdown.count("**new**") == 1
    states = [r["baselineState"] for r in sarif_dict(report, baseline_keys=one_new)["runs"][0]["results"]]
    assert states.count("new") == 1 and states.count("unchanged") == len(states) - 1
    assert "baselineState" not in json.dumps(sarif_dict(report))  # no baseline: no state claimed
    unknown_model = render_markdown(report, baseline_keys={"another-model": set()})
    assert "4 new problems" in unknown_model


def test_sarif_messages_are_separate_sentences() -> None:
    for result in sarif_dict(make_report())["runs"][0]["results"]:
        text = result["message"]["text"]
        assert text.endswith(".") and ": Model " not in text and ":." not in text, text
    recompile = next(r for r in sarif_dict(make_report())["runs"][0]["results"] if r["properties"]["guard"])
    assert "# attention.py:12. Use a static cache" in recompile["message"]["text"]  # the guard, then the advice


def test_a_decorator_line_is_moved_to_the_def_it_decorates(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("class M:\n    @deprecate_kwarg('a', '1')\n    @can_return_tuple\n    def forward(self, x):\n"
                   "        return x\n")
    moved = past_decorators(Location(str(src), 2, "wrapped_func", ""))
    assert (moved.line, moved.function, moved.source) == (4, "forward", "def forward(self, x):")
    plain = Location(str(src), 5, "forward", "return x")
    assert past_decorators(plain) is plain


# -- the next step ------------------------------------------------------------------------------------------------


def test_the_text_report_ends_with_the_optimize_command(tmp_path: Path) -> None:
    fixed = make_report(findings=[Finding(Kind.RECOMPILE, Category.DYNAMIC_CACHE, "recompiled",
                                          Location("x.py", 3), fix_pass="static-kv-cache")])
    hint = next_step([fixed], ["smollm2"], "my pkg.loop:run")
    assert hint == "next: graphfix optimize smollm2 --driver 'my pkg.loop:run' --verify  (applies static-kv-cache)"
    config_only = tmp_path / "config.json"
    config_only.write_text("{}")
    assert next_step([fixed], [str(config_only)], None) == ""  # no weights to rewrite
    assert next_step([make_report(findings=[])], ["smollm2"], None) == ""

    from graphfix.cli.app import build_parser, emit_reports

    args = build_parser().parse_args(["-q", "report", "smollm2", "-o", str(tmp_path / "r.txt"),
                                      "--max-recompiles", "5"])
    assert emit_reports([fixed], args, specs=["smollm2"]) == 0
    assert (tmp_path / "r.txt").read_text().rstrip().splitlines()[-1].startswith("next: graphfix optimize smollm2")


# -- progress -----------------------------------------------------------------------------------------------------


def test_a_silent_phase_gets_heartbeats_that_say_what_runs() -> None:
    out = io.StringIO()
    with Progress(False, heartbeat=0.05, stream=out) as say:
        say("compiling the decode step")
        time.sleep(0.4)
        say.paused = True
        paused_at = out.getvalue().count("...")
        time.sleep(0.3)
        assert out.getvalue().count("...") == paused_at  # streamed output shows life: no heartbeat inside it
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("] compiling the decode step")
    beats = [ln for ln in lines if "... compiling the decode step:" in ln]
    assert beats and all("s so far" in ln for ln in beats)
    quiet = io.StringIO()
    with Progress(True, heartbeat=0.05, stream=quiet) as say:
        say("loading")
        time.sleep(0.2)
    assert quiet.getvalue() == ""
    assert describe_stack(sys._getframe()).startswith("running test_a_silent_phase")


def test_the_first_heartbeat_of_a_phase_comes_sooner_than_the_next() -> None:
    """A phase says something after a few seconds of silence, then every ``heartbeat`` seconds."""
    out = io.StringIO()
    progress = Progress(False, heartbeat=30.0, stream=out)
    progress.first_heartbeat = 0.05  # FIRST_HEARTBEAT_S, scaled down
    with progress as say:
        say("loading")
        time.sleep(0.5)
    assert out.getvalue().count("... loading:") == 1  # the first, early; the next only after 30 s


# -- generate -----------------------------------------------------------------------------------------------------


class _Words:
    """A tokenizer stand-in: id i decodes to w{i}; id 1 is the special end-of-turn token."""

    eos_token_id = 1

    def decode(self, ids, skip_special_tokens=False):
        return " ".join("<eot>" if i == 1 else f"w{i}" for i in ids if not (skip_special_tokens and i == 1))


def test_streamed_text_has_no_special_tokens_and_stops_at_the_first_eos() -> None:
    out = io.StringIO()
    stream = TextStream(_Words(), [1], out)
    for tokens in ([[5]], [[6]], [[1]], [[1]], [[1]]):  # a finished row keeps stepping on the pad (= EOS) token
        stream(SimpleNamespace(tokens=torch.tensor(tokens)))
    assert out.getvalue() == "w5 w6"
    ids = TextStream(None, [1], io.StringIO())
    for tokens in ([[5, 6]], [[1, 1]]):
        ids(SimpleNamespace(tokens=torch.tensor(tokens)))
    assert ids.out.getvalue() == "5 6 1 "


def test_eos_ids_gathers_every_source(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    model = SimpleNamespace(config=SimpleNamespace(eos_token_id=2), generation_config=None)
    assert eos_ids(_Words(), model, str(tmp_path)) == [1, 2, 7]


def test_generate_uses_the_tokenizer_json_of_a_meta_folder(tiny_meta: Path, capsys) -> None:
    from graphfix.cli.app import main

    code = main(["-q", "generate", str(tiny_meta), "--prompt", "w3 w9 w4", "--max-new-tokens", "4", "--no-compile",
                 "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    assert isinstance(out["text"][0], str) and "<eos>" not in out["text"][0]
    assert main(["generate", str(tiny_meta), "--prompt-ids", "3,9", "--max-new-tokens", "3", "--no-compile"]) == 0
    captured = capsys.readouterr()
    said = re.search(r"\] (\d+) tokens? per row", captured.err)
    assert said and int(said.group(1)) == len(captured.out.split())  # the count said is the count returned


def test_the_text_report_lists_findings_also_when_some_were_hidden() -> None:
    from graphfix.render import render_text

    report = make_report()
    report.findings[1].hidden_behind = "torch.view_as_complex is not supported (models/model.py:120)"
    text = render_text(report)
    assert "1 of these appear only once the findings before them are fixed" in text
    assert "#  KIND" in text and "models/model.py:77" in text and "hidden behind: torch.view_as_complex" in text


def test_every_command_takes_both_dtype_spellings() -> None:
    """``--dtype bf16`` and ``--dtype bfloat16`` mean the same in convert, generate, optimize and verify."""
    from graphfix.cli.app import build_parser
    from graphfix.cli.preflight import DTYPES
    from graphfix.convert.spec import parse_dtype

    parser = build_parser()
    for short, long in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")):
        for argv in (["convert", "a", "b", "--to", "hf"], ["generate", "m"], ["optimize", "m"], ["verify", "m"]):
            parsed = [parser.parse_args([*argv, "--dtype", s]).dtype for s in (short, long)]
            as_dtypes = [parse_dtype(p) if argv[0] == "convert" else DTYPES[p] for p in parsed]
            assert as_dtypes[0] == as_dtypes[1] == DTYPES[long], (argv[0], parsed)
