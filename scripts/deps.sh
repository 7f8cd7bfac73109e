# Debian packages pier's scripts install, each with the file or command the
# build or the run actually uses. Sourced by scripts/up.sh and tests/run.sh.
#
# The check is what matters, not the package name: `protoc` alone is not
# enough for etcd-client's build script, which also needs the well-known
# .proto files from libprotobuf-dev (only *recommended* by
# protobuf-compiler, so `--no-install-recommends` skips it). The same goes
# for gcc, which only recommends libc6-dev (crt1.o and the C headers).
#
# A check is either an absolute path (a file that must exist) or a command
# name (that must be on PATH). Lines: PACKAGE CHECK [CHECK...].
# shellcheck shell=bash

pier_multiarch() { echo "$(uname -m)-linux-gnu"; }

# Building pier (cargo build): the linker and C compiler rustc and ring call,
# libc's start files and headers, protoc and its include files, and the CA
# bundle cargo trusts when it fetches crates.
pier_build_deps() {
  cat <<EOF
gcc cc
libc6-dev /usr/lib/$(pier_multiarch)/crt1.o /usr/include/stdio.h /usr/lib/$(pier_multiarch)/libc.a
protobuf-compiler protoc
libprotobuf-dev /usr/include/google/protobuf/descriptor.proto
ca-certificates /etc/ssl/certs/ca-certificates.crt
EOF
}

# Running the agent and the quick start: dockerd and its CLI, `ip`, the
# iptables dockerd programs, busybox-static and `file` for the test image
# (tests/images/build.sh), curl for the quick start.
pier_run_deps() {
  cat <<EOF
docker.io dockerd docker
iproute2 ip
iptables iptables
busybox-static /bin/busybox
file file
curl curl
EOF
}

# Only the tests: etcd (multi-host and etcd-store tests), dig, nsenter,
# ebtables (multi-host cuts), docker-compose (docker/test-image.sh and the
# DNS e2e test), dnsmasq (the DNS e2e test's host resolver), chromium (the
# dashboard's browser test runs `chromium --headless`) and a font for its
# screenshots.
pier_test_deps() {
  cat <<EOF
etcd-server etcd
etcd-client etcdctl
dnsutils dig
util-linux nsenter
ebtables ebtables
docker-compose docker-compose
dnsmasq-base dnsmasq
chromium chromium
fonts-dejavu-core /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
EOF
}

# pier_check CHECK: true when the file exists or the command is on PATH.
pier_check() {
  case "$1" in
    /*) [ -e "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

# pier_missing < TABLE: the packages whose checks fail, one per line, each
# followed by what was missing (for the log).
pier_missing() {
  local pkg checks c
  while read -r pkg checks; do
    [ -n "$pkg" ] || continue
    for c in $checks; do
      if ! pier_check "$c"; then
        printf '%s %s\n' "$pkg" "$c"
        break
      fi
    done
  done
}

# pier_install LOG_FN TABLE_FN...: installs every package of the tables
# whose check fails, then checks again and fails naming what is still
# missing (so a package that does not ship what we expect is caught here,
# not in the middle of a build).
pier_install() {
  local log=$1
  shift
  local missing pkgs t
  missing=$(for t in "$@"; do "$t"; done | pier_missing)
  if [ -n "$missing" ]; then
    pkgs=$(echo "$missing" | awk '{print $1}' | sort -u | tr '\n' ' ')
    "$log" "installing: $pkgs(missing: $(echo "$missing" | awk '{print $2}' | tr '\n' ' '| sed 's/ $//'))"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  fi
  missing=$(for t in "$@"; do "$t"; done | pier_missing)
  if [ -n "$missing" ]; then
    "$log" "still missing after apt-get install: $(echo "$missing" | tr '\n' ';')"
    return 1
  fi
}
