#!/usr/bin/env bash
# pier's one test command. On a Debian machine, as root, it:
#   1. installs whatever is missing (scripts/deps.sh: each package is checked
#      by the file or command the build or the tests use, e.g. protoc's
#      descriptor.proto from libprotobuf-dev, not just the protoc binary);
#   2. checks the style: `cargo fmt --check` and
#      `cargo clippy --workspace --all-targets -- -D warnings`;
#   3. starts dockerd if `docker info` fails (and stops it again at the end,
#      unless another run.sh still uses it);
#   4. guards the test subnets with blackhole routes (metric = this shell's
#      pid, so that concurrent runs each own theirs);
#   5. builds the test images with `docker import` (no registry);
#   6. builds the workspace once, runs `cargo test --workspace`, then
#      tests pier's own image and compose file (docker/test-image.sh);
#   7. removes what this run created, also after a failure, and nothing
#      else (tests/cleanup.sh): containers and networks whose pier.test-run
#      label is this run's id (PIER_TEST_RUN) or starts with "<id>-", the
#      multi-host network namespaces named "<id>-…", its own blackhole
#      routes, and the test image only if this run built it.
#
#   tests/run.sh [extra cargo test args...]     e.g. tests/run.sh -p pier-dns
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_ID=${PIER_TEST_RUN:-run$(date +%s)$$}
export PIER_TEST_RUN=$RUN_ID
log() { printf '[run.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
case "$RUN_ID" in
  *[!a-z0-9_]*|"") log "PIER_TEST_RUN=$RUN_ID: use lower-case letters, digits and '_' only (it names containers, images and namespaces, and '-' separates it from what follows)"; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
  log "needs root (dockerd, network namespaces, pier0); re-run with sudo"
  exit 1
fi

# 1. Packages. Only call apt when a check fails.
# shellcheck source=../scripts/deps.sh
. scripts/deps.sh
test_deps() {
  # `docker compose` (v2) does as well as Debian's docker-compose.
  if docker compose version >/dev/null 2>&1; then pier_test_deps | grep -v '^docker-compose '; else pier_test_deps; fi
}
pier_install log pier_build_deps pier_run_deps test_deps
# Debian's etcd-server package starts a system etcd on :2379; the tests start
# their own on random ports and never use it.
if [ -z "${CARGO:-}" ] && ! command -v cargo >/dev/null; then
  # shellcheck disable=SC1091
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || { log "cargo not found (install Rust with rustup)"; exit 1; }

# 2. Style, before anything slow.
log "cargo fmt --check"
cargo fmt --all --check || { log "formatting differs: run \`cargo fmt --all\`"; exit 1; }
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

# Runs in flight, so that the dockerd one of them started is stopped only by
# the last one.
runs_dir=/run/pier-test-runs
mkdir -p "$runs_dir"
echo $$ > "$runs_dir/$RUN_ID"

# 3. dockerd.
started_dockerd=""
routes=()
image_was_there=unknown   # set once dockerd answers

# shellcheck source=cleanup.sh
. tests/cleanup.sh

other_runs() {
  local f pid
  for f in "$runs_dir"/*; do
    [ -f "$f" ] && [ "$(basename "$f")" != "$RUN_ID" ] || continue
    pid=$(cat "$f" 2>/dev/null)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then basename "$f"; else rm -f "$f"; fi
  done
}

cleanup() {
  rc=$?
  set +e
  log "cleaning up (run id $RUN_ID)"
  # This run's containers, networks and namespaces (tests/cleanup.sh).
  pier_cleanup_run "$RUN_ID"
  # The test image only if this run built it, and not while a container
  # (of another run) uses it: no -f.
  if [ "$image_was_there" = no ] && [ -z "${KEEP_IMAGES:-}" ] && timeout 10 docker info >/dev/null 2>&1; then
    docker rmi pier-test/httpd:latest >/dev/null 2>&1
  fi
  for r in "${routes[@]}"; do ip route del blackhole "$r" metric $$ 2>/dev/null; done
  rm -f "$runs_dir/$RUN_ID"
  if [ -n "$started_dockerd" ]; then
    others=$(other_runs | tr '\n' ' ')
    if [ -n "$others" ]; then
      log "leaving the dockerd we started (pid $started_dockerd) running: run(s) $others still use it"
    else
      log "stopping the dockerd we started (pid $started_dockerd)"
      kill "$started_dockerd" 2>/dev/null
      for _ in $(seq 1 50); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 0.2; done
    fi
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if ! timeout 10 docker info >/dev/null 2>&1; then
  log "starting dockerd"
  dockerd >/tmp/pier-test-dockerd.log 2>&1 &
  started_dockerd=$!
  for _ in $(seq 1 100); do timeout 5 docker info >/dev/null 2>&1 && break; sleep 0.2; done
  timeout 5 docker info >/dev/null 2>&1 || { log "dockerd did not start; see /tmp/pier-test-dockerd.log"; tail -20 /tmp/pier-test-dockerd.log >&2; exit 1; }
fi

image_was_there=no
docker image inspect pier-test/httpd:latest >/dev/null 2>&1 && image_was_there=yes

# 4. Blackhole routes: a packet to a test or VIP address that is not assigned
# locally is dropped here instead of leaving the machine by the default route.
# Each run adds its own (metric = its pid) and removes only that one.
# fd5e:7e57::/32 is the tests' IPv6 range (dual-stack VIPs, IPv6 Docker
# networks, namespaces); `ip route` takes either family.
for r in 10.213.0.0/16 10.214.0.0/16 fd5e:7e57::/32; do
  if ip route add blackhole "$r" metric $$ 2>/dev/null; then routes+=("$r"); fi
done

# 5. Test images.
tests/images/build.sh

# 6. Build once, then test.
log "building"
cargo build --workspace --all-targets --locked
log "testing"
cargo test --workspace --locked --no-fail-fast "$@" -- --test-threads "${TEST_THREADS:-4}"
log "testing pier's own image and compose file"
docker/test-image.sh target/debug/pier
log "all tests passed"
