#!/usr/bin/env bash
# What the OpenAI features cost on one GPU: serve_c16 (16 streaming clients, 64 requests,
# 512-token prompts, 256 tokens out) against one sagellm-server, once plain and once with each
# feature on every request: a small JSON schema (structured_outputs), presence/frequency/
# repetition penalties, logprobs=5.
#
#   packages/sagellm-server/benchmarks/gpu_api_cost.sh MODEL_DIR
#
# Run from the repository root; carry .whl (shared/device/wheels.sh plus the llguidance wheel)
# and the model folder. Writes $OUT/api_<variant>_<run>.json, $OUT/api_cost_runs.json (all runs)
# $OUT/api_cost.txt (the table, json_schema also against plain_matched) and $OUT/api_cpu.txt (per variant, the CPU share of the server
# process and of the engine process under it). Time: server start-up (~45 s) + about 15 s per variant.
set -u
MODEL=${1:?usage: gpu_api_cost.sh MODEL_DIR}
OUT=${OUT:-bench-results}; PORT=${PORT:-8766}; mkdir -p "$OUT"
source "$(dirname "$0")/../../sagellm-core/benchmarks/device_env.sh"
start_server "$OUT/api_server.log" --model "$MODEL" --load-format dummy --backend cuda \
  --max-model-len 4096 --log-interval 0
URL=http://127.0.0.1:$PORT
SCHEMA='{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"}},"required":["name","age"]}'
declare -A BODY=(
  [plain]=''
  [json_schema]="{\"structured_outputs\": {\"json\": $SCHEMA}}"
  [penalties]='{"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1}'
  [logprobs5]='{"logprobs": 5}'
)
# Each variant runs REPS times (a serve_c16 run lasts ~3 s, so one run is noisy) and is judged
# by its median; plain runs first and last, and the base is the median of all its runs. Each
# variant is warmed by one request with its body first (a grammar compiles once per schema and
# is cached: the timed runs measure the steady state).
REPS=${REPS:-3}
warm() {
  python3 - "$URL" "$1" <<'PY' >/dev/null 2>&1 || true
import json, sys, urllib.request as u
model = json.load(u.urlopen(sys.argv[1] + "/v1/models", timeout=30))["data"][0]["id"]
body = {"model": model, "prompt": "hello", "max_tokens": 8, **json.loads(sys.argv[2] or "{}")}
req = u.Request(sys.argv[1] + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
u.urlopen(req, timeout=120).read()
PY
}
# CPU seconds (user + system) of the server process and each process under it (the engine
# core), as "pid name seconds" lines: taken around each variant's timed runs, they say which
# side a feature's cost lands on (the event loop's per-token work or the engine's step).
cpu_times() {
  python3 - "$SERVER" <<'PY'
import os, sys
tick = os.sysconf("SC_CLK_TCK")
def kids(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []
todo, seen = [int(sys.argv[1])], []
while todo:
    p = todo.pop()
    seen.append(p)
    todo += kids(p)
for p in seen:
    try:
        with open(f"/proc/{p}/stat") as f:
            stat = f.read()
    except OSError:
        continue
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    print(p, name.replace(" ", "_"), (int(fields[11]) + int(fields[12])) / tick)
PY
}
cpu_share() {  # BEFORE AFTER T0: each process's share of one core since T0 (date +%s.%N)
  python3 - "$1" "$2" "$3" <<'PY'
import sys, time
def read(s):
    return {ln.split()[0]: (ln.split()[1], float(ln.split()[2])) for ln in s.splitlines() if ln.strip()}
a, b, wall = read(sys.argv[1]), read(sys.argv[2]), time.time() - float(sys.argv[3])
print("  ".join(f"{name}[{pid}] {100 * (t - a.get(pid, (name, 0.0))[1]) / wall:.0f}%"
                for pid, (name, t) in b.items() if t - a.get(pid, (name, 0.0))[1] > 0.05 * wall))
PY
}
# VARIANTS picks some (plain runs first and last whatever it says). After json_schema,
# plain_matched runs plain requests whose lengths are the first json_schema run's (its
# out_lens): the grammar ends requests early, so json_schema decodes fewer tokens per prompt
# than plain, and "vs matched" compares the two at the same work.
VARIANTS=${VARIANTS:-json_schema penalties logprobs5}
run_variant() {  # NAME [bench args...]
  local v=$1; shift
  local body=${BODY[${v%_again}]:-}
  local extra=()
  [ -n "$body" ] && extra=(--serve-extra-body "$body")
  warm "$body"
  before=$(cpu_times); t0=$(date +%s.%N)
  for r in $(seq "$REPS"); do
    python3 -m sagellm.bench --serve-url "$URL" --workloads serve_c16 --out "$OUT/api_${v}_$r.json" \
      "${extra[@]}" "$@" > /dev/null 2>&1 || echo "variant $v run $r failed"
  done
  echo "$v CPU, % of one core: $(cpu_share "$before" "$(cpu_times)" "$t0")" \
    | tee -a "$OUT/api_cpu.txt"
}
for v in plain $VARIANTS plain_again; do
  run_variant "$v"
  if [ "$v" = json_schema ] && [ -f "$OUT/api_json_schema_1.json" ]; then
    BODY[plain_matched]=''
    run_variant plain_matched --serve-lengths-from "$OUT/api_json_schema_1.json"
  fi
done
python3 - "$OUT" <<'PY' | tee "$OUT/api_cost.txt"
import json, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1])
runs = {}
for f in sorted(out.glob("api_*_[0-9]*.json")):
    v = f.stem.rsplit("_", 1)[0].removeprefix("api_").removesuffix("_again")
    runs.setdefault(v, []).append(json.loads(f.read_text())["serve_c16"])
json.dump(runs, open(out / "api_cost_runs.json", "w"), indent=1)
med = lambda rs, f: statistics.median(f(r) for r in rs)
tok_s = lambda v: med(runs[v], lambda r: r["out_tok_s"]) if runs.get(v) else float("nan")
base, matched = tok_s("plain"), tok_s("plain_matched")
plain = [round(r["out_tok_s"]) for r in runs.get("plain", [])]
print(f"plain runs (tok/s, first and last variant): {plain}")
print(f"{'serve_c16':<14}{'runs':>5}{'tokens':>8}{'tok/s':>9}{'TPOT p50':>10}{'TTFT p50':>10}"
      f"{'TTFT p90':>10}{'errors':>8}{'vs plain':>10}{'vs matched':>12}")
for v, rs in runs.items():
    tok = med(rs, lambda r: r["out_tok_s"])
    tokens = statistics.median_low(round(r["out_tok_s"] * r["duration_s"]) for r in rs)
    vs_matched = f"{tok / matched:>12.3f}" if v == "json_schema" and runs.get("plain_matched") else ""
    print(f"{v:<14}{len(rs):>5}{tokens:>8,}{tok:>9,.0f}{med(rs, lambda r: r['tpot_ms']['p50']):>10.2f}"
          f"{med(rs, lambda r: r['ttft_ms']['p50']):>10.1f}{med(rs, lambda r: r['ttft_ms']['p90']):>10.1f}"
          f"{sum(r['n_errors'] for r in rs):>8}{tok / base:>10.3f}{vs_matched}")
PY
stop_server
trap - EXIT
