#!/usr/bin/env bash
# The real `pier agent` as a watch relay (TLS, mesh certificates) against
# etcd's own watchers, in interleaved rounds (figures in BENCHMARKS.md,
# "Scale", "The real relay agent (TLS) vs etcd's own watchers"). As root,
# from the repository, after building (nothing is built here):
#
#   CARGO_INCREMENTAL=0 cargo build --release -p pier
#   CARGO_INCREMENTAL=0 cargo build --release -p pier --example relay_bench
#   scripts/bench-relay.sh [-- relay_bench options]   # e.g. -- --sizes 50,200,500 --rounds 3 --rate 200 --secs 10
#
# What it starts, all on loopback, each on its own random free port:
# - a throwaway single-member etcd (data dir in a temp dir), on CPU 0;
# - a mesh CA and two node certificates, made with the real CLI
#   (`pier ca init`, `pier ca issue relay`, `pier ca issue bench-client`);
# - ONE relay agent, started as a user would: `pier agent --unprivileged
#   --config ...` with `[store] url = "etcd://127.0.0.1:PORT"`, `[mesh]`
#   and `[relay] listen = "127.0.0.1:PORT"`, keeper and worker on CPU 1.
#   It talks to the host's dockerd (which must be up: `docker info`) but
#   takes only containers labelled with this run's id, so none; nothing
#   here starts a container;
# - the load generator (`crates/pier/examples/relay_bench.rs`), on
#   CPU 0 with etcd: N watchers of /pier/v1/ through the relay (with the
#   bench-client certificate) or on etcd itself (a connection each), in
#   rounds relay, direct, relay, direct, ..., while a writer puts stats
#   records of a service that does not exist at a fixed rate. It prints
#   each round and a table of medians per N (latency p50 / p99 / max,
#   events lost, CPU of the relay worker, of etcd and of itself, etcd's
#   watchers) with the ratios relay / direct.
# At the end it prints the agent's warnings and errors (there should be
# none), stops everything it started by PID and removes its directory.
#
# Environment: PIER (default target/release/pier), RELAY_BENCH (default
# target/release/examples/relay_bench), PIER_LOG (the agent's log level,
# default info), KEEP_LOG (copy the agent's log there).
set -euo pipefail
[ "${1:-}" = "--" ] && shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PIER=$(readlink -f "${PIER:-$ROOT/target/release/pier}")
GEN=$(readlink -f "${RELAY_BENCH:-$ROOT/target/release/examples/relay_bench}")
[ -x "$PIER" ] || { echo "no pier binary at $PIER: run CARGO_INCREMENTAL=0 cargo build --release -p pier first" >&2; exit 1; }
[ -x "$GEN" ] || { echo "no load generator at $GEN: run CARGO_INCREMENTAL=0 cargo build --release -p pier --example relay_bench first" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "run as root: the agent and etcd are pinned with taskset and need many descriptors" >&2; exit 1; }
command -v etcd >/dev/null || { echo "etcd is not installed" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "dockerd is not up (docker info fails); the agent needs it" >&2; exit 1; }
# 500 watchers: a descriptor each in the load generator, the worker and etcd.
ulimit -n 20000

DIR=$(mktemp -d /tmp/pier-relay-bench.XXXXXX)
ETCD_PID= AGENT_PID=
cleanup() {
  local rc=$?
  if [ -n "$AGENT_PID" ]; then
    kill -TERM "$AGENT_PID" 2>/dev/null || true
    # The keeper stops its worker; bounded: 30 s, then KILL.
    for _ in $(seq 300); do kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$AGENT_PID" 2>/dev/null || true
    wait "$AGENT_PID" 2>/dev/null || true
  fi
  [ -n "${WORKER:-}" ] && kill -KILL "$WORKER" 2>/dev/null || true
  if [ -n "$ETCD_PID" ]; then
    kill -TERM "$ETCD_PID" 2>/dev/null || true
    wait "$ETCD_PID" 2>/dev/null || true
  fi
  [ -n "${KEEP_LOG:-}" ] && [ -f "$DIR/agent.log" ] && cp "$DIR/agent.log" "$KEEP_LOG"
  rm -rf "$DIR"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free loopback TCP port, not one handed out already (bounded tries):
# below the ephemeral range (ip_local_port_range starts at 32768), in no
# socket of any state (a TIME_WAIT of a connection of an earlier run holds
# its port against a bind too).
TAKEN=" "
free_port() {
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 12000))
    case "$TAKEN" in *" $p "*) continue ;; esac
    if ! ss -Htan "sport = :$p" | grep -q .; then
      TAKEN="$TAKEN$p "
      echo "$p"
      return 0
    fi
  done
  echo "no free port found" >&2
  return 1
}
ETCD_C=$(free_port) ETCD_P=$(free_port) RELAY=$(free_port) MESH=$(free_port) API=$(free_port)
TAKEN="$TAKEN$ETCD_C $ETCD_P $RELAY $MESH $API "

# etcd, on CPU 0 with the load generator.
taskset -c 0 etcd --name relay-bench --data-dir "$DIR/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_C" --advertise-client-urls "http://127.0.0.1:$ETCD_C" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_P" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_P" \
  --initial-cluster "relay-bench=http://127.0.0.1:$ETCD_P" --initial-cluster-state new \
  >"$DIR/etcd.log" 2>&1 &
ETCD_PID=$!
for _ in $(seq 200); do
  curl -s --max-time 1 "http://127.0.0.1:$ETCD_C/health" 2>/dev/null | grep -q '"health":"true"' && break
  kill -0 "$ETCD_PID" 2>/dev/null || { echo "etcd exited; its log:" >&2; tail -20 "$DIR/etcd.log" >&2; exit 1; }
  sleep 0.05
done
curl -s --max-time 1 "http://127.0.0.1:$ETCD_C/health" | grep -q '"health":"true"' \
  || { echo "etcd is not healthy after 10 s" >&2; exit 1; }

# The mesh CA and the node certificates, with the real CLI.
"$PIER" ca init "$DIR/ca" >/dev/null
"$PIER" ca issue relay --ca "$DIR/ca" --out "$DIR/relay-certs" >/dev/null
"$PIER" ca issue bench-client --ca "$DIR/ca" --out "$DIR/client-certs" >/dev/null

cat >"$DIR/pier.toml" <<EOF
[node]
name = "relay"
addr = "127.0.0.1"
[store]
url = "etcd://127.0.0.1:$ETCD_C"
[network]
data_dir = "$DIR/data"
# No DNS on port 53 of a loopback VIP: not what is measured here.
serve_dns_vip = false
[api]
listen = "127.0.0.1:$API"
[agent]
# Containers on this host are not the benchmark's.
filter_labels = { "pier.test-run" = "relaybench$$" }
[mesh]
listen = "127.0.0.1:$MESH"
ca = "$DIR/relay-certs/ca.pem"
cert = "$DIR/relay-certs/node.pem"
key = "$DIR/relay-certs/node-key.pem"
[relay]
listen = "127.0.0.1:$RELAY"
EOF

PIER_LOG=${PIER_LOG:-info} taskset -c 1 "$PIER" agent --unprivileged --config "$DIR/pier.toml" >"$DIR/agent.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 1500); do
  curl -s -o /dev/null --max-time 1 -w '%{http_code}' "http://127.0.0.1:$API/readyz" 2>/dev/null | grep -q 200 && break
  kill -0 "$AGENT_PID" 2>/dev/null || { echo "the agent exited; its log:" >&2; cat "$DIR/agent.log" >&2; exit 1; }
  sleep 0.02
done
curl -s -o /dev/null --max-time 1 -w '%{http_code}' "http://127.0.0.1:$API/readyz" | grep -q 200 \
  || { echo "the agent is not ready after 30 s; its log:" >&2; tail -30 "$DIR/agent.log" >&2; exit 1; }
# The relay listens (checked without a connection: a probe would be a
# refused handshake in the agent's log).
for _ in $(seq 250); do
  ss -Htln "sport = :$RELAY" | grep -q . && break
  sleep 0.02
done
ss -Htln "sport = :$RELAY" | grep -q . || { echo "nothing listens on the relay port $RELAY" >&2; exit 1; }
WORKER=$(ps -o pid= --ppid "$AGENT_PID" | head -1 | tr -d ' ')
[ -n "$WORKER" ] || { echo "no worker process under the keeper $AGENT_PID" >&2; exit 1; }
echo "# $(date -u '+%F %T UTC'); $("$PIER" --version); keeper $AGENT_PID, worker $WORKER (CPU 1); etcd $(etcd --version | head -1 | awk '{print $3}') pid $ETCD_PID (CPU 0); load generator on CPU 0; uptime:$(uptime | sed 's/.*load/ load/')"

set +e
taskset -c 0 "$GEN" --etcd "127.0.0.1:$ETCD_C" --relay "127.0.0.1:$RELAY" \
  --certs "$DIR/client-certs" --node bench-client --keeper "$AGENT_PID" --etcd-pid "$ETCD_PID" "$@"
GEN_RC=$?
set -e

echo "# uptime after:$(uptime | sed 's/.*load/ load/')"
echo "# the agent's log: $(wc -l <"$DIR/agent.log") lines, $(grep -c -E ' (WARN|ERROR) ' "$DIR/agent.log" || true) warnings or errors"
grep -E ' (WARN|ERROR) ' "$DIR/agent.log" | head -20 || true
kill -0 "$WORKER" 2>/dev/null || echo "# the worker $WORKER is gone (restarted?)"
exit "$GEN_RC"
