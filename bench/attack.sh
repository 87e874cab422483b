#!/usr/bin/env bash
# Attack scenarios against a release build (examples/attack.rs): a few-source
# flood, slowloris, slow POST and a flash crowd, each beside a legitimate
# client at 10 requests/s, all from distinct loopback addresses. Prints the
# legitimate client's success rate and latency and how many attack requests
# reached the origin. Every scenario stops by itself after SECONDS.
#
#   bench/attack.sh [SECONDS]      (default 10 per scenario; the README's figures use 30)
#   ATTACK_SHEDDING=off            without load shedding, for comparison
#   ATTACK_ORIGIN_MS=0             an origin that answers at once (default: 2 ms, 4 at a time)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin portcullis --example attack >/dev/null
ulimit -n 65536 2>/dev/null || true
exec target/release/examples/attack target/release/portcullis "${1:-10}"
