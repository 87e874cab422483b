#!/usr/bin/env bash
# Property tests of the admin API against its OpenAPI description
# (docs/admin-api.openapi.json) with schemathesis: a real proxy with every
# section the API reports on (cache, bans, attack mode, load shedding),
# then generated requests to every operation. Fails on any 5xx, any status
# the file does not list, any response that breaks its schema or content
# type. Bounded: --max-examples per operation and --max-time overall.
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${CARGO_TARGET_DIR:-target}/debug/portcullis"
[ -x "$bin" ] || cargo build --locked
work="$(mktemp -d)"
token="schemathesis-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
printf 'ops:operator:%s\n' "$token" > "$work/tokens"
admin_port=$((20000 + RANDOM % 20000))
cat > "$work/portcullis.toml" <<TOML
[[listeners]]
bind = "127.0.0.1:0"

[[routes]]
name = "site"
path = "/"
upstream = "app"
cache = true

[upstreams.app]
servers = ["127.0.0.1:9", "127.0.0.1:10"]

[protect.bans]
[protect.adaptive]
[protect.load_shedding]

[admin]
listen = "127.0.0.1:$admin_port"
tokens_file = "$work/tokens"
TOML

"$bin" run -c "$work/portcullis.toml" > "$work/proxy.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do
  if curl -fsS "http://127.0.0.1:$admin_port/healthz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then cat "$work/proxy.log"; exit 1; fi
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$admin_port/healthz" >/dev/null

# pip puts `st` in the interpreter's scripts directory (pyenv's shims may
# not know it yet).
st="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/st"
[ -x "$st" ] || st="$(command -v st)"
"$st" run "${1:-docs/admin-api.openapi.json}" \
  --url "http://127.0.0.1:$admin_port" \
  --header "Authorization: Bearer $token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --phases examples,coverage,fuzzing \
  --max-examples 30 \
  --max-time "${ST_MAX_TIME:-90}" \
  --request-timeout 10 \
  --seed 1 \
  --workers 1

# The proxy is still up, and said nothing of a panic.
kill -0 "$pid"
if grep -q "panicked" "$work/proxy.log"; then cat "$work/proxy.log"; exit 1; fi
