#!/usr/bin/env bash
# What an agent restart costs the clients (issue 18; figures in
# RELIABILITY.md). As root, on a host with dockerd and the test image
# (tests/images/build.sh):
#
#   scripts/restart-bench.sh upgrade|crash|keeper-kill [PIER_BINARY] [STYLE]
#
# One agent on the embedded store, a replica set of 2 behind a NodePort
# service; three bounded client loops run side by side, 300 requests each
# over about 9 s: curl to the node port on 127.0.0.1, curl to the VIP, and
# dig of the service name at the DNS VIP. After 3 s the agent is restarted:
#   upgrade: STYLE=keeper (default): SIGHUP to the keeper (what
#            `systemctl reload pier` sends); STYLE=legacy (a pier without a
#            keeper): SIGTERM, wait for the exit, start again.
#   crash:   STYLE=keeper: kill -9 of the worker (the keeper restarts it);
#            STYLE=legacy: kill -9 of the agent, start again 1 s later (as
#            systemd's Restart= would).
#   keeper-kill: (STYLE=keeper) kill -9 of the keeper, the process a user
#            starts; `pier agent` again 2 s later (the unit's RestartSec):
#            the worker serves on as an orphan and the new keeper adopts it.
# Prints, per loop: requests failed, the longest request (the client-seen
# stall) and, once, the time from the restart to full service (the new
# process's /readyz answering 200, and for the keeper the worker's log line
# "worker ready").
# Everything it creates carries the label pier.test-run=$PIER_TEST_RUN and
# is removed at the end, also after a failure.
set -euo pipefail
MODE=${1:?usage: restart-bench.sh upgrade|crash|keeper-kill [PIER_BINARY] [keeper|legacy]}
PIER=$(readlink -f "${2:-target/debug/pier}")
STYLE=${3:-keeper}
RUN=${PIER_TEST_RUN:-rb$$}
N=${N:-300}
GAP=${GAP:-0.03}
DIR=$(mktemp -d /tmp/pier-rb.XXXXXX)
API_PORT=$((17000 + RANDOM % 1000))
CIDR=${CIDR:-10.213.226.0/24}
IFACE=prb$((RANDOM % 1000))
NP=30990
cat >"$DIR/pier.toml" <<EOF
[node]
name = "rb"
addr = "127.0.0.1"
[store]
url = "embedded"
lease_ttl_secs = 3
[network]
service_cidr = "$CIDR"
node_port_min = $NP
node_port_max = $((NP + 9))
data_dir = "$DIR/data"
[api]
listen = "127.0.0.1:$API_PORT"
[proxy]
iface = "$IFACE"
[agent]
filter_labels = { "pier.test-run" = "$RUN" }
pod_labels = { "pier.test-run" = "$RUN" }
EOF
AGENT_PID=
start_agent() {
  PIER_LOG=${PIER_LOG:-info} "$PIER" agent --config "$DIR/pier.toml" >>"$DIR/agent.log" 2>&1 &
  AGENT_PID=$!
}
ORPHAN=
cleanup() {
  [ -n "$AGENT_PID" ] && kill -TERM "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null || true
  # A worker left by keeper-kill that no keeper adopted.
  [ -n "$ORPHAN" ] && grep -q pier "/proc/$ORPHAN/cmdline" 2>/dev/null && kill -TERM "$ORPHAN" 2>/dev/null || true
  docker ps -aq --filter "label=pier.test-run=$RUN" | xargs -r docker rm -f >/dev/null
  ip link del "$IFACE" 2>/dev/null || true
  [ -n "${KEEP_LOG:-}" ] && cp "$DIR/agent.log" "$KEEP_LOG"; rm -rf "$DIR"
}
trap cleanup EXIT
ready() { curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$API_PORT/readyz" 2>/dev/null | grep -q 200; }
wait_ready() {
  for _ in $(seq 300); do ready && return 0; sleep 0.02; done
  echo "agent not ready; log:" >&2; tail -30 "$DIR/agent.log" >&2; exit 1
}
start_agent
wait_ready
cli() { "$PIER" --config "$DIR/pier.toml" "$@"; }
cli run rb --image pier-test/httpd:latest --port 8080 --replicas 2 --wait >/dev/null
cli expose rs rb --port 8080 --type NodePort >/dev/null
SVC=$(cli get svc rb -o json)
VIP=$(echo "$SVC" | python3 -c 'import json,sys; d=json.load(sys.stdin); d=d[0] if isinstance(d,list) else d; print(d["vip"])')
NPORT=$(echo "$SVC" | python3 -c 'import json,sys; d=json.load(sys.stdin); d=d[0] if isinstance(d,list) else d; print(d["ports"][0]["node_port"])')
DNS=$(python3 -c "import ipaddress; print(ipaddress.ip_network('$CIDR')[10])")
for _ in $(seq 100); do
  curl -s --max-time 1 "http://127.0.0.1:$NPORT/" >/dev/null && break; sleep 0.05
done

loop_http() { # URL OUT
  for _ in $(seq "$N"); do
    curl -s -o /dev/null -w '%{http_code} %{time_total} %{exitcode}\n' --max-time 5 "$1" >>"$2" || true
    sleep "$GAP"
  done
}
loop_dns() { # OUT
  for _ in $(seq "$N"); do
    s=$(date +%s.%N)
    if r=$(dig +short +tries=1 +timeout=5 "@$DNS" rb.default.svc.pier.internal A) && [ "$r" = "$VIP" ]; then c=200; else c=000; fi
    echo "$c $(echo "$(date +%s.%N) - $s" | bc)" >>"$1"
    sleep "$GAP"
  done
}
: >"$DIR/np" ; : >"$DIR/vip" ; : >"$DIR/dns"
loop_http "http://127.0.0.1:$NPORT/" "$DIR/np" & L1=$!
loop_http "http://$VIP:8080/" "$DIR/vip" & L2=$!
loop_dns "$DIR/dns" & L3=$!
sleep 3
T0=$(date +%s.%N)
OLD_WORKER=$(ps -o pid= --ppid "$AGENT_PID" | head -1 | tr -d ' ' || true)
[ "$MODE" = keeper-kill ] && ORPHAN=$OLD_WORKER
case "$STYLE/$MODE" in
  keeper/upgrade) kill -HUP "$AGENT_PID" ;;
  keeper/crash) kill -KILL "$OLD_WORKER" ;;
  keeper/keeper-kill) kill -KILL "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true; sleep 2; start_agent ;;
  legacy/upgrade) kill -TERM "$AGENT_PID"; wait "$AGENT_PID" || true; start_agent ;;
  legacy/crash) kill -KILL "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true; sleep 1; start_agent ;;
  *) echo "unknown mode $STYLE/$MODE" >&2; exit 2 ;;
esac
# Full service: the new process answers /readyz (the keeper's new worker
# logs "worker ready" once its DNS and proxy serve the synced snapshot).
for _ in $(seq 1000); do
  if [ "$STYLE" = keeper ]; then
    NEW=$(ps -o pid= --ppid "$AGENT_PID" | tr -d ' ' | grep -vx "${OLD_WORKER:-x}" | head -1 || true)
    [ -n "$NEW" ] && grep -q "worker ready.*pid=$NEW\|worker ready.*worker=$NEW" "$DIR/agent.log" && break
  else
    ready && break
  fi
  sleep 0.01
done
T1=$(date +%s.%N)
wait $L1 $L2 $L3
summary() { # NAME FILE
  # curl's exit code 7 (refused) or 28 (timed out): a new connection
  # failed; 52/56 (no reply, reset): accepted, then closed unanswered (in
  # flight through a process that died, or no ready endpoint yet).
  awk -v n="$1" '{ if ($1 != "200") { f++; if ($3 == 52 || $3 == 56) e++ } if ($2 > m) m = $2; c++ }
    END { printf "%-9s requests %d  failed %d (of which accepted, then closed unanswered %d)  longest %.3f s\n", n, c, f, e, m }' "$2"
}
echo "pier $("$PIER" --version | cut -d' ' -f2-) style=$STYLE mode=$MODE"
summary nodeport "$DIR/np"
summary vip "$DIR/vip"
summary dns "$DIR/dns"
printf 'full service after %.3f s\n' "$(echo "$T1 - $T0" | bc)"
