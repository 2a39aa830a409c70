#!/usr/bin/env bash
# Tail latency at a constant request rate: the 1 KB JSON path (the upstream
# is nginx answering every request with a 1 KB Messages response, as in
# run.sh) through Debian's nginx as a plain reverse proxy and through the
# relay, in the same run, taking turns. A closed loop (wrk) waits for each
# answer before sending the next, so a slow answer delays the requests behind
# it and hides them from the tail (coordinated omission); here `oha -q` sends
# at a fixed rate and, with --latency-correction, counts each request's
# latency from when it was due. The rate is half of nginx's maximum, measured
# first with oha in the same run. It prints p50/p99/p99.9 of each target,
# relay p99 / nginx p99 (target <= 1.2) and the relay's CPU per request.
#
# Needs oha (a load generator in Rust, from crates.io):
#   cargo install oha --locked
#
#   bench/tail.sh                      # 3 turns of 10 s each
#   ROUNDS=5 SECS=15 bench/tail.sh
#   RATE=8000 bench/tail.sh            # a rate of your own instead of half of nginx's max
#   RELAY=path bench/tail.sh           # another build of the relay (no build)
#   BASE=path bench/tail.sh            # and a second build beside it, taking its
#                                      # turn after the relay's (relay/base p99)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-10}
CONNECTIONS=${CONNECTIONS:-32}
out=${OUT:-$root/bench/out}
mkdir -p "$out"
. "$here/common.sh"
need wrk
need redis-server
command -v oha >/dev/null 2>&1 || { echo "missing oha: cargo install oha --locked" >&2; exit 1; }
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true

if [ -z "${RELAY:-}" ]; then
  echo "building the release binary..."
  (cd "$root" && cargo build --release --locked -q -p claude-relay-proxy --bin claude-relay-proxy)
fi
RELAY=${RELAY:-$root/target/release/claude-relay-proxy}

UP=$(free_port); NG=$(free_port); RL=$(free_port); RA=$(free_port); RD=$(free_port)
redis-server --port "$RD" --bind 127.0.0.1 --save "" --appendonly no > "$work/redis.log" 2>&1 & pids+=($!)
write_proxy_conf "$NG" "$UP" 256 8192 "worker_processes auto;"
start_upstream "$UP"
"$NGINX" -c "$work/ng/nginx.conf" -p "$work/ng" & nginx_pid=$!; pids+=($nginx_pid)
# The core relay of run.sh: a relay key, one region, state in Redis.
cat > "$work/relay.yaml" <<YAML
server: {listen: 127.0.0.1:$RL, admin_listen: 127.0.0.1:$RA}
log: {level: warn}
store: {redis: {url: "redis://127.0.0.1:$RD"}}
clients: [{id: bench, relay_keys: [{file: $work/relay.key}]}]
regions: [{name: local, base_url: "http://127.0.0.1:$UP", api_keys: [{file: $work/upstream.key}]}]
YAML
wait_port "$UP"; wait_port "$NG"; wait_port "$RD"
"$RELAY" --config "$work/relay.yaml" > "$work/relay.log" 2>&1 & relay_pid=$!; pids+=($relay_pid)
wait_port "$RL"
targets="nginx relay"
if [ -n "${BASE:-}" ]; then
  BL=$(free_port); BA=$(free_port)
  sed -e "s/127.0.0.1:$RL,/127.0.0.1:$BL,/" -e "s/127.0.0.1:$RA}/127.0.0.1:$BA}/" "$work/relay.yaml" > "$work/base.yaml"
  "$BASE" --config "$work/base.yaml" > "$work/base.log" 2>&1 & base_pid=$!; pids+=($base_pid)
  wait_port "$BL"
  targets="nginx relay base"
fi

BODY='{"model":"claude-bench","max_tokens":256,"messages":[{"role":"user","content":"Say hello"}]}'
run_oha() { # name port rate: "name p50_us p99_us p99.9_us rps non-200"
  local f="$out/oha-$1.json"
  oha --no-tui --output-format json -z "${SECS}s" -c "$CONNECTIONS" -q "$3" --latency-correction \
    -m POST -d "$BODY" -H "content-type: application/json" -H "anthropic-version: 2023-06-01" \
    -H "x-api-key: bench-relay-key" "http://127.0.0.1:$2/v1/messages" > "$f"
  python3 - "$1" "$f" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
p = r["latencyPercentiles"]
codes = r.get("statusCodeDistribution", {})
# Requests still out when the time is up are cut by oha, not failed.
errors = {e: n for e, n in r.get("errorDistribution", {}).items() if e != "aborted due to deadline"}
bad = sum(n for c, n in codes.items() if c != "200") + sum(errors.values())
print(sys.argv[1], *(round(p[k] * 1e6) for k in ("p50", "p99", "p99.9")), round(r["summary"]["requestsPerSec"]), bad)
PY
}

echo "warming up..."
for p in "$NG" "$RL" ${BL:-}; do wrk -t2 -c"$CONNECTIONS" -d2s -s "$work/post.lua" "http://127.0.0.1:$p/v1/messages" > /dev/null; done
if [ -z "${RATE:-}" ]; then
  # nginx's maximum with this generator, closed loop: oha spends more CPU per
  # request than wrk, and on a small machine it shares the cores with nginx.
  oha --no-tui --output-format json -z 5s -c 64 -m POST -d "$BODY" -H "content-type: application/json" \
    -H "x-api-key: bench-relay-key" "http://127.0.0.1:$NG/v1/messages" > "$out/oha-nginx-max.json"
  max=$(python3 -c 'import json, sys; print(round(json.load(open(sys.argv[1]))["summary"]["requestsPerSec"]))' "$out/oha-nginx-max.json")
  RATE=$((max / 2))
  echo "nginx max (oha -c64 -z5s, closed loop): $max req/s; rate: $RATE req/s"
fi
run_oha warm-nginx "$NG" "$RATE" > /dev/null; run_oha warm-relay "$RL" "$RATE" > /dev/null
[ -z "${BL:-}" ] || run_oha warm-base "$BL" "$RATE" > /dev/null
echo "constant rate: oha -q $RATE -c $CONNECTIONS -z ${SECS}s --latency-correction, $ROUNDS turns"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# nginx's CPU: its master and worker processes.
nginx_ticks_now() { local t=0 p; for p in "$nginx_pid" $(pgrep -P "$nginx_pid"); do t=$((t + $(ticks "$p"))); done; echo "$t"; }
relay_ticks=0; nginx_ticks=0; base_ticks=0
for _ in $(seq 1 "$ROUNDS"); do
  t0=$(nginx_ticks_now); run_oha nginx "$NG" "$RATE"; nginx_ticks=$((nginx_ticks + $(nginx_ticks_now) - t0))
  t0=$(ticks "$relay_pid"); run_oha relay "$RL" "$RATE"; relay_ticks=$((relay_ticks + $(ticks "$relay_pid") - t0))
  if [ -n "${BL:-}" ]; then
    t0=$(ticks "$base_pid"); run_oha base "$BL" "$RATE"; base_ticks=$((base_ticks + $(ticks "$base_pid") - t0))
  fi
done > "$out/tail-rounds.txt"
all=$(cat "$out/tail-rounds.txt")

report=$(
  echo "== tail latency at a constant rate ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores) =="
  echo "oha -q $RATE -c $CONNECTIONS -z ${SECS}s --latency-correction; 1 KB JSON answers; turns taken in order ${targets// /, }"
  printf '%-6s %8s %8s %9s %8s %7s\n' target p50_us p99_us p99.9_us req/s errors
  echo "$all" | awk '{printf "%-6s %8d %8d %9d %8d %7d\n", $1, $2, $3, $4, $5, $6}'
  # The median turn's figures of each, and the ratio of the median p99s.
  echo "$all" | awk '
    { p50[$1] = p50[$1] " " $2; p99[$1] = p99[$1] " " $3; p999[$1] = p999[$1] " " $4 }
    function median(s,   v, n, i, j, t) {
      n = split(s, v, " ")
      for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] + 0 < v[i] + 0) { t = v[i]; v[i] = v[j]; v[j] = t }
      return v[int((n + 1) / 2)]
    }
    END {
      for (t in p99) printf "median %-6s p50 %6d us  p99 %6d us  p99.9 %6d us\n", t, median(p50[t]), median(p99[t]), median(p999[t])
      printf "ratio: relay p99 / nginx p99 %.2f (target <= 1.20); p99.9 %.2f\n", median(p99["relay"]) / median(p99["nginx"]), median(p999["relay"]) / median(p999["nginx"])
      if ("base" in p99) printf "ratio: relay p99 / base p99 %.2f; p99.9 %.2f\n", median(p99["relay"]) / median(p99["base"]), median(p999["relay"]) / median(p999["base"])
    }' | sort
  # What a core serves: each proxy's CPU time over the requests of its turns.
  for t in $targets; do
    ticks_of=$nginx_ticks; [ "$t" = relay ] && ticks_of=$relay_ticks; [ "$t" = base ] && ticks_of=$base_ticks
    echo "$all" | awk -v name="$t" -v t="$ticks_of" -v hz="$(getconf CLK_TCK)" -v s="$SECS" '$1==name {n += $5 * s}
      END {us = t / hz * 1e6 / n; printf "%s CPU per request: %.1f us (%.0f req/s per core)\n", name, us, 1e6 / us}'
  done
)
echo
echo "$report" | tee "$out/tail.txt"
