#!/bin/bash
# Why the bulk row of haproxy-chain.sh depends on where the relays run: one 1 GiB download
# (curl, HTTP/1.1, as the judge's bulk row) through haproxy's two HTTP+TLS hops and through
# Tower, one thread per relay process (DEPLOYED=1 of haproxy-chain.sh), alternated ROUNDS
# times (default 3). For each download it prints:
#   - the rate;
#   - the CPU seconds per GiB of each relay, of curl and of the stand-in (user + system);
#   - how idle the machine's CPUs were meanwhile (/proc/stat);
#   - each relay's voluntary context switches per GiB (how often it slept);
#   - how often the two relays were on the same CPU, sampled every 5 ms from
#     /proc/PID/stat's "processor" (the CPU each last ran on), and of the samples where
#     both were runnable, how many had them on one CPU (one waiting for the other).
#
# On a machine of two cores the four busy processes (curl, two relays, the stand-in) share
# them, and where the kernel puts the two relays decides the rate as much as what each
# byte costs them (BENCHMARKS.md, "Issue 18's goals, session 30: where the relays run").
#
# Needs: release builds (see BENCHMARKS.md), haproxy, openssl, curl, GNU time
# (/usr/bin/time), python3. GLIBC=DIR as in haproxy-chain.sh. Everything listens on
# 127.0.0.1 only.
set -euo pipefail
export DEPLOYED=1 TOKIO_WORKER_THREADS=1
ROUNDS=${ROUNDS:-3}
B=${B:-$(cd "$(dirname "$0")/../.." && pwd)/target/release}
D=$(mktemp -d)
SI=; SV=; AG=; SAMPLER=
trap 'kill $(cat "$D"/*.pid 2>/dev/null) $SAMPLER $SI $SV $AG 2>/dev/null; rm -rf "$D"' EXIT

source "$(dirname "$0")/tower.sh"
start_tower
P1=$(free_port); P2=$(free_port)
start_haproxy_chain "$P1" "$P2"

# download NAME ADDR TOKEN PID1 PID2: one 1 GiB download through the relays PID1, PID2.
download() {
  local name=$1 addr=$2 token=$3 first=$4 second=$5
  python3 "$(dirname "$0")/placement.py" "$first" "$second" "$SI" >"$D/placement" &
  SAMPLER=$!
  # Let the sampler take its first reading of every counter before the download starts.
  for _ in $(seq 50); do [ -s "$D/placement" ] && break; sleep 0.02; done
  [ -s "$D/placement" ] || { echo "$0: placement.py did not start" >&2; exit 1; }
  local curl_time
  curl_time=$( { /usr/bin/time -f '%U %S' "${ON_GLIBC[@]}" "$(command -v curl)" -sfk --http1.1 \
    -o /dev/null -w '%{speed_download}\n' -H "Authorization: Bearer $token" \
    "https://$addr/debug/bytes?size=1073741824" >"$D/speed"; } 2>&1)
  kill -INT "$SAMPLER"
  wait "$SAMPLER" || { echo "$0: placement.py failed" >&2; exit 1; }
  SAMPLER=
  printf '%-8s %5.0f MB/s  curl %.2f s/GiB  %s\n' "$name" "$(awk '{print $1 / 1e6}' "$D/speed")" \
    "$(awk '{print $1 + $2}' <<<"$curl_time")" "$(tail -1 "$D/placement")"
}
for round in $(seq 1 "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then
    download tower "${BASE#https://}" "$USER_TOKEN" "$SV" "$AG"
    download haproxy "127.0.0.1:$P1" T "$HOP1" "$HOP2"
  else
    download haproxy "127.0.0.1:$P1" T "$HOP1" "$HOP2"
    download tower "${BASE#https://}" "$USER_TOKEN" "$SV" "$AG"
  fi
done
