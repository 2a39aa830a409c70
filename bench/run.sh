#!/usr/bin/env bash
# Relay benchmark: the same load generator (wrk), in the same run, against
#   direct  — a fast local upstream (nginx serving a 1 KB Messages response)
#   nginx   — Debian's nginx as a plain reverse proxy to that upstream
#   relay   — claude-relay-proxy to that upstream
# It prints requests/s and p50/p99 latency of each, the ratios, the relay's
# added p50 latency over direct, signed against relay-key requests (with the
# CPU the relay and Redis spend per request), the time to the first stream event with
# usage accounting on and off, cache hits against relayed requests, and the
# relay's RSS idle and with 1,000 concurrent open streams. Figures, not
# pass/fail: the machines are shared.
#
#   bench/run.sh                 # defaults
#   DURATION=20 CONNECTIONS=128 bench/run.sh
#   ROUNDS=5 bench/run.sh        # rounds of the throughput and signed runs (median)
#   RELAY=path bench/run.sh      # measure another build of the relay (LOAD=, MOCK=:
#                                # the load generator's and mock upstream's; all three: no build)
#   BASE=path bench/run.sh       # and a second build beside it, taking turns in
#                                # the throughput and relay-key runs (base/relay ratios)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
STREAMS=${STREAMS:-1000}
out=${OUT:-$root/bench/out}
mkdir -p "$out"
. "$here/common.sh"

need wrk
need redis-server
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true

if [ -z "${RELAY:-}" ] || [ -z "${LOAD:-}" ] || [ -z "${MOCK:-}" ]; then
  echo "building release binaries..."
  (cd "$root" && cargo build --release --locked -q -p claude-relay-proxy -p claude-relay-testkit --bin claude-relay-proxy --bin relay-load --bin mock-upstream)
fi
RELAY=${RELAY:-$root/target/release/claude-relay-proxy}
BASE=${BASE:-}
LOAD=${LOAD:-$root/target/release/relay-load}
MOCK=${MOCK:-$root/target/release/mock-upstream}

UP=$(free_port); NG=$(free_port); RL=$(free_port); RA=$(free_port); MK=$(free_port); RD=$(free_port); R3=$(free_port); R3A=$(free_port)
UA=$(free_port); UAA=$(free_port); UN=$(free_port); UNA=$(free_port); BL=$(free_port); BA=$(free_port)
redis-server --port "$RD" --bind 127.0.0.1 --save "" --appendonly no --daemonize no > "$work/redis.log" 2>&1 & redis_pid=$!; pids+=($redis_pid)

write_proxy_conf "$NG" "$UP" 256 8192 "worker_processes auto;"
start_upstream "$UP"
"$NGINX" -c "$work/ng/nginx.conf" -p "$work/ng" & pids+=($!)
"$MOCK" --listen "127.0.0.1:$MK" 2>/dev/null & pids+=($!)

cat > "$work/relay.yaml" <<YAML
server:
  listen: 127.0.0.1:$RL
  admin_listen: 127.0.0.1:$RA
log:
  level: warn   # no access lines, as nginx runs with access_log off
store:
  redis: {url: "redis://127.0.0.1:$RD"}
clients:
  - id: bench
    relay_keys: [{file: $work/relay.key}]
  - id: bench-signer
    signing_secrets: [{file: $work/signing.secret}]
regions:
  - name: local
    base_url: http://127.0.0.1:$UP
    api_keys: [{file: $work/upstream.key}]
  - name: streams
    priority: 10
    base_url: http://127.0.0.1:$MK
    api_keys: [{file: $work/upstream.key}]
YAML
# The same relay with three regions, three keys each (least in flight),
# breakers shared through Redis: what routing and accounting cost.
cat > "$work/relay3.yaml" <<YAML
relay_name: bench-three
server: {listen: 127.0.0.1:$R3, admin_listen: 127.0.0.1:$R3A}
log: {level: warn}
store: {redis: {url: "redis://127.0.0.1:$RD"}}
key_pool: {strategy: least_in_flight}
clients: [{id: bench, relay_keys: [{file: $work/relay.key}]}]
regions:
$(for r in us eu ap; do echo "  - {name: $r, base_url: 'http://127.0.0.1:$UP', api_keys: [{file: $work/upstream.key}, {file: $work/upstream.key}, {file: $work/upstream.key}]}"; done)
YAML
# Usage accounting on (the default) and off, the same relay otherwise, to the
# mock upstream (streams; JSON after a simulated generation time when asked).
accounting() { # port admin enabled
  cat <<YAML
relay_name: bench-usage-$3
server: {listen: 127.0.0.1:$1, admin_listen: 127.0.0.1:$2}
log: {level: warn}
store: {redis: {url: "redis://127.0.0.1:$RD"}}
usage: {enabled: $3}
clients: [{id: bench, relay_keys: [{file: $work/relay.key}]}]
regions: [{name: mock, base_url: 'http://127.0.0.1:$MK', api_keys: [{file: $work/upstream.key}]}]
YAML
}
accounting "$UA" "$UAA" true > "$work/usage-on.yaml"
accounting "$UN" "$UNA" false > "$work/usage-off.yaml"
"$RELAY" --config "$work/usage-on.yaml" > "$work/usage-on.log" 2>&1 & pids+=($!)
"$RELAY" --config "$work/usage-off.yaml" > "$work/usage-off.log" 2>&1 & pids+=($!)
"$RELAY" --config "$work/relay.yaml" > "$work/relay.log" 2>&1 & relay_pid=$!; pids+=($relay_pid)
if [ -n "$BASE" ]; then
  # The same relay config on other ports, served by the other build.
  sed -e "s/127.0.0.1:$RL\$/127.0.0.1:$BL/" -e "s/127.0.0.1:$RA\$/127.0.0.1:$BA/" "$work/relay.yaml" > "$work/base.yaml"
  "$BASE" --config "$work/base.yaml" > "$work/base.log" 2>&1 & base_pid=$!; pids+=($base_pid)
  wait_port "$BL"
fi
"$RELAY" --config "$work/relay3.yaml" > "$work/relay3.log" 2>&1 & pids+=($!)
wait_port "$UP"; wait_port "$NG"; wait_port "$RL"; wait_port "$MK"; wait_port "$RD"; wait_port "$R3"; wait_port "$UA"; wait_port "$UN"
sleep 0.5
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
idle_rss=$(rss_kb "$relay_pid")


# wrk's latency lines are in us, ms or s; print microseconds.
to_us() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); print v} else if (v ~ /ms$/) {sub(/ms$/,"",v); print v*1000} else if (v ~ /s$/) {sub(/s$/,"",v); print v*1000000} else print v}'; }
run_wrk() { # name url threads connections seconds
  local name=$1 url=$2 t=$3 c=$4 d=$5 f="$out/wrk-$1-c$4.txt"
  wrk -t"$t" -c"$c" -d"${d}s" --latency -s "$work/post.lua" "$url" > "$f"
  local rps p50 p99 errs
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$f")
  p50=$(awk '$1=="50%" {print $2}' "$f" | to_us)
  p99=$(awk '$1=="99%" {print $2}' "$f" | to_us)
  errs=$(awk '/Non-2xx|Socket errors/ {print}' "$f" | tr '\n' ' ')
  echo "$name $rps $p50 $p99 $errs"
}

# median_of NAME: of run_wrk lines on stdin, the one of NAME with the median req/s.
median_of() { awk -v n="$1" '$1==n' | sort -k2 -g | awk '{l[NR]=$0} END {print l[int((NR+1)/2)]}'; }

echo "warming up..."
for u in "http://127.0.0.1:$UP/v1/messages" "http://127.0.0.1:$NG/v1/messages" "http://127.0.0.1:$RL/v1/messages" "http://127.0.0.1:$R3/v1/messages"; do
  wrk -t2 -c"$CONNECTIONS" -d2s -s "$work/post.lua" "$u" > /dev/null
done

echo "throughput: wrk -t2 -c$CONNECTIONS -d${DURATION}s, 1 KB responses, $ROUNDS rounds"
# ROUNDS turns of every target, taking turns, and the median of each: one
# turn hit by the shared machine's noise does not decide a ratio.
tp_all=$(for _ in $(seq 1 "$ROUNDS"); do
        run_wrk direct "http://127.0.0.1:$UP/v1/messages" 2 "$CONNECTIONS" "$DURATION"
        run_wrk nginx  "http://127.0.0.1:$NG/v1/messages" 2 "$CONNECTIONS" "$DURATION"
        run_wrk relay  "http://127.0.0.1:$RL/v1/messages" 2 "$CONNECTIONS" "$DURATION"
        [ -z "$BASE" ] || run_wrk base "http://127.0.0.1:$BL/v1/messages" 2 "$CONNECTIONS" "$DURATION"
        run_wrk relay3 "http://127.0.0.1:$R3/v1/messages" 2 "$CONNECTIONS" "$DURATION"; done)
echo "$tp_all" > "$out/throughput-rounds.txt"
tp=$(for t in direct nginx relay relay3 ${BASE:+base}; do echo "$tp_all" | median_of "$t"; done)
echo "latency: wrk -t1 -c1 -d${DURATION}s (one request at a time)"
lat=$( { run_wrk direct "http://127.0.0.1:$UP/v1/messages" 1 1 "$DURATION"
         run_wrk nginx  "http://127.0.0.1:$NG/v1/messages" 1 1 "$DURATION"
         run_wrk relay  "http://127.0.0.1:$RL/v1/messages" 1 1 "$DURATION"; } )

echo "signed vs relay-key: relay-load -c$CONNECTIONS -d${DURATION}s (fresh nonce per signed request, checked in Redis)"
# CPU time (user + system, clock ticks) a process has used so far.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
CLK_TCK=$(getconf CLK_TCK)
load() { # mode [port pid]: relay-load's line, plus the CPU the relay and Redis spent per request
  local port=${2:-$RL} pid=${3:-$relay_pid} relay0 redis0 line n
  relay0=$(ticks "$pid"); redis0=$(ticks "$redis_pid")
  line=$("$LOAD" --url "http://127.0.0.1:$port/v1/messages" --connections "$CONNECTIONS" --seconds "$DURATION" --threads 2 \
    --mode "$1" --relay-key bench-relay-key --key-id bench-signer --secret-file "$work/signing.secret")
  n=$(echo "$line" | sed 's/.*requests=\([0-9]*\).*/\1/')
  echo "$line relay_cpu_us=$(( ($(ticks "$pid") - relay0) * 1000000 / CLK_TCK / (n > 0 ? n : 1) ))" \
    "redis_cpu_us=$(( ($(ticks "$redis_pid") - redis0) * 1000000 / CLK_TCK / (n > 0 ? n : 1) ))"
}
load relay-key > /dev/null  # warm-up of the generator's own connections
sig_all=$(for _ in $(seq 1 "$ROUNDS"); do echo "relay-key $(load relay-key)"; echo "signed $(load signed)"
           [ -z "$BASE" ] || echo "base-key $(load relay-key "$BL" "$base_pid")"; done)
echo "$sig_all" > "$out/relay-load.txt"
# relay-load prints key=value pairs; the median turn of each by rps.
sig=$(for m in relay-key signed; do echo "$sig_all" | awk -v m="$m" '$1==m' | sed 's/rps=/rps= /' | sort -k5 -n | sed 's/rps= /rps=/' |
      awk '{l[NR]=$0} END {print l[int((NR+1)/2)]}'; done)

# Time to the first event of a stream, usage accounting on and off, taking
# turns (on, off, on, off) so that noise of the shared machine hits both.
STREAM_BODY='{"model":"claude-bench","max_tokens":256,"stream":true,"messages":[{"role":"user","content":"Say hello"}]}'
ttfe() { # port
  "$LOAD" --url "http://127.0.0.1:$1/v1/messages" --connections 1 --seconds "$DURATION" --threads 1 \
    --relay-key bench-relay-key --body "$STREAM_BODY" --header "x-mock:stream" --first-byte
}
ttfe "$UA" > /dev/null; ttfe "$UN" > /dev/null
first=$(for _ in 1 2 3; do echo "on $(ttfe "$UA")"; echo "off $(ttfe "$UN")"; done)
echo "$first" > "$out/first-event.txt"
# And what accounting costs a relay's throughput (1 KB JSON answers, usage
# parsed from each), taking turns as well.
json_load() { # port
  "$LOAD" --url "http://127.0.0.1:$1/v1/messages" --connections "$CONNECTIONS" --seconds "$DURATION" --threads 2 \
    --relay-key bench-relay-key
}
acct=$( { echo "on $(json_load "$UA")"; echo "off $(json_load "$UN")"; echo "on $(json_load "$UA")"; echo "off $(json_load "$UN")"; } )
echo "$acct" > "$out/accounting-throughput.txt"

# Cache hits against relayed requests, in the same relay: x-relay-cache on
# (every request after the first is a hit), off (relayed to the mock
# upstream, which answers at once), and off with 20 ms of generation time
# (a real answer takes far longer).
cached() { # seconds, extra relay-load args...
  local seconds=$1; shift
  "$LOAD" --url "http://127.0.0.1:$UA/v1/messages" --connections "$CONNECTIONS" --seconds "$seconds" --threads 2 \
    --relay-key bench-relay-key "$@"
}
cached 1 --header "x-relay-cache:on" > /dev/null
cache=$( { echo "hit $(cached "$DURATION" --header 'x-relay-cache:on')"
           echo "relayed $(cached "$DURATION" --header 'x-relay-cache:off')"
           echo "relayed-20ms $(cached "$DURATION" --header 'x-relay-cache:off' --header 'x-mock-delay-ms:20')"; } )
echo "$cache" > "$out/cache.txt"

# 1,000 concurrent open streams: each answered by an endless, slow SSE stream.
cat > "$work/stream.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"claude-bench","max_tokens":256,"stream":true,"messages":[{"role":"user","content":"Say hello"}]}'
wrk.headers["content-type"] = "application/json"
wrk.headers["x-api-key"] = "bench-relay-key"
wrk.headers["x-relay-region"] = "streams"
wrk.headers["x-mock"] = "stream-endless"
wrk.headers["x-mock-delay-ms"] = "1000"
LUA
wrk -t2 -c"$STREAMS" -d10s --timeout 30s -s "$work/stream.lua" "http://127.0.0.1:$RL/v1/messages" > "$out/wrk-streams.txt" 2>&1 &
wrk_pid=$!
peak_streams=0; peak_rss=0
for _ in $(seq 1 18); do
  sleep 0.5
  n=$(curl -s "http://127.0.0.1:$RA/metrics" | awk '/^claude_relay_in_flight_requests / {print $2}')
  r=$(rss_kb "$relay_pid")
  [ "${n:-0}" -gt "$peak_streams" ] && peak_streams=$n
  [ "$r" -gt "$peak_rss" ] && peak_rss=$r
done
wait "$wrk_pid" || true
hwm=$(hwm_kb "$relay_pid")

report=$(
  echo "== claude-relay benchmark ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores) =="
  echo
  echo "throughput (wrk -t2 -c$CONNECTIONS -d${DURATION}s, 1 KB JSON responses; median of $ROUNDS rounds)"
  printf '%-8s %12s %10s %10s\n' target req/s p50_us p99_us
  echo "$tp" | awk '{printf "%-8s %12.0f %10.0f %10.0f %s %s %s %s %s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9}'
  echo
  echo "latency (wrk -t1 -c1 -d${DURATION}s)"
  printf '%-8s %12s %10s %10s\n' target req/s p50_us p99_us
  echo "$lat" | awk '{printf "%-8s %12.0f %10.0f %10.0f %s %s %s %s %s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9}'
  echo
  d=$(echo "$tp" | awk '$1=="direct"{print $2}'); n=$(echo "$tp" | awk '$1=="nginx"{print $2}'); r=$(echo "$tp" | awk '$1=="relay"{print $2}')
  ld=$(echo "$lat" | awk '$1=="direct"{print $3}'); ln=$(echo "$lat" | awk '$1=="nginx"{print $3}'); lr=$(echo "$lat" | awk '$1=="relay"{print $3}')
  awk -v d="$d" -v n="$n" -v r="$r" 'BEGIN {printf "ratios: relay/nginx throughput %.2f (target >= 1.00); relay/direct %.2f; nginx/direct %.2f\n", r/n, r/d, n/d}'
  r3=$(echo "$tp" | awk '$1=="relay3"{print $2}')
  awk -v r="$r" -v r3="$r3" 'BEGIN {printf "three regions x three keys, shared breakers: %.2f of the core relay path (target >= 0.95)\n", r3/r}'
  awk -v ld="$ld" -v ln="$ln" -v lr="$lr" 'BEGIN {printf "added p50 latency over direct: relay %.0f us (target < 100 us); nginx %.0f us\n", lr-ld, ln-ld}'
  echo
  echo "relay-key vs signed (relay-load -c$CONNECTIONS -d${DURATION}s, same relay, Redis on loopback; median of $ROUNDS rounds)"
  echo "$sig" | sed 's/=/ /g' | awk '{printf "%-10s %10.0f req/s  p50 %6d us  p99 %6d us  errors %d\n", $1, $7, $9, $11, $13}'
  echo "$sig" | sed 's/=/ /g' | awk '$1=="relay-key"{k=$7} $1=="signed"{s=$7} END {printf "ratio: signed/relay-key throughput %.2f (target >= 0.80)\n", s/k}'
  # CPU per request is steadier than req/s on a shared machine: the median turn of each.
  cpu_median() { echo "$sig_all" | awk -v m="$1" '$1==m' | tr ' ' '\n' | sed -n "s/^$2=//p" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
  for m in relay-key signed ${BASE:+base-key}; do
    printf "%-10s CPU per request: relay %4d us, Redis %3d us (median of %d rounds)\n" "$m" "$(cpu_median "$m" relay_cpu_us)" "$(cpu_median "$m" redis_cpu_us)" "$ROUNDS"
  done
  if [ -n "$BASE" ]; then
    echo
    echo "this build against BASE ($BASE), taking turns in the same run"
    b=$(echo "$tp" | awk '$1=="base"{print $2}')
    awk -v r="$r" -v b="$b" 'BEGIN {printf "throughput (median of the wrk rounds): relay %.0f, base %.0f req/s, relay/base %.3f\n", r, b, r/b}'
    echo "$tp_all" | awk '$1=="relay"||$1=="base" {printf "  round %s %.0f req/s\n", $1, $2}'
    k=$(cpu_median relay-key relay_cpu_us); bk=$(cpu_median base-key relay_cpu_us)
    awk -v k="$k" -v b="$bk" 'BEGIN {printf "relay CPU per relay-key request (median): relay %d, base %d us, relay/base %.3f\n", k, b, k/b}'
    echo "$sig_all" | awk '$1=="relay-key"||$1=="base-key"' | sed 's/=/ /g' | awk '{printf "  round %-9s %8.0f req/s  relay_cpu_us %s\n", $1, $7, $(NF-2)}'
  fi
  echo
  echo "time to first stream event (relay-load -c1 -d${DURATION}s, mock upstream, three turns on/off)"
  echo "$first" | sed 's/=/ /g' | awk '{printf "accounting %-4s %10.0f req/s  p50 %6d us  p99 %6d us  errors %d\n", $1, $7, $9, $11, $13}'
  # The median turn of each: one turn hit by the shared machine's noise does not decide.
  median_p50() { echo "$first" | sed 's/=/ /g' | awk -v m="$1" '$1==m {print $9}' | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
  awk -v on="$(median_p50 on)" -v off="$(median_p50 off)" 'BEGIN {printf "ratio: median p50 with/without accounting %.2f (%d vs %d us; target: no measurable difference, ~1.00)\n", on/off, on, off}'
  echo "throughput with accounting on and off (relay-load -c$CONNECTIONS -d${DURATION}s, 1 KB JSON from the mock upstream)"
  echo "$acct" | sed 's/=/ /g' | awk '{printf "accounting %-4s %10.0f req/s  p50 %6d us  p99 %6d us  errors %d\n", $1, $7, $9, $11, $13}'
  echo "$acct" | sed 's/=/ /g' | awk '$1=="on"{on+=$7} $1=="off"{off+=$7} END {printf "ratio: throughput with/without accounting %.2f\n", on/off}'
  echo
  echo "cache hit vs relayed (relay-load -c$CONNECTIONS -d${DURATION}s, same relay)"
  echo "$cache" | sed 's/=/ /g' | awk '{printf "%-13s %10.0f req/s  p50 %6d us  p99 %6d us  errors %d\n", $1, $7, $9, $11, $13}'
  echo "$cache" | sed 's/=/ /g' | awk '$1=="hit"{h=$9; hr=$7} $1=="relayed"{r=$9; rr=$7} $1=="relayed-20ms"{s=$9} END {printf "ratios: hit faster than relayed p50 %.1fx, throughput %.1fx (instant local upstream); p50 %.1fx against a 20 ms upstream (target >= 5x)\n", r/h, hr/rr, s/h}'
  echo
  awk -v i="$idle_rss" 'BEGIN {printf "relay RSS idle: %.1f MB (target < 30 MB)\n", i/1024}'
  awk -v p="$peak_rss" -v h="$hwm" -v s="$peak_streams" 'BEGIN {printf "relay RSS with %d concurrent open streams: %.1f MB, peak %.1f MB (target < 100 MB)\n", s, p/1024, h/1024}'
)
echo
echo "$report" | tee "$out/results.txt"
