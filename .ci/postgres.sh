#!/usr/bin/env bash
# Starts the local PostgreSQL cluster (Debian's) and creates the role the
# tests use: clawfleet/clawfleet, allowed to create databases. Idempotent.
set -euo pipefail

version=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters --no-header | grep -q "^$version \+main"; then
  pg_createcluster "$version" main >/dev/null
fi
# Test databases are throwaway: trade durability for speed.
conf="/etc/postgresql/$version/main/conf.d/clawfleet-tests.conf"
changed=no
if [ ! -f "$conf" ]; then
  mkdir -p "$(dirname "$conf")"
  printf 'fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 300\n' >"$conf"
  changed=yes
fi
if ! pg_lsclusters --no-header | grep -q "^$version \+main .*online"; then
  pg_ctlcluster "$version" main start
elif [ "$changed" = yes ]; then
  pg_ctlcluster "$version" main restart
fi
for _ in $(seq 1 30); do
  pg_isready -q -h 127.0.0.1 && break
  sleep 1
done
# The postgres superuser authenticates by peer over the local socket.
su postgres -c "psql -qAt -c \"SELECT 1 FROM pg_roles WHERE rolname = 'clawfleet'\"" | grep -q 1 ||
  su postgres -c "psql -q -c \"CREATE ROLE clawfleet LOGIN SUPERUSER PASSWORD 'clawfleet'\""
echo "postgresql $version ready on 127.0.0.1:5432 (role clawfleet)"
