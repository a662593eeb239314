#!/bin/bash
# B1's and B2's reference point: what relays cost on this machine with no Tower code.
#
# Measures small-request latency (c=1) and throughput (c=64) with wrk, and one 1 GiB
# download with curl, against the
# stand-in directly, through one haproxy hop, and through two chained hops, every leg
# over TLS and haproxy in HTTP mode with keep-alive to its upstream: the topology of
# caller -> tower-server -> tower-agent -> kube-apiserver, done by a mature C proxy.
# Then the same through a TCP-mode haproxy (no TLS termination, no HTTP parsing), and
# through Tower itself (tower-server + tower-agent, user JWT), all with the same client.
# For each relay, the CPU it spent per request at c=64 (for haproxy's 1-hop row, the
# process holds both hops' frontends, only one of them busy).
#
# DEPLOYED=1 gives every relay process one thread, as Tower is deployed: both Deployments
# (deploy/host, the agent's) limit their pod to 1 CPU, so tokio runs one worker
# (TOKIO_WORKER_THREADS=1 here), and haproxy's two hops run as two processes with
# `nbthread 1` (one per pod, as Tower's are), in place of one process with a thread per
# core holding both.
#
# APART=1 (with DEPLOYED) puts each relay on a core of its own: tower-server and haproxy's
# first hop on CPU 0, tower-agent and the second hop on CPU 1 (client and upstream
# float). Deployed, the two hops run in different clusters and never take turns on one
# core, as they can here: with both Tower processes on one core a download ran 436-475
# MB/s, on two 674-726, and left to the scheduler either (BENCHMARKS.md, "Two relays on
# two cores").
#
# ROUNDS=N (default 1) runs the two rows issue 18 compares (haproxy's two HTTP+TLS hops and
# Tower) N - 1 more times after the table, alternating which goes first, and ends with
# each goal's figure round by round, its median and how many rounds met it. This VM's
# speed moves by a third within minutes (BENCHMARKS.md), so a single row pair decides
# little; rounds taken back to back share the host's state.
#
# GLIBC=DIR runs every program the comparison times (stand-in, Tower, haproxy, wrk, curl)
# under the glibc in DIR instead of the machine's: GLIBC=$(benches/reference/debian13-glibc.sh)
# is the one Tower's image ships (Debian 13's), whose memcpy differs from Debian 12's where
# a relay spends much of its time on AMD Zen (BENCHMARKS.md, "glibc's memcpy on AMD Zen").
#
# Needs: release builds (see BENCHMARKS.md), haproxy, wrk, openssl, curl, python3 (to pick
# free ports: haproxy cannot bind port 0, and for the rounds' summary). Everything listens
# on 127.0.0.1 only.
set -euo pipefail
DEPLOYED=${DEPLOYED:-}
APART=${APART:-}
if [ -n "$APART" ] && [ -z "$DEPLOYED" ]; then
  echo "$0: APART needs DEPLOYED (one process per haproxy hop)" >&2
  exit 1
fi
ROUNDS=${ROUNDS:-1}
[ -n "$DEPLOYED" ] && export TOKIO_WORKER_THREADS=1
B=${B:-$(cd "$(dirname "$0")/../.." && pwd)/target/release}
D=$(mktemp -d)
SI=; SV=; AG=
trap 'kill $(cat "$D"/*.pid 2>/dev/null) $SI $SV $AG 2>/dev/null; rm -rf "$D"' EXIT

source "$(dirname "$0")/tower.sh"
start_tower
P1=$(free_port); P2=$(free_port); P3=$(free_port)
start_haproxy_chain "$P1" "$P2"
if [ -n "$APART" ]; then
  for pin in "0 $SV" "0 $HOP1" "1 $AG" "1 $HOP2"; do
    taskset -a -p -c $pin >/dev/null
  done
fi
cat > "$D/tcp.cfg" <<CFG
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend f
  bind 127.0.0.1:$P3
  default_backend b
backend b
  server s $UP
CFG
[ -n "$DEPLOYED" ] && sed -i 's/^defaults/global\n  nbthread 1\ndefaults/' "$D/tcp.cfg"
on_glibc haproxy -f "$D/tcp.cfg" -D -p "$D/tcp.pid"
wait_answer "https://127.0.0.1:$P3/version" || { echo "$0: the TCP relay did not answer" >&2; exit 1; }
# CPU seconds (user + system, in clock ticks) the processes $@ have used so far.
cpu_ticks() {
  local total=0 p
  for p in "$@"; do total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$total"
}
TICK=$(getconf CLK_TCK)
# run NAME ADDR [TOKEN [PID...]]: PIDs are the relays between client and upstream, whose
# CPU per request over the c=64 phase is printed (issue 18's goal: at most 35 us for
# tower-server and tower-agent together).
run() {
  local name=$1 addr=$2 token=${3:-T}
  shift $(($# < 3 ? $# : 3))
  local one many bulk before after cpu=-
  one=$(on_glibc wrk -t1 -c1 -d5s --latency -H "Authorization: Bearer $token" "https://$addr/version")
  [ $# -gt 0 ] && before=$(cpu_ticks "$@")
  many=$(on_glibc wrk -t2 -c64 -d5s -H "Authorization: Bearer $token" "https://$addr/version")
  if [ $# -gt 0 ]; then
    after=$(cpu_ticks "$@")
    cpu=$(awk -v t=$((after - before)) -v hz="$TICK" -v n="$(awk '/requests in/{print $1}' <<<"$many")" \
      'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
  fi
  local p50 rps h1
  p50=$(awk '$1=="50%"{print $2}' <<<"$one")
  rps=$(awk '/Requests\/sec/{print $2}' <<<"$many")
  h1=$(bulk "$addr" "$token" 1.1)
  printf '%-34s c=1 p50 %8s  p99 %8s   c=64 %10s req/s  relay CPU %6s us/req   bulk %s, h2 %s\n' "$name" \
    "$p50" "$(awk '$1=="99%"{print $2}' <<<"$one")" "$rps" "$cpu" "$h1" "$(bulk "$addr" "$token" 2)"
  # For the rounds' summary: name, c=1 p50, c=64 requests/s, CPU, HTTP/1.1 bulk MB/s.
  echo "$name|$p50|$rps|$cpu|${h1% MB/s}" >>"$D/rows"
}
# bulk ADDR TOKEN VERSION: one 1 GiB download (B1's size) over HTTP/VERSION, in MB/s.
# curl discards the bytes, so the client is cheaper than tower-bench's, which checks
# them. HTTP/1.1, as wrk's rows above, is the row issue 18's goal is judged on; HTTP/2
# is what kubectl and KubeSphere's Go clients speak to Tower's frontend (each DATA
# frame's 9-byte header makes 16 KiB of body two TLS records, on either relay). "-" if
# curl got the other protocol.
bulk() {
  local got
  got=$(on_glibc curl -sfk "--http$3" -o /dev/null -w '%{http_version} %{speed_download}' \
    -H "Authorization: Bearer $2" "https://$1/debug/bytes?size=1073741824")
  if [ "${got%% *}" = "$3" ]; then
    awk -v b="${got#* }" 'BEGIN{printf "%5.0f MB/s", b/1e6}'
  else
    printf '%10s' -
  fi
}
# The two rows issue 18 compares: haproxy's two HTTP+TLS hops (as one process, or as two
# with DEPLOYED) and Tower.
two_hops() {
  if [ -n "$DEPLOYED" ]; then
    run "haproxy HTTP+TLS (2 hops)" "127.0.0.1:$P1" T "$HOP1" "$HOP2"
  else
    run "haproxy HTTP+TLS (2 hops)" "127.0.0.1:$P1" T "$HOP1"
  fi
}
tower() {
  run "tower (server + agent)" "${BASE#https://}" "$USER_TOKEN" "$SV" "$AG"
}
run "direct" "$UP"
run "haproxy TCP relay (1 hop)" "127.0.0.1:$P3" T "$(cat "$D/tcp.pid")"
if [ -n "$DEPLOYED" ]; then
  echo "(DEPLOYED: one thread per relay process, one process per hop${APART:+, each relay on a core of its own})"
  run "haproxy HTTP+TLS (1 hop)" "127.0.0.1:$P2" T "$HOP2"
else
  run "haproxy HTTP+TLS (1 hop)" "127.0.0.1:$P2" T "$HOP1"
fi
two_hops
tower

# The further rounds, alternating which of the two goes first.
for round in $(seq 2 "$ROUNDS"); do
  echo "(round $round)"
  if [ $((round % 2)) = 0 ]; then
    tower
    two_hops
  else
    two_hops
    tower
  fi
done
[ "$ROUNDS" -gt 1 ] && python3 "$(dirname "$0")/rounds.py" "$D/rows"
exit 0
