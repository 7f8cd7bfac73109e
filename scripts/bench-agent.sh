#!/usr/bin/env bash
# The real `pier agent` binary in shared/bench's interleaved runs, beside
# HAProxy (proxy) or NSD and Knot (DNS) (issue 21; figures in
# BENCHMARKS.md). As root, from the repository:
#
#   cargo build --release -p pier
#   scripts/bench-agent.sh proxy [-- bench_proxy.sh options]   # e.g. -- --reps 3 --dur 5 --tests close,ka
#   scripts/bench-agent.sh dns   [-- bench_dns.sh options]     # e.g. -- --tests max,lat1 --reps 3 --dur 5
#
# One agent, started as a user would (`pier agent --unprivileged` on the
# embedded store: VIPs in 127.213.0.0/16, no interface), pinned with
# everything it starts (keeper and worker) where the scripts' --pin puts
# the server under test: CPU 1 for the proxy (load and backends on CPU 0),
# CPU 0 for DNS (dnsperf on CPU 1, NSD and Knot on CPU 0).
#   proxy: two services made with `pier expose external`: bench (one port,
#          in front of the iperf3 backend 127.0.0.1:15201) and http (in
#          front of the two nginx backends 127.0.0.1:18081 and :18082).
#          shared/bench's run_proxy_baselines.sh then measures them through
#          their VIPs beside HAProxy (copy and splice), with the worker's
#          PID for the CPU figures.
#   dns:   1000 services svc0001..svc1000 (one VIP each, port 80; the
#          first 100 with two endpoints, so `_p80._tcp.svcNNNN` SRV has two
#          targets, as in gen_dns_data.py) and the agent's DNS on
#          127.0.0.1:15360. run_dns_baselines.sh runs from a copy of
#          shared/bench changed in two ways only: the zone is
#          default.svc.pier.internal (gen_dns_data.py --zone) and the SRV
#          names are _p80._tcp (what `pier expose external --port 80`
#          names the port), so NSD, Knot and the agent answer the same
#          query file (70 % A, 10 % SRV, 20 % NXDOMAIN).
#
# Environment: PIER (the binary; default target/release/pier), BENCH (the
# shared/bench directory), PIER_BENCH_TOML (extra config lines appended to
# the agent's config, e.g. $'[proxy]\nsplice = false'), PROXIES (the
# reference proxies, default haproxy,haproxy_splice), SERVERS (the reference
# DNS servers, default nsd,knot), and the scripts' own (QUIET_MAX, ...).
# Everything started here is stopped by PID at the end; the data directory
# is removed.
set -euo pipefail
MODE=${1:?usage: scripts/bench-agent.sh proxy|dns [-- options for the bench script]}
shift
[ "${1:-}" = "--" ] && shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=$(cd "${BENCH:-$ROOT/../shared/bench}" && pwd)
PIER=$(readlink -f "${PIER:-$ROOT/target/release/pier}")
[ -x "$PIER" ] || { echo "no pier binary at $PIER: run cargo build --release -p pier first" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "run as root: the bench scripts pin with taskset and install packages" >&2; exit 1; }
DIR=$(mktemp -d /tmp/pier-bench.XXXXXX)
API_PORT=$((17000 + RANDOM % 1000))
RUN=bench$$
# dns: the static endpoints' health checks every 30 s (see below).
HEALTH=""; [ "$MODE" = dns ] && HEALTH="default_health_interval_ms = 30000"
cat >"$DIR/pier.toml" <<EOF
[node]
name = "bench"
addr = "127.0.0.1"
[store]
url = "embedded"
[network]
data_dir = "$DIR/data"
static_endpoint_allow = ["127.0.0.0/8"]
dns_listen = ["127.0.0.1:15360"]
[api]
listen = "127.0.0.1:$API_PORT"
[agent]
# Containers on this host are not the benchmark's.
filter_labels = { "pier.test-run" = "$RUN" }
$HEALTH
EOF
[ -n "${PIER_BENCH_TOML:-}" ] && printf '%s\n' "$PIER_BENCH_TOML" >>"$DIR/pier.toml"

AGENT_PID= LISTENER_PID=
cleanup() {
  [ -n "$LISTENER_PID" ] && kill "$LISTENER_PID" 2>/dev/null
  if [ -n "$AGENT_PID" ]; then
    kill -TERM "$AGENT_PID" 2>/dev/null || true
    wait "$AGENT_PID" 2>/dev/null || true
  fi
  [ -n "${KEEP_LOG:-}" ] && cp "$DIR/agent.log" "$KEEP_LOG"
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The load generator runs on CPU 0 for the proxy and on CPU 1 for DNS
# (run_dns_baselines.sh --pin puts the servers on CPU 0).
CPU=1; [ "$MODE" = dns ] && CPU=0
PIER_LOG=${PIER_LOG:-warn} taskset -c "$CPU" "$PIER" agent --unprivileged --config "$DIR/pier.toml" >"$DIR/agent.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 500); do
  curl -s -o /dev/null --max-time 1 -w '%{http_code}' "http://127.0.0.1:$API_PORT/readyz" 2>/dev/null | grep -q 200 && break
  kill -0 "$AGENT_PID" 2>/dev/null || { echo "the agent exited; its log:" >&2; cat "$DIR/agent.log" >&2; exit 1; }
  sleep 0.02
done
WORKER=$(ps -o pid= --ppid "$AGENT_PID" | head -1 | tr -d ' ')
[ -n "$WORKER" ] || { echo "no worker process under the keeper $AGENT_PID" >&2; exit 1; }
cli() { "$PIER" --config "$DIR/pier.toml" "$@"; }
vip() { cli get svc "$1" -o json | python3 -c 'import json,sys; d=json.load(sys.stdin); d=d[0] if isinstance(d,list) else d; print(d["vip"])'; }
# A VIP listener answers once the agent's proxy has the service.
wait_port() {
  for _ in $(seq 250); do
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
    sleep 0.02
  done
  echo "nothing listens on $1:$2; the agent's log:" >&2; tail -20 "$DIR/agent.log" >&2; exit 1
}
echo "# pier agent $("$PIER" --version) keeper=$AGENT_PID worker=$WORKER (CPU $CPU) config=$DIR/pier.toml" >&2

case "$MODE" in
proxy)
  cli expose external bench --port 19101 --endpoint 127.0.0.1:15201 >/dev/null
  cli expose external http --port 19102 --endpoint 127.0.0.1:18081 --endpoint 127.0.0.1:18082 >/dev/null
  BULK=$(vip bench) HTTP=$(vip http)
  wait_port "$BULK" 19101
  wait_port "$HTTP" 19102
  cd "$BENCH"
  ./run_proxy_baselines.sh --pin --proxies "${PROXIES:-haproxy,haproxy_splice}" \
    --extra-proxy "name=pier,bulk=$BULK:19101,http=$HTTP:19102,pid=$WORKER" -- "$@"
  ;;
dns)
  echo "# making 1000 services (about a minute)" >&2
  # The endpoints must be up for SRV to have targets (an endpoint that
  # fails its health check is not answered): two idle listeners, checked
  # every 30 s rather than the default 0.5 s, so that 1,100 health checks
  # do not weigh on the CPU figures (see BENCHMARKS.md).
  python3 -c '
import socket, signal, sys, time
ls = []
for p in (15398, 15399):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", p)); s.listen(4096); ls.append(s)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
time.sleep(3600)' &
  LISTENER_PID=$!
  for i in $(seq 1 1000); do
    n=$(printf 'svc%04d' "$i")
    if [ "$i" -le 100 ]; then
      cli expose external "$n" --port 80 --endpoint 127.0.0.1:15398 --endpoint 127.0.0.1:15399 >/dev/null
    else
      cli expose external "$n" --port 80 --endpoint 127.0.0.1:15398 >/dev/null
    fi
  done
  # The last one answers, and the first SRV has both targets.
  for _ in $(seq 500); do
    dig +short +tries=1 +timeout=1 -p 15360 @127.0.0.1 svc1000.default.svc.pier.internal A | grep -q . \
      && [ "$(dig +short +tries=1 +timeout=1 -p 15360 @127.0.0.1 _p80._tcp.svc0001.default.svc.pier.internal SRV | wc -l)" = 2 ] && break
    sleep 0.02
  done
  [ "$(dig +short +tries=1 +timeout=1 -p 15360 @127.0.0.1 _p80._tcp.svc0001.default.svc.pier.internal SRV | wc -l)" = 2 ] \
    || { echo "the agent does not answer _p80._tcp.svc0001 SRV with two targets" >&2; exit 1; }
  B=$DIR/bench
  cp -a "$BENCH" "$B"
  sed -i 's|^python3 "\$HERE/gen_dns_data.py" "\$D"|python3 "$HERE/gen_dns_data.py" "$D" --zone default.svc.pier.internal|; s|^ZONE=mesh.internal;|ZONE=default.svc.pier.internal;|; s|_http\._tcp|_p80._tcp|g' "$B/run_dns_baselines.sh"
  sed -i 's|_http\._tcp|_p80._tcp|g' "$B/gen_dns_data.py"
  grep -q 'ZONE=default.svc.pier.internal;' "$B/run_dns_baselines.sh" && grep -q -- '--zone default.svc.pier.internal' "$B/run_dns_baselines.sh" \
    && grep -q '_p80._tcp' "$B/gen_dns_data.py" \
    || { echo "shared/bench changed: cannot point its DNS run at the agent's zone" >&2; exit 1; }
  cd "$B"
  ./run_dns_baselines.sh --pin --servers "${SERVERS:-nsd,knot}" \
    --extra-target "name=pier,addr=127.0.0.1:15360,pid=$WORKER" -- "$@"
  ;;
*) echo "unknown mode $MODE: proxy or dns" >&2; exit 2 ;;
esac
