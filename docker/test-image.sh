#!/bin/sh
# Tests pier's image and compose file against the local dockerd, with
# images built here (no registry):
#   1. docker/build-image.sh builds the image from the built binary;
#   2. the image runs `pier --version` (same output as the binary);
#   3. `pier agent --store embedded` starts inside it and serves its API;
#   4. docker/compose.yaml validates and runs the agent with its mounts,
#      NET_ADMIN and the Docker socket (network_mode overridden to `none`
#      so that the test never touches the host's network);
#   5. the agent's API token is made 0600 in the bind-mounted data dir,
#      the CLI in the container reads it, and a wrong token is refused.
# Everything is labelled pier.test-run=$run and removed on exit.
#
#   docker/test-image.sh [BINARY]      (default target/debug/pier)
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$here/target/debug/pier}
# Under run.sh, the run id is a prefix, so run.sh cleans up after a test that died.
run="${PIER_TEST_RUN:+$PIER_TEST_RUN-}img-$(date +%s)-$$"
tag="pier-test/pier:$run"
work=$(mktemp -d /tmp/pier-imgtest.XXXXXX)
compose=""
if docker compose version >/dev/null 2>&1; then compose="docker compose"
elif command -v docker-compose >/dev/null 2>&1; then compose="docker-compose"; fi

cleanup() {
    set +e
    if [ -n "$compose" ] && [ -f "$work/override.yaml" ]; then
        PIER_NODE=img-test $compose -p "$run" -f "$here/docker/compose.yaml" -f "$work/override.yaml" \
            down -v --timeout 5 >/dev/null 2>&1
    fi
    ids=$(docker ps -aq --filter "label=pier.test-run=$run")
    [ -n "$ids" ] && docker rm -f $ids >/dev/null 2>&1
    docker network rm "pier-$run" >/dev/null 2>&1
    docker rmi "$tag" >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "ok: $*"; }

# 1. Build.
"$here/docker/build-image.sh" "$bin" "$tag" >/dev/null || fail "build-image.sh"
pass "image $tag built ($(docker image inspect -f '{{.Size}}' "$tag") bytes)"

# 2. --version.
want=$("$bin" --version)
got=$(docker run --rm --pull never --network none --label "pier.test-run=$run" "$tag" --version) \
    || fail "pier --version in the image"
[ "$got" = "$want" ] || fail "version: got '$got', want '$want'"
pass "pier --version in the image: $got"

# Mesh certificates, made by pier itself.
"$bin" ca init "$work/ca" >/dev/null || fail "pier ca init"
"$bin" ca issue img-test --ca "$work/ca" --out "$work/certs" >/dev/null || fail "pier ca issue"

# Waits until the container $1 is running and listening on 127.0.0.1:7370
# (the agent's API) and, when $3 is given, on that port too (the mesh), or
# fails after 20 s. The agent binds the API first and the mesh a little
# later, so seeing the API alone says nothing about the mesh yet.
wait_agent() {
    i=0
    while [ $i -lt 100 ]; do
        state=$(docker inspect -f '{{.State.Status}}' "$1" 2>/dev/null || echo gone)
        [ "$state" = running ] || { docker logs "$1" 2>&1 | tail -20 >&2; fail "$2: agent container is $state"; }
        listening=$(docker exec "$1" netstat -ltn 2>/dev/null || true)
        if echo "$listening" | grep -q '127.0.0.1:7370' &&
            { [ -z "${3:-}" ] || echo "$listening" | grep -q ":$3 "; }; then
            return 0
        fi
        sleep 0.2; i=$((i + 1))
    done
    docker logs "$1" 2>&1 | tail -20 >&2
    fail "$2: agent API${3:+ and port $3} not listening after 20 s"
}

# 3. pier agent --store embedded in the image, on an internal network.
docker network create --internal --label "pier.test-run=$run" "pier-$run" >/dev/null
c=$(docker run -d --pull never --label "pier.test-run=$run" --network "pier-$run" \
    --cap-add NET_ADMIN -v /var/run/docker.sock:/var/run/docker.sock \
    "$tag" agent --store embedded --node img-test --data-dir /var/lib/pier) || fail "docker run agent"
wait_agent "$c" "docker run"
sleep 1
[ "$(docker inspect -f '{{.State.Status}}' "$c")" = running ] || fail "agent exited after start"
pass "pier agent --store embedded starts in the image"
docker rm -f "$c" >/dev/null

# 4. The compose file.
[ -n "$compose" ] || fail "neither 'docker compose' nor 'docker-compose' is installed"
cp "$here/docker/pier.toml" "$work/pier.toml"
cat > "$work/override.yaml" <<YAML
services:
  pier:
    network_mode: none
    labels:
      pier.test-run: "$run"
YAML
mkdir -p "$work/data"
export PIER_NODE=img-test PIER_IMAGE="$tag" PIER_CERTS="$work/certs" PIER_CONFIG="$work/pier.toml" \
    PIER_DATA="$work/data"
$compose -p "$run" -f "$here/docker/compose.yaml" config >/dev/null || fail "$compose config"
pass "$compose accepts docker/compose.yaml"
$compose -p "$run" -f "$here/docker/compose.yaml" -f "$work/override.yaml" up -d >/dev/null 2>&1 \
    || fail "$compose up"
c=$(docker ps -aq --filter "label=pier.test-run=$run" --filter "label=com.docker.compose.project=$run")
[ -n "$c" ] || fail "compose started no container"
wait_agent "$c" "compose" 7443
caps=$(docker inspect -f '{{.HostConfig.CapAdd}}' "$c")
case "$caps" in *NET_ADMIN*) ;; *) fail "compose: NET_ADMIN missing ($caps)";; esac
docker exec "$c" test -S /var/run/docker.sock || fail "compose: Docker socket not mounted"
docker exec "$c" test -r /etc/pier/certs/node.pem || fail "compose: certificates not mounted"
pass "$compose runs pier agent with NET_ADMIN, the Docker socket and the certificates"

# 5. The API token: made in the data dir (the host's, bind-mounted), 0600;
# the CLI as root reads it by itself; a wrong token is refused.
[ "$(stat -c %a "$work/data/api-token" 2>/dev/null)" = 600 ] \
    || fail "compose: no 0600 api-token in the data dir ($(ls -la "$work/data" 2>&1))"
[ "$(stat -c %a "$work/data")" = 700 ] || fail "compose: the data dir is not 0700"
docker exec "$c" pier get nodes >/dev/null 2>&1 || fail "compose: pier get nodes in the container (token from the data dir)"
if docker exec -e PIER_TOKEN=wrong "$c" pier get nodes >/dev/null 2>&1; then
    fail "compose: a wrong token was accepted"
fi
pass "the agent makes its API token (0600) in the host's data dir; the CLI reads it, a wrong one is refused"
echo "PASS"
