#!/usr/bin/env bash
# Compressed answers: what reading usage from gzip answers costs the relay,
# against identity answers in the same run, taking turns.
#   throughput — 1 KB Messages JSON answers (usage accounting on, the
#     default), from nginx serving the body as it is or precompressed
#     (gzip_static: no compression cost upstream), as the client asks with
#     `Accept-Encoding: gzip` or not. Target: gzip/identity >= 0.90.
#   time to the first event of a stream — the Claude API double streaming
#     identity or gzip flushed per event, through the relay and directly;
#     what the relay adds for gzip beyond what it adds for identity.
#     Target: < 1 ms.
# Prints figures as ratios against the identity baseline of the same run.
#
#   bench/compressed.sh                       # DURATION=10 CONNECTIONS=64 ROUNDS=3
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
out=${OUT:-$root/bench/out}
mkdir -p "$out"
. "$here/common.sh"
need curl
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true

echo "building release binaries..."
(cd "$root" && cargo build --release --locked -q -p claude-relay-proxy -p claude-relay-testkit --bin claude-relay-proxy --bin relay-load --bin mock-upstream)
RELAY="$root/target/release/claude-relay-proxy"
LOAD="$root/target/release/relay-load"
MOCK="$root/target/release/mock-upstream"

UP=$(free_port); MK=$(free_port); RL=$(free_port); RA=$(free_port)

# A 1 KB Messages answer of varied text (compresses about as a real one,
# ~2.5x), and its gzip; POST is turned into the static file (405 -> 200).
# nginx's workers run as another user: they may pass through the work
# directory (0700 from mktemp) to the files, not list it.
mkdir -p "$work/up/www/v1"
chmod 711 "$work" "$work/up"
python3 - "$work/up/www/v1" <<'PY'
import gzip, json, random, sys
random.seed(14)
words = ("the relay passes every byte through unchanged while it reads usage from "
         "answers compressed by the upstream and counts tokens per client model and day").split()
text = " ".join(random.choice(words) for _ in range(150))[:780]
body = json.dumps({"id": "msg_bench", "type": "message", "role": "assistant", "model": "claude-bench",
    "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 25, "output_tokens": 180}}, separators=(",", ":")).encode()
open(f"{sys.argv[1]}/messages", "wb").write(body)
open(f"{sys.argv[1]}/messages.gz", "wb").write(gzip.compress(body, 6))
PY
start_nginx_upstream "$UP" "root $work/up/www; default_type application/json; gzip_static on; error_page 405 =200 \$uri;"
"$MOCK" --listen "127.0.0.1:$MK" 2>/dev/null & pids+=($!)

cat > "$work/relay.yaml" <<YAML
server: {listen: 127.0.0.1:$RL, admin_listen: 127.0.0.1:$RA}
log: {level: warn}
clients: [{id: bench, relay_keys: [{file: $work/relay.key}]}]
regions:
  - {name: json, base_url: 'http://127.0.0.1:$UP', api_keys: [{file: $work/upstream.key}]}
  - {name: sse, priority: 10, base_url: 'http://127.0.0.1:$MK', api_keys: [{file: $work/upstream.key}]}
YAML
"$RELAY" --config "$work/relay.yaml" > "$work/relay.log" 2>&1 & pids+=($!)
wait_port "$UP"; wait_port "$MK"; wait_port "$RL"
sizes=$(for enc in identity gzip; do
  curl -s -o /dev/null -w "$enc %{http_code} %{size_download} bytes, " -X POST -H "x-api-key: bench-relay-key" \
    -H "x-relay-region: json" -H "accept-encoding: $enc" -d '{}' "http://127.0.0.1:$RL/v1/messages"; done)

json_load() { # extra relay-load args...
  "$LOAD" --url "http://127.0.0.1:$RL/v1/messages" --connections "$CONNECTIONS" --seconds "$DURATION" --threads 2 \
    --relay-key bench-relay-key --header "x-relay-region:json" "$@"
}
echo "warming up..."
json_load > /dev/null; json_load --header "accept-encoding:gzip" > /dev/null
echo "throughput: relay-load -c$CONNECTIONS -d${DURATION}s, identity and gzip taking turns, $ROUNDS rounds"
tp=$(for _ in $(seq 1 "$ROUNDS"); do
  echo "identity $(json_load)"
  echo "gzip $(json_load --header 'accept-encoding:gzip')"
done)
echo "$tp" > "$out/compressed-throughput.txt"

STREAM_BODY='{"model":"claude-bench","max_tokens":256,"stream":true,"messages":[{"role":"user","content":"Say hello"}]}'
ttfe() { # port, extra relay-load args...
  local port=$1; shift
  "$LOAD" --url "http://127.0.0.1:$port/v1/messages" --connections 1 --seconds "$DURATION" --threads 1 \
    --relay-key bench-relay-key --body "$STREAM_BODY" --header "x-mock:stream" --header "x-relay-region:sse" \
    --first-byte "$@"
}
echo "time to first event: relay-load -c1 -d${DURATION}s --first-byte, relay and direct, identity and gzip, 3 turns"
ttfe "$RL" > /dev/null; ttfe "$RL" --header "accept-encoding:gzip" > /dev/null
first=$(for _ in 1 2 3; do
  echo "relay-identity $(ttfe "$RL")"
  echo "relay-gzip $(ttfe "$RL" --header 'accept-encoding:gzip')"
  echo "direct-identity $(ttfe "$MK")"
  echo "direct-gzip $(ttfe "$MK" --header 'accept-encoding:gzip')"
done)
echo "$first" > "$out/compressed-first-event.txt"
metrics=$(curl -s "http://127.0.0.1:$RA/metrics")

# The median turn of each by a field of relay-load's line (rps, p50_us).
median() { # name field
  echo "${3:-$tp}" | awk -v n="$1" '$1==n' | tr ' ' '\n' | sed -n "s/^$2=//p" | sort -g |
    awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'
}
report=$(
  echo "== compressed answers ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores) =="
  echo "answer bytes on the wire: $sizes"
  echo
  echo "throughput with usage accounting (relay-load -c$CONNECTIONS -d${DURATION}s, 1 KB JSON; median of $ROUNDS rounds)"
  for n in identity gzip; do
    printf '%-9s %10.0f req/s  p50 %6d us  p99 %6d us\n' "$n" "$(median "$n" rps)" "$(median "$n" p50_us)" "$(median "$n" p99_us)"
  done
  awk -v g="$(median gzip rps)" -v i="$(median identity rps)" \
    'BEGIN {printf "ratio: gzip/identity throughput %.2f (target >= 0.90)\n", g/i}'
  echo
  echo "time to first stream event (relay-load -c1 -d${DURATION}s --first-byte; median p50 of 3 turns)"
  for n in relay-identity relay-gzip direct-identity direct-gzip; do
    printf '%-16s p50 %6d us  p99 %6d us\n' "$n" "$(median "$n" p50_us "$first")" "$(median "$n" p99_us "$first")"
  done
  awk -v ri="$(median relay-identity p50_us "$first")" -v rg="$(median relay-gzip p50_us "$first")" \
      -v di="$(median direct-identity p50_us "$first")" -v dg="$(median direct-gzip p50_us "$first")" \
    'BEGIN {printf "relay adds %d us for identity, %d us for gzip: gzip adds %d us (target < 1000 us); ratio gzip/identity through the relay %.2f\n", ri-di, rg-dg, (rg-dg)-(ri-di), rg/ri}'
  echo
  echo "the relay read them (its /metrics):"
  echo "$metrics" | grep -E '^claude_relay_(usage_decodes|tokens)_total' | grep -E 'decodes|output_tokens'
)
echo
echo "$report" | tee "$out/compressed-results.txt"
