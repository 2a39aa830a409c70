#!/usr/bin/env bash
# CPU cost per request, counted in instructions by valgrind's callgrind:
# repeatable on a shared, noisy machine where wall-clock throughput is not.
# Each proxy runs alone under callgrind (one worker, so one thread does all
# the work), the upstream is nginx serving a 1 KB Messages response, and wrk
# drives the same POST through
#   nginx  — Debian's nginx as a plain reverse proxy (the baseline)
#   relay  — claude-relay-proxy, relay key, shared state in Redis
#   signed — the same relay, every request signed with a fresh nonce
# Counting is switched on only while the load runs, so start-up is excluded.
# Prints instructions per request and the relay/nginx ratio.
#
#   bench/instructions.sh              # REQUESTS_SECONDS=8 by default
#   PROFILE=1 bench/instructions.sh    # also the relay's top functions
#   TARGETS="nginx relay" bench/instructions.sh   # only some of the runs
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
SECONDS_OF_LOAD=${REQUESTS_SECONDS:-8}
TARGETS=${TARGETS:-nginx relay relay-key signed cache-hit}
out=${OUT:-$root/bench/out}
mkdir -p "$out"
. "$here/common.sh"

need wrk
need redis-server
need valgrind "and apt-get install valgrind"
need callgrind_control "and apt-get install valgrind"

echo "building release binaries..."
(cd "$root" && cargo build --release --locked -q -p claude-relay-proxy --bin claude-relay-proxy --bin relay-load)
RELAY=${RELAY:-$root/target/release/claude-relay-proxy}
LOAD="$root/target/release/relay-load"


UP=$(free_port); NG=$(free_port); RL=$(free_port); RA=$(free_port); RD=$(free_port)
redis-server --port "$RD" --bind 127.0.0.1 --save "" --appendonly no --daemonize no > "$work/redis.log" 2>&1 & pids+=($!)

# master_process off: the one process under callgrind is the one that works.
write_proxy_conf "$NG" "$UP" 64 4096 "worker_processes 1;
master_process off;"
cat > "$work/relay.yaml" <<YAML
server: {listen: 127.0.0.1:$RL, admin_listen: 127.0.0.1:$RA, workers: 1}
log: {level: warn}
store: {redis: {url: "redis://127.0.0.1:$RD"}}
clients:
  - {id: bench, relay_keys: [{file: $work/relay.key}]}
  - {id: bench-signer, signing_secrets: [{file: $work/signing.secret}]}
regions:
  - {name: local, base_url: "http://127.0.0.1:$UP", api_keys: [{file: $work/upstream.key}]}
YAML

start_upstream "$UP"
wait_port "$UP"; wait_port "$RD"

grind() { # name: starts the named proxy under callgrind, counting off
  local name=$1
  local vg=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/$name.cg")
  case $name in
    nginx) "${vg[@]}" "$NGINX" -c "$work/ng/nginx.conf" -p "$work/ng" > "$work/$name.log" 2>&1 & ;;
    *) "${vg[@]}" "$RELAY" --config "$work/relay.yaml" > "$work/$name.log" 2>&1 & ;;
  esac
  grind_pid=$!
  pids+=($grind_pid)
}
# Instructions counted while `load` runs, over the requests it completed.
measure() { # name port load-command...
  local name=$1 port=$2; shift 2
  grind "$name"
  wait_port "$port"
  "$@" > /dev/null 2>&1 || true    # warm-up: connections, pools, caches
  callgrind_control -i on "$grind_pid" > /dev/null 2>&1
  local done
  done=$("$@")
  callgrind_control -i off "$grind_pid" > /dev/null 2>&1
  kill -INT "$grind_pid" 2>/dev/null || kill "$grind_pid"
  wait "$grind_pid" 2>/dev/null || true
  local ir
  ir=$(awk '/^totals:/ {print $2; exit}' "$work/$name.cg")
  echo "$name $done $ir" | awk '{printf "%-7s %9d requests %15d instructions %9.0f per request\n", $1, $2, $3, $3/$2}'
  cp "$work/$name.cg" "$out/callgrind-$name.out"
}
wrk_count() { # port: completed requests of a short wrk run
  wrk -t1 -c8 -d"${SECONDS_OF_LOAD}s" -s "$work/post.lua" "http://127.0.0.1:$1/v1/messages" |
    awk '/requests in/ {print $1}'
}
load_count() { # mode
  "$LOAD" --url "http://127.0.0.1:$RL/v1/messages" --connections 8 --seconds "$SECONDS_OF_LOAD" --threads 1 \
    --mode "$1" --relay-key bench-relay-key --key-id bench-signer --secret-file "$work/signing.secret" |
    awk '{for (i = 1; i <= NF; i++) if ($i ~ /^requests=/) {sub(/requests=/, "", $i); print $i}}'
}

# Every request after the first answered from the response cache (level 1).
hit_count() {
  "$LOAD" --url "http://127.0.0.1:$RL/v1/messages" --connections 8 --seconds "$SECONDS_OF_LOAD" --threads 1 \
    --relay-key bench-relay-key --header "x-relay-cache:on" |
    awk '{for (i = 1; i <= NF; i++) if ($i ~ /^requests=/) {sub(/requests=/, "", $i); print $i}}'
}

echo "instructions per request (callgrind; wrk -t1 -c8 -d${SECONDS_OF_LOAD}s, 1 KB responses)"
wanted() { [[ " $TARGETS " == *" $1 "* ]]; }
res=$( { if wanted nginx; then measure nginx "$NG" wrk_count "$NG"; fi
         if wanted relay; then measure relay "$RL" wrk_count "$RL"; fi
         if wanted relay-key; then measure relay-key "$RL" load_count relay-key; fi
         if wanted signed; then measure signed "$RL" load_count signed; fi
         if wanted cache-hit; then measure cache-hit "$RL" hit_count; fi; } )
echo "$res" | tee "$out/instructions.txt"
echo "$res" | awk '{ir[$1]=$6} END {
  if (ir["relay"] && ir["nginx"]) printf "relay / nginx instructions per request: %.2f (below 1: the relay does less work)\n", ir["relay"]/ir["nginx"]
  if (ir["signed"] && ir["relay-key"]) printf "signed / relay-key instructions per request: %.2f\n", ir["signed"]/ir["relay-key"]
  if (ir["relay-key"] && ir["cache-hit"]) printf "relayed (relay-key) / cache hit instructions per request: %.2f\n", ir["relay-key"]/ir["cache-hit"] }'

if [ "${PROFILE:-0}" = 1 ]; then
  callgrind_annotate --inclusive=no "$out/callgrind-${PROFILE_OF:-relay}.out" 2>/dev/null | sed -n '1,60p'
fi
