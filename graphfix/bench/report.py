"""The decode benchmark's Markdown table, from its JSON document."""

from __future__ import annotations

import json
from typing import Any

from graphfix.bench.timing import _atomic_write

SCHEMA = "graphfix.bench_decode/1"


def _fmt(v: Any, spec: str = ".1f") -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def markdown(doc: dict[str, Any]) -> str:
    lines = [(f"Model `{doc.get('model')}` ({doc.get('dtype')}), device {doc.get('device_name')}, "
              f"torch {doc.get('torch')}, transformers {doc.get('transformers')}; prompt {doc.get('prompt_len')} "
              f"tokens, {doc.get('new_tokens')} new tokens, median of {doc.get('repeats')} runs."), ""]
    copy = doc.get("copy_bandwidth")
    wb = doc.get("weight_bytes_per_step")
    if copy:
        lines.append(f"Copy bandwidth {copy['gb_per_s']:.0f} GB/s (read + written)"
                     + (f"; weights read per step {wb / 1e9:.2f} GB, floor {copy['gb_per_s'] * 1e9 / wb:.1f} tok/s "
                        f"at batch 1" if wb else "") + ".")
        lines.append("")
    lines.append("| system | batch | tok/s (per seq) | tok/s (all) | ms/token | GB/s | share of copy BW | TTFT (ms) "
                 "| peak GB | compile cold s |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in doc.get("runs", []):
        name = r["system"] + (f" ({r['variant']})" if r.get("variant") else "")
        ms = r.get("event_ms_per_token") or r.get("ms_per_token")
        lines.append("| " + " | ".join([
            name, str(r["batch"]), _fmt(r.get("tok_per_s")), _fmt(r.get("tok_per_s", 0) * r["batch"]),
            _fmt(ms, ".2f"), _fmt(r.get("gb_per_s"), ".0f"), _fmt(r.get("fraction_of_copy_bw"), ".2f"),
            _fmt(1000 * r["ttft_s"] if r.get("ttft_s") is not None else None, ".1f"), _fmt(r.get("peak_gb"), ".1f"),
            _fmt(r.get("compile_cold_s"), ".0f")]) + " |")
    warm = doc.get("warm_start")
    if warm:
        lines += ["", (f"Warm start (second process, compile cache loaded: {warm.get('megacache_loaded')}): "
                       f"warmup {_fmt(warm.get('warmup_s'), '.1f')} s against {_fmt(warm.get('cold_warmup_s'), '.1f')} "
                       f"s cold; process start to first token {_fmt(warm.get('process_to_first_token_s'), '.1f')} s.")]
    if doc.get("ttft"):
        lines += ["", "| system | prompt tokens | TTFT (ms) |", "|---|---|---|"]
        for t in doc["ttft"]:
            lines.append(f"| {t['system']} | {t['prompt_len']} | {_fmt(1000 * t['seconds'], '.1f')} |")
    for r in doc.get("runs", []):
        k = r.get("kernels")
        if k and "ms_per_step_by_category" in k:
            cats = ", ".join(f"{c} {v:.3f}" for c, v in k["ms_per_step_by_category"].items())
            lines += ["", (f"graphfix ({r.get('variant')}) batch {r['batch']}: device time per step "
                           f"{k['device_ms_per_step']:.3f} ms of {k['wall_ms_per_step']:.3f} ms wall ({cats}); "
                           f"linears alone in a CUDA graph: {_fmt(r.get('matmul_only_ms'), '.3f')} ms."
                           + (" Kernels overlap under programmatic dependent launch (one waiting at "
                              "griddepcontrol.wait counts as busy), so device time exceeds wall time."
                              if k["device_ms_per_step"] > k["wall_ms_per_step"] else ""))]
    if doc.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{s['what']} ({s['why']})" for s in doc["skipped"])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------




class Results:
    """The JSON document, rewritten after every section (a cut-off run keeps what it measured)."""

    def __init__(self, path: str | None, md_path: str | None, meta: dict[str, Any]) -> None:
        self.path, self.md_path = path, md_path
        self.doc: dict[str, Any] = {"schema": SCHEMA, **meta, "copy_bandwidth": None, "runs": [],
                                    "warm_start": None, "ttft": [], "skipped": [], "notes": []}

    def add_run(self, row: dict[str, Any]) -> None:
        self.doc["runs"].append(row)
        self.flush()

    def skip(self, what: str, why: str) -> None:
        self.doc["skipped"].append({"what": what, "why": why})
        print(f"[bench] skipped {what}: {why}", flush=True)
        self.flush()

    def flush(self) -> None:
        if self.path:
            _atomic_write(self.path, json.dumps(self.doc, indent=2, default=str))
        if self.md_path:
            _atomic_write(self.md_path, markdown(self.doc))


