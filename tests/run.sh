#!/usr/bin/env bash
# pier's one test command. On a Debian machine, as root, it:
#   1. installs whatever is missing (protobuf-compiler, etcd-server, docker.io,
#      busybox-static, dnsutils, iproute2, iptables, curl);
#   2. starts dockerd if `docker info` fails (and stops it again at the end);
#   3. guards the test subnets with blackhole routes;
#   4. builds the test images with `docker import` (no registry);
#   5. builds the workspace once, runs `cargo test --workspace`, then
#      tests pier's own image and compose file (docker/test-image.sh);
#   6. removes everything it started, also after a failure.
#
#   tests/run.sh [extra cargo test args...]     e.g. tests/run.sh -p pier-dns
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_ID=${PIER_TEST_RUN:-run$(date +%s)$$}
export PIER_TEST_RUN=$RUN_ID
log() { printf '[run.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "needs root (dockerd, network namespaces, pier0); re-run with sudo"
  exit 1
fi

# 1. Packages. Only call apt when something is missing.
need=()
command -v protoc    >/dev/null || need+=(protobuf-compiler)
command -v etcd      >/dev/null || need+=(etcd-server)
command -v etcdctl   >/dev/null || need+=(etcd-client)
command -v dockerd   >/dev/null || need+=(docker.io)
[ -x /bin/busybox ]  || need+=(busybox-static)
command -v dig       >/dev/null || need+=(dnsutils)
command -v ip        >/dev/null || need+=(iproute2)
command -v iptables  >/dev/null || need+=(iptables)
command -v curl      >/dev/null || need+=(curl)
command -v nsenter   >/dev/null || need+=(util-linux)
command -v ebtables  >/dev/null || need+=(ebtables)
command -v file      >/dev/null || need+=(file)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
if [ ${#need[@]} -gt 0 ]; then
  log "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's etcd-server package starts a system etcd on :2379; the tests start
# their own on random ports and never use it.
if [ -z "${CARGO:-}" ] && ! command -v cargo >/dev/null; then
  # shellcheck disable=SC1091
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || { log "cargo not found (install Rust with rustup)"; exit 1; }

# 2. dockerd.
started_dockerd=""
cleanup() {
  rc=$?
  set +e
  log "cleaning up (run id $RUN_ID)"
  if command -v docker >/dev/null && timeout 10 docker info >/dev/null 2>&1; then
    ids=$(docker ps -aq --filter "label=pier.test-run" 2>/dev/null)
    [ -n "$ids" ] && docker rm -f $ids >/dev/null 2>&1
    nets=$(docker network ls -q --filter "label=pier.test-run" 2>/dev/null)
    [ -n "$nets" ] && docker network rm $nets >/dev/null 2>&1
    [ -z "${KEEP_IMAGES:-}" ] && docker rmi pier-test/httpd:latest pier:test >/dev/null 2>&1
  fi
  # Test agents' namespaces (pt…), and the multi-host topologies' (p<k><pid>-sw,
  # p<k><pid>-h<i>) should a test process have died before its own teardown.
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^pt|^p[0-9]+-(sw|h[0-9])$' ); do
    ip netns del "$ns" 2>/dev/null
  done
  for r in "${routes[@]}"; do ip route del blackhole "$r" 2>/dev/null; done
  if [ -n "$started_dockerd" ]; then
    log "stopping the dockerd we started (pid $started_dockerd)"
    kill "$started_dockerd" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 0.2; done
  fi
  exit $rc
}
routes=()
trap cleanup EXIT
trap 'exit 130' INT TERM

if ! timeout 10 docker info >/dev/null 2>&1; then
  log "starting dockerd"
  dockerd >/tmp/pier-test-dockerd.log 2>&1 &
  started_dockerd=$!
  for _ in $(seq 1 100); do timeout 5 docker info >/dev/null 2>&1 && break; sleep 0.2; done
  timeout 5 docker info >/dev/null 2>&1 || { log "dockerd did not start; see /tmp/pier-test-dockerd.log"; tail -20 /tmp/pier-test-dockerd.log >&2; exit 1; }
fi

# 3. Blackhole routes: a packet to a test or VIP address that is not assigned
# locally is dropped here instead of leaving the machine by the default route.
for r in 10.213.0.0/16 10.214.0.0/16; do
  if ip route add blackhole "$r" 2>/dev/null; then routes+=("$r"); fi
done

# 4. Test images.
tests/images/build.sh

# 5. Build once, then test.
log "building"
cargo build --workspace --all-targets --locked
log "testing"
cargo test --workspace --locked --no-fail-fast "$@" -- --test-threads "${TEST_THREADS:-4}"
log "testing pier's own image and compose file"
docker/test-image.sh target/debug/pier
log "all tests passed"
