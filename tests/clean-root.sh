#!/usr/bin/env bash
# Proof that the README's two commands work on a clean Debian 12 host: a
# fresh `debootstrap bookworm` root (Debian's default package set: no gcc,
# no protoc, no docker, no curl, no iptables) holding only the Rust
# toolchain, in a network namespace of its own. Slow (it builds pier twice
# from nothing: once in release, once in debug for the tests), so it is not
# part of CI. As root, on a Debian host with debootstrap and nsenter:
#
#   tests/clean-root.sh [--no-tests] [--keep] [--rev REV]
#
#   --no-tests   stop after scripts/up.sh and the quick start
#   --rev REV    the commit to clone into the root (default HEAD)
#   --keep       leave the root directory (not the mounts, namespaces or
#                processes) in place for a look afterwards
#
# What it does, each step timed:
#   1. debootstrap bookworm into /var/tmp/pier-clean-root.<id>;
#   2. a network namespace pier-clean-<id> with a veth to the host and NAT,
#      so that apt and cargo reach Debian's archive and crates.io; the
#      agent, dockerd, the containers and the tests all live in there, not
#      on the host's network;
#   3. the host's rustup toolchains mounted read-only at /root/.rustup and
#      the rustup proxies in /root/.cargo/bin (a fresh CARGO_HOME: every
#      crate is downloaded); this checkout's HEAD cloned to /root/pier;
#   4. scripts/up.sh, then scripts/up.sh again (it must reuse the build and
#      find the agent running), then the README's quick start against it
#      (pier run --wait, expose, curl by VIP and node port, a container that
#      resolves the service by name), then the agent is stopped;
#   5. tests/run.sh;
#   6. tear-down, also after a failure: the processes running in the root
#      (by pid), its mounts, the namespace, the veth, the NAT rules, the
#      ip_forward setting, and the root unless --keep.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(pwd)
tests=yes keep="" rev=HEAD
while [ $# -gt 0 ]; do
  case "$1" in
    --no-tests) tests="" ;;
    --keep) keep=yes ;;
    --rev) rev=${2:?--rev needs a commit}; shift ;;
    *) echo "clean-root.sh: unknown argument $1 (use --no-tests, --keep, --rev REV)" >&2; exit 2 ;;
  esac
  shift
done
rev=$(git rev-parse --verify "$rev^{commit}") || { echo "clean-root.sh: --rev: no such commit" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "clean-root.sh: needs root (debootstrap, chroot, namespaces)" >&2; exit 1; }
for c in debootstrap nsenter iptables ip; do
  command -v "$c" >/dev/null || { echo "clean-root.sh: $c missing (apt-get install debootstrap util-linux iptables iproute2)" >&2; exit 1; }
done
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
[ -x "$cargo_bin/cargo" ] && [ -d "$rustup_home/toolchains" ] || { echo "clean-root.sh: no rustup toolchain at $rustup_home" >&2; exit 1; }

id=$$
ROOT=/var/tmp/pier-clean-root.$id
NS=pier-clean-$id
VH=pcr${id}h             # host side of the veth (<= 15 chars)
net=10.251.$((id % 250)).0
host_ip=${net%.0}.1 ns_ip=${net%.0}.2
stamp() { date +%s; }
log() { printf '[clean-root %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
declare -A took
t_all=$(stamp)
fwd_before=$(sysctl -n net.ipv4.ip_forward)
nat_rule=(-t nat -A POSTROUTING -s "$net/30" ! -o "$VH" -j MASQUERADE)
fwd_in=(-A FORWARD -i "$VH" -j ACCEPT)
fwd_out=(-A FORWARD -o "$VH" -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT)

# Processes whose root is $ROOT: everything started inside the chroot.
procs_in_root() {
  find /proc -mindepth 2 -maxdepth 2 -name root -lname "$ROOT" 2>/dev/null | cut -d/ -f3
}

teardown() {
  rc=$?
  set +e
  log "tearing down (exit status $rc)"
  pids=$(procs_in_root)
  if [ -n "$pids" ]; then
    kill $pids 2>/dev/null
    for _ in $(seq 1 50); do [ -z "$(procs_in_root)" ] && break; sleep 0.2; done
    pids=$(procs_in_root)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null && sleep 0.5
  fi
  # Deepest mounts first.
  for m in $(awk -v r="$ROOT" '$5 == r || index($5, r "/") == 1 {print $5}' /proc/self/mountinfo | sort -r); do
    umount -l "$m" 2>/dev/null
  done
  ip netns del "$NS" 2>/dev/null
  ip link del "$VH" 2>/dev/null
  iptables "${nat_rule[@]/-A/-D}" 2>/dev/null
  iptables "${fwd_in[@]/-A/-D}" 2>/dev/null
  iptables "${fwd_out[@]/-A/-D}" 2>/dev/null
  # Put ip_forward back unless a host dockerd (which wants it on) runs now.
  if [ "$fwd_before" = 0 ] && ! { [ -f /var/run/docker.pid ] && kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; }; then
    sysctl -qw net.ipv4.ip_forward=0
  fi
  [ "$rc" = 0 ] && rm -f "/var/tmp/pier-clean-root.$id.debootstrap.log"
  if [ -z "$keep" ]; then
    if awk -v r="$ROOT" 'index($5, r) == 1 {f=1} END {exit !f}' /proc/self/mountinfo; then
      log "mounts remain under $ROOT; not removing it"
    else
      rm -rf --one-file-system "$ROOT"
    fi
  else
    log "kept $ROOT"
  fi
  log "timings (s): $(for k in "${!took[@]}"; do printf '%s=%s ' "$k" "${took[$k]}"; done)total=$(( $(stamp) - t_all ))"
  exit $rc
}
trap teardown EXIT
trap 'exit 130' INT TERM

# 1. The root.
log "debootstrap bookworm -> $ROOT"
t=$(stamp)
debootstrap bookworm "$ROOT" http://deb.debian.org/debian >"/var/tmp/pier-clean-root.$id.debootstrap.log" 2>&1 ||
  { tail -20 "/var/tmp/pier-clean-root.$id.debootstrap.log" >&2; exit 1; }
took[debootstrap]=$(( $(stamp) - t ))
log "packages in the root: $(chroot "$ROOT" dpkg-query -W | wc -l); gcc: $(chroot "$ROOT" sh -c 'command -v gcc || echo none'), protoc: $(chroot "$ROOT" sh -c 'command -v protoc || echo none'), docker: $(chroot "$ROOT" sh -c 'command -v docker || echo none')"

# 2. Its network.
ip netns add "$NS"
ip link add "$VH" type veth peer name eth0 netns "$NS"
ip addr add "$host_ip/30" dev "$VH"
ip link set "$VH" up
ip -n "$NS" addr add "$ns_ip/30" dev eth0
ip -n "$NS" link set eth0 up
ip -n "$NS" link set lo up
ip -n "$NS" route add default via "$host_ip"
sysctl -qw net.ipv4.ip_forward=1
iptables "${nat_rule[@]}"
iptables "${fwd_in[@]}"
iptables "${fwd_out[@]}"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# CAs added to this host by hand (/usr/local/share/ca-certificates), e.g.
# for a TLS-inspecting egress proxy: a fresh host on the same network needs
# them as well, or cargo cannot fetch crates. ca-certificates, which up.sh
# installs, puts them into the bundle as on any Debian host.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  mkdir -p "$ROOT/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
  log "copied this host's local CAs: $(cd /usr/local/share/ca-certificates && echo *.crt)"
fi

# Mounts. The root itself first, bound onto itself: dockerd unpacks images
# after making "/" a slave mount, which fails where "/" is no mount point.
# sysfs is mounted from inside the namespace so that it shows the
# namespace's interfaces.
mount --bind "$ROOT" "$ROOT"
mount -t proc proc "$ROOT/proc"
nsenter --net="/run/netns/$NS" mount -t sysfs sysfs "$ROOT/sys"
mount --rbind /sys/fs/cgroup "$ROOT/sys/fs/cgroup"
mount --rbind /dev "$ROOT/dev"
mount -t tmpfs tmpfs "$ROOT/run"
mount -t tmpfs tmpfs "$ROOT/tmp"

# 3. The toolchain and the source.
mkdir -p "$ROOT/root/.rustup" "$ROOT/root/.cargo/bin"
mount --bind -o ro "$rustup_home" "$ROOT/root/.rustup"
mount -o remount,bind,ro "$ROOT/root/.rustup"
cp -a "$cargo_bin"/. "$ROOT/root/.cargo/bin/"
printf '. "$HOME/.cargo/env"\n' >>"$ROOT/root/.bashrc"
printf 'export PATH="$HOME/.cargo/bin:$PATH"\n' >"$ROOT/root/.cargo/env"
git clone -q "$src" "$ROOT/root/pier"
git -C "$ROOT/root/pier" checkout -q "$rev"
log "source: $(git -C "$ROOT/root/pier" log -1 --format='%h %s' | cut -c1-80)"

inside() {
  nsenter --net="/run/netns/$NS" chroot "$ROOT" /usr/bin/env -i HOME=/root TERM=dumb \
    PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    RUSTUP_HOME=/root/.rustup CARGO_HOME=/root/.cargo LANG=C.UTF-8 \
    bash -c "cd /root/pier && $1"
}
step() { # step NAME COMMAND
  local name=$1 t
  log "== $name: $2"
  t=$(stamp)
  inside "$2"
  took[$name]=$(( $(stamp) - t ))
  log "== $name: done in ${took[$name]} s"
}

# 4. The main-job command, twice, and the quick start.
step up1 'scripts/up.sh'
step up2 'scripts/up.sh 2>&1 | tee /tmp/up2.log; grep -q "already running" /tmp/up2.log && ! grep -q "^\[up.sh.*installing" /tmp/up2.log'
step quickstart '
set -euxo pipefail
pier version
pier run kube-demo --image pier-test/httpd:latest --port 8080 --wait
pier get pods
pier expose rs kube-demo --port 8080 --type NodePort
pier get svc kube-demo
vip=$(pier get svc kube-demo | awk "NR==2 {print \$3}")
np=$(pier get svc kube-demo -o json | grep -o "\"node_port\": *[0-9]*" | grep -o "[0-9]*$")
curl -fsS "http://$vip:8080/"
curl -fsS "http://127.0.0.1:$np/"
docker run --rm --dns 10.213.0.10 --dns-search default.svc.pier.internal pier-test/httpd:latest wget -qO- http://kube-demo:8080/
pier scale rs kube-demo --replicas 3 --wait
pier delete rs kube-demo
pier delete svc kube-demo
kill "$(cat /run/pier/agent.pid)"
for i in $(seq 100); do kill -0 "$(cat /run/pier/agent.pid)" 2>/dev/null || break; sleep 0.2; done
! kill -0 "$(cat /run/pier/agent.pid)" 2>/dev/null
'

# 5. The test command.
if [ -n "$tests" ]; then
  step tests 'tests/run.sh'
fi
log "all steps passed"
