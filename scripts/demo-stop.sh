#!/usr/bin/env bash
# Stops the demo controller and removes what the demo created: containers and
# volumes labelled with the demo's instance, and the demo's network.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/demo-env.sh
if [ -f "$dir/clawfleet.pid" ]; then
  pid=$(cat "$dir/clawfleet.pid")
  if kill "$pid" 2>/dev/null; then
    # Wait for its graceful shutdown, so it creates nothing after the removal below.
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    echo "stopped the demo controller"
  fi
  rm -f "$dir/clawfleet.pid"
fi
ids=$(docker ps -aq --filter "label=io.clawfleet.instance=$CLAWFLEET_INSTANCE")
[ -n "$ids" ] && docker rm -f $ids >/dev/null && echo "removed $(echo "$ids" | wc -w) demo containers"
vols=$(docker volume ls -q --filter "label=io.clawfleet.instance=$CLAWFLEET_INSTANCE")
[ -n "$vols" ] && docker volume rm $vols >/dev/null && echo "removed $(echo "$vols" | wc -w) demo volumes"
docker network rm "$OPENCLAW_NETWORK" >/dev/null 2>&1 && echo "removed network $OPENCLAW_NETWORK"
exit 0
