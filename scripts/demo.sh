#!/usr/bin/env bash
# `make demo`: clawfleet on the stand-in agent image, a handful of users
# created through the CLI, and the fleet converging before your eyes.
# Everything lives under ./data/demo and carries the instance label "demo";
# `make demo-stop` stops the controller and removes the demo's containers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bin=./target/release/clawfleet
dir=./data/demo
mkdir -p "$dir"
export DATABASE_URL="sqlite://$dir/clawfleet.db?mode=rwc"
export CLAWFLEET_DATA_DIR="$dir"
export CLAWFLEET_INSTANCE=demo
export OPENCLAW_IMAGE=clawfleet-agent-stub:dev
export OPENCLAW_NETWORK=clawfleet-demo
export CLAWFLEET_LISTEN="${CLAWFLEET_LISTEN:-127.0.0.1:8089}"

if [ -f "$dir/clawfleet.pid" ] && kill -0 "$(cat "$dir/clawfleet.pid")" 2>/dev/null; then
  echo "a demo controller is already running (pid $(cat "$dir/clawfleet.pid")); make demo-stop first" >&2
  exit 1
fi

echo "== starting clawfleet (log: $dir/clawfleet.log)"
"$bin" run >"$dir/clawfleet.log" 2>&1 &
echo $! >"$dir/clawfleet.pid"
for _ in $(seq 1 50); do
  grep -q "http listener ready" "$dir/clawfleet.log" 2>/dev/null && break
  if ! kill -0 "$(cat "$dir/clawfleet.pid")" 2>/dev/null; then
    echo "clawfleet exited:" >&2; tail -20 "$dir/clawfleet.log" >&2; exit 1
  fi
  sleep 0.2
done

echo "== creating users through the CLI"
"$bin" users set alice
"$bin" users set bob --idle-timeout 30m --touch
"$bin" users set 'Carol@Example.com'
"$bin" users set dave --state stopped
"$bin" users set erin --image clawfleet-agent-stub:dev

echo "== converging"
for _ in $(seq 1 60); do
  list=$("$bin" users list)
  clear 2>/dev/null || true
  echo "$list"
  # Converged: every running user healthy, every stopped one stopped.
  pending=$(echo "$list" | awk 'NR>1 && $0 !~ / users$/ && !(($3 == "running" && $4 == "healthy") || $3 == "stopped")' | wc -l)
  [ "$pending" -eq 0 ] && break
  sleep 1
done

cat <<MSG

Converged. Try:
  curl -s http://$CLAWFLEET_LISTEN/metrics | grep ^clawfleet_containers
  curl -s http://$CLAWFLEET_LISTEN/readyz
  DATABASE_URL='$DATABASE_URL' $bin users show alice
  docker kill mosaic-user-alice   # and watch it come back: $bin users list
The controller keeps running (pid $(cat "$dir/clawfleet.pid")); stop it and remove the demo's containers with: make demo-stop
MSG
