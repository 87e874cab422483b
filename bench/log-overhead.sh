#!/usr/bin/env bash
# Access-log overhead: the same release binary with the JSON access log off
# and on (written to a file), measured in interleaved rounds against one
# nginx origin (1 KiB responses, keep-alive), like the peer benchmark's
# "small" scenario.
#
#   bench/log-overhead.sh [ROUNDS] [SECONDS]     (default 5 rounds of 8 s)
#
# Prints per-round and median requests/s and proxy CPU per request (user +
# sys from /proc/PID/stat) for each variant, and the on/off ratios.
# Needs wrk and nginx. Everything runs on loopback, in a temporary
# directory removed on exit; every process started here is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-5}"
seconds="${2:-8}"
cargo build --release --locked >/dev/null
bin=target/release/portcullis
tmp=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

origin_port=18710 off_port=18711 on_port=18712
body=$(head -c 1024 /dev/zero | tr '\0' 'x')
cat >"$tmp/nginx.conf" <<EOF
worker_processes 1;
error_log $tmp/nginx-error.log;
pid $tmp/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  server {
    listen 127.0.0.1:$origin_port;
    keepalive_requests 1000000;
    location / { return 200 "$body"; }
  }
}
EOF
nginx -c "$tmp/nginx.conf" -p "$tmp" -g 'daemon off;' &
pids+=($!)

config() { # $1 port, $2 extra
  cat <<EOF
[[listeners]]
bind = "127.0.0.1:$1"
[[routes]]
upstream = "origin"
[upstreams.origin]
servers = ["127.0.0.1:$origin_port"]
pool_size = 256
$2
EOF
}
config "$off_port" "" >"$tmp/off.toml"
config "$on_port" "[access_log]
destination = \"$tmp/access.log\"
format = \"json\"" >"$tmp/on.toml"
"$bin" run -c "$tmp/off.toml" 2>"$tmp/off.err" &
off_pid=$!
pids+=("$off_pid")
"$bin" run -c "$tmp/on.toml" 2>"$tmp/on.err" &
on_pid=$!
pids+=("$on_pid")

# Ready when each port answers.
for port in $origin_port $off_port $on_port; do
  for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://127.0.0.1:$port/" && break
    sleep 0.1
  done
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

run() { # $1 name, $2 port, $3 pid -> "req/s us/req"
  wrk -t2 -c64 -d1s "http://127.0.0.1:$2/" >/dev/null # warm-up
  local before after out requests rps
  before=$(cpu_ticks "$3")
  out=$(wrk -t2 -c64 -d"${seconds}s" "http://127.0.0.1:$2/")
  after=$(cpu_ticks "$3")
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out")
  [[ -z $errors ]] || echo "  $1: $errors" >&2
  awk -v r="$rps" -v t=$((after - before)) -v n="$requests" -v hz="$hz" \
    'BEGIN { printf "%.0f %.1f\n", r, t / hz * 1e6 / n }'
}

echo "| round | log off req/s | log on req/s | on/off req/s | log off CPU us/req | log on CPU us/req | on/off CPU |"
echo "|---|---:|---:|---:|---:|---:|---:|"
: >"$tmp/rows"
for round in $(seq 1 "$rounds"); do
  if ((round % 2)); then
    read -r off_rps off_cpu < <(run off $off_port $off_pid)
    read -r on_rps on_cpu < <(run on $on_port $on_pid)
  else
    read -r on_rps on_cpu < <(run on $on_port $on_pid)
    read -r off_rps off_cpu < <(run off $off_port $off_pid)
  fi
  awk -v a="$off_rps" -v b="$on_rps" -v c="$off_cpu" -v d="$on_cpu" -v r="$round" \
    'BEGIN { printf "| %d | %d | %d | %.3f | %.1f | %.1f | %.3f |\n", r, a, b, b / a, c, d, d / c }' | tee -a "$tmp/rows"
done
median() { sort -g | awk '{v[NR] = $1} END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
col() { awk -F'|' -v c="$1" '{gsub(/ /, "", $c); print $c}' "$tmp/rows" | median; }
echo "| **median** | $(col 3) | $(col 4) | $(col 5) | $(col 6) | $(col 7) | $(col 8) |"
echo
echo "access log lines written: $(wc -l <"$tmp/access.log")"
