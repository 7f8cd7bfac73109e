#!/usr/bin/env bash
# Brings up pier's main job on this host, from a fresh clone. On Debian 12,
# as root, with the Rust toolchain (rustup) and nothing else, it:
#   1. installs what is missing (scripts/deps.sh: gcc and libc6-dev, protoc
#      and its include files, docker.io, iproute2, iptables, busybox-static,
#      curl), each checked by the file or command actually used;
#   2. starts dockerd when none answers (and leaves it running);
#   3. builds pier once, in release (`cargo build --release -p pier`; a
#      second run reuses the build) and installs it as /usr/local/bin/pier;
#   4. builds the quick start's test image (pier-test/httpd:latest);
#   5. starts `pier agent` with the embedded store in the background
#      (log: /var/log/pier/agent.log, pid: /run/pier/agent.pid), unless one
#      is already running, and waits until it is ready;
#   6. prints where the API and DNS are, and what to type next.
#
#   scripts/up.sh [pier agent flags...]   e.g. scripts/up.sh --node host-2
#
# Safe to run again: it installs nothing new, reuses the build, and says so
# when the agent already runs instead of starting a second one.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$(pwd)
log() { printf '[up.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "$*"; exit 1; }

BIN=/usr/local/bin/pier
RUN_DIR=/run/pier
PIDFILE=$RUN_DIR/agent.pid
LOG_DIR=/var/log/pier
LOG=$LOG_DIR/agent.log
API=http://127.0.0.1:7370
DOCKERD_LOG=$LOG_DIR/dockerd.log

[ "$(id -u)" = 0 ] || die "needs root (dockerd, pier0 and the DNS VIP on :53); re-run with sudo"

agent_args=("$@")
have_node=""
for a in "${agent_args[@]}"; do
  case "$a" in --node|--node=*|--config|--config=*) have_node=yes ;; esac
done
[ -n "$have_node" ] || agent_args=(--node "${PIER_NODE:-host-1}" "${agent_args[@]}")

# 1. Packages.
# shellcheck source=deps.sh
. scripts/deps.sh
pier_install log pier_build_deps pier_run_deps
if ! command -v cargo >/dev/null; then
  # shellcheck disable=SC1091
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs), then run this again"

# 2. dockerd.
if ! timeout 10 docker info >/dev/null 2>&1; then
  mkdir -p "$LOG_DIR"
  if [ -d /run/systemd/system ] && systemctl list-unit-files docker.service >/dev/null 2>&1; then
    log "starting dockerd (systemctl start docker)"
    systemctl start docker || true
  fi
  if ! timeout 10 docker info >/dev/null 2>&1; then
    log "starting dockerd (log: $DOCKERD_LOG)"
    setsid dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
  fi
  for _ in $(seq 1 150); do timeout 5 docker info >/dev/null 2>&1 && break; sleep 0.2; done
  timeout 5 docker info >/dev/null 2>&1 || {
    tail -20 "$DOCKERD_LOG" >&2 2>/dev/null
    die "dockerd did not start (see $DOCKERD_LOG); \`$BIN doctor\` names the usual causes"
  }
fi
log "dockerd: $(docker version -f '{{.Server.Version}} (API {{.Server.APIVersion}})' 2>/dev/null)"

# 3. Build (once: cargo rebuilds nothing when nothing changed) and install.
log "building pier (release)"
t0=$(date +%s)
cargo build --release --locked -p pier
log "build finished in $(( $(date +%s) - t0 )) s"
if ! cmp -s target/release/pier "$BIN"; then
  install -m 0755 target/release/pier "$BIN"
  log "installed $BIN"
fi

# 4. The quick start's image.
if ! docker image inspect pier-test/httpd:latest >/dev/null 2>&1; then
  tests/images/build.sh
fi

# 5. The agent: one only.
running_pid() {
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  case "$(readlink "/proc/$pid/exe" 2>/dev/null)" in
    "$BIN"|"$BIN (deleted)") echo "$pid" ;;
    *) return 1 ;;
  esac
}
ready() { curl -fsS -m 2 -o /dev/null "$API/readyz" 2>/dev/null; }

if pid=$(running_pid); then
  log "pier agent is already running (pid $pid); not starting another"
  if [ "$(readlink "/proc/$pid/exe")" = "$BIN (deleted)" ]; then
    log "note: it runs an older build; restart it to use the new one: kill $pid && scripts/up.sh"
  fi
elif [ -d /run/systemd/system ] && systemctl is-active --quiet pier 2>/dev/null; then
  log "pier agent is already running (systemd unit pier.service); not starting another"
elif ready; then
  die "something already answers on $API/readyz (another pier agent, not started by this script?); stop it or leave it, but a second agent would not bind the API"
else
  if ! "$BIN" doctor "${agent_args[@]}" >&2; then
    die "pier doctor found a problem (above, with the fix); fix it and run this again"
  fi
  mkdir -p "$RUN_DIR" "$LOG_DIR"
  log "starting: $BIN agent ${agent_args[*]} (log: $LOG)"
  setsid "$BIN" agent "${agent_args[@]}" >>"$LOG" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$PIDFILE"
  for _ in $(seq 1 300); do
    ready && break
    kill -0 "$pid" 2>/dev/null || { tail -20 "$LOG" >&2; rm -f "$PIDFILE"; die "pier agent exited during start-up (log above, full log in $LOG)"; }
    sleep 0.1
  done
  ready || { tail -20 "$LOG" >&2; die "pier agent (pid $pid) not ready after 30 s; see $LOG"; }
  log "pier agent is ready (pid $pid)"
fi

# 6. Where things are.
# The DNS VIP is the .10 of the service CIDR, on pier0.
dns=$(ip -4 -o addr show dev pier0 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | grep '\.10$' | head -1 || true)
cat <<EOF

pier is running on this host.
  API:    $API  (pier get nodes)
  DNS:    ${dns:-10.213.0.10}:53 on pier0, for containers: --dns ${dns:-10.213.0.10}
  log:    $LOG
  stop:   kill \$(cat $PIDFILE)   (deregisters, removes pier0, leaves containers)

Next, run a replicated service and curl it (README, "Quick start"):
  pier run kube-demo --image pier-test/httpd:latest --port 8080 --wait
  pier expose rs kube-demo --port 8080 --type NodePort
  pier get svc kube-demo
  curl http://127.0.0.1:30000/
EOF
