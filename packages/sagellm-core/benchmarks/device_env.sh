# Sourced by the GPU scripts (gpu_soak.sh, gpu_api_cost.sh, gpu_tests.sh) on the device machine:
# installs the carried wheels (.whl: shared/device/wheels.sh, plus llguidance: its wheels since 1.7
# are manylinux_2_31, which wheels.sh does not ask for, so add `--platform manylinux_2_31_x86_64`
# or it fetches 1.6, older than core's floor) into /tmp/site,
# writes entry points for the packages used from source (so backend discovery finds them), and
# puts both on PYTHONPATH. Run from the repository root.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
  for spec in "sagellm_core:sagellm-core:cpu = sagellm.backends.cpu" "sagellm_cuda:sagellm-cuda:cuda = sagellm_cuda.plugin"; do
    IFS=: read -r mod dist ep <<<"$spec"; d=/tmp/site/$mod-0.1.0.dist-info; mkdir -p "$d"
    printf 'Metadata-Version: 2.1\nName: %s\nVersion: 0.1.0\n' "$dist" > "$d/METADATA"
    printf '[sagellm.backends]\n%s\n' "$ep" > "$d/entry_points.txt"
  done
fi
export PYTHONPATH=/tmp/site:$(ls -d packages/*/src | tr '\n' ':')${PYTHONPATH:+:$PYTHONPATH}

# start_server OUT_LOG ARGS...: a sagellm-server in the background ($SERVER its pid) on $PORT,
# waited for up to STARTUP_TIMEOUT s (exit 2 if it does not come up); stop_server ends it.
start_server() {
  local log=$1; shift
  python3 -m sagellm_server.cli --port "$PORT" "$@" > "$log" 2>&1 &
  SERVER=$!
  trap stop_server EXIT
  local t0; t0=$(date +%s)
  until python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; do
    if ! kill -0 "$SERVER" 2>/dev/null || (( $(date +%s) - t0 > ${STARTUP_TIMEOUT:-400} )); then
      echo "the server did not come up"; tail -30 "$log"; exit 2
    fi
    sleep 1
  done
  echo "server up after $(( $(date +%s) - t0 )) s"
}
stop_server() {
  kill -TERM "$SERVER" 2>/dev/null || return 0
  for _ in $(seq 30); do kill -0 "$SERVER" 2>/dev/null || return 0; sleep 1; done
  kill -KILL "$SERVER" 2>/dev/null
}
