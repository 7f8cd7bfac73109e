#!/usr/bin/env bash
# Swarm anchor for the issue 14 benchmarks (BENCHMARKS.md), on a private
# dockerd: Swarm mode changes a daemon's state (ingress network, iptables),
# so it never runs on the machine's shared dockerd. This script starts a
# dockerd of its own in a network namespace (as tests/multihost does),
# `docker swarm init`s it, and times, on the same inputs as pier's benches:
#   1. `docker stack deploy` of apply-bench.sh's 20-service Compose file
#      until every service runs its task (then `docker stack rm`);
#   2. a rolling update of a 10-replica service (`--init`, as pier's pods)
#      with Swarm's defaults (stop-first, parallelism 1, monitor 5 s) to
#      another tag of the same image, until the update is completed; then
#      `docker service update --rollback` until the rollback is completed.
# Removes everything it made (namespace, dockerd, its data) on exit.
#
#   scripts/swarm-anchor.sh [ROUNDS]     (root; needs pier-test/httpd:latest)
set -euo pipefail
ROUNDS=${1:-3}
ID=${SWARM_ANCHOR_ID:-pswarm$$}
NS=$ID
DIR=$(mktemp -d /tmp/"$ID".XXXX)
SOCK=$DIR/docker.sock
export DOCKER_HOST=unix://$SOCK
log() { printf '[swarm-anchor %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
now() { date +%s%N; }
ms() { echo $(( ($2 - $1) / 1000000 )); }

cleanup() {
  set +e
  if [ -S "$SOCK" ]; then
    docker swarm leave --force >/dev/null 2>&1
    docker rm -f $(docker ps -aq) >/dev/null 2>&1
  fi
  if [ -f "$DIR/dockerd.pid" ]; then
    pid=$(cat "$DIR/dockerd.pid")
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  # Shims of this dockerd's containerd namespace, by PID.
  for p in $(pgrep -f -- "-namespace $ID " 2>/dev/null); do kill "$p" 2>/dev/null; done
  umount "$DIR/exec/netns/"* 2>/dev/null
  ip netns del "$NS" 2>/dev/null
  rm -rf "$DIR"
}
trap cleanup EXIT

command -v docker >/dev/null && docker image inspect pier-test/httpd:latest >/dev/null 2>&1 \
  || { DOCKER_HOST=unix:///var/run/docker.sock docker image inspect pier-test/httpd:latest >/dev/null \
  || { echo "pier-test/httpd:latest missing: run tests/images/build.sh" >&2; exit 1; }; }

log "namespace $NS, dockerd data in $DIR"
ip netns add "$NS"
ip -n "$NS" link set lo up
# An address to advertise (no dummy driver in this kernel: a veth pair,
# both ends inside the namespace).
ip -n "$NS" link add swarm0 type veth peer name swarm1
ip -n "$NS" addr add 10.215.0.1/24 dev swarm0
ip -n "$NS" link set swarm0 up
ip -n "$NS" link set swarm1 up
mkdir -p "$DIR/data" "$DIR/exec"
nsenter --net=/run/netns/"$NS" dockerd \
  --data-root "$DIR/data" --exec-root "$DIR/exec" --pidfile "$DIR/dockerd.pid" \
  --host "$DOCKER_HOST" --bip 172.31.250.1/24 --cgroup-parent "$ID" \
  --containerd-namespace "$ID" --containerd-plugins-namespace "$ID-plugins" \
  --userland-proxy=false >"$DIR/dockerd.log" 2>&1 </dev/null &
for _ in $(seq 1 300); do docker version >/dev/null 2>&1 && break; sleep 0.1; done
docker version -f 'private dockerd {{.Server.Version}}' >&2
DOCKER_HOST=unix:///var/run/docker.sock docker save pier-test/httpd:latest | docker load >/dev/null
docker tag pier-test/httpd:latest pier-test/httpd:swarm-v2
docker swarm init --advertise-addr 10.215.0.1 >/dev/null
log "swarm initialised"

# 1. The 20-service file of scripts/apply-bench.sh.
N=20
{
  echo "version: \"3.8\""
  echo "services:"
  for i in $(seq 1 $N); do
    printf '  s%02d:\n    image: pier-test/httpd:latest\n    expose: [8080]\n' "$i"
  done
} > "$DIR/compose.yaml"
all_running() {
  # Every service's one task is running (REPLICAS 1/1).
  local n
  n=$(docker service ls --filter "label=com.docker.stack.namespace=$1" --format '{{.Replicas}}' | grep -c '^1/1' || true)
  [ "$n" = "$2" ]
}
for r in $(seq 1 "$ROUNDS"); do
  t0=$(now)
  docker stack deploy -c "$DIR/compose.yaml" applybench >/dev/null
  t1=$(now)
  for _ in $(seq 1 1200); do all_running applybench $N && break; sleep 0.1; done
  all_running applybench $N || { docker service ls >&2; tail -20 "$DIR/dockerd.log" >&2; exit 1; }
  t2=$(now)
  echo "deploy round $r: docker stack deploy returned after $(ms "$t0" "$t1") ms; all $N tasks running after $(ms "$t0" "$t2") ms"
  docker stack rm applybench >/dev/null
  for _ in $(seq 1 600); do [ -z "$(docker ps -aq)" ] && [ -z "$(docker network ls -q --filter label=com.docker.stack.namespace=applybench)" ] && break; sleep 0.1; done
done

# 2. A rolling update of 10 replicas with Swarm's defaults, then --rollback.
# --init as pier's pods have it: httpd as PID 1 ignores SIGTERM, and each
# stop-first step would wait out Swarm's 10 s stop grace period.
docker service create -d --init --name web --replicas 10 pier-test/httpd:latest >/dev/null
for _ in $(seq 1 1200); do [ "$(docker service ls --filter name=web --format '{{.Replicas}}')" = "10/10" ] && break; sleep 0.1; done
update_state() { docker service inspect web -f '{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}'; }
wait_state() {
  for _ in $(seq 1 3000); do [ "$(update_state)" = "$1" ] && return 0; sleep 0.1; done
  docker service ps web >&2; return 1
}
t0=$(now)
docker service update -d --image pier-test/httpd:swarm-v2 web >/dev/null
wait_state completed
t1=$(now)
echo "rolling update of 10 (stop-first, parallelism 1, monitor 5 s): $(ms "$t0" "$t1") ms"
t0=$(now)
docker service update -d --rollback web >/dev/null
wait_state rollback_completed
t1=$(now)
echo "docker service update --rollback of 10 (rollback_config defaults): $(ms "$t0" "$t1") ms"
docker service rm web >/dev/null
