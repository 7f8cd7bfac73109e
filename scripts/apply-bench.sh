#!/usr/bin/env bash
# Apply benchmark (issue 14): `pier apply -f` of a 20-service Compose file
# until every pod is ready (`--wait`), then `pier delete -f`; and, as the
# anchor for Docker's own share, `docker run -d` of the same 20 containers
# (create + start, 20 in parallel) until all run. Runs against the agent
# of PIER_CONFIG (default /etc/pier/pier.toml); uses pier-test/httpd.
#
#   PIER_CONFIG=/path/pier.toml scripts/apply-bench.sh [ROUNDS]
set -euo pipefail
ROUNDS=${1:-5}
PIER=${PIER:-pier}
N=20
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
{
  echo "name: applybench"
  echo "services:"
  for i in $(seq 1 $N); do
    printf '  s%02d:\n    image: pier-test/httpd:latest\n    expose: [8080]\n' "$i"
  done
} > "$dir/compose.yaml"
now() { date +%s%N; }
ms() { echo $(( ($2 - $1) / 1000000 )); }
for r in $(seq 1 "$ROUNDS"); do
  t0=$(now); $PIER apply -f "$dir/compose.yaml" --wait --timeout 120s >/dev/null; t1=$(now)
  $PIER delete -f "$dir/compose.yaml" >/dev/null
  # Let the pods go before Docker's own round.
  while [ -n "$(docker ps -q --filter label=pier.namespace=applybench)" ]; do sleep 0.2; done
  t2=$(now)
  for i in $(seq 1 $N); do
    docker run -d --rm --init --label pier-apply-bench=1 --name "applybench-docker-$i" \
      pier-test/httpd:latest >/dev/null &
  done
  wait
  t3=$(now)
  docker rm -f $(docker ps -aq --filter label=pier-apply-bench=1) >/dev/null
  echo "round $r: pier apply until ready $(ms "$t0" "$t1") ms; docker run -d x$N $(ms "$t2" "$t3") ms"
done
