#!/usr/bin/env bash
# Redis at scale: signed requests (a fresh nonce each, checked in Redis) from
# four relay replicas sharing one redis-server, the 1 KB JSON path upstream
# (nginx, as in run.sh). Four relay-load generators, one per replica, run at
# once. It prints the replicas' requests/s, the requests served per second of
# Redis CPU (requests/s per Redis core), Redis commands per request by command
# (INFO commandstats before and after) and the reads Redis processed per
# request (INFO stats total_reads_processed: one per round trip a client
# makes, fewer when a client's round trips arrive together). Targets: one
# round trip and at most two commands per signed request.
#
# What pipelining gains: four twins of the replicas (same binary, same
# config but `store.redis.pipeline: false`: one command at a time on each
# Redis connection) take turns with them under the same load, ROUNDS rounds
# (the order swapped each round), and the report ends with the medians of
# each and the ratios on/off: requests/s, Redis reads per request, signed
# requests per Redis CPU second, p50 and p99 latency. The same with
# relay-key requests follows (pipelining on), for what signing adds.
#
#   bench/redis_scale.sh               # 2 rounds, 10 s per turn (about 1.5 minutes)
#   ROUNDS=3 SECS=20 REPLICAS=4 bench/redis_scale.sh
#   RELAY=path LOAD=path bench/redis_scale.sh   # other builds (no build)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
SECS=${SECS:-10}
ROUNDS=${ROUNDS:-2}
REPLICAS=${REPLICAS:-4}
CONNECTIONS=${CONNECTIONS:-16}   # per replica
. "$here/common.sh"
need redis-server
need redis-cli
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true

if [ -z "${RELAY:-}" ] || [ -z "${LOAD:-}" ]; then
  echo "building release binaries..."
  (cd "$root" && cargo build --release --locked -q -p claude-relay-proxy --bin claude-relay-proxy --bin relay-load)
fi
RELAY=${RELAY:-$root/target/release/claude-relay-proxy}
LOAD=${LOAD:-$root/target/release/relay-load}

UP=$(free_port); RD=$(free_port)
redis-server --port "$RD" --bind 127.0.0.1 --save "" --appendonly no > "$work/redis.log" 2>&1 & redis_pid=$!; pids+=($redis_pid)
start_upstream "$UP"
wait_port "$UP"; wait_port "$RD"

start_replicas() { # name pipeline: REPLICAS relays, their ports in $work/ports-NAME
  local i p a
  : > "$work/ports-$1"
  for i in $(seq 1 "$REPLICAS"); do
    p=$(free_port); a=$(free_port); echo "$p" >> "$work/ports-$1"
    # Replicas of one relay: the same name, clients and Redis.
    cat > "$work/relay-$1-$i.yaml" <<YAML
relay_name: bench-scale
server: {listen: 127.0.0.1:$p, admin_listen: 127.0.0.1:$a, workers: 1}
log: {level: warn}
store: {redis: {url: "redis://127.0.0.1:$RD", pipeline: $2}}
clients:
  - {id: bench, relay_keys: [{file: $work/relay.key}]}
  - {id: bench-signer, signing_secrets: [{file: $work/signing.secret}]}
regions: [{name: local, base_url: "http://127.0.0.1:$UP", api_keys: [{file: $work/upstream.key}]}]
YAML
    "$RELAY" --config "$work/relay-$1-$i.yaml" > "$work/relay-$1-$i.log" 2>&1 & pids+=($!)
  done
  while read -r p; do wait_port "$p"; done < "$work/ports-$1"
}
start_replicas on true
start_replicas off false

rcli() { redis-cli -p "$RD" "$@"; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
CLK_TCK=$(getconf CLK_TCK)
stat_of() { rcli info stats | tr -d '\r' | awk -F: -v k="$1" '$1==k {print $2}'; }
commandstats() { rcli info commandstats | tr -d '\r' | sed -n 's/^cmdstat_\([^:]*\):calls=\([0-9]*\),.*/\1 \2/p'; }

run() { # replicas mode seconds: all of them at once; prints "requests errors p50_us p99_us"
  local i=0 p ports
  mapfile -t ports < "$work/ports-$1"
  rm -f "$work"/load-*.txt
  for p in "${ports[@]}"; do
    i=$((i + 1))
    "$LOAD" --url "http://127.0.0.1:$p/v1/messages" --connections "$CONNECTIONS" --seconds "$3" --threads 1 \
      --mode "$2" --relay-key bench-relay-key --key-id bench-signer --secret-file "$work/signing.secret" > "$work/load-$i.txt" &
  done
  wait  # run is called in $(...): its only children are the generators
  # Latency: the mean over the generators of each one's percentile.
  cat "$work"/load-*.txt | sed -n 's/.*requests=\([0-9]*\).*p50_us=\([0-9]*\) p99_us=\([0-9]*\) errors=\([0-9]*\).*/\1 \4 \2 \3/p' \
    | awk '{n += $1; e += $2; p50 += $3; p99 += $4; k++} END {printf "%d %d %.0f %.0f\n", n, e, p50 / k, p99 / k}'
}

measure() { # replicas mode: one turn, printed, and its figures appended to $work/results
  : "$(run "$1" "$2" 2)"  # warm-up: connections, the replicas' Redis pools (in $(...), as run waits)
  rcli config resetstat > /dev/null
  local cpu0 reads0 t0 t1 res n e p50 p99 cpu reads
  cpu0=$(ticks "$redis_pid"); reads0=$(stat_of total_reads_processed); t0=$(date +%s.%N)
  res=$(run "$1" "$2" "$SECS")
  t1=$(date +%s.%N)
  cpu=$(( $(ticks "$redis_pid") - cpu0 )); reads=$(( $(stat_of total_reads_processed) - reads0 ))
  read -r n e p50 p99 <<< "$res"
  echo "== $2 requests, pipelining $1: $REPLICAS replicas x relay-load -c$CONNECTIONS, ${SECS}s =="
  awk -v n="$n" -v e="$e" -v c="$cpu" -v hz="$CLK_TCK" -v t0="$t0" -v t1="$t1" -v r="$reads" -v p50="$p50" -v p99="$p99" \
      -v label="$2 $1" -v results="$work/results" 'BEGIN {
    s = c / hz
    printf "requests %d (errors %d), %.0f req/s over the replicas; latency p50 %d us, p99 %d us (mean over the generators)\n", n, e, n / (t1 - t0), p50, p99
    printf "Redis CPU %.2f s: %.0f requests per Redis CPU second (req/s per Redis core), %.1f us per request\n", s, (s > 0 ? n / s : 0), s * 1e6 / n
    printf "Redis reads processed per request: %.2f (round trips, or fewer when they arrive together)\n", r / n
    printf "%s %f %f %f %d %d\n", label, n / (t1 - t0), r / n, (s > 0 ? n / s : 0), p50, p99 >> results
  }'
  commandstats | awk -v n="$n" '{t += $2; printf "  %-10s %.3f per request\n", $1, $2 / n} END {printf "Redis commands per request: %.2f (commandstats; the benchmark'"'"'s own INFO/CONFIG calls included)\n", t / n}'
}

echo "redis-server $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'), $(nproc) cores"
: > "$work/results"
for round in $(seq 1 "$ROUNDS"); do
  # Swapped each round, so a drift of the machine favours neither.
  if [ $((round % 2)) -eq 1 ]; then order="on off"; else order="off on"; fi
  for setting in $order; do measure "$setting" signed; done
done
measure on relay-key

python3 - "$work/results" "$ROUNDS" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
def median(setting, column):
    return statistics.median(float(r[column]) for r in rows if r[:2] == ["signed", setting])
print(f"== pipelining on / off, signed requests (median of {sys.argv[2]} rounds each) ==")
for name, column, unit in [
    ("req/s over the replicas", 2, ""),
    ("Redis reads per request", 3, ""),
    ("signed requests per Redis CPU second", 4, ""),
    ("latency p50", 5, " us"),
    ("latency p99", 6, " us"),
]:
    on, off = median("on", column), median("off", column)
    ratio = on / off if off else float("nan")
    digits = 2 if column == 3 else 0
    print(f"{name:38} on {on:>10.{digits}f}{unit}  off {off:>10.{digits}f}{unit}  on/off {ratio:.2f}")
PY
