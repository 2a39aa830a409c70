#!/usr/bin/env bash
# Installs what the tests and the benchmark need, when it is missing:
# redis-server (tests start their own on free ports), tinyproxy (the egress
# proxy of the egress tests, started by them), nginx, its echo module and
# wrk (benchmark),
# unshare and mount (the e2e tests), prometheus and promtool (the
# observability tests).
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
{ command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } || missing+=(nginx-light)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
# nginx's echo module: bench/streams.sh's upstream streams events with it.
[ -f /usr/lib/nginx/modules/ngx_http_echo_module.so ] || missing+=(libnginx-mod-http-echo)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v tinyproxy >/dev/null 2>&1 || missing+=(tinyproxy)
# Debian's prometheus: the observability tests start it, and check the
# dashboard's queries with its promtool.
{ command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || missing+=(prometheus)
# The e2e tests run each proxy pod under `unshare --mount` with bind mounts.
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
command -v mount >/dev/null 2>&1 || missing+=(mount)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo_=""
  [ "$(id -u)" -eq 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts the services it installs; the tests start their own.
if command -v systemctl >/dev/null 2>&1; then
  systemctl stop redis-server nginx tinyproxy prometheus >/dev/null 2>&1 || true
fi
# The official Python SDK, for the test that drives the relay with it.
venv="$(cd "$(dirname "$0")/.." && pwd)/target/sdk-venv"
if ! "$venv/bin/python" -c 'import anthropic' >/dev/null 2>&1; then
  echo "installing the anthropic Python SDK into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check anthropic
fi
