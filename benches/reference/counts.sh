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

# Runs "$@" in place of this (background) shell, so that its pid is the program's and
# signals reach it; under cachegrind writing to file $1 when COUNT is set.
under() {
  local out=$1
  shift
  if [ -n "${COUNT:-}" ]; then
    exec valgrind --tool=cachegrind --cache-sim=no --branch-sim=no --cachegrind-out-file="$out" "$@"
  else
    exec "$@"
  fi
}

# Starts the stand-in, server and agent (each under `under`) in directory $D, and waits
# until a request goes through. Sets SI, SV, AG (pids), BASE and USER_TOKEN.
start() {
  "$B/kube-stand-in" --listen 127.0.0.1:0 --token T --kubeconfig-out "$D/kc" >"$D/si.out" 2>/dev/null &
  SI=$!
  for _ in $(seq 100); do grep -q listening "$D/si.out" 2>/dev/null && break; sleep 0.1; done
  echo -n "counts-run-jwt-secret-0123456789abcdef" >"$D/secret"
  TOWER_LOG=warn under "$D/server.cg" "$B/tower-server" serve \
    --tunnel-addr 127.0.0.1:0 --proxy-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 \
    --jwt-secret-file "$D/secret" --state-dir "$D/st" >"$D/sv.out" 2>"$D/sv.err" &
  SV=$!
  for _ in $(seq 600); do grep -q frontend "$D/sv.out" 2>/dev/null && break; sleep 0.1; done
  local tunnel frontend
  tunnel=$(grep -o '"tunnel":"[^"]*"' "$D/sv.out" | cut -d'"' -f4)
  frontend=$(grep -o '"frontend":"[^"]*"' "$D/sv.out" | cut -d'"' -f4)
  TOWER_LOG=warn under "$D/agent.cg" "$B/tower-agent" --name c1 \
    --proxy-server "https://$tunnel" \
    --token "$("$B/tower-server" token --jwt-secret-file "$D/secret" --cluster c1)" \
    --ca-file "$D/st/ca.crt" --kubeconfig "$D/kc" --jwt-secret-file "$D/secret" >/dev/null 2>"$D/ag.err" &
  AG=$!
  USER_TOKEN=$("$B/tower-server" user-token --jwt-secret-file "$D/secret" --user alice)
  BASE="https://$frontend/clusters/c1"
  for _ in $(seq 600); do
    curl -sfk -o /dev/null -H "Authorization: Bearer $USER_TOKEN" "$BASE/version" && return
    sleep 0.1
  done
  echo "counts.sh: Tower did not answer" >&2
  exit 1
}

stop() {
  kill -INT "$AG" "$SV" 2>/dev/null || true
  wait "$AG" "$SV" 2>/dev/null || true
  kill "$SI" 2>/dev/null || true
  wait "$SI" 2>/dev/null || true
}

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
  COUNT=1 start
  if [ "$small" -gt 0 ]; then
    python3 -c "import sys;[print(f'url = \"{sys.argv[1]}/version\"\noutput = /dev/null') for _ in range(int(sys.argv[2]))]" \
      "$BASE" "$small" >"$D/urls"
    curl -sfk -K "$D/urls" -H "Authorization: Bearer $USER_TOKEN" ||
      { echo "counts.sh: a small request failed" >&2; exit 1; }
  fi
  [ "$mib" -gt 0 ] && download "$mib" >/dev/null
  stop
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
start
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
stop
rm -rf "$D"
