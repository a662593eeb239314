# Sourced by the reference scripts: the stand-in, tower-server and tower-agent from $B,
# all on 127.0.0.1, their files in $D.

# ON_GLIBC: what to put before a program so that it runs under the glibc in $GLIBC (a
# directory with another glibc's ld-linux-x86-64.so.2 and libraries, from
# debian13-glibc.sh) instead of the machine's; empty without GLIBC. The loader finds that
# glibc's libraries first and everything else (libssl, libgcc_s, ...) in the machine's.
ON_GLIBC=()
if [ -n "${GLIBC:-}" ]; then
  ON_GLIBC=("$GLIBC/ld-linux-x86-64.so.2" --library-path "$GLIBC:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu")
fi
# Runs program $1 (found on PATH: the loader does not search it) with arguments under
# $GLIBC's glibc, or as is.
on_glibc() {
  local program
  program=$(command -v "$1")
  shift
  "${ON_GLIBC[@]}" "$program" "$@"
}

# Runs "$@" in place of this (background) shell, so that its pid is the program's and
# signals reach it; under cachegrind writing to file $1 when COUNT is set; under $GLIBC's
# glibc when that is set.
under() {
  local out=$1
  shift
  if [ -n "${COUNT:-}" ]; then
    exec valgrind --tool=cachegrind --cache-sim=no --branch-sim=no --cachegrind-out-file="$out" "${ON_GLIBC[@]}" "$@"
  else
    exec "${ON_GLIBC[@]}" "$@"
  fi
}

# Starts the stand-in, then server and agent (each under `under`), and waits until a
# request goes through. Sets SI, SV, AG (pids), UP (the stand-in's address), FRONTEND,
# BASE (cluster c1 through the frontend) and USER_TOKEN.
start_tower() {
  "${ON_GLIBC[@]}" "$B/kube-stand-in" --listen 127.0.0.1:0 --token T --kubeconfig-out "$D/kc" >"$D/si.out" 2>/dev/null &
  SI=$!
  for _ in $(seq 100); do grep -q listening "$D/si.out" 2>/dev/null && break; sleep 0.1; done
  UP=$(sed 's|listening on https://||' "$D/si.out")
  echo -n "reference-run-jwt-secret-0123456789" >"$D/secret"
  # The server says when the agent's tunnel is up, so that readiness is waited for in
  # its log: a request polled until it answers would cost each run a varying number of
  # TLS handshakes (1-1.5 M instructions each under counts.sh's valgrind).
  TOWER_LOG=warn,tower_server::agents=info under "$D/server.cg" "$B/tower-server" serve \
    --tunnel-addr 127.0.0.1:0 --proxy-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 \
    --jwt-secret-file "$D/secret" --state-dir "$D/st" >"$D/sv.out" 2>"$D/sv.err" &
  SV=$!
  # Generous waits: under valgrind, start-up takes seconds.
  for _ in $(seq 600); do grep -q frontend "$D/sv.out" 2>/dev/null && break; sleep 0.1; done
  local tunnel
  tunnel=$(grep -o '"tunnel":"[^"]*"' "$D/sv.out" | cut -d'"' -f4)
  FRONTEND=$(grep -o '"frontend":"[^"]*"' "$D/sv.out" | cut -d'"' -f4)
  TOWER_LOG=warn under "$D/agent.cg" "$B/tower-agent" --name c1 \
    --proxy-server "https://$tunnel" \
    --token "$("$B/tower-server" token --jwt-secret-file "$D/secret" --cluster c1)" \
    --ca-file "$D/st/ca.crt" --kubeconfig "$D/kc" --jwt-secret-file "$D/secret" >/dev/null 2>"$D/ag.err" &
  AG=$!
  USER_TOKEN=$("$B/tower-server" user-token --jwt-secret-file "$D/secret" --user alice)
  BASE="https://$FRONTEND/clusters/c1"
  for _ in $(seq 600); do grep -q "agent connected" "$D/sv.err" 2>/dev/null && break; sleep 0.1; done
  wait_answer "$BASE/version" "$USER_TOKEN" || { echo "$0: Tower did not answer" >&2; exit 1; }
}

# Stops server and agent (SIGINT: they drain and exit, and cachegrind writes its files),
# then the stand-in.
stop_tower() {
  kill -INT "$AG" "$SV" 2>/dev/null || true
  wait "$AG" "$SV" 2>/dev/null || true
  kill "$SI" 2>/dev/null || true
  wait "$SI" 2>/dev/null || true
}

# Writes "$D/http.cfg": haproxy's two chained HTTP+TLS hops, Tower's topology (caller ->
# hop one on port $1 -> hop two on port $2 -> the stand-in at $UP), each with keep-alive
# to its upstream, and "$D/ck.pem", their certificate. `nbthread 1` when $3 is set. Each
# hop offers callers HTTP/2 as well as HTTP/1.1, as Tower's frontend does, so that a
# client that prefers HTTP/2 (curl) speaks the same protocol to both; between the hops,
# and to the upstream, HTTP/1.1.
haproxy_chain_config() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$D/k.pem" \
    -out "$D/c.pem" -days 1 -subj /CN=localhost 2>/dev/null
  cat "$D/c.pem" "$D/k.pem" >"$D/ck.pem"
  cat >"$D/http.cfg" <<CFG
global
  maxconn 2000
${3:+  nbthread 1}
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend one
  bind 127.0.0.1:$1 ssl crt $D/ck.pem alpn h2,http/1.1
  default_backend to_two
backend to_two
  http-reuse always
  server s 127.0.0.1:$2 ssl verify none
frontend two
  bind 127.0.0.1:$2 ssl crt $D/ck.pem alpn h2,http/1.1
  default_backend to_upstream
backend to_upstream
  http-reuse always
  server s $UP ssl verify none
CFG
}

# A free port on 127.0.0.1 (haproxy cannot bind port 0).
free_port() { python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])"; }

# Starts haproxy's two chained HTTP+TLS hops (see haproxy_chain_config) on ports $1 and
# $2: one process with a thread per core holding both, or, with DEPLOYED set, one
# process per hop with one thread each, as Tower is deployed (one pod per hop, 1 CPU).
# Sets HOP1 and HOP2, the pids whose CPU is each hop's (the same pid twice when one
# process holds both), and returns once a request goes through both hops.
start_haproxy_chain() {
  haproxy_chain_config "$1" "$2"
  if [ -n "${DEPLOYED:-}" ]; then
    # Split http.cfg at its second frontend.
    awk '/^frontend two/{exit} {print}' "$D/http.cfg" | sed 's/^global/global\n  nbthread 1/' >"$D/hop1.cfg"
    { printf 'global\n  nbthread 1\n  maxconn 2000\n'; awk '/^defaults/{p=1} /^frontend one/{p=0} /^frontend two/{p=1} p' "$D/http.cfg"; } >"$D/hop2.cfg"
    on_glibc haproxy -f "$D/hop1.cfg" -D -p "$D/hop1.pid"
    on_glibc haproxy -f "$D/hop2.cfg" -D -p "$D/hop2.pid"
    HOP1=$(cat "$D/hop1.pid")
    HOP2=$(cat "$D/hop2.pid")
  else
    on_glibc haproxy -f "$D/http.cfg" -D -p "$D/http.pid"
    HOP1=$(cat "$D/http.pid")
    HOP2=$HOP1
  fi
  wait_answer "https://127.0.0.1:$1/version" || { echo "$0: haproxy's chain did not answer" >&2; exit 1; }
}

# wait_answer URL [TOKEN [SECONDS]]: returns once URL answers a request with TOKEN (the
# stand-in's, T, by default), false after SECONDS (10).
wait_answer() {
  for _ in $(seq "$((${3:-10} * 10))"); do
    curl -sfk -o /dev/null -H "Authorization: Bearer ${2:-T}" "$1" && return 0
    sleep 0.1
  done
  return 1
}
