# Sourced by demo.sh and demo-stop.sh: everything the demo makes is its own —
# database and key file under $DEMO_DIR, instance label, container/volume name
# prefix, network and listen address — so it never meets what `make run`
# (the default instance, `mosaic-user-*` on `mosaic-internal`, port 8089) made.
# Each can be overridden from the environment (the tests run the demo beside
# others this way).
bin="${CLAWFLEET_BIN:-./target/release/clawfleet}"
dir="${DEMO_DIR:-./data/demo}"
export DATABASE_URL="sqlite://$dir/clawfleet.db?mode=rwc"
export CLAWFLEET_DATA_DIR="$dir"
export CLAWFLEET_INSTANCE="${DEMO_INSTANCE:-demo}"
export CLAWFLEET_NAME_PREFIX="${DEMO_NAME_PREFIX:-demo-user-}"
export OPENCLAW_NETWORK="${DEMO_NETWORK:-clawfleet-demo}"
export OPENCLAW_IMAGE="${DEMO_IMAGE:-clawfleet-agent-stub:dev}"
export CLAWFLEET_LISTEN="${DEMO_LISTEN:-127.0.0.1:8090}"
unset CLAWFLEET_ENCRYPTION_KEYS CLAWFLEET_API_TOKEN
