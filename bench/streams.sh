#!/usr/bin/env bash
# Streams benchmark: STREAMS concurrent open SSE streams through one relay,
# the upstream (Debian's nginx with the echo module) sending an event every
# 100 ms with its send time in it, and the same streams direct to nginx in
# the same run (the baseline). Then IDLE idle keep-alive connections to the
# relay. It prints the relay's RSS idle and under load (per stream and per
# connection beyond idle), each event's delay from its send time direct and
# through the relay (p50/p99 added), the relay's CPU per event, and the
# streams stalled, cut or never opened. Figures, not pass/fail.
#
#   bench/streams.sh                       # 10,000 streams (or as many as the fd cap fits)
#   STREAMS=2000 SECONDS_HELD=20 bench/streams.sh
#   IDLE=50000 bench/streams.sh            # idle connections (as many as fit)
#   RELAY=path LOAD=path bench/streams.sh  # other builds, no build
#
# A relayed stream holds two descriptors in the relay (client and upstream),
# so under a cap of 20,000 open files a process holds about 9,900 streams;
# the stream and idle counts are lowered to what fits, and said so.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
STREAMS=${STREAMS:-10000}
IDLE=${IDLE:-50000}
SECONDS_HELD=${SECONDS_HELD:-20}
INTERVAL_MS=${INTERVAL_MS:-100}
out=${OUT:-$root/bench/out}
mkdir -p "$out"
. "$here/common.sh"

need redis-server
ECHO_MODULE=/usr/lib/nginx/modules/ngx_http_echo_module.so
[ -f "$ECHO_MODULE" ] || { echo "missing nginx's echo module: run scripts/install-test-deps.sh" >&2; exit 1; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
fds=$(ulimit -n)
# Room for the relay's own descriptors (listeners, Redis, epoll, files).
reserve=200
fit_streams=$(( (fds - reserve) / 2 ))
[ "$STREAMS" -le "$fit_streams" ] || { echo "open files capped at $fds: $fit_streams streams instead of $STREAMS" >&2; STREAMS=$fit_streams; }
fit_idle=$(( fds - reserve ))
[ "$IDLE" -le "$fit_idle" ] || { echo "open files capped at $fds: $fit_idle idle connections instead of $IDLE" >&2; IDLE=$fit_idle; }

if [ -z "${RELAY:-}" ] || [ -z "${LOAD:-}" ]; then
  echo "building release binaries..."
  (cd "$root" && cargo build --release --locked -q -p claude-relay-proxy --bin claude-relay-proxy --bin stream-load)
fi
RELAY=${RELAY:-$root/target/release/claude-relay-proxy}
LOAD=${LOAD:-$root/target/release/stream-load}

UP=$(free_port); RL=$(free_port); RA=$(free_port); RD=$(free_port)
redis-server --port "$RD" --bind 127.0.0.1 --save "" --appendonly no --daemonize no > "$work/redis.log" 2>&1 & pids+=($!)

# The upstream: every request answered by an SSE stream, one ping event every
# INTERVAL_MS carrying nginx's clock ($msec, ms) when it was written, for
# longer than the streams are held.
events=$(( (SECONDS_HELD + 10) * 1000 / INTERVAL_MS ))
sleep_s=$(awk -v ms="$INTERVAL_MS" 'BEGIN {printf "%.3f", ms/1000}')
mkdir -p "$work/up"
{
  echo "load_module $ECHO_MODULE;"
  echo "worker_processes 1; worker_rlimit_nofile $fds; daemon off;"
  echo "pid $work/up/nginx.pid; error_log $work/up/error.log warn;"
  echo "events { worker_connections $fds; }"
  echo "http { access_log off; keepalive_requests 1000000;"
  echo "  client_body_temp_path $work/up; proxy_temp_path $work/up; fastcgi_temp_path $work/up; uwsgi_temp_path $work/up; scgi_temp_path $work/up;"
  echo "  server { listen 127.0.0.1:$UP backlog=4096; location / { default_type text/event-stream; echo_read_request_body;"
  for _ in $(seq 1 "$events"); do
    echo "    echo_sleep $sleep_s; echo 'event: ping'; echo 'data: {\"type\":\"ping\",\"t\":\$msec}'; echo; echo_flush;"
  done
  echo "  } } }"
} > "$work/up/nginx.conf"
"$NGINX" -c "$work/up/nginx.conf" -p "$work/up" & pids+=($!)

cat > "$work/relay.yaml" <<YAML
# By default the relay takes half its descriptors' room in client
# connections (each stream also holds an upstream one); idle connections
# hold one each, so the cap is lifted to all of it.
server: {listen: 127.0.0.1:$RL, admin_listen: 127.0.0.1:$RA, max_connections: $fit_idle}
log: {level: warn}
store: {redis: {url: "redis://127.0.0.1:$RD"}}
clients: [{id: bench, relay_keys: [{file: $work/relay.key}]}]
# A region lets 4,096 requests in flight by default (more wait): raised, so
# that every stream is relayed at once.
regions: [{name: local, base_url: 'http://127.0.0.1:$UP', api_keys: [{file: $work/upstream.key}], pool: {max_in_flight: $((STREAMS + 100))}}]
YAML
"$RELAY" --config "$work/relay.yaml" > "$work/relay.log" 2>&1 & relay_pid=$!; pids+=($relay_pid)
wait_port "$UP"; wait_port "$RL"; wait_port "$RD"
sleep 0.5

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
CLK_TCK=$(getconf CLK_TCK)
open_fds() { ls "/proc/$1/fd" | wc -l; }
# A warm-up stream, so idle RSS counts the relay's pools and first allocations.
"$LOAD" --url "http://127.0.0.1:$RL/v1/messages" --connections 1 --seconds 2 --warmup 0 --header x-api-key:bench-relay-key > /dev/null
sleep 0.5
idle_rss=$(rss_kb "$relay_pid"); idle_fds=$(open_fds "$relay_pid")

# run NAME PORT: stream-load's line; for the relay, its peak RSS and open
# streams (two descriptors each beyond idle) sampled while held, and its CPU.
run() {
  local name=$1 port=$2 peak_rss=0 peak_n=0 cpu0 line r n pid
  cpu0=$(ticks "$relay_pid")
  "$LOAD" --url "http://127.0.0.1:$port/v1/messages" --connections "$STREAMS" --seconds "$SECONDS_HELD" \
    --header x-api-key:bench-relay-key > "$work/$name.out" & pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if [ "$name" = relay ]; then
      r=$(rss_kb "$relay_pid"); n=$(( ($(open_fds "$relay_pid") - idle_fds) / 2 ))
      [ "$r" -gt "$peak_rss" ] && peak_rss=$r
      [ "${n:-0}" -gt "$peak_n" ] && peak_n=$n
    fi
  done
  wait "$pid"
  line=$(cat "$work/$name.out")
  echo "$name $line relay_ticks=$(( $(ticks "$relay_pid") - cpu0 )) peak_rss_kb=$peak_rss peak_streams=$peak_n"
}
echo "streams: $STREAMS for ${SECONDS_HELD}s, an event every ${INTERVAL_MS} ms; direct, then through the relay"
direct=$(run direct "$UP")
relayed=$(run relay "$RL")
echo "$direct" > "$out/streams.txt"; echo "$relayed" >> "$out/streams.txt"
sleep 2
after_streams_rss=$(rss_kb "$relay_pid")

# Idle keep-alive connections: one request each (a 401 the relay answers
# itself, keep-alive), then held; split over client processes for their fds.
# The relay's upstream pool still holds the streams' connections for a while.
avail=$(( fds - reserve - $(open_fds "$relay_pid") ))
[ "$IDLE" -le "$avail" ] || { echo "relay has $avail descriptors free: $avail idle connections instead of $IDLE" >&2; IDLE=$avail; }
echo "idle keep-alive: $IDLE connections held 15 s"
per=$(( fds - 100 )); left=$IDLE; loaders=(); k=0
before_idle_rss=$(rss_kb "$relay_pid"); idle_fds=$(open_fds "$relay_pid")
while [ "$left" -gt 0 ]; do
  c=$(( left < per ? left : per ))
  "$LOAD" --mode idle --url "http://127.0.0.1:$RL/v1/messages" --connections "$c" --seconds 15 \
    --header x-api-key:not-a-key > "$work/idle-$k.out" & loaders+=($!)
  left=$(( left - c )); k=$((k + 1))
done
peak_idle_rss=$before_idle_rss; peak_conns=0
for _ in $(seq 1 $(( IDLE > 0 ? 14 : 0 ))); do
  sleep 1
  r=$(rss_kb "$relay_pid"); [ "$r" -gt "$peak_idle_rss" ] && peak_idle_rss=$r
  c=$(open_fds "$relay_pid"); [ "$c" -gt "$peak_conns" ] && peak_conns=$c
done
for p in "${loaders[@]}"; do wait "$p" || true; done
idle_lines=$(cat "$work"/idle-*.out 2>/dev/null || echo "connections=0 held=0 closed=0 failed=0")
echo "$idle_lines" > "$out/idle.txt"

field() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }
report=$(
  echo "== claude-relay streams benchmark ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, open files $fds) =="
  echo
  echo "$STREAMS streams held ${SECONDS_HELD}s, an event every ${INTERVAL_MS} ms (nginx echo upstream); delay = arrival - nginx's \$msec (ms clock, so +0..1 ms in both)"
  for l in "$direct" "$relayed"; do
    printf '%-7s streams %5d  events %8d  p50 %6d us  p99 %6d us  p99.9 %6d us  max %7d us  stalled %d  cut %d  failed %d\n' \
      "${l%% *}" "$(field "$l" streams)" "$(field "$l" events)" "$(field "$l" p50_us)" "$(field "$l" p99_us)" \
      "$(field "$l" p999_us)" "$(field "$l" max_us)" "$(field "$l" stalled)" "$(field "$l" cut)" "$(field "$l" failed)"
  done
  awk -v d50="$(field "$direct" p50_us)" -v d99="$(field "$direct" p99_us)" -v r50="$(field "$relayed" p50_us)" -v r99="$(field "$relayed" p99_us)" \
    'BEGIN {printf "added delay per event, relay over direct: p50 %.2f ms, p99 %.2f ms (target p99 < 2 ms)\n", (r50-d50)/1000, (r99-d99)/1000}'
  awk -v t="$(field "$relayed" relay_ticks)" -v hz="$CLK_TCK" -v e="$(field "$relayed" events)" -v s="$SECONDS_HELD" \
    'BEGIN {printf "relay CPU: %.1f us per event (%.0f%% of a core over the run)\n", t/hz*1e6/(e>0?e:1), t/hz/s*100}'
  # Every stream the client opened was held to the end (cut and failed
  # above), so the peak is with all of them open.
  awk -v i="$idle_rss" -v p="$(field "$relayed" peak_rss_kb)" -v n="$(field "$relayed" streams)" -v f="$(field "$relayed" peak_streams)" -v a="$after_streams_rss" \
    'BEGIN {printf "relay RSS: idle %.1f MB; %d open streams %.1f MB peak (target < 200 MB at 10,000), %.1f KB per stream beyond idle (target ~16 KB); %.1f MB after they closed (allocator keeps it)\n", i/1024, n, p/1024, (p-i)/(n>0?n:1), a/1024;
           printf "relay descriptors: at most %d pairs (client + upstream) seen at once beyond idle\n", f}'
  echo
  echo "idle keep-alive connections (one 401 answered on each, then held 15 s)"
  echo "$idle_lines"
  held=$(echo "$idle_lines" | tr ' ' '\n' | sed -n 's/^held=//p' | awk '{s+=$1} END {print s+0}')
  awk -v b="$before_idle_rss" -v p="$peak_idle_rss" -v h="$held" -v f="$peak_conns" \
    'BEGIN {printf "relay RSS: %.1f MB before, %.1f MB with %d held (%d fds open): %.1f KB per idle connection\n", b/1024, p/1024, h, f, (p-b)/(h>0?h:1)}'
)
echo
echo "$report" | tee "$out/streams-results.txt"
