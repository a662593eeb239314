#!/bin/bash
# Fetches the glibc Tower's image runs on (Debian 13's libc6, as deploy/Containerfile's
# distroless/cc-debian13) into target/glibc-debian13 and prints that directory, for the
# reference scripts' GLIBC=: on a Debian 12 machine they can then run every process of a
# comparison (stand-in, Tower, haproxy, wrk, curl) under the image's glibc rather than the
# machine's, e.g.
#   GLIBC=$(benches/reference/debian13-glibc.sh) benches/reference/haproxy-chain.sh
# Why it matters (BENCHMARKS.md, "glibc's memcpy on AMD Zen"): on AMD Zen, Debian 12's glibc
# 2.36 copies anything over 2 KiB with REP MOVSB, slow there for some alignments of source
# and destination; Debian 13's 2.41 uses it only from 24 MiB.
# Needs: curl, xz, dpkg-deb; reaches deb.debian.org. x86_64 only.
set -euo pipefail
out=$(cd "$(dirname "$0")/../.." && pwd)/target/glibc-debian13
if [ ! -e "$out/libc.so.6" ]; then
  mirror=http://deb.debian.org/debian
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  curl -sf "$mirror/dists/trixie/main/binary-amd64/Packages.xz" -o "$work/Packages.xz"
  deb=$(xz -dc "$work/Packages.xz" | awk '$0 == "Package: libc6" { p = 1 } p && !f && /^Filename:/ { print $2; f = 1 }')
  [ -n "$deb" ] || { echo "$0: no libc6 in Debian 13's package index" >&2; exit 1; }
  curl -sf "$mirror/$deb" -o "$work/libc6.deb"
  dpkg-deb -x "$work/libc6.deb" "$work/root"
  mkdir -p "$out"
  cp -a "$work/root/usr/lib/x86_64-linux-gnu/." "$out/"
fi
echo "$out"
