#!/usr/bin/env bash
# A real multi-node Docker Swarm inside network namespaces on this machine, for tests of
# the controller's Swarm backend. Needs root, iproute2, nsenter/unshare, dockerd 20.10+.
#
#   swarm-cluster.sh up NAME [WORKERS]   1 manager + WORKERS (default 2) workers, then
#                                        prints shell-sourceable SWARM_* lines on stdout
#   swarm-cluster.sh stop-node NAME I    SIGKILLs worker I (1-based; 0 = the manager): its
#                                        dockerd, containerd, shims and containers
#   swarm-cluster.sh start-node NAME I   starts it again on the same data-root (same node id)
#   swarm-cluster.sh env NAME            prints the SWARM_* lines again
#   swarm-cluster.sh down NAME           removes everything of cluster NAME (idempotent)
#   swarm-cluster.sh down-all            `down` for every cluster under the state root
#
# Layout, for cluster NAME (ID = 8 hex digits of sha256(NAME)):
#   netns NAME-hub    holds the bridge br0 that joins the nodes (and the host). The bridge
#                     is NOT in the host netns: there, bridge-nf-call-iptables=1 and the host
#                     engine's FORWARD policy DROP would drop node-to-node frames, and
#                     changing either would touch state shared with the host engine.
#   netns NAME-m, NAME-w1..   one per node, eth0 = 10.213.X.(2+i)/24, each runs its own
#                     dockerd (+ its own containerd) in a fresh UTS ns (hostname NAME-m...)
#   host link cfsw-NAME (cfsw-ID when NAME is longer than 10), 10.213.X.1/24: the host can
#                     reach every node's address (published ports) directly.
#   /tmp/clawfleet-swarm/NAME/          state dir: NODE.sock, NODE/{data,dockerd.log,...}, env
#   /run/cfsw/ID/NODE                   exec-roots (short: unix socket paths <= 107 bytes)
#   cgroups /cfsw-ID-NODE               parent cgroup of each node's containers
# Environment:
#   SWARM_IMAGES          images copied from the local engine (`docker save`) into every node
#                         (default clawfleet-agent-stub:dev; empty = none)
#   SWARM_STORAGE_DRIVER  node storage driver (default vfs; e.g. fuse-overlayfs, overlay2)
#   SWARM_PREFER_OFFLINE_IMAGE  1 (default): nodes' swarm executors don't try to pull a
#                         task's image first (DOCKER_SERVICE_PREFER_OFFLINE_IMAGE); 0: they do
#   SWARM_HEARTBEAT       dispatcher heartbeat period for `swarm init` (e.g. 1s; default:
#                         the engine's 5s). A dead node is marked Down after ~3 periods.
#   SWARM_SUBNET_PREFIX   first two octets of the node subnet (default 10.213)
#   SWARM_START_TIMEOUT   seconds to wait for a dockerd / for nodes to be Ready (default 90)
#   SWARM_STATE_ROOT      default /tmp/clawfleet-swarm
# Progress and errors go to stderr; only the SWARM_* lines go to stdout. Exit status: 0 ok,
# 1 failure (a failed `up` has removed what it made), 2 usage.
#
# Limits of this kernel (no CONFIG_IP_VS): swarm's routing mesh and service VIPs do not
# work (dockerd logs "Could not get ipvs family information from the kernel"): a port
# published in ingress mode refuses connections, and a service's name (its VIP) does not
# answer. Publish with mode=host (with --endpoint-mode dnsrr) and reach tasks through
# tasks.SERVICE or their own addresses; overlay traffic between nodes (vxlan) works.
set -euo pipefail
umask 022

PROG=swarm-cluster.sh
STATE_ROOT="${SWARM_STATE_ROOT:-/tmp/clawfleet-swarm}"
RUN_ROOT=/run/cfsw
START_TIMEOUT="${SWARM_START_TIMEOUT:-90}"
SUBNET_PREFIX="${SWARM_SUBNET_PREFIX:-10.213}"
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
usage() {
  sed -n '5,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# ---------------------------------------------------------------------------- naming
set_names() { # NAME
  NAME=$1
  if ! [[ $NAME =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$ ]]; then
    log "invalid cluster name '$NAME' (1-32 of [A-Za-z0-9_.-], starting alphanumeric)"
    exit 2
  fi
  ID=$(printf '%s' "$NAME" | sha256sum | cut -c1-8)
  STATE="$STATE_ROOT/$NAME"
  RUN_DIR="$RUN_ROOT/$ID"
  HUB="$NAME-hub"
  if [ ${#NAME} -le 10 ]; then HOSTLINK="cfsw-$NAME"; else HOSTLINK="cfsw-$ID"; fi
}
node_name() { if [ "$1" = 0 ]; then echo m; else echo "w$1"; fi; }
node_ns() { echo "$NAME-$1"; }
node_sock() { echo "$STATE/$1.sock"; }
node_cgroup() { echo "cfsw-$ID-$1"; }
node_ip() { # NODE -> address
  local subnet; subnet=$(cat "$STATE/subnet")
  if [ "$1" = m ]; then echo "$subnet.2"; else echo "$subnet.$((2 + ${1#w}))"; fi
}
node_log() { echo "$STATE/$1/dockerd.log"; }

# docker CLI against one node, ignoring whatever engine the caller's environment names.
dk() { # NODE args...
  local sock; sock=$(node_sock "$1"); shift
  env -u DOCKER_HOST -u DOCKER_CONTEXT -u DOCKER_TLS_VERIFY -u DOCKER_CERT_PATH \
    timeout 120 docker -H "unix://$sock" "$@"
}

# ---------------------------------------------------------------------------- failure
UP_IN_PROGRESS=0
# fail NODE|- MESSAGE [OUTPUT]: reports (with the tail of NODE's dockerd log), tears down
# a half-made cluster when `up` is running, exits 1.
fail() {
  local node=$1 msg=$2 out=${3:-}
  {
    echo "$PROG: $msg"
    [ -n "$out" ] && printf '%s\n' "$out" | sed 's/^/  | /'
    if [ "$node" != - ] && [ -f "$(node_log "$node")" ]; then
      echo "--- last 40 lines of $(node_log "$node") ---"
      tail -n 40 "$(node_log "$node")"
      echo "---"
    fi
  } >&2
  if [ "$UP_IN_PROGRESS" = 1 ]; then
    UP_IN_PROGRESS=0
    log "tearing down the half-made cluster $NAME"
    do_down || true
  fi
  exit 1
}
# run NODE|- CMD...: runs CMD; on failure, fail with the command line and its output.
run() {
  local node=$1 out rc=0; shift
  out=$("$@" 2>&1) || rc=$?
  if [ $rc -ne 0 ]; then fail "$node" "command failed (exit $rc): $*" "$out"; fi
  [ -z "$out" ] || printf '%s\n' "$out"
}

# ---------------------------------------------------------------------------- processes
netns_inode() { stat -L -c %i "/var/run/netns/$1" 2>/dev/null || true; }
# PIDs of every process in netns NS and in the node's container cgroups.
node_pids() { # NODE
  local node=$1 ino d
  ino=$(netns_inode "$(node_ns "$node")")
  if [ -n "$ino" ]; then
    # (a zombie has no ns/net link: it is gone already)
    find /proc/[0-9]*/ns -maxdepth 1 -name net -lname "net:?$ino?" 2>/dev/null | cut -d/ -f3 || true
  fi
  for d in /sys/fs/cgroup/*/"$(node_cgroup "$node")" /sys/fs/cgroup/"$(node_cgroup "$node")"; do
    [ -d "$d" ] || continue
    find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null || true
  done
}
# Unix sockets the node's containerd shims bound under /run/containerd/s (a host-wide dir
# containerd hard-codes); a SIGKILLed shim leaves its socket file behind.
node_shim_sockets() { # NODE
  local ns; ns=$(node_ns "$1")
  [ -e "/var/run/netns/$ns" ] || return 0
  nsenter --net="/var/run/netns/$ns" cat /proc/net/unix 2>/dev/null |
    awk '$8 ~ /^\/run\/containerd\/s\/[0-9a-f]+$/ {print $8}' | sort -u
}
kill_node() { # NODE: SIGKILL everything of the node until nothing is left
  local node=$1 pids socks i
  socks=$(node_shim_sockets "$node")
  for i in $(seq 1 100); do
    pids=$(node_pids "$node" | sort -un | grep -vx "$$" || true)
    [ -n "$pids" ] || break
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.1
  done
  [ -z "$pids" ] || log "warning: processes of node $node survived SIGKILL: $(echo $pids)"
  for s in $socks; do [ -S "$s" ] && rm -f "$s"; done
  rm -f "$STATE/$node/dockerd.pid"
}

# ---------------------------------------------------------------------------- mounts
# Mount points at or under DIR (resolved), deepest first.
mounts_under() { # DIR
  local dir; dir=$(realpath -m "$1")
  awk -v r="$dir" '{ mp = $5; gsub(/\\040/, " ", mp)
      if (mp == r || index(mp, r "/") == 1) print mp }' /proc/self/mountinfo | sort -r
}
unmount_under() { # DIR...
  local dir mp i
  for dir in "$@"; do
    for i in 1 2 3 4 5; do
      [ -n "$(mounts_under "$dir")" ] || break
      while IFS= read -r mp; do
        umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
      done < <(mounts_under "$dir")
    done
  done
}

# ---------------------------------------------------------------------------- dockerd
storage_driver() {
  if [ -n "${SWARM_STORAGE_DRIVER:-}" ]; then echo "$SWARM_STORAGE_DRIVER"; else echo vfs; fi
}
start_dockerd() { # NODE
  local node=$1 ns dir exec_root
  ns=$(node_ns "$node"); dir="$STATE/$node"; exec_root="$RUN_DIR/$node"
  mkdir -p "$dir/data" "$exec_root"
  # The engine ID key (key.json) would default to the host's /etc/docker/key.json, and
  # dockerd 20.10 accepts its path only in the config file.
  [ -f "$dir/daemon.json" ] || printf '{"deprecated-key-path": "%s"}\n' "$dir/key.json" >"$dir/daemon.json"
  local args=(
    --config-file "$dir/daemon.json"
    --data-root "$dir/data"
    --exec-root "$exec_root"
    --pidfile "$dir/dockerd.pid"
    -H "unix://$(node_sock "$node")"
    --storage-driver "$(cat "$STATE/storage-driver")"
    --cgroup-parent "/$(node_cgroup "$node")"
    --iptables=true
    --userland-proxy=true
  )
  echo "=== $(date -u +%FT%TZ) starting dockerd in netns $ns" >>"$dir/dockerd.log"
  # setsid: own session, so the caller's terminal/process-group signals don't reach it;
  # stdio to the log only, and the lock fds closed, so nothing waits on this process.
  # unshare --uts: own hostname (swarm node hostname NAME-m, NAME-w1...).
  (
    cd /
    exec 8>&- 9>&-
    env -u NOTIFY_SOCKET -u DOCKER_HOST -u DOCKER_CONTEXT \
      DOCKER_SERVICE_PREFER_OFFLINE_IMAGE="$([ "${SWARM_PREFER_OFFLINE_IMAGE:-1}" = 1 ] && echo 1 || echo 0)" \
      setsid unshare --uts -- sh -c 'h=$0 n=$1; shift; hostname "$h" && exec nsenter --net="$n" -- "$@"' \
      "$ns" "/var/run/netns/$ns" dockerd "${args[@]}" </dev/null >>"$dir/dockerd.log" 2>&1 &
    echo $! >"$dir/launcher.pid"
  )
  # $! is the forked subshell until it has exec'd (setsid, unshare, sh, nsenter) dockerd;
  # dockerd_pid recognizes dockerd only from then on.
  local p i cmd
  p=$(cat "$dir/launcher.pid")
  for i in $(seq 1 100); do
    cmd=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null) || break
    [[ $cmd == "dockerd "* ]] && break
    sleep 0.05
  done
}
# dockerd's PID, if node NODE's dockerd runs (not a zombie, and really that dockerd).
dockerd_pid() { # NODE
  local node=$1 f p st cmd
  for f in "$STATE/$node/dockerd.pid" "$STATE/$node/launcher.pid"; do
    p=$(cat "$f" 2>/dev/null) && [[ $p =~ ^[0-9]+$ ]] || continue # (dockerd writes no newline)
    st=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f1) || continue
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ] || continue
    cmd=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null) || continue
    [[ $cmd == "dockerd "*" --data-root $STATE/$node/data "* ]] || continue
    echo "$p"
    return 0
  done
  return 0
}
wait_dockerd() { # NODE
  local node=$1 sock deadline
  sock=$(node_sock "$node")
  deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    if [ -S "$sock" ] && [ "$(curl -s -m 2 --unix-socket "$sock" http://d/_ping 2>/dev/null)" = OK ]; then
      return 0
    fi
    [ -n "$(dockerd_pid "$node")" ] || fail "$node" "dockerd of node $node (netns $(node_ns "$node")) exited during start-up"
    [ $SECONDS -lt $deadline ] || fail "$node" "dockerd of node $node did not answer on $sock within ${START_TIMEOUT}s"
    sleep 0.2
  done
}
# Waits until the manager lists node NODE_ID as STATUS (Ready/Down).
wait_node_status() { # NODE_ID STATUS [WHO]
  local id=$1 want=$2 who=${3:-$1} deadline st
  deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    st=$(dk m node inspect -f '{{.Status.State}}' "$id" 2>/dev/null || true)
    [ "${st,,}" = "${want,,}" ] && return 0
    [ $SECONDS -lt $deadline ] || fail m "node $who ($id) is '$st', not $want, after ${START_TIMEOUT}s"
    sleep 0.5
  done
}

# ---------------------------------------------------------------------------- network
ip2int() { local a b c d; IFS=. read -r a b c d <<<"$1"; echo $(((a << 24) | (b << 16) | (c << 8) | d)); }
cidr_overlap() { # A/len B/len
  local a=${1%/*} al=${1#*/} b=${2%/*} bl=${2#*/} l mask
  [ "$al" = "$1" ] && al=32
  [ "$bl" = "$2" ] && bl=32
  l=$((al < bl ? al : bl))
  mask=$(((0xffffffff << (32 - l)) & 0xffffffff))
  [ "$l" = 0 ] && mask=0
  [ $(($(ip2int "$a") & mask)) = $(($(ip2int "$b") & mask)) ]
}
# A 10.213.X /24 (X from NAME's hash) that no host route and no other cluster uses.
pick_subnet() {
  local x0 x i cand used r
  x0=$((16#$(printf '%s' "$NAME" | sha256sum | cut -c9-10)))
  used=$(
    ip -4 route show table all 2>/dev/null | awk '
      $1 ~ /^(local|broadcast|unicast|multicast|blackhole|unreachable|prohibit|throw|anycast)$/ {print $2; next}
      $1 != "default" {print $1}'
    cat "$STATE_ROOT"/*/subnet 2>/dev/null | sed 's|$|.0/24|'
  )
  for i in $(seq 0 255); do
    x=$(((x0 + i) % 256))
    cand="$SUBNET_PREFIX.$x"
    for r in $used; do
      [[ $r =~ ^[0-9.]+(/[0-9]+)?$ ]] || continue
      cidr_overlap "$cand.0/24" "$r" && continue 2
    done
    echo "$cand"
    return 0
  done
  return 1
}
make_network() { # WORKERS
  local workers=$1 subnet node i
  subnet=$(cat "$STATE/subnet")
  echo "$HUB" >>"$STATE/netns"
  run - ip netns add "$HUB"
  run - ip -n "$HUB" link set lo up
  run - ip -n "$HUB" link add br0 type bridge
  run - ip -n "$HUB" link set br0 up
  # br_netfilter sysctls are per netns; this one has no firewall, so skip it altogether.
  nsenter --net="/var/run/netns/$HUB" sh -c \
    'for f in /proc/sys/net/bridge/bridge-nf-call-*; do [ -w "$f" ] && echo 0 >"$f"; done; true'
  echo "$HOSTLINK" >"$STATE/hostlink"
  run - ip link add "$HOSTLINK" type veth peer name host netns "$HUB"
  run - ip -n "$HUB" link set host master br0 up
  run - ip addr add "$subnet.1/24" dev "$HOSTLINK"
  run - ip link set "$HOSTLINK" up
  for i in $(seq 0 "$workers"); do
    node=$(node_name "$i")
    echo "$(node_ns "$node")" >>"$STATE/netns"
    run - ip netns add "$(node_ns "$node")"
    run - ip -n "$(node_ns "$node")" link set lo up
    run - ip -n "$HUB" link add "v-$node" type veth peer name eth0 netns "$(node_ns "$node")"
    run - ip -n "$HUB" link set "v-$node" master br0 up
    run - ip -n "$(node_ns "$node")" addr add "$(node_ip "$node")/24" dev eth0
    run - ip -n "$(node_ns "$node")" link set eth0 up
  done
}

# ---------------------------------------------------------------------------- env lines
write_env() {
  local workers i node id
  workers=$(cat "$STATE/workers")
  {
    echo "SWARM_NAME=$NAME"
    echo "SWARM_STATE_DIR=$STATE"
    echo "SWARM_WORKERS=$workers"
    echo "SWARM_HOST_ADDR=$(cat "$STATE/subnet").1"
    echo "SWARM_MANAGER_HOST=unix://$(node_sock m)"
    echo "SWARM_MANAGER_ADDR=$(node_ip m)"
    echo "SWARM_MANAGER_ID=$(cat "$STATE/m/node-id" 2>/dev/null)"
    echo "SWARM_MANAGER_NETNS=$(node_ns m)"
    for i in $(seq 1 "$workers"); do
      node=$(node_name "$i")
      id=$(cat "$STATE/$node/node-id" 2>/dev/null || true)
      echo "SWARM_NODE_${i}_HOST=unix://$(node_sock "$node")"
      echo "SWARM_NODE_${i}_ID=$id"
      echo "SWARM_NODE_${i}_ADDR=$(node_ip "$node")"
      echo "SWARM_NODE_${i}_NETNS=$(node_ns "$node")"
    done
  } >"$STATE/env.tmp"
  mv "$STATE/env.tmp" "$STATE/env"
}

# ---------------------------------------------------------------------------- commands
lock_name() { # holds an exclusive lock on cluster NAME on fd 8 until exit
  mkdir -p "$STATE_ROOT"
  exec 8>"$STATE_ROOT/.$NAME.lock"
  flock -w 600 8 || { log "cannot lock cluster $NAME"; exit 1; }
}

cmd_up() { # NAME [WORKERS]
  set_names "$1"
  local workers=${2:-2} t0=$SECONDS i node pids id token images
  [[ $workers =~ ^[0-9]+$ ]] && [ "$workers" -le 50 ] || { log "WORKERS must be 0..50"; exit 2; }
  [ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
  # sun_path holds 107 bytes (+ NUL)
  [ ${#STATE} -le 90 ] || { log "state dir $STATE is too long for the nodes' unix sockets"; exit 2; }
  for c in dockerd docker containerd runc ip nsenter unshare curl flock iptables; do
    command -v "$c" >/dev/null || { log "missing command: $c"; exit 1; }
  done
  # dockerd 20.10 uses a containerd at this path instead of starting its own: all nodes
  # would then share the host netns's containerd.
  if [ -e /run/containerd/containerd.sock ]; then
    log "/run/containerd/containerd.sock exists: dockerd would use that system containerd instead of starting one per node"
    exit 1
  fi
  lock_name
  if [ -e "$STATE" ] || [ -e "$RUN_DIR" ] || [ -e "/var/run/netns/$HUB" ] || ip link show "$HOSTLINK" >/dev/null 2>&1; then
    log "cluster $NAME already exists (or left-overs of it do); run: $0 down $NAME"
    exit 1
  fi
  UP_IN_PROGRESS=1
  trap 'if [ "$UP_IN_PROGRESS" = 1 ]; then UP_IN_PROGRESS=0; log "up failed or was interrupted; tearing down $NAME"; do_down || true; fi' EXIT
  trap 'exit 130' INT TERM HUP
  mkdir -p "$STATE" "$RUN_DIR"
  echo "$NAME" >"$STATE/name"
  echo "$NAME" >"$RUN_DIR/name"
  echo "$workers" >"$STATE/workers"
  echo "$(storage_driver)" >"$STATE/storage-driver"

  # Subnet: under a global lock, so that concurrent `up`s pick different ones.
  exec 9>"$STATE_ROOT/.subnet.lock"
  flock -w 60 9 || fail - "cannot lock $STATE_ROOT/.subnet.lock"
  local subnet; subnet=$(pick_subnet) || fail - "no free $SUBNET_PREFIX.X.0/24 subnet"
  echo "$subnet" >"$STATE/subnet"
  log "cluster $NAME: 1 manager + $workers workers on $subnet.0/24 (host $HOSTLINK $subnet.1), driver $(cat "$STATE/storage-driver")"
  make_network "$workers"
  exec 9>&-

  log "starting $((workers + 1)) dockerds"
  for i in $(seq 0 "$workers"); do start_dockerd "$(node_name "$i")"; done
  for i in $(seq 0 "$workers"); do wait_dockerd "$(node_name "$i")"; done
  log "dockerds up after $((SECONDS - t0))s"

  local init_args=(--advertise-addr "$(node_ip m)" --listen-addr "$(node_ip m):2377")
  [ -z "${SWARM_HEARTBEAT:-}" ] || init_args+=(--dispatcher-heartbeat "$SWARM_HEARTBEAT")
  run m dk m swarm init "${init_args[@]}" >/dev/null
  token=$(run m dk m swarm join-token -q worker)
  run m dk m info -f '{{.Swarm.NodeID}}' >"$STATE/m/node-id"
  for i in $(seq 1 "$workers"); do
    node=$(node_name "$i")
    run "$node" dk "$node" swarm join --token "$token" --advertise-addr "$(node_ip "$node")" \
      --listen-addr "$(node_ip "$node"):2377" "$(node_ip m):2377" >/dev/null
    id=$(run "$node" dk "$node" info -f '{{.Swarm.NodeID}}')
    [ -n "$id" ] || fail "$node" "node $node has no swarm node id after joining"
    echo "$id" >"$STATE/$node/node-id"
  done
  for i in $(seq 1 "$workers"); do
    node=$(node_name "$i")
    wait_node_status "$(cat "$STATE/$node/node-id")" ready "$node"
    run m dk m node update --label-add agents=true "$(cat "$STATE/$node/node-id")" >/dev/null
  done
  log "swarm formed after $((SECONDS - t0))s"

  images=${SWARM_IMAGES-clawfleet-agent-stub:dev}
  if [ -n "${images// /}" ]; then
    # shellcheck disable=SC2086
    run - docker save -o "$STATE/images.tar" $images
    pids=()
    for i in $(seq 0 "$workers"); do
      node=$(node_name "$i")
      (dk "$node" load -q -i "$STATE/images.tar" >"$STATE/$node/load.out" 2>&1; echo $? >"$STATE/$node/load.rc") &
      pids+=($!)
    done
    wait "${pids[@]}" || true
    for i in $(seq 0 "$workers"); do
      node=$(node_name "$i")
      [ "$(cat "$STATE/$node/load.rc")" = 0 ] ||
        fail "$node" "command failed: docker -H unix://$(node_sock "$node") load -i $STATE/images.tar" "$(cat "$STATE/$node/load.out")"
    done
    rm -f "$STATE/images.tar" "$STATE"/*/load.out "$STATE"/*/load.rc
    log "loaded $images into every node"
  fi
  write_env
  UP_IN_PROGRESS=0
  log "cluster $NAME up in $((SECONDS - t0))s"
  cat "$STATE/env"
}

# Index I -> node, checking the cluster exists.
resolve_node() { # NAME I
  set_names "$1"
  [ -f "$STATE/workers" ] || { log "no cluster $NAME (no $STATE)"; exit 1; }
  [[ $2 =~ ^[0-9]+$ ]] && [ "$2" -le "$(cat "$STATE/workers")" ] ||
    { log "node index must be 0 (manager) .. $(cat "$STATE/workers")"; exit 2; }
  NODE=$(node_name "$2")
}

cmd_stop_node() { # NAME I
  resolve_node "$1" "$2"
  lock_name
  log "killing node $NODE of $NAME (netns $(node_ns "$NODE"))"
  kill_node "$NODE"
  # Like a reboot: nothing of the node stays mounted, its /run (exec-root) is gone.
  unmount_under "$STATE/$NODE" "$RUN_DIR/$NODE"
  rm -rf --one-file-system "${RUN_DIR:?}/$NODE"
  rm -f "$(node_sock "$NODE")"
  log "node $NODE stopped"
}

cmd_start_node() { # NAME I
  resolve_node "$1" "$2"
  lock_name
  [ -z "$(dockerd_pid "$NODE")" ] || { log "node $NODE's dockerd is already running"; exit 1; }
  local t0=$SECONDS id old
  start_dockerd "$NODE"
  wait_dockerd "$NODE"
  old=$(cat "$STATE/$NODE/node-id" 2>/dev/null || true)
  id=$(dk "$NODE" info -f '{{.Swarm.NodeID}}' 2>/dev/null || true)
  [ "$id" = "$old" ] || log "warning: node $NODE came back with node id '$id', was '$old'"
  if [ "$NODE" = m ]; then
    # The manager's API answers before raft has a leader again.
    local deadline=$((SECONDS + START_TIMEOUT))
    until dk m node ls >/dev/null 2>&1; do
      [ $SECONDS -lt $deadline ] || fail m "the manager has no working raft after ${START_TIMEOUT}s"
      sleep 0.5
    done
    # After a manager restart the workers are "unknown" until they report in again.
    local i w
    for i in $(seq 1 "$(cat "$STATE/workers")"); do
      w=$(node_name "$i")
      [ -z "$(dockerd_pid "$w")" ] || wait_node_status "$(cat "$STATE/$w/node-id")" ready "$w"
    done
  else
    # Until it has reconnected to the manager, a worker's swarm state is "pending".
    local deadline=$((SECONDS + START_TIMEOUT)) st
    while st=$(dk "$NODE" info -f '{{.Swarm.LocalNodeState}}' 2>/dev/null); [ "$st" != active ]; do
      [ $SECONDS -lt $deadline ] || fail "$NODE" "node $NODE's swarm state is '$st', not active, after ${START_TIMEOUT}s"
      sleep 0.3
    done
    [ -z "$(dockerd_pid m)" ] || wait_node_status "$id" ready "$NODE"
  fi
  log "node $NODE started (${id}) in $((SECONDS - t0))s"
  grep -E "^SWARM_(NODE_${2}_|MANAGER_)" "$STATE/env" 2>/dev/null || true
}

# Removes everything of cluster $NAME. Never fails on what is already gone.
do_down() {
  local ns nodes=() node d l
  # Nodes: what the state dir recorded plus what exists under the derived names.
  while IFS= read -r ns; do
    [ -n "$ns" ] && [ "$ns" != "$HUB" ] && nodes+=("${ns#"$NAME"-}")
  done < <(
    { cat "$STATE/netns" 2>/dev/null; ip netns list 2>/dev/null | awk '{print $1}'; } |
      grep -E "^$(printf '%s' "$NAME" | sed 's/[.]/\\./g')-(m|w[0-9]+)$" | sort -u
  )
  for d in /sys/fs/cgroup/*/cfsw-"$ID"-* /sys/fs/cgroup/cfsw-"$ID"-*; do
    [ -d "$d" ] && nodes+=("${d##*/cfsw-"$ID"-}")
  done
  if [ ${#nodes[@]} -gt 0 ]; then
    mapfile -t nodes < <(printf '%s\n' "${nodes[@]}" | sort -u)
    for node in "${nodes[@]}"; do kill_node "$node"; done
  fi
  unmount_under "$STATE" "$RUN_DIR"
  for node in "${nodes[@]}"; do
    ns=$(node_ns "$node")
    [ -e "/var/run/netns/$ns" ] && { ip netns del "$ns" 2>/dev/null || log "warning: ip netns del $ns failed"; }
  done
  l=$(cat "$STATE/hostlink" 2>/dev/null || echo "$HOSTLINK")
  if ip -d link show "$l" 2>/dev/null | grep -qw veth; then ip link del "$l" 2>/dev/null || true; fi
  [ -e "/var/run/netns/$HUB" ] && { ip netns del "$HUB" 2>/dev/null || log "warning: ip netns del $HUB failed"; }
  # Container cgroups, deepest first (runc of a killed node never removed them).
  for d in /sys/fs/cgroup/*/cfsw-"$ID"-* /sys/fs/cgroup/cfsw-"$ID"-*; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  for d in "$STATE" "$RUN_DIR"; do
    [ -e "$d" ] || continue
    if [ -n "$(mounts_under "$d")" ]; then
      log "warning: still mounted under $d, not removing it: $(mounts_under "$d" | tr '\n' ' ')"
      continue
    fi
    rm -rf --one-file-system "$d"
  done
  rmdir "$RUN_ROOT" 2>/dev/null || true
  rm -f "$STATE_ROOT/.$NAME.lock"
  return 0
}

cmd_down() { # NAME
  set_names "$1"
  lock_name
  do_down
  log "cluster $NAME is down"
}

cmd_down_all() {
  local d n
  for d in "$STATE_ROOT"/*/ "$RUN_ROOT"/*/; do
    [ -f "$d/name" ] || continue
    n=$(cat "$d/name")
    ( cmd_down "$n" ) || log "warning: down $n failed"
  done
}

cmd_env() {
  set_names "$1"
  [ -f "$STATE/env" ] || { log "no cluster $NAME"; exit 1; }
  cat "$STATE/env"
}

[ $# -ge 1 ] || usage
case "$1" in
  up) [ $# -ge 2 ] && [ $# -le 3 ] || usage; cmd_up "$2" "${3:-2}" ;;
  stop-node) [ $# -eq 3 ] || usage; cmd_stop_node "$2" "$3" ;;
  start-node) [ $# -eq 3 ] || usage; cmd_start_node "$2" "$3" ;;
  env) [ $# -eq 2 ] || usage; cmd_env "$2" ;;
  down) [ $# -eq 2 ] || usage; cmd_down "$2" ;;
  down-all) [ $# -eq 1 ] || usage; cmd_down_all ;;
  -h | --help | help) usage ;;
  *) usage ;;
esac
