# What tests/run.sh removes after a run, and nothing more. Sourced.
# shellcheck shell=bash
#
# pier_cleanup_run RUN_ID removes:
#   - containers and networks whose pier.test-run label is RUN_ID or starts
#     with "RUN_ID-" (tests/lib.rs labels each agent's things RUN_ID-<slot>,
#     the multi-host clusters RUN_ID-mh<k>, docker/test-image.sh
#     RUN_ID-img-…);
#   - network namespaces whose name starts with "RUN_ID-" (the multi-host
#     topologies', tests/multihost/netns.rs), should a test process have
#     died before its own teardown.
# Run ids are [a-z0-9_]: no "-", so one run's prefix is never another's.

# The ids of containers or networks (`docker ps -a` / `docker network ls`)
# labelled pier.test-run=RUN_ID or pier.test-run=RUN_ID-…
pier_run_objects() {
  local id=$1
  shift
  "$@" --filter "label=pier.test-run" --format '{{.ID}} {{.Label "pier.test-run"}}' 2>/dev/null |
    awk -v id="$id" '$2 == id || index($2, id "-") == 1 { print $1 }'
}

pier_cleanup_run() {
  local id=$1 ids nets ns
  case "$id" in
    ""|*[!a-z0-9_]*) echo "pier_cleanup_run: bad run id '$id'" >&2; return 2 ;;
  esac
  if command -v docker >/dev/null && timeout 10 docker info >/dev/null 2>&1; then
    ids=$(pier_run_objects "$id" docker ps -a)
    # shellcheck disable=SC2086
    [ -z "$ids" ] || docker rm -f $ids >/dev/null 2>&1
    nets=$(pier_run_objects "$id" docker network ls)
    # shellcheck disable=SC2086
    [ -z "$nets" ] || docker network rm $nets >/dev/null 2>&1
  fi
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | awk -v id="$id" 'index($0, id "-") == 1'); do
    ip netns del "$ns" 2>/dev/null
  done
  return 0
}
