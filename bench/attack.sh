#!/usr/bin/env bash
# Attack scenarios against a release build (examples/attack.rs), with every
# step of the mitigation ladder enforced: a cold start under steady traffic
# above min_rate, an 8-source flood, a distributed flood (and the same flood
# returning later), slowloris, slow uploads of small and of large bodies and
# a flash crowd, each beside legitimate traffic of 55 requests/s from six
# addresses (most from one browser-like client with a session cookie), all
# from distinct loopback addresses, against an origin that serves 4 requests
# at once. Prints the legitimate traffic's success rate and latency, how many
# attack requests reached the origin, what the proxy did and how much it
# logged. Every scenario stops by itself after SECONDS.
#
#   bench/attack.sh [SECONDS]      (default 10 per scenario; the README's figures use 30)
#   ATTACK_MODE=shadow             every ladder step in shadow mode, for comparison
#   ATTACK_SHEDDING=off            without load shedding
#   ATTACK_ORIGIN_MS=0             an origin that answers at once (default: 2 ms, 4 at a time)
#   ATTACK_TRACE=20                print each legitimate request slower than 20 ms
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin portcullis --example attack >/dev/null
ulimit -n 65536 2>/dev/null || true
exec target/release/examples/attack target/release/portcullis "${1:-10}"
