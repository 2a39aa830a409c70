# Shared by bench/run.sh, instructions.sh and compressed.sh (sourced, not run): a work
# directory and child processes cleaned up on exit, the bench's secrets, tool
# checks, free ports, the upstream (nginx serving a 1 KB Messages response),
# the nginx reverse proxy config and wrk's POST script.

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The bench's secrets: the relay key, the upstream key, the signing secret.
echo "bench-relay-key" > "$work/relay.key"
echo "sk-ant-bench" > "$work/upstream.key"
echo "bench-signing-secret-0123456789abcdefghij" > "$work/signing.secret"

need() { command -v "$1" >/dev/null 2>&1 || { echo "missing $1: run scripts/install-test-deps.sh${2:+ ($2)}" >&2; exit 1; }; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { echo "missing nginx: run scripts/install-test-deps.sh" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_port() { for _ in $(seq 1 600); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# start_upstream PORT: one nginx worker answering every request with a 1 KB
# Messages API response, as fast as a server can give it.
start_upstream() {
  local body
  body=$(python3 - <<'PY'
import json
text = ("The relay passes every byte through unchanged. " * 16).strip()
print(json.dumps({"id":"msg_bench","type":"message","role":"assistant","model":"claude-bench",
  "content":[{"type":"text","text":text}],"stop_reason":"end_turn","stop_sequence":None,
  "usage":{"input_tokens":25,"output_tokens":180}}, separators=(",",":")))
PY
)
  start_nginx_upstream "$1" "location / { default_type application/json; return 200 '$body'; }"
}

# start_nginx_upstream PORT DIRECTIVES [DIR]: one nginx worker in $work/DIR
# (default up), its one server on PORT configured by DIRECTIVES.
start_nginx_upstream() {
  local dir=$work/${3:-up}
  mkdir -p "$dir"
  cat > "$dir/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $dir; proxy_temp_path $dir; fastcgi_temp_path $dir; uwsgi_temp_path $dir; scgi_temp_path $dir;
  server {
    listen 127.0.0.1:$1;
    $2
  }
}
NGINX
  "$NGINX" -c "$dir/nginx.conf" -p "$dir" & pids+=($!)
}

# write_proxy_conf PORT UPSTREAM_PORT KEEPALIVE WORKER_CONNECTIONS PROCESS_LINES:
# Debian's nginx as a plain reverse proxy on PORT to the upstream, setting
# the upstream key as the relay does; the config goes to $work/ng.
write_proxy_conf() {
  mkdir -p "$work/ng"
  cat > "$work/ng/nginx.conf" <<NGINX
$5
daemon off;
pid $work/ng/nginx.pid;
error_log $work/ng/error.log warn;
events { worker_connections $4; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $work/ng; proxy_temp_path $work/ng; fastcgi_temp_path $work/ng; uwsgi_temp_path $work/ng; scgi_temp_path $work/ng;
  upstream claude { server 127.0.0.1:$2; keepalive $3; }
  server {
    listen 127.0.0.1:$1;
    location / {
      proxy_pass http://claude;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header x-api-key "sk-ant-bench";
    }
  }
}
NGINX
}

# wrk's request: a Messages API POST with the bench relay key.
cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"claude-bench","max_tokens":256,"messages":[{"role":"user","content":"Say hello"}]}'
wrk.headers["content-type"] = "application/json"
wrk.headers["anthropic-version"] = "2023-06-01"
wrk.headers["x-api-key"] = "bench-relay-key"
LUA
