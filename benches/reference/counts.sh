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
# Needs release builds (see BENCHMARKS.md), valgrind, perf, curl and python3.
set -euo pipefail
B=${B:-$(cd "$(dirname "$0")/../.." && pwd)/target/release}
N_SMALL=${N_SMALL:-2000}
BULK_MIB=${BULK_MIB:-64}
NATIVE_MIB=${NATIVE_MIB:-1024}

source "$(dirname "$0")/tower.sh"

# Downloads `mib` MiB and checks that all of it came.
download() {
  local got
  got=$(curl -sfk -o /dev/null -w '%{size_download} %{speed_download}' \
    -H "Authorization: Bearer $USER_TOKEN" "$BASE/debug/bytes?size=$(($1 * 1048576))")
  [ "${got% *}" = $(($1 * 1048576)) ] || { echo "counts.sh: download cut at ${got% *}" >&2; exit 1; }
  echo "${got#* }"
}

# One valgrind run: `small` requests on one keep-alive connection, then one download of
# `mib` MiB. Prints the server's and the agent's instruction totals.
counted() {
  local small=$1 mib=$2
  D=$(mktemp -d)
  COUNT=1 start_tower
  if [ "$small" -gt 0 ]; then
    python3 -c "import sys;[print(f'url = \"{sys.argv[1]}/version\"\noutput = /dev/null') for _ in range(int(sys.argv[2]))]" \
      "$BASE" "$small" >"$D/urls"
    curl -sfk -K "$D/urls" -H "Authorization: Bearer $USER_TOKEN" ||
      { echo "counts.sh: a small request failed" >&2; exit 1; }
  fi
  [ "$mib" -gt 0 ] && download "$mib" >/dev/null
  stop_tower
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP"
    cp "$D/server.cg" "$KEEP/server-$small-$mib.cg"
    cp "$D/agent.cg" "$KEEP/agent-$small-$mib.cg"
  fi
  echo "$(awk '/^summary:/{print $2}' "$D/server.cg") $(awk '/^summary:/{print $2}' "$D/agent.cg")"
  rm -rf "$D"
}

read -r s0 a0 < <(counted 0 0)
read -r s1 a1 < <(counted "$N_SMALL" 0)
read -r s2 a2 < <(counted 0 "$BULK_MIB")
echo "$B"
awk -v s0="$s0" -v a0="$a0" -v s1="$s1" -v a1="$a1" -v s2="$s2" -v a2="$a2" \
  -v n="$N_SMALL" -v m="$BULK_MIB" 'BEGIN {
  printf "instructions per small request: server %.0f, agent %.0f\n", (s1 - s0) / n, (a1 - a0) / n
  printf "instructions per MiB downloaded: server %.0f, agent %.0f\n", (s2 - s0) / m, (a2 - a0) / m
}'

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
