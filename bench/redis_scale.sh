#!/usr/bin/env bash
# Redis at scale: signed requests (a fresh nonce each, checked in Redis) from
# four relay replicas sharing one redis-server, the 1 KB JSON path upstream
# (nginx, as in run.sh). Four relay-load generators, one per replica, run at
# once. It prints the replicas' requests/s, the requests served per second of
# Redis CPU (requests/s per Redis core), Redis commands per request by command
# (INFO commandstats before and after) and the reads Redis processed per
# request (INFO stats total_reads_processed: one per round trip a client
# makes, fewer when a client's round trips arrive together). Targets: one
# round trip and at most two commands per signed request. The same with
# relay-key requests follows, for what signing adds.
#
#   bench/redis_scale.sh               # 10 s per mode
#   SECS=20 REPLICAS=4 bench/redis_scale.sh
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
SECS=${SECS:-10}
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
ports=()
for i in $(seq 1 "$REPLICAS"); do
  p=$(free_port); a=$(free_port); ports+=("$p")
  # Replicas of one relay: the same name, clients and Redis.
  cat > "$work/relay-$i.yaml" <<YAML
relay_name: bench-scale
server: {listen: 127.0.0.1:$p, admin_listen: 127.0.0.1:$a, workers: 1}
log: {level: warn}
store: {redis: {url: "redis://127.0.0.1:$RD"}}
clients:
  - {id: bench, relay_keys: [{file: $work/relay.key}]}
  - {id: bench-signer, signing_secrets: [{file: $work/signing.secret}]}
regions: [{name: local, base_url: "http://127.0.0.1:$UP", api_keys: [{file: $work/upstream.key}]}]
YAML
  "$RELAY" --config "$work/relay-$i.yaml" > "$work/relay-$i.log" 2>&1 & pids+=($!)
done
for p in "${ports[@]}"; do wait_port "$p"; done

rcli() { redis-cli -p "$RD" "$@"; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
CLK_TCK=$(getconf CLK_TCK)
stat_of() { rcli info stats | tr -d '\r' | awk -F: -v k="$1" '$1==k {print $2}'; }
commandstats() { rcli info commandstats | tr -d '\r' | sed -n 's/^cmdstat_\([^:]*\):calls=\([0-9]*\),.*/\1 \2/p'; }

run() { # mode seconds: all replicas at once; prints "requests errors"
  local i=0
  for p in "${ports[@]}"; do
    i=$((i + 1))
    "$LOAD" --url "http://127.0.0.1:$p/v1/messages" --connections "$CONNECTIONS" --seconds "$2" --threads 1 \
      --mode "$1" --relay-key bench-relay-key --key-id bench-signer --secret-file "$work/signing.secret" > "$work/load-$i.txt" &
  done
  wait  # run is called in $(...): its only children are the generators
  cat "$work"/load-*.txt | sed -n 's/.*requests=\([0-9]*\).*errors=\([0-9]*\).*/\1 \2/p' | awk '{n += $1; e += $2} END {print n, e}'
}

measure() { # mode
  : "$(run "$1" 2)"  # warm-up: connections, the replicas' Redis pools (in $(...), as run waits)
  rcli config resetstat > /dev/null
  local cpu0 reads0 t0 t1 res n e cpu reads
  cpu0=$(ticks "$redis_pid"); reads0=$(stat_of total_reads_processed); t0=$(date +%s.%N)
  res=$(run "$1" "$SECS")
  t1=$(date +%s.%N)
  cpu=$(( $(ticks "$redis_pid") - cpu0 )); reads=$(( $(stat_of total_reads_processed) - reads0 ))
  n=${res% *}; e=${res#* }
  echo "== $1 requests: $REPLICAS replicas x relay-load -c$CONNECTIONS, ${SECS}s =="
  awk -v n="$n" -v e="$e" -v c="$cpu" -v hz="$CLK_TCK" -v t0="$t0" -v t1="$t1" -v r="$reads" 'BEGIN {
    s = c / hz
    printf "requests %d (errors %d), %.0f req/s over the replicas\n", n, e, n / (t1 - t0)
    printf "Redis CPU %.2f s: %.0f requests per Redis CPU second (req/s per Redis core), %.1f us per request\n", s, (s > 0 ? n / s : 0), s * 1e6 / n
    printf "Redis reads processed per request: %.2f (round trips, or fewer when they arrive together)\n", r / n
  }'
  commandstats | awk -v n="$n" '{t += $2; printf "  %-10s %.3f per request\n", $1, $2 / n} END {printf "Redis commands per request: %.2f (commandstats; the benchmark'"'"'s own INFO/CONFIG calls included)\n", t / n}'
}

echo "redis-server $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'), $(nproc) cores"
measure signed
measure relay-key
