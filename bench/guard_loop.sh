#!/usr/bin/env bash
# The guard's whole loop offline on the embedded SmolLM2-135M (README: "Guard: the whole loop, offline"):
#   1. the quickstart's data stages (SL-CAI chains, helpfulness answers, AI-feedback labels) → runs/quickstart
#   2. cai train guard → runs/quickstart/guard/classifier (calibration.json beside it)
#   3. llama_cpp.server with the embedded GGUF on :8000, the guard proxy in front of it on :8100
#   4. cai eval recipes/guard-eval.yaml: bare vs through the proxy vs behind the guard in-process, and the guard
#      alone on XSTest + AdvBench → runs/guard-eval/eval/{metrics.json,report.html}
# Usage: bench/guard_loop.sh   (from the repository root; PY=path/to/python to pick the interpreter; LIMIT=4 takes
# only the first 4 quickstart prompts, N=4 evaluates 4 prompts per suite — for a busy laptop)
set -euo pipefail
PY=${PY:-.venv/bin/python}
CAI=("$PY" -m cai_async.cli)
LOGS=runs/guard-loop-logs
mkdir -p "$LOGS"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

LIMIT_FLAG=(); [[ -n "${LIMIT:-}" ]] && LIMIT_FLAG=(--limit "$LIMIT")
# the quickstart's "after" model is written by its train stage, which this loop does not run: stand the GGUF in
AFTER='engine.groups.after=[{name: after, backend: llamacpp, model: embedded, options: {n_ctx: 2048}}]'
"${CAI[@]}" sl recipes/quickstart.yaml "${LIMIT_FLAG[@]}" --set "$AFTER"
"${CAI[@]}" label recipes/quickstart.yaml "${LIMIT_FLAG[@]}" --set "$AFTER"
"${CAI[@]}" train guard recipes/guard.yaml --run-dir runs/quickstart > runs/quickstart/guard-classifier.json

MODEL=$("$PY" -c 'from backends.llamacpp import embedded_model_path; print(embedded_model_path())')
"$PY" -m llama_cpp.server --model "$MODEL" --host 127.0.0.1 --port 8000 --n_ctx 2048 > "$LOGS/llama_server.log" 2>&1 &
pids+=($!)
"${CAI[@]}" guard serve recipes/guard-eval.yaml --upstream http://127.0.0.1:8000/v1 --port 8100 \
  > "$LOGS/proxy.log" 2>&1 &
pids+=($!)
for port in 8000 8100; do
  for _ in $(seq 1 120); do
    if "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/v1/models', timeout=2)" \
      2>/dev/null; then break; fi
    sleep 1
  done
done
"${CAI[@]}" eval recipes/guard-eval.yaml --n "${N:-6}"
"${CAI[@]}" guard report runs/guard-eval
