#!/bin/bash
# What a small request and a MiB of download cost tower-server and tower-agent, in
# figures this 2-core VM's noise (CPU steal, frequency) barely moves, for telling two
# builds apart where B7's CPU seconds cannot:
# - instructions, counted by valgrind (cachegrind, no cache simulation): user-space work.
#   Each is a difference of two runs that differ only in their load (N_SMALL more small
#   requests, or BULK_MIB more MiB), so start-up, handshakes and warm-up cancel out;
# - system calls and context switches per MiB of a native download (perf stat's software
#   events; this VM has no hardware counters), with the CPU time beside them: the kernel
#   side, which instruction counts do not see.
# Run it on each build to compare:
#   B=/path/to/old/target/release benches/reference/counts.sh
#   B=/path/to/new/target/release benches/reference/counts.sh
# KEEP=DIR keeps each valgrind run's files there (cg_annotate shows where the
# instructions went; cg_diff compares two builds' files function by function).
# Small requests are counted twice: with curl's default HTTP/2 to the frontend (as
# kubectl speaks) and with HTTP/1.1 (as wrk and the reference script's haproxy chain).
# Tower runs one tokio worker per process here, as deployed (its pods have one CPU): with
# two, the work stealing between them moves the counts by ~1 % from run to run; with one
# they repeat to ~0.5 % (what is left: the readiness probes before the counted requests
# make a varying number of TLS handshakes). HAPROXY=1 also counts haproxy's two HTTP+TLS hops (one process,
# one thread) over the same HTTP/1.1 requests: the same work, done by a C proxy.
# Needs release builds (see BENCHMARKS.md), valgrind, perf, curl and python3 (and haproxy
# and openssl for HAPROXY=1).
set -euo pipefail
B=${B:-$(cd "$(dirname "$0")/../.." && pwd)/target/release}
N_SMALL=${N_SMALL:-2000}
BULK_MIB=${BULK_MIB:-64}
NATIVE_MIB=${NATIVE_MIB:-1024}

source "$(dirname "$0")/tower.sh"
export TOKIO_WORKER_THREADS=1

# `n` requests for /version under "$1" (a base URL), one keep-alive connection, with the
# user's token and curl options "$3".
small_requests() {
  python3 -c "import sys;[print(f'url = \"{sys.argv[1]}/version\"\noutput = /dev/null') for _ in range(int(sys.argv[2]))]" \
    "$1" "$2" >"$D/urls"
  # shellcheck disable=SC2086
  curl -sfk $3 -K "$D/urls" -H "Authorization: Bearer $4" ||
    { echo "counts.sh: a small request failed" >&2; exit 1; }
}

# Downloads `mib` MiB and checks that all of it came.
download() {
  local got
  got=$(curl -sfk -o /dev/null -w '%{size_download} %{speed_download}' \
    -H "Authorization: Bearer $USER_TOKEN" "$BASE/debug/bytes?size=$(($1 * 1048576))")
  [ "${got% *}" = $(($1 * 1048576)) ] || { echo "counts.sh: download cut at ${got% *}" >&2; exit 1; }
  echo "${got#* }"
}

# One valgrind run: `small` requests on one keep-alive connection (curl options $3),
# then one download of `mib` MiB. Prints the server's and the agent's instruction totals.
counted() {
  local small=$1 mib=$2 opts=${3:-}
  D=$(mktemp -d)
  COUNT=1 start_tower
  [ "$small" -gt 0 ] && small_requests "$BASE" "$small" "$opts" "$USER_TOKEN"
  [ "$mib" -gt 0 ] && download "$mib" >/dev/null
  stop_tower
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP"
    cp "$D/server.cg" "$KEEP/server-$small-$mib${opts:+-h1}.cg"
    cp "$D/agent.cg" "$KEEP/agent-$small-$mib${opts:+-h1}.cg"
  fi
  echo "$(awk '/^summary:/{print $2}' "$D/server.cg") $(awk '/^summary:/{print $2}' "$D/agent.cg")"
  rm -rf "$D"
}

# haproxy's two hops under cachegrind, `small` HTTP/1.1 requests through them: prints
# the instructions it ran.
counted_haproxy() {
  local small=$1
  D=$(mktemp -d)
  "$B/kube-stand-in" --listen 127.0.0.1:0 --token T --kubeconfig-out "$D/kc" >"$D/si.out" 2>/dev/null &
  SI=$!
  for _ in $(seq 100); do grep -q listening "$D/si.out" 2>/dev/null && break; sleep 0.1; done
  UP=$(sed 's|listening on https://||' "$D/si.out")
  local p1 p2 hp
  p1=$(free_port)
  p2=$(free_port)
  haproxy_chain_config "$p1" "$p2" one-thread
  valgrind --tool=cachegrind --cache-sim=no --branch-sim=no --cachegrind-out-file="$D/hap.cg" \
    "$(PATH="$PATH:/usr/sbin" command -v haproxy)" -db -f "$D/http.cfg" >/dev/null 2>&1 &
  hp=$!
  wait_answer "https://127.0.0.1:$p1/version" T 60 || { echo "$0: haproxy's chain did not answer" >&2; exit 1; }
  [ "$small" -gt 0 ] && small_requests "https://127.0.0.1:$p1" "$small" --http1.1 T
  kill -USR1 "$hp" # haproxy's soft stop: it exits, and cachegrind writes its file
  wait "$hp" || true
  kill "$SI"
  wait "$SI" 2>/dev/null || true
  awk '/^summary:/{print $2}' "$D/hap.cg"
  rm -rf "$D"
}

read -r s0 a0 < <(counted 0 0)
read -r s1 a1 < <(counted "$N_SMALL" 0)
read -r s3 a3 < <(counted "$N_SMALL" 0 --http1.1)
read -r s2 a2 < <(counted 0 "$BULK_MIB")
echo "$B"
awk -v s0="$s0" -v a0="$a0" -v s1="$s1" -v a1="$a1" -v s2="$s2" -v a2="$a2" -v s3="$s3" -v a3="$a3" \
  -v n="$N_SMALL" -v m="$BULK_MIB" 'BEGIN {
  printf "instructions per small request: server %.0f, agent %.0f (HTTP/2 caller)\n", (s1 - s0) / n, (a1 - a0) / n
  printf "instructions per small request: server %.0f, agent %.0f, together %.0f (HTTP/1.1 caller)\n", (s3 - s0) / n, (a3 - a0) / n, (s3 - s0 + a3 - a0) / n
  printf "instructions per MiB downloaded: server %.0f, agent %.0f\n", (s2 - s0) / m, (a2 - a0) / m
}'
if [ -n "${HAPROXY:-}" ]; then
  h0=$(counted_haproxy 0)
  h1=$(counted_haproxy "$N_SMALL")
  awk -v h0="$h0" -v h1="$h1" -v n="$N_SMALL" 'BEGIN {
    printf "instructions per small request: haproxy, two HTTP+TLS hops, %.0f (HTTP/1.1 caller)\n", (h1 - h0) / n }'
fi

# Natively: system calls, context switches and CPU time during one download.
D=$(mktemp -d)
start_tower
download 64 >/dev/null # warm: pools, windows
events=raw_syscalls:sys_enter,context-switches,task-clock
perf stat -e "$events" -p "$SV" -o "$D/server.perf" &
PS=$!
perf stat -e "$events" -p "$AG" -o "$D/agent.perf" &
PA=$!
sleep 0.3 # perf attaches
speed=$(download "$NATIVE_MIB")
kill -INT "$PS" "$PA"
wait "$PS" "$PA" 2>/dev/null || true
for side in server agent; do
  awk -v side="$side" -v m="$NATIVE_MIB" '
    { gsub(",", "", $1) }
    /raw_syscalls/ { calls = $1 } /context-switches/ { switches = $1 } /task-clock/ { ms = $1 }
    END { printf "per MiB downloaded natively, %s: %.0f system calls, %.1f context switches, %.2f s CPU per GiB\n", side, calls / m, switches / m, ms * 1024 / m / 1000 }' \
    "$D/$side.perf"
done
awk -v b="$speed" 'BEGIN { printf "download: %.0f MB/s\n", b / 1e6 }'
stop_tower
rm -rf "$D"
