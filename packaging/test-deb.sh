#!/usr/bin/env bash
# Installs the .deb on a fresh Debian 12 root and boots that root with
# systemd as PID 1 (systemd-nspawn, private network: nothing touches the
# host's), to show that `dpkg -i` installs pier and that its unit starts
# the agent, hands it over to a new worker on `systemctl reload`, restarts
# it after a crash of the keeper (whose worker serves on meanwhile and is
# adopted), and stops it cleanly. Slow (a
# debootstrap), so not part of CI. As root:
#
#   packaging/test-deb.sh [target/debian/pier_*.deb]
#
# Needs debootstrap and systemd-container (systemd-nspawn).
set -euo pipefail
cd "$(dirname "$0")/.."
deb=${1:-$(ls -t target/debian/pier_*.deb 2>/dev/null | head -1)}
[ -f "$deb" ] || { echo "test-deb: no .deb (build one with packaging/build-deb.sh)" >&2; exit 1; }
for c in debootstrap systemd-nspawn nsenter; do
  command -v "$c" >/dev/null || { echo "test-deb: $c missing (apt-get install debootstrap systemd-container util-linux)" >&2; exit 1; }
done
id=$$
ROOT=/var/tmp/pier-deb-root.$id
log() { printf '[test-deb %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
nspawn_pid=""

# Processes whose root is $ROOT (the booted system), by pid.
procs_in_root() {
  find /proc -mindepth 2 -maxdepth 2 -name root -lname "$ROOT" 2>/dev/null | cut -d/ -f3
}
teardown() {
  rc=$?
  set +e
  if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
    kill "$nspawn_pid"   # nspawn powers the container off
    for _ in $(seq 1 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$nspawn_pid" 2>/dev/null
  fi
  pids=$(procs_in_root)
  [ -n "$pids" ] && kill -9 $pids 2>/dev/null && sleep 0.5
  for m in $(awk -v r="$ROOT" 'index($5, r) == 1 {print $5}' /proc/self/mountinfo | sort -r); do umount -l "$m"; done
  rm -rf --one-file-system "$ROOT"
  if [ "$rc" = 0 ]; then rm -f "$ROOT.debootstrap.log" "$ROOT.boot.log"; else log "logs: $ROOT.debootstrap.log $ROOT.boot.log"; fi
  log "done (exit status $rc)"
  exit $rc
}
trap teardown EXIT
trap 'exit 130' INT TERM

log "debootstrap bookworm -> $ROOT"
debootstrap bookworm "$ROOT" http://deb.debian.org/debian >"$ROOT.debootstrap.log" 2>&1 ||
  { tail -20 "$ROOT.debootstrap.log" >&2; exit 1; }
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# No daemon may start in the chroot during the installs (they would start on
# the host's network): the standard policy-rc.d.
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod +x "$ROOT/usr/sbin/policy-rc.d"
mount -t proc proc "$ROOT/proc"

log "the package's dependency first (docker.io), with apt"
chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
cp "$deb" "$ROOT/root/"
log "dpkg -i $(basename "$deb") ($(du -k "$deb" | cut -f1) KiB)"
chroot "$ROOT" dpkg -i "/root/$(basename "$deb")"
chroot "$ROOT" dpkg -L pier
log "the unit, verified by the root's own systemd-analyze"
chroot "$ROOT" systemd-analyze verify /lib/systemd/system/pier.service && log "systemd-analyze verify: no complaints"
log "enabled: $(chroot "$ROOT" systemctl is-enabled pier)"
log "conffile: $(chroot "$ROOT" dpkg-query -W -f='${Conffiles}' pier | tr -s ' \n' ' ')"
rm -f "$ROOT/usr/sbin/policy-rc.d"
umount "$ROOT/proc"
# A node name for this machine, as an admin would set it.
sed -i 's/^name = "host-1"/name = "deb-test"/' "$ROOT/etc/pier/pier.toml"
echo pier-deb-test >"$ROOT/etc/hostname"

log "booting it: systemd-nspawn -b --private-network"
systemd-nspawn -q -D "$ROOT" -b --private-network --register=no --keep-unit -M "pierdeb$id" >"$ROOT.boot.log" 2>&1 </dev/null &
nspawn_pid=$!
# The container's PID 1: the systemd whose root is $ROOT.
init=""
for _ in $(seq 1 100); do
  for p in $(ps -o pid= --ppid "$nspawn_pid"); do
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = systemd ] && { init=$p; break; }
  done
  [ -n "$init" ] && break
  kill -0 "$nspawn_pid" 2>/dev/null || break
  sleep 0.2
done
[ -n "$init" ] || { cat "$ROOT.boot.log" >&2; echo "test-deb: the container's systemd did not start" >&2; exit 1; }
inside() { nsenter -t "$init" -m -u -i -n -p -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
for _ in $(seq 1 150); do
  st=$(inside systemctl is-system-running 2>/dev/null || true)
  case "$st" in running|degraded) break ;; esac
  sleep 0.2
done
log "the container's systemd: $st (PID 1 there: $(inside cat /proc/1/comm))"
ok=""
for _ in $(seq 1 100); do
  if inside pier get nodes >/dev/null 2>&1; then ok=yes; break; fi
  sleep 0.2
done
inside systemctl --no-pager status pier | head -12 || true
[ -n "$ok" ] || { inside journalctl -u pier --no-pager | tail -30; echo "test-deb: the agent did not answer" >&2; exit 1; }
inside pier version
inside pier get nodes
pid1=$(inside systemctl show -p MainPID --value pier)
# The keeper's worker (its only child), before and after `systemctl reload`.
worker_of() { inside ps -o pid= --ppid "$1" | tr -d ' ' | head -1; }
w1=$(worker_of "$pid1")
inside systemctl reload pier
w2=""
for _ in $(seq 1 100); do
  w2=$(worker_of "$pid1")
  if [ -n "$w2" ] && [ "$w2" != "$w1" ] && [ "$(inside ps -o pid= --ppid "$pid1" | wc -l)" = 1 ]; then break; fi
  sleep 0.2
done
[ -n "$w2" ] && [ "$w2" != "$w1" ] && [ "$(inside systemctl show -p MainPID --value pier)" = "$pid1" ] ||
  { inside journalctl -u pier --no-pager | tail -30; echo "test-deb: systemctl reload did not hand over to a new worker" >&2; exit 1; }
inside pier get nodes >/dev/null
log "systemctl reload: worker $w1 handed over to $w2 under the same keeper (pid $pid1)"
log "the agent runs under the unit (keeper pid $pid1, worker $w2 in the container); killing the keeper with SIGKILL"
inside kill -9 "$pid1"
sleep 0.5
# KillMode=process: the worker outlives its keeper and serves on (an orphan).
inside kill -0 "$w2" && inside pier get nodes >/dev/null ||
  { inside journalctl -u pier --no-pager | tail -30; echo "test-deb: the worker did not outlive its keeper" >&2; exit 1; }
log "worker $w2 serves on as an orphan"
pid2=""
for _ in $(seq 1 100); do
  pid2=$(inside systemctl show -p MainPID --value pier)
  if [ "$pid2" != 0 ] && [ "$pid2" != "$pid1" ] && inside pier get nodes >/dev/null 2>&1; then break; fi
  sleep 0.2
done
[ "$pid2" != 0 ] && [ "$pid2" != "$pid1" ] || { inside journalctl -u pier --no-pager | tail -30; echo "test-deb: not restarted" >&2; exit 1; }
log "restarted by systemd: pid $pid2, NRestarts=$(inside systemctl show -p NRestarts --value pier)"
# The new keeper adopts the orphan: it hands over to a new worker and exits.
for _ in $(seq 1 100); do inside kill -0 "$w2" 2>/dev/null || break; sleep 0.2; done
# The journal is read whole before grep: with pipefail, `journalctl | grep
# -q` fails when grep's early exit cuts journalctl off (SIGPIPE) once the
# journal outgrows a pipe's buffer, which reads as "not adopted".
journal=$(inside journalctl -u pier --no-pager -o cat)
if inside kill -0 "$w2" 2>/dev/null || ! grep -q "adopting the orphaned worker" <<<"$journal"; then
  inside journalctl -u pier --no-pager | tail -30; echo "test-deb: the restarted agent did not adopt the orphan" >&2; exit 1
fi
log "the restarted keeper adopted orphan $w2; now worker $(worker_of "$pid2")"
inside systemctl stop pier
log "after systemctl stop: $(inside systemctl is-active pier || true); pier0 left: $(inside ip link show pier0 >/dev/null 2>&1 && echo yes || echo no)"
inside journalctl -u pier --no-pager -o cat | grep -iE "shutting|deregister|stopped|removed|listening|ready" | tail -8 || true
log "PASS: dpkg -i installed pier; its unit started the agent under systemd, kept its worker serving through a SIGKILL of the keeper, restarted and adopted it, stopped it"
