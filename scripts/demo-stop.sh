#!/usr/bin/env bash
# Stops the demo controller and removes what the demo created (instance "demo").
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=./data/demo
if [ -f "$dir/clawfleet.pid" ]; then
  kill "$(cat "$dir/clawfleet.pid")" 2>/dev/null && echo "stopped the demo controller"
  rm -f "$dir/clawfleet.pid"
fi
ids=$(docker ps -aq --filter label=io.clawfleet.instance=demo)
[ -n "$ids" ] && docker rm -f $ids >/dev/null && echo "removed $(echo "$ids" | wc -w) demo containers"
vols=$(docker volume ls -q --filter label=io.clawfleet.instance=demo)
[ -n "$vols" ] && docker volume rm $vols >/dev/null && echo "removed $(echo "$vols" | wc -w) demo volumes"
docker network rm clawfleet-demo >/dev/null 2>&1 && echo "removed network clawfleet-demo"
exit 0
