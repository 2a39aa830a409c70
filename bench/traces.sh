#!/usr/bin/env bash
# What OpenTelemetry traces cost: three relays alike but for `traces`, to
# the same nginx upstream (1 KB Messages answers), in the same run:
#   off  — no `traces`
#   10%  — sampling_ratio 0.1
#   100% — sampling_ratio 1
# exporting to a collector double that reads and discards every export
# (nginx answering 200). wrk takes turns (off, 10%, 100%, off, ...),
# ROUNDS times; the median of each is compared with off (target: 10% keeps
# at least 0.95x of off), with the relay's CPU per request.
#
#   bench/traces.sh                    # 5 rounds of 10 s
#   ROUNDS=3 DURATION=5 bench/traces.sh
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-5}
CONNECTIONS=${CONNECTIONS:-64}
. "$here/common.sh"
need wrk

echo "building the release binary..."
(cd "$root" && cargo build --release --locked -q -p claude-relay-proxy --bin claude-relay-proxy)
RELAY=${RELAY:-$root/target/release/claude-relay-proxy}

UP=$(free_port); OT=$(free_port)
# The collector: a second nginx that reads and discards each export and
# answers 200, so what is measured is the relays' cost, not a collector's
# (a Python sink here took CPU from the relays on two cores). The relays'
# claude_relay_trace_spans_total shows the spans went out.
start_nginx_upstream "$OT" "client_max_body_size 64m; location / { default_type application/json; return 200 '{}'; }" sink
start_upstream "$UP"

relay_conf() { # name port admin ratio (empty: no traces)
  cat <<YAML
relay_name: bench-traces-$1
server: {listen: 127.0.0.1:$2, admin_listen: 127.0.0.1:$3}
log: {level: warn}
clients: [{id: bench, relay_keys: [{file: $work/relay.key}]}]
regions: [{name: local, base_url: 'http://127.0.0.1:$UP', api_keys: [{file: $work/upstream.key}]}]
YAML
  if [ -n "$4" ]; then
    echo "traces: {endpoint: 'http://127.0.0.1:$OT', sampling_ratio: $4, export_interval: 1s, max_queue_spans: 65536}"
  fi
}
declare -A port admin pid
for name in off 10pct 100pct; do
  port[$name]=$(free_port); admin[$name]=$(free_port)
done
relay_conf off "${port[off]}" "${admin[off]}" "" > "$work/off.yaml"
relay_conf 10pct "${port[10pct]}" "${admin[10pct]}" 0.1 > "$work/10pct.yaml"
relay_conf 100pct "${port[100pct]}" "${admin[100pct]}" 1 > "$work/100pct.yaml"
for name in off 10pct 100pct; do
  "$RELAY" --config "$work/$name.yaml" > "$work/$name.log" 2>&1 & pid[$name]=$!; pids+=($!)
done
wait_port "$UP"; wait_port "$OT"
for name in off 10pct 100pct; do wait_port "${port[$name]}"; done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
CLK_TCK=$(getconf CLK_TCK)
run() { # name: "name rps cpu_us_per_request"
  local name=$1 f="$work/wrk-$1.txt" t0 t1 n rps
  t0=$(ticks "${pid[$name]}")
  wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" -s "$work/post.lua" "http://127.0.0.1:${port[$name]}/v1/messages" > "$f"
  t1=$(ticks "${pid[$name]}")
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$f")
  n=$(awk '/requests in/ {print $1}' "$f")
  if grep -q "Non-2xx" "$f"; then echo "WARNING: $name had non-2xx answers: $(grep Non-2xx "$f")" >&2; fi
  echo "$name $rps $(( (t1 - t0) * 1000000 / CLK_TCK / (n > 0 ? n : 1) ))"
}

echo "warming up..."
for name in off 10pct 100pct; do
  wrk -t2 -c"$CONNECTIONS" -d2s -s "$work/post.lua" "http://127.0.0.1:${port[$name]}/v1/messages" > /dev/null
done

echo "throughput: wrk -t2 -c$CONNECTIONS -d${DURATION}s, $ROUNDS rounds taking turns"
all=$(for round in $(seq 1 "$ROUNDS"); do
        for name in off 10pct 100pct; do run "$name"; done
      done)
echo "$all" | awk '{printf "  %-6s %10s req/s  %5s us CPU/request\n", $1, $2, $3}'
median() { echo "$all" | awk -v n="$1" '$1==n' | sort -k2 -g | awk '{l[NR]=$0} END {print l[int((NR+1)/2)]}'; }
off=$(median off); ten=$(median 10pct); full=$(median 100pct)
sleep 2  # the last export
echo
echo "median of $ROUNDS rounds:"
printf '  %-6s %10s req/s  %5s us CPU/request\n' $off
printf '  %-6s %10s req/s  %5s us CPU/request\n' $ten
printf '  %-6s %10s req/s  %5s us CPU/request\n' $full
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a / b}'; }
echo "  10% / off:  $(ratio "$(echo "$ten" | cut -d' ' -f2)" "$(echo "$off" | cut -d' ' -f2)")x  (target >= 0.95x)"
echo "  100% / off: $(ratio "$(echo "$full" | cut -d' ' -f2)" "$(echo "$off" | cut -d' ' -f2)")x"
for name in 10pct 100pct; do
  echo "  $name relay: $(curl -s "http://127.0.0.1:${admin[$name]}/metrics" | grep '^claude_relay_trace_spans_total' | tr '\n' ' ')"
done
