#!/usr/bin/env bash
# What the concurrency slot's release costs at the end of an answer: two
# clients of one relay with shared state in Redis, the same admission (a
# token quota), one of them also with `max_concurrent: 1`, whose slot is
# released in Redis before its answer's last byte goes out. wrk with one
# connection sends strictly one request after another (every answer of the
# capped client must be a 200); the difference of the latencies is the
# release's round trip.
#
#   bench/slot_release.sh                      # 3 rounds of 5 s each
#   ROUNDS=5 SECS=8 bench/slot_release.sh
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
. "$here/common.sh"
need wrk
need redis-server

echo "building the release binary..."
(cd "$root" && cargo build --release --locked -q -p claude-relay-proxy --bin claude-relay-proxy)
RELAY=${RELAY:-$root/target/release/claude-relay-proxy}

UP=$(free_port); RL=$(free_port); RA=$(free_port); RD=$(free_port)
redis-server --port "$RD" --bind 127.0.0.1 --save "" --appendonly no > "$work/redis.log" 2>&1 & pids+=($!)
echo "capped-relay-key" > "$work/capped.key"
cat > "$work/relay.yaml" <<YAML
server: {listen: 127.0.0.1:$RL, admin_listen: 127.0.0.1:$RA, workers: 1}
log: {level: warn}
store: {redis: {url: "redis://127.0.0.1:$RD"}}
clients:
  - {id: plain, relay_keys: [{file: $work/relay.key}], quota: {tokens_per_minute: 1000000000}}
  - {id: capped, relay_keys: [{file: $work/capped.key}], quota: {tokens_per_minute: 1000000000, max_concurrent: 1}}
regions:
  - {name: local, base_url: "http://127.0.0.1:$UP", api_keys: [{file: $work/upstream.key}]}
YAML
start_upstream "$UP"; wait_port "$UP"; wait_port "$RD"
"$RELAY" --config "$work/relay.yaml" > "$work/relay.log" 2>&1 & pids+=($!)
wait_port "$RL"
sed 's/bench-relay-key/capped-relay-key/' "$work/post.lua" > "$work/capped.lua"
for round in $(seq 1 "${ROUNDS:-3}"); do
  for who in plain capped; do
    script=$work/post.lua; [ "$who" = capped ] && script=$work/capped.lua
    printf '%-6s round %s: ' "$who" "$round"
    wrk -t1 -c1 -d"${SECS:-5}"s --latency -s "$script" "http://127.0.0.1:$RL/v1/messages" \
      | awk '/^ +Latency +[0-9]/{m=$2} /^ +50%/{p50=$2} /^ +99%/{p99=$2} /Requests\/sec/{r=$2} /Non-2xx/{bad=$NF}
             END{printf "mean %s p50 %s p99 %s req/s %s%s\n", m, p50, p99, r, bad ? " NON-2xx " bad : ""}'
  done
done
