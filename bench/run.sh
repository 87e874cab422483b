#!/usr/bin/env bash
# Builds the release binary and runs the peer benchmark (nginx, HAProxy and
# others beside Portcullis, interleaved, on loopback). Extra arguments go to
# peers.sh, for example: bench/run.sh --quick --scenarios small,large,close
#
# Needs wrk, h2load (nghttp2-client), nginx and haproxy; the cache scenario
# (--scenarios cache) also measures Varnish when it is installed:
#   apt-get install -y wrk nghttp2-client nginx haproxy varnish
set -euo pipefail
cd "$(dirname "$0")/.."
peers="${PEERS_SH:-../shared/bench/peers.sh}"
[[ -x $peers ]] || { echo "peer benchmark not found at $peers (set PEERS_SH)" >&2; exit 1; }
cargo build --release --locked
exec "$peers" \
  --candidate 'target/release/portcullis run -c {config}' \
  --candidate-config bench/portcullis.toml.in \
  --candidate-name portcullis \
  "$@"
