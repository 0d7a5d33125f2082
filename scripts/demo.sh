#!/usr/bin/env bash
# `make demo`: clawfleet on the stand-in agent image, a handful of users
# created through the CLI, and the fleet converging before your eyes.
# What it makes is its own (see demo-env.sh): state under ./data/demo,
# instance "demo", containers `demo-user-*` on network clawfleet-demo,
# listener 127.0.0.1:8090. `make demo-stop` stops the controller and removes
# the demo's containers. Exits 1, leaving the controller running to look at,
# when a user has not converged within DEMO_WAIT seconds (default 60).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/demo-env.sh
wait_secs="${DEMO_WAIT:-60}"
mkdir -p "$dir"

if [ -f "$dir/clawfleet.pid" ] && kill -0 "$(cat "$dir/clawfleet.pid")" 2>/dev/null; then
  echo "a demo controller is already running (pid $(cat "$dir/clawfleet.pid")); make demo-stop first" >&2
  exit 1
fi

echo "== starting clawfleet (log: $dir/clawfleet.log)"
"$bin" run >"$dir/clawfleet.log" 2>&1 &
echo $! >"$dir/clawfleet.pid"
for _ in $(seq 1 150); do
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
"$bin" users set erin --image "$OPENCLAW_IMAGE"

# Columns of `users list` are separated by two or more spaces. A user has
# converged when it runs healthy (running desired) or is stopped (stopped
# desired); `failed` is reported as such, never as converged.
unconverged() {
  awk -F'  +' 'NR > 1 && $0 !~ /^[0-9]+ users$/ && !(($2 ~ /^running/ && $3 == "running" && $4 == "healthy") || ($2 == "stopped" && $3 == "stopped"))'
}

echo "== converging (up to ${wait_secs}s)"
deadline=$((SECONDS + wait_secs))
while :; do
  list=$("$bin" users list)
  if [ -t 1 ]; then clear 2>/dev/null || true; fi
  echo "$list"
  left=$(echo "$list" | unconverged)
  [ -z "$left" ] && break
  if [ "$SECONDS" -ge "$deadline" ] || echo "$left" | awk -F'  +' '$3 == "failed" { f = 1 } END { exit !f }'; then
    # A failed user waits 5 min before it is tried again: no reason to wait on.
    [ "$SECONDS" -ge "$deadline" ] || sleep 2
    list=$("$bin" users list)
    left=$(echo "$list" | unconverged)
    [ -z "$left" ] && break
    cat <<MSG

Not converged: $(echo "$left" | wc -l) user(s) did not reach their desired state:
$(echo "$left" | awk -F'  +' '{ printf "  %s: desired %s, phase %s%s\n", $1, $2, $3, ($8 != "" ? " — " $8 : "") }')
Look at the log ($dir/clawfleet.log) and at: DATABASE_URL='$DATABASE_URL' $bin users show <user>
The controller keeps running (pid $(cat "$dir/clawfleet.pid")); stop it and remove the demo's containers with: make demo-stop
MSG
    exit 1
  fi
  sleep 1
done

cat <<MSG

Converged. Try:
  curl -s http://$CLAWFLEET_LISTEN/metrics | grep ^clawfleet_containers
  curl -s http://$CLAWFLEET_LISTEN/readyz
  DATABASE_URL='$DATABASE_URL' $bin users show alice
  docker kill ${CLAWFLEET_NAME_PREFIX}alice   # and watch it come back: DATABASE_URL='$DATABASE_URL' $bin users list
The controller keeps running (pid $(cat "$dir/clawfleet.pid")); stop it and remove the demo's containers with: make demo-stop
MSG
