#!/usr/bin/env bash
# UDP through the release `pier agent` against direct and against nginx's
# stream UDP proxy (issue 19 sections 2 and 6), and the endpoint VIP's extra
# hop against reaching the pod directly (issue 19 section 0). Interleaved
# runs, medians, ratios against direct; figures in BENCHMARKS.md. As root,
# from the repository:
#
#   cargo build --release -p pier
#   scripts/bench-udp.sh anchor [--reps 5] [--dur 5] [--flows 16] [--window 8] [--size 64]
#   scripts/bench-udp.sh hop    [same options]
#
#   anchor: a UDP echo server (tests/images/udp-echo.c, built here) on
#           127.0.0.1:15401, pinned to CPU 0 with the load generator;
#           nginx (stream module, libnginx-mod-stream, one worker) on
#           127.0.0.1:15402 and the agent (`pier agent --unprivileged` on the
#           embedded store, VIPs in 127.219.0.0/16, keeper and worker) both
#           pinned to CPU 1. The agent's service is
#           `pier expose external udpb --port 19201/udp --endpoint
#           127.0.0.1:15401`. Targets: direct, nginx, pier (its VIP).
#   hop:    the echo server in a container of the test image
#           (pier-test/httpd, tests/images/build.sh; Docker's CPU 0), joined
#           to service `hop` by its labels (pier.service=hop,
#           pier.port=5353/udp), so the agent gives it an endpoint VIP.
#           Targets: direct (the container's bridge address), epvip (its
#           endpoint VIP: one proxy hop to exactly that pod) and vip (the
#           service's VIP, for reference).
#
# The load (scripts/udp-load.c, built here): FLOWS sockets, each its own
# flow, each keeping WINDOW datagrams of SIZE bytes in flight, for DUR
# seconds after a 0.5 s warm-up; every run bounded by `timeout`. pps is
# echoed datagrams (round trips) per second; the proxy's CPU is its PID
# tree's user+sys time over the run, as % of one core and as µs per round
# trip (two datagrams proxied, one each way).
#
# Output: one "RESULT udp target=... pps=... ratio=..." line per target on
# stdout, medians over --reps; the raw runs on stderr. Environment: PIER
# (default target/release/pier), BENCH (shared/bench, for common.sh),
# QUIET_MAX/QUIET_PCT (common.sh's wait before each run). Everything started
# here is stopped by its PID (containers by the run's label) at the end.
set -euo pipefail
MODE=${1:?usage: scripts/bench-udp.sh anchor|hop [--reps N] [--dur S] [--flows F] [--window W] [--size B]}
shift
REPS=5 DUR=5 FLOWS=16 WINDOW=8 SIZE=64
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) REPS=$2; shift 2 ;;
    --dur) DUR=$2; shift 2 ;;
    --flows) FLOWS=$2; shift 2 ;;
    --window) WINDOW=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
case "$MODE" in anchor|hop) ;; *) echo "unknown mode $MODE: anchor or hop" >&2; exit 2 ;; esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=$(cd "${BENCH:-$ROOT/../shared/bench}" && pwd)
PIER=$(readlink -f "${PIER:-$ROOT/target/release/pier}")
[ -x "$PIER" ] || { echo "no pier binary at $PIER: run cargo build --release -p pier first" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "run as root: it pins with taskset and may install packages" >&2; exit 1; }
# shellcheck source=/dev/null
. "$BENCH/common.sh"
ensure_pkgs cc:gcc taskset:util-linux nginx:nginx-light
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] || ensure_pkgs /usr/lib/nginx/modules/ngx_stream_module.so:libnginx-mod-stream

DIR=$(mktemp -d /tmp/pier-bench-udp.XXXXXX)
API_PORT=$((17000 + RANDOM % 1000))
RUN=benchudp$$
cc -O2 -o "$DIR/udp-echo" "$ROOT/tests/images/udp-echo.c"
cc -O2 -o "$DIR/udp-load" "$ROOT/scripts/udp-load.c"

cat >"$DIR/pier.toml" <<EOF
[node]
name = "bench"
addr = "127.0.0.1"
[store]
url = "embedded"
[network]
data_dir = "$DIR/data"
static_endpoint_allow = ["127.0.0.0/8"]
# No DNS VIP (and its own CIDR, --service-cidr below), beside any agent
# already running.
serve_dns_vip = false
node_port_min = 31900
node_port_max = 31999
[api]
listen = "127.0.0.1:$API_PORT"
[agent]
# Containers on this host are not the benchmark's, but for its own.
filter_labels = { "pier.test-run" = "$RUN" }
EOF

AGENT_PID=
cleanup() {
  stop_started
  if [ -n "$AGENT_PID" ]; then
    kill -TERM "$AGENT_PID" 2>/dev/null || true
    wait "$AGENT_PID" 2>/dev/null || true
  fi
  if [ "$MODE" = hop ]; then
    ids=$(docker ps -aq --filter "label=pier.test-run=$RUN")
    [ -n "$ids" ] && docker rm -f $ids >/dev/null 2>&1
  fi
  [ -n "${KEEP_LOG:-}" ] && cp "$DIR/agent.log" "$KEEP_LOG"
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PIER_LOG=${PIER_LOG:-warn} taskset -c 1 "$PIER" agent --unprivileged --service-cidr 127.219.0.0/16 --config "$DIR/pier.toml" >"$DIR/agent.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 500); do
  curl -s -o /dev/null --max-time 1 -w '%{http_code}' "http://127.0.0.1:$API_PORT/readyz" 2>/dev/null | grep -q 200 && break
  kill -0 "$AGENT_PID" 2>/dev/null || { echo "the agent exited; its log:" >&2; cat "$DIR/agent.log" >&2; exit 1; }
  sleep 0.02
done
WORKER=$(ps -o pid= --ppid "$AGENT_PID" | head -1 | tr -d ' ')
[ -n "$WORKER" ] || { echo "no worker process under the keeper $AGENT_PID" >&2; exit 1; }
cli() { "$PIER" --config "$DIR/pier.toml" "$@"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
# One short exchange, to know a target answers before it is measured.
answers() { timeout 5 "$DIR/udp-load" "$1" "$2" 1 1 0.3 8 ${3:-} | grep -qv 'replies=0 '; }
wait_answers() {
  for _ in $(seq 50); do answers "$@" && return 0; sleep 0.1; done
  echo "$1:$2 does not answer; the agent's log:" >&2; tail -20 "$DIR/agent.log" >&2; exit 1
}
echo "# pier agent $("$PIER" --version) keeper=$AGENT_PID worker=$WORKER (CPU 1); nginx $(nginx -v 2>&1 | cut -d/ -f2)" >&2

# TARGETS: name addr port pid-for-CPU (- for none) [container]
TARGETS=()
case "$MODE" in
anchor)
  taskset -c 0 "$DIR/udp-echo" 15401 2>/dev/null &
  track_pid $!
  cat >"$DIR/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
daemon off;
pid $DIR/nginx.pid;
error_log $DIR/nginx-error.log warn;
events { worker_connections 4096; }
stream {
  upstream echo { server 127.0.0.1:15401; }
  server {
    listen 127.0.0.1:15402 udp;
    proxy_pass echo;
    # As the agent's [proxy] udp_idle_timeout_ms: a flow lives until idle 30 s.
    proxy_timeout 30s;
  }
}
EOF
  nginx -t -q -p "$DIR" -c "$DIR/nginx.conf" -e "$DIR/nginx-error.log"
  taskset -c 1 nginx -p "$DIR" -c "$DIR/nginx.conf" -e "$DIR/nginx-error.log" &
  NGINX=$!
  track_pid $NGINX
  cli expose external udpb --port 19201/udp --endpoint 127.0.0.1:15401 >/dev/null
  VIP=$(cli get svc udpb -o json | json 'd[0]["vip"]')
  wait_answers 127.0.0.1 15401
  wait_answers 127.0.0.1 15402
  wait_answers "$VIP" 19201
  TARGETS=("direct 127.0.0.1 15401 -" "nginx 127.0.0.1 15402 $NGINX" "pier $VIP 19201 $WORKER")
  ;;
hop)
  "$ROOT/tests/images/build.sh" >/dev/null
  docker run -d --cpuset-cpus 0 --label "pier.test-run=$RUN" --label pier.service=hop \
    --label pier.port=5353/udp pier-test/httpd:latest /bin/udp-echo 5353 >/dev/null
  CIP=""
  for _ in $(seq 100); do
    CIP=$(docker ps -q --filter "label=pier.test-run=$RUN" | head -1 | xargs -r docker inspect -f '{{.NetworkSettings.IPAddress}}')
    [ -n "$CIP" ] && break; sleep 0.1
  done
  [ -n "$CIP" ] || { echo "the echo container has no address" >&2; exit 1; }
  EPVIP=""
  for _ in $(seq 100); do
    EPVIP=$(cli get endpoints hop -o json 2>/dev/null | json '[e.get("addr") for e in d if e.get("addr")][0] if any(e.get("addr") for e in d) else ""' 2>/dev/null || true)
    [ -n "$EPVIP" ] && break; sleep 0.1
  done
  [ -n "$EPVIP" ] || { echo "no endpoint VIP for the container; the agent's log:" >&2; tail -20 "$DIR/agent.log" >&2; exit 1; }
  VIP=$(cli get svc hop -o json | json 'd[0]["vip"]')
  wait_answers "$CIP" 5353 container
  wait_answers "$EPVIP" 5353
  wait_answers "$VIP" 5353
  TARGETS=("direct $CIP 5353 - container" "epvip $EPVIP 5353 $WORKER" "vip $VIP 5353 $WORKER")
  ;;
esac

declare -A PPS CPU_PCT CPU_US
for rep in $(seq "$REPS"); do
  for t in "${TARGETS[@]}"; do
    read -r name addr port pid extra <<<"$t"
    bg=$(wait_quiet)
    c0=$(proc_ticks "${pid#-}"); n0=$(now_ns)
    out=$(timeout $((DUR + 10)) taskset -c 0 "$DIR/udp-load" "$addr" "$port" "$FLOWS" "$WINDOW" "$DUR" "$SIZE" ${extra:-})
    n1=$(now_ns); c1=$(proc_ticks "${pid#-}")
    pps=$(sed -n 's/.*pps=\([0-9]*\).*/\1/p' <<<"$out")
    replies=$(sed -n 's/.*replies=\([0-9]*\).*/\1/p' <<<"$out")
    cpu_s=$(awk -v d=$((c1 - c0)) -v h="$CLK_TCK" 'BEGIN{printf "%.4f", d/h}')
    if [ "$pid" = - ]; then pct=nan; us=nan; else
      pct=$(awk -v c="$cpu_s" -v w=$((n1 - n0)) 'BEGIN{printf "%.1f", c/(w/1e9)*100}')
      us=$(awk -v c="$cpu_s" -v r="$replies" 'BEGIN{ if (r>0) printf "%.2f", c*1e6/r; else print "nan"}')
    fi
    echo "run $rep $name pps=$pps cpu_pct=$pct cpu_us_per_rt=$us bg=$bg% ($out)" >&2
    PPS[$name]+="$pps "; CPU_PCT[$name]+="$pct "; CPU_US[$name]+="$us "
  done
done

base=""
for t in "${TARGETS[@]}"; do
  read -r name _ <<<"$t"
  # shellcheck disable=SC2086
  m=$(median ${PPS[$name]})
  [ -z "$base" ] && base=$m
  # shellcheck disable=SC2086
  printf 'RESULT udp target=%-7s pps=%-9s ratio=%-6s proxy_cpu_pct=%-6s proxy_cpu_us_per_rt=%-6s runs=%s flows=%s window=%s size=%s dur=%ss\n' \
    "$name" "$m" "$(ratio "$m" "$base")" "$(median ${CPU_PCT[$name]})" "$(median ${CPU_US[$name]})" \
    "$(echo ${PPS[$name]} | tr ' ' ,)" "$FLOWS" "$WINDOW" "$SIZE" "$DUR"
done
