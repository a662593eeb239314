#!/bin/bash
# B3's question put to the C reference: how long a small request takes (wrk, one
# connection, one request at a time) while a download runs through the same relays, and
# how long a request straight to the stand-in takes during that same download (B3's goal:
# the relayed probe's p99 at most 2x the direct probe's).
#
# Relays: haproxy's two chained HTTP+TLS hops (Tower's topology in C, see tower.sh), and
# tower-server + tower-agent. The download is curl's, as fast as it reads, through the
# same relays; each round starts a fresh download and waits until it has moved 64 MiB.
# haproxy runs each connection on one thread: with a thread per core (the default here)
# the probe may land on the download's thread or the other one, so rounds differ. With
# DEPLOYED=1 every relay process has one thread (one process per hop, TOKIO_WORKER_THREADS=1
# for Tower), as Tower is deployed, and the probe always shares the download's thread, as
# a probe through Tower always shares the download's tunnel.
#
# Needs: release builds (see BENCHMARKS.md), haproxy, wrk, openssl, curl, python3.
# Everything listens on 127.0.0.1 only.
set -euo pipefail
DEPLOYED=${DEPLOYED:-}
[ -n "$DEPLOYED" ] && export TOKIO_WORKER_THREADS=1
ROUNDS=${ROUNDS:-3}
B=${B:-$(cd "$(dirname "$0")/../.." && pwd)/target/release}
D=$(mktemp -d)
SI=; SV=; AG=; DL=
trap 'kill $(cat "$D"/*.pid 2>/dev/null) $DL $SI $SV $AG 2>/dev/null; rm -rf "$D"' EXIT

source "$(dirname "$0")/tower.sh"
start_tower
P1=$(free_port); P2=$(free_port)
start_haproxy_chain "$P1" "$P2"

# probe ADDR TOKEN: "p50 p99" of 3 s of one-at-a-time requests, in microseconds.
probe() {
  wrk -t1 -c1 -d3s --latency -H "Authorization: Bearer $2" "https://$1/version" | awk '
    function us(v) { if (v ~ /us$/) return v + 0; if (v ~ /ms$/) return v * 1000; return v * 1e6 }
    $1 == "50%" { p50 = us($2) } $1 == "99%" { p99 = us($2) } END { printf "%.0f %.0f", p50, p99 }'
}

# Starts a download through ADDR (with TOKEN) and returns once curl has written 64 MiB
# of it (to /dev/null: /proc counts its writes, not its socket reads).
start_download() {
  curl -sk -o /dev/null -H "Authorization: Bearer $2" "https://$1/debug/bytes?size=$((1 << 40))" &
  DL=$!
  for _ in $(seq 200); do
    [ "$(awk '/^wchar/{print $2}' "/proc/$DL/io" 2>/dev/null || echo 0)" -gt $((64 << 20)) ] && return
    sleep 0.05
  done
  echo "$0: the download through $1 did not start" >&2
  exit 1
}

stop_download() {
  kill "$DL" 2>/dev/null || true
  wait "$DL" 2>/dev/null || true
  DL=
}

# row NAME ADDR TOKEN: idle probe, then per round the probe and a direct probe during a
# download through ADDR.
row() {
  local name=$1 addr=$2 token=$3 idle r relayed direct
  idle=$(probe "$addr" "$token")
  printf '%-28s idle p50/p99 %6s/%-6s us\n' "$name" ${idle}
  for r in $(seq "$ROUNDS"); do
    start_download "$addr" "$token"
    relayed=$(probe "$addr" "$token")
    direct=$(probe "$UP" T)
    stop_download
    set -- ${relayed} ${direct}
    printf '%-28s round %d: probe p50/p99 %6s/%-6s us, direct probe %6s/%-6s us: p99 %5.1fx direct\n' \
      "" "$r" "$1" "$2" "$3" "$4" "$(awk -v a="$2" -v b="$4" 'BEGIN { print a / b }')"
  done
}

[ -n "$DEPLOYED" ] && echo "(DEPLOYED: one thread per relay process, one process per hop)"
row "haproxy HTTP+TLS (2 hops)" "127.0.0.1:$P1" T
row "tower (server + agent)" "${BASE#https://}" "$USER_TOKEN"
