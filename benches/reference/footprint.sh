#!/bin/bash
# What a small request costs tower-server and tower-agent in memory traffic with many in
# flight: cachegrind's cache simulation under wrk at each concurrency in $CS (default 64
# and 256), with the last level it simulates set to this VM's per-core L2 (1 MiB, 8-way,
# 64-byte lines; `lscpu`: AMD EPYC, L2 2 MiB in 2 instances). Prints, per request and per
# process, the instructions, first-level data misses and misses of that simulated L2.
#
# Why: B7 and the reference script time CPU per request at c=64 and c=256, and this VM
# drifts by more than a change moves them; cachegrind counts the same run the same way
# every time. A miss of the L2 costs this CPU an L3 access (~50 cycles), so at c=256 a
# few hundred per request are microseconds. As with counts.sh, each figure is the
# difference of two runs that differ only in how long wrk runs (T1 and T2 seconds), so
# start-up and TLS handshakes cancel out. cachegrind does not see the kernel's copies:
# data a socket read brings in counts as missed when user space first reads it, and data
# written for a socket is never read back; compare builds with it, not absolute figures.
#   B=/path/to/target/release benches/reference/footprint.sh
# Needs release builds, valgrind, wrk and python3; ~3 minutes at the defaults.
set -euo pipefail
B=${B:-$(cd "$(dirname "$0")/../.." && pwd)/target/release}
CS=${CS:-64 256}
T1=${T1:-6}
T2=${T2:-16}

source "$(dirname "$0")/tower.sh"
# One worker per process, as deployed (and as counts.sh): work stealing between two
# would move the counts from run to run.
export TOKIO_WORKER_THREADS=1
under() {
  local out=$1
  shift
  exec valgrind --tool=cachegrind --cache-sim=yes --branch-sim=no --LL=1048576,8,64 \
    --cachegrind-out-file="$out" "$@"
}

# One run of wrk at concurrency $1 for $2 seconds: "requests server-summary agent-summary",
# each summary being cachegrind's totals (Ir I1mr ILmr Dr D1mr DLmr Dw D1mw DLmw).
measured() {
  D=$(mktemp -d)
  start_tower
  local out n
  out=$(wrk -t2 -c"$1" -d"$2"s -H "Authorization: Bearer $USER_TOKEN" "$BASE/version")
  n=$(awk '/requests in/{print $1}' <<<"$out")
  stop_tower
  echo "$n|$(awk '/^summary:/{$1=""; print}' "$D/server.cg")|$(awk '/^summary:/{$1=""; print}' "$D/agent.cg")"
  rm -rf "$D"
}

echo "$B"
for c in $CS; do
  short=$(measured "$c" "$T1")
  long=$(measured "$c" "$T2")
  python3 - "$c" "$short" "$long" <<'PY'
import sys
c, short, long = sys.argv[1], sys.argv[2].split('|'), sys.argv[3].split('|')
requests = int(long[0]) - int(short[0])
for i, side in ((1, 'server'), (2, 'agent')):
    a, b = (list(map(int, run[i].split())) for run in (short, long))
    per = [(y - x) / requests for x, y in zip(a, b)]
    ir, d1, l2 = per[0], per[4] + per[7], per[5] + per[8]
    print(f"c={c} {side}: {ir:.0f} instructions, {d1:.0f} D1 misses, "
          f"{l2:.1f} misses of a 1 MiB L2 per request ({requests} requests)")
PY
done
