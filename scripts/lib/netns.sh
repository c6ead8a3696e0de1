# shellcheck shell=bash
# Network namespaces for tests. Everything created here is removed on exit (normal, failure,
# SIGINT/SIGTERM) through the cleanup registry in common.sh. Only 192.0.2.0/24 (TEST-NET-1)
# addresses, and only inside namespaces created here.
#
#   vk_netns_create [SUFFIX]         create "vk-test-$$[-SUFFIX]", lo up; sets VK_NETNS
#   vk_netns_exec CMD...             run CMD inside VK_NETNS
#   vk_netns_spawn LOG CMD...        start CMD in the background inside VK_NETNS, stdout+stderr to
#                                    LOG, killed on exit; sets VK_SPAWN_PID
#   vk_netns_add_tap NAME [ADDR]     persistent TAP NAME in VK_NETNS, ADDR (default 192.0.2.1/24),
#                                    up; QEMU's tap backend or vhostkit-net --tap opens it by name
#   vk_netns_add_veth NAME PEER [ADDR]  veth pair NAME<->PEER in VK_NETNS, ADDR on NAME, both up;
#                                    PEER is for an AF_PACKET backend
#   vk_netns_link_up NAME            1 unless NAME has carrier (operstate up) in VK_NETNS
#   vk_netns_delete                  kill every process in VK_NETNS, delete its links and itself
#
# Processes in the namespace are found with `ip netns pids`, so even children a test lost track
# of are killed before the namespace goes.
[[ -n ${VK_NETNS_SH:-} ]] && return 0
VK_NETNS_SH=1
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

VK_NETNS=${VK_NETNS:-}
VK_NETNS_LINKS=()

vk__check_testnet() {
  [[ $1 =~ ^192\.0\.2\.[0-9]{1,3}(/[0-9]{1,2})?$ ]] ||
    { echo "netns.sh: refusing address '$1': only 192.0.2.0/24 (TEST-NET-1)" >&2; return 1; }
}

vk_netns_create() {
  local name="vk-test-$$${1:+-$1}"
  vk_require_cmd ip
  if [[ -e /run/netns/$name ]]; then
    echo "netns.sh: namespace $name already exists" >&2
    return 1
  fi
  ip netns add "$name" || return 1
  VK_NETNS=$name
  vk_on_exit "vk_netns_delete '$name'"
  ip netns exec "$name" ip link set lo up
}

vk_netns_exec() {
  ip netns exec "$VK_NETNS" "$@"
}

vk_netns_spawn() {
  local log=$1; shift
  ip netns exec "$VK_NETNS" "$@" >"$log" 2>&1 &
  VK_SPAWN_PID=$!
  vk_track_pid "$VK_SPAWN_PID"
}

vk_netns_add_tap() {
  local name=$1 addr=${2:-192.0.2.1/24}
  vk__check_testnet "$addr" || return 1
  vk_netns_exec ip tuntap add dev "$name" mode tap || return 1
  VK_NETNS_LINKS+=("$name")
  vk_netns_exec ip addr add "$addr" dev "$name" || return 1
  vk_netns_exec ip link set "$name" up
}

vk_netns_add_veth() {
  local name=$1 peer=$2 addr=${3:-192.0.2.1/24}
  vk__check_testnet "$addr" || return 1
  vk_netns_exec ip link add "$name" type veth peer name "$peer" || return 1
  VK_NETNS_LINKS+=("$name")
  vk_netns_exec ip addr add "$addr" dev "$name" || return 1
  vk_netns_exec ip link set "$name" up &&
    vk_netns_exec ip link set "$peer" up
}

vk_netns_link_up() {
  local state
  state=$(vk_netns_exec cat "/sys/class/net/$1/operstate" 2>/dev/null)
  [[ $state == up ]]
}

vk_netns_delete() {
  local ns=${1:-$VK_NETNS} pids l i
  [[ -n $ns ]] || return 0
  [[ -e /run/netns/$ns ]] || return 0
  # Everything still running in the namespace: TERM, a moment, then KILL.
  pids=$(ip netns pids "$ns" 2>/dev/null)
  if [[ -n $pids ]]; then
    kill -TERM $pids 2>/dev/null
    for ((i = 0; i < 20; i++)); do
      pids=$(ip netns pids "$ns" 2>/dev/null)
      [[ -z $pids ]] && break
      sleep 0.1
    done
    [[ -n $pids ]] && kill -KILL $pids 2>/dev/null
  fi
  for l in "${VK_NETNS_LINKS[@]}"; do
    ip netns exec "$ns" ip link del "$l" 2>/dev/null
  done
  ip netns del "$ns" 2>/dev/null
  [[ $ns == "$VK_NETNS" ]] && VK_NETNS=
  return 0
}
