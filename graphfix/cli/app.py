"""The ``graphfix`` command line.

Exit codes (documented in docs/reports.md): 0 clean or within budget, 1 over
budget or verification failed, 2 usage or input error. User errors print one
line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from graphfix.cli.progress import Progress
from graphfix.convert.atomic import atomic_write
from graphfix.errors import GraphfixError, InputError

EXIT_OK, EXIT_OVER_BUDGET, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors; graphfix prints them as its other errors: one line, and where to look."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"graphfix: error: {self.prog}: {message} (see {self.prog} --help)\n")


def progress_printer(quiet: bool) -> Progress:
    """Progress lines on stderr with elapsed seconds, so long compiles show life (``with`` it for a heartbeat)."""
    return Progress(quiet)


def write_output(text: str, output: str | None) -> None:
    """Write to the requested stdout, or atomically to a file (no partial file on failure)."""
    from graphfix.cli.streams import requested_output

    text = text if text.endswith("\n") else text + "\n"
    if not output:
        out = requested_output()
        out.write(text)
        out.flush()
        return
    target = Path(output)
    if not target.parent.exists():
        raise GraphfixError(f"output folder {target.parent} does not exist")
    try:
        atomic_write(target, text)
    except OSError as exc:
        raise GraphfixError(f"cannot write {target}: {exc.strerror or type(exc).__name__}",
                            hint="choose a writable location") from None


def add_report_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="diagnose graph breaks, recompiles and fallbacks over prefill + decode")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="HF dir, config.json, .gguf, Meta folder, 'smollm2' or package.module:function")
    p.add_argument("--backend", default="auto", choices=["auto", "eager", "aot_eager", "inductor"],
                   help="auto (default): the loop on Dynamo's eager backend (graph breaks and recompiles are "
                        "Dynamo's), then the prefill once more with aot_eager to catch failures in AOT autograd "
                        "(skipped on the meta device); inductor also lists ATen fallbacks")
    p.add_argument("--inductor", action="store_true", help="also compile with inductor to list ATen fallbacks")
    p.add_argument("--meta-device", action="store_true", help="build from config.json on the meta device, no weights")
    add_driver_argument(p)
    p.add_argument("--no-hidden", action="store_true",
                   help="do not look for breaks hidden behind the first ones (on a scratch copy with the fixes)")
    p.add_argument("--prefill", type=int, default=8, help="prompt length for the prefill (default 8)")
    p.add_argument("--decode-steps", type=int, default=16, help="decode steps after the prefill (default 16)")
    p.add_argument("--no-fullgraph-check", action="store_true", help="skip the fullgraph=True run")
    p.add_argument("--format", default="text", choices=["text", "json", "markdown", "junit", "sarif"])
    p.add_argument("--output", "-o", help="write the report to FILE instead of stdout")
    p.add_argument("--also", action="append", default=[], metavar="FORMAT=FILE",
                   help="write another format too, e.g. --also sarif=graphfix.sarif (repeatable)")
    p.add_argument("--write-baseline", metavar="FILE",
                   help="record today's findings as the baseline (missing folders are created)")
    p.add_argument("--baseline", metavar="FILE", help="fail only on findings not in this baseline")
    p.add_argument("--max-graph-breaks", type=int, metavar="N", help="graph-break sites allowed (default 0)")
    p.add_argument("--max-recompiles", type=int, metavar="N", help="recompiles allowed (default 0)")
    p.add_argument("--max-fallbacks", type=int, metavar="N", help="Inductor fallbacks allowed (default: not gated)")
    p.set_defaults(func=run_report)


def check_report_args(args: argparse.Namespace) -> tuple[list[tuple[str, str]], Any]:
    """Every argument of ``report`` checked before any model loads; returns ``(--also outputs, baseline)``."""
    from graphfix.cli import preflight
    from graphfix.cli.baseline import load_baseline

    preflight.whole(args.prefill, "--prefill", minimum=1, maximum=preflight.MAX_PREFILL)
    preflight.whole(args.decode_steps, "--decode-steps", minimum=1, maximum=preflight.MAX_DECODE_STEPS)
    for flag in ("max_graph_breaks", "max_recompiles", "max_fallbacks"):
        preflight.whole(getattr(args, flag, None), "--" + flag.replace("_", "-"))
    extra = [_parse_also(item) for item in args.also]
    preflight.check_output(args.output, "--output")
    for fmt, path in extra:
        preflight.check_output(path, f"--also {fmt}=")
    preflight.check_output(args.write_baseline, "--write-baseline", create_parents=True)
    preflight.distinct_outputs([("--output", args.output), *((f"--also {f}", p) for f, p in extra),
                                ("--write-baseline", args.write_baseline)])
    baseline = load_baseline(args.baseline) if args.baseline else None
    return extra, baseline


def run_report(args: argparse.Namespace) -> int:
    from graphfix.cli.streams import output_only_on_stdout, third_party_quiet
    from graphfix.diagnose import sources
    from graphfix.diagnose.diagnosis import diagnose

    extra, baseline = check_report_args(args)
    with Progress(args.quiet) as say, third_party_quiet(args.quiet), output_only_on_stdout():
        driver = sources.load_driver(args.driver) if args.driver else None
        reports = []
        for spec in args.models:
            say(f"loading {spec}")
            loaded = sources.load(spec, meta_device=args.meta_device)
            if loaded.positions and args.prefill + args.decode_steps > loaded.positions:
                raise InputError(f"--prefill {args.prefill} + --decode-steps {args.decode_steps} is more than the "
                                 f"{loaded.positions} positions of {spec}", hint="use a shorter prefill")
            say(f"diagnosing {loaded.name} ({loaded.source})")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = diagnose(
                    loaded.model,
                    loaded.inputs,
                    driver=driver or loaded.driver,
                    hidden=not args.no_hidden,
                    backend=args.backend,
                    inductor=args.inductor,
                    fullgraph_check=not args.no_fullgraph_check,
                    prefill_tokens=args.prefill,
                    decode_steps=args.decode_steps,
                    name=loaded.name,
                    source=loaded.source,
                    progress=say,
                )
            say(f"done in {report.wall_seconds:.1f}s, peak memory {report.peak_memory_mb:.0f} MB")
            reports.append(report)
        return emit_reports(reports, args, extra, baseline=baseline, specs=args.models)


def add_driver_argument(p: argparse.ArgumentParser) -> None:
    """``--driver pkg.mod:fn``: the user's own loop, shared by report, optimize and verify."""
    p.add_argument("--driver", metavar="PKG.MOD:FN",
                   help="your decode loop: fn(model) runs a prefill and decode steps the way your code does "
                        "(its own cache and positions) and returns the generated tokens")


def _parse_also(item: str) -> tuple[str, str]:
    from graphfix.render import RENDERERS

    fmt, sep, path = item.partition("=")
    if not sep or not path:
        raise InputError(f"--also expects FORMAT=FILE, got {item!r}", hint="e.g. --also sarif=graphfix.sarif")
    if fmt not in RENDERERS:
        raise InputError(f"--also {item}: unknown report format {fmt!r}", hint=f"choose from {', '.join(RENDERERS)}")
    return fmt, path


_UNSET: Any = object()


def emit_reports(reports: list[Any], args: argparse.Namespace, extra: Sequence[tuple[str, str]] = (), *,
                 baseline: Any = _UNSET, specs: Sequence[str] = ()) -> int:
    """Render, write baselines, and apply the CI gate; returns the exit code."""
    from graphfix.cli.baseline import load_baseline, write_baseline
    from graphfix.cli.gate import evaluate
    from graphfix.cli.next_step import next_step
    from graphfix.render import RENDERERS

    for fmt, _path in [(args.format, None), *extra]:
        if fmt not in RENDERERS:
            raise GraphfixError(f"unknown report format {fmt!r}", hint=f"choose from {', '.join(RENDERERS)}")
    if baseline is _UNSET:
        baseline = load_baseline(args.baseline) if args.baseline else None
    known = None if baseline is None else {m: baseline.keys(m) for m in baseline.models}
    subject: Any = reports[0] if len(reports) == 1 else reports

    def render(fmt: str, color: bool = False) -> str:
        from graphfix.render.text import render_text

        if fmt == "text":
            hint = next_step(reports, specs, getattr(args, "driver", None))
            return render_text(subject, color=color) + (f"\n{hint}\n" if hint else "")
        if fmt in ("markdown", "sarif"):
            return RENDERERS[fmt](subject, baseline_keys=known)
        return RENDERERS[fmt](subject)

    if args.format == "text" and not args.output:
        from graphfix.cli.streams import requested_output
        from graphfix.render.text import want_color

        write_output(render("text", color=want_color(requested_output())), None)
    else:
        write_output(render(args.format), args.output)
    for fmt, path in extra:
        write_output(render(fmt), path)
    if args.write_baseline:
        Path(args.write_baseline).parent.mkdir(parents=True, exist_ok=True)
        write_baseline(reports, args.write_baseline)
    gate = evaluate(
        reports,
        baseline=baseline,
        max_graph_breaks=args.max_graph_breaks,
        max_recompiles=args.max_recompiles,
        max_fallbacks=getattr(args, "max_fallbacks", None),
    )
    if args.write_baseline and not args.baseline:
        return EXIT_OK  # recording a baseline accepts today's findings
    if not args.quiet or not gate.passed:
        print(gate.summary(), file=sys.stderr)
    return gate.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphfix", description="Make Llama-style models compile clean, then fast.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_report_parser(sub)
    for hook in _extra_commands():
        hook(sub)
    return parser


def _extra_commands() -> list[Callable[[Any], None]]:
    """Subcommands that live beside their own code (convert, optimize, ...)."""
    hooks = []
    for module_name in ("graphfix.cli.convert_cmd", "graphfix.cli.optimize_cmd", "graphfix.cli.generate_cmd"):
        try:
            module = __import__(module_name, fromlist=["add_parser"])
        except ImportError:
            continue
        hooks.append(module.add_parser)
    return hooks


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from graphfix import __version__

        print(f"graphfix {__version__}")
        return EXIT_OK
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except GraphfixError as exc:
        if args.debug:
            raise
        print(f"graphfix: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("graphfix: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `graphfix report ... | head`: the reader left; nothing more to say
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        except OSError:
            pass
        return EXIT_OVER_BUDGET


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
