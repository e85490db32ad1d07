#!/usr/bin/env bash
# Overlay benchmark (not a test). All in one run, in network namespaces this
# script makes (never the root namespace), with iperf3 and ping:
#
#   underlay     node <-> node over the underlay bridge (the ceiling)
#   hand-vxlan   pod -> pod through a VXLAN overlay built by hand with `ip`
#                exactly as flannel's VXLAN backend does (nolearning device,
#                permanent neighbour + FDB, onlink route, MTU - 50)
#   hand-direct  the same pods with a plain route via the peer (no encap)
#   ferry-vxlan  pod -> pod through ferryd's overlay, pods wired by `ferry`
#   ferry-direct pod -> pod with ferryd --direct-routing (same L2: no encap)
#   ferry-vxlan-nomasq  ferry-vxlan with --masquerade false (no nat chain,
#                so no conntrack: what the hand-built paths have)
#
# and node-join convergence: a new node's ferryd starts -> a pod on it is
# reachable from every existing pod, on the file store and on etcd.
#
# Usage: scripts/bench-overlay.sh [--time=SECONDS] [--repeat=N] [--no-build]
#        [--paths=underlay,hand-vxlan,...] [--no-converge]
#        [--gro]   turn GRO on on every node's underlay veth (as on a real NIC)
set -euo pipefail

TIME=5
REPEAT=5
BUILD=1
ONLY=""
CONVERGE=1
GRO=0
for a in "$@"; do
    case "$a" in
        --time=*) TIME=${a#*=} ;;
        --repeat=*) REPEAT=${a#*=} ;;
        --no-build) BUILD=0 ;;
        --paths=*) ONLY=${a#*=} ;;
        --no-converge) CONVERGE=0 ;;
        --gro) GRO=1 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "unknown argument $a" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN="${FERRY_BIN_DIR:-$ROOT/target/release}"
ID="fb$$"
TMP=$(mktemp -d /tmp/ferry-bench.XXXXXX)
NSES=()
PIDS=()
declare -A RESULT

need() { # command package
    command -v "$1" >/dev/null && return
    echo "installing $2 ..." >&2
    apt-get install -y -q "$2" >/dev/null
}
[[ $GRO == 0 ]] || need ethtool ethtool
need iperf3 iperf3; need ping iputils-ping; need jq jq; need nft nftables; need etcd etcd-server

cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    for ns in "${NSES[@]}"; do ip netns delete "$ns" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

log() { printf '%s\n' "$*" >&2; }
mkns() { ip netns add "$1"; NSES+=("$1"); ip -n "$1" link set lo up; }
x() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# One underlay (bridge in its own namespace) with N node namespaces.
# underlay <tag> <nodes>  -> namespaces $ID-<tag>-ul, $ID-<tag>-n<i>
underlay() {
    local tag=$1 n=$2 ul="$ID-$1-ul"
    mkns "$ul"
    ip -n "$ul" link add br0 type bridge
    ip -n "$ul" addr add 192.168.77.254/24 dev br0
    ip -n "$ul" link set br0 up
    for i in $(seq 1 "$n"); do add_node "$tag" "$i"; done
}
add_node() {
    local tag=$1 i=$2 ul="$ID-$1-ul" N="$ID-$1-n$2"
    mkns "$N"
    ip -n "$ul" link add "v$i" type veth peer name eth0 netns "$N"
    ip -n "$ul" link set "v$i" master br0 up
    ip -n "$N" addr add "192.168.77.$((10 + i))/24" dev eth0
    ip -n "$N" link set eth0 up
    # A real NIC receives with GRO on; a veth does not by default. With it,
    # VXLAN packets are aggregated before decapsulation (UDP tunnel GRO).
    [[ $GRO == 0 ]] || x "$N" ethtool -K eth0 gro on
}

# One iperf3 run from ns $1 to address $2 (server in ns $3); prints Gbit/s.
tput_once() {
    x "$3" iperf3 -s -1 -D -B "$2" >/dev/null
    sleep 0.2
    local bps
    bps=$(x "$1" iperf3 -c "$2" -t "$TIME" -J | jq '.end.sum_received.bits_per_second')
    echo "scale=2; $bps / 1000000000" | bc
    sleep 0.2
}

# Average RTT in ms of 200 pings.
rtt() {
    x "$1" ping -n -q -c 200 -i 0.005 "$2" | awk -F/ '/^rtt/ {print $5}'
}

median() { printf '%s\n' "$@" | sort -n | sed -n "$((($# + 1) / 2))p"; }

# Paths to measure: name -> "client-ns addr server-ns". All are built
# first and then measured round-robin, so that drift in the machine's speed
# (other load, a VM's neighbours) hits every path alike.
declare -A PATHSPEC
ORDER=()
path() {
    [[ -z $ONLY || ",$ONLY," == *",$1,"* ]] || return 0
    PATHSPEC[$1]="$2 $3 $4"; ORDER+=("$1")
}

start_ferryd() { # tag node-index store [extra args]
    local tag=$1 i=$2 store=$3 D="$TMP/$1/node$2"
    shift 3
    mkdir -p "$D"
    # `ip netns exec` directly (not via a shell function) so that $! is
    # ferryd itself and teardown can kill it.
    ip netns exec "$ID-$tag-n$i" "$BIN/ferryd" run --node-name "node$i" --underlay-iface eth0 \
        --store "$store" --cni-conf-dir "$D/net.d" --cni-bin-dir "$BIN" \
        --cni-data-dir "$D/data" --ipam-data-dir "$D/ipam" --run-dir "$D/run" \
        --listen off --log-level warn "$@" >>"$D/ferryd.log" 2>&1 &
    PIDS+=($!)
}
wait_ready() { # tag node-index
    local f="$TMP/$1/node$2/run/ready"
    for _ in $(seq 1 500); do [[ -e $f ]] && return; sleep 0.01; done
    log "node$2 of $1 not ready"; cat "$TMP/$1/node$2/ferryd.log" >&2; exit 1
}
add_pod() { # tag node-index pod-name; sets POD_IP (no subshell: NSES must see the pod)
    local tag=$1 i=$2 pod="$ID-$1-$3" D="$TMP/$1/node$2"
    mkns "$pod"
    POD_IP=$(jq '{cniVersion, name} + .plugins[0]' "$D/net.d/10-ferry.conflist" |
        x "$ID-$tag-n$i" env CNI_COMMAND=ADD CNI_CONTAINERID="$3" CNI_NETNS="/var/run/netns/$pod" \
            CNI_IFNAME=eth0 CNI_PATH="$BIN" "$BIN/ferry" | jq -r '.ips[0].address' | cut -d/ -f1)
}
teardown() { # kill ferryds, delete namespaces of this phase
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
    for ns in "${NSES[@]}"; do ip netns delete "$ns" 2>/dev/null || true; done
    NSES=()
}

if [[ $BUILD == 1 && -z ${FERRY_BIN_DIR:-} ]]; then
    log "building (release) ..."
    (cd "$ROOT" && cargo build --release -q -p ferry-plugin -p ferry-daemon)
fi
log "machine: $(nproc) cores, kernel $(uname -r)"

# --- underlay ---------------------------------------------------------------
log "underlay (node <-> node)"
underlay u 2
path underlay "$ID-u-n1" 192.168.77.12 "$ID-u-n2"

# --- hand-built references ------------------------------------------------------
# The same pod topology as ferry's (pod veth -> node bridge -> node routing),
# built with `ip` alone: over VXLAN exactly as flannel's VXLAN backend does,
# or with a plain route via the peer's underlay address (flannel's
# DirectRouting).
mac() { printf '02:fe:00:00:00:%02x' "$1"; }
hand() { # vxlan|direct
    local mode=$1 tag="h$1"
    underlay "$tag" 2
    for i in 1 2; do
        local N="$ID-$tag-n$i" P="$ID-$tag-p$i" j=$((3 - i))
        x "$N" sysctl -qw net.ipv4.ip_forward=1
        if [[ $mode == vxlan ]]; then
            ip -n "$N" link add flannel.1 type vxlan id 1 local "192.168.77.$((10 + i))" dev eth0 dstport 8472 nolearning
            ip -n "$N" link set flannel.1 mtu 1450 address "$(mac "$i")" up
            ip -n "$N" addr add "10.245.$i.0/32" dev flannel.1
            ip -n "$N" neigh replace "10.245.$j.0" lladdr "$(mac "$j")" dev flannel.1 nud permanent
            bridge -n "$N" fdb replace "$(mac "$j")" dev flannel.1 dst "192.168.77.$((10 + j))" self permanent
            ip -n "$N" route replace "10.245.$j.0/24" via "10.245.$j.0" dev flannel.1 onlink
        else
            ip -n "$N" route replace "10.245.$j.0/24" via "192.168.77.$((10 + j))" dev eth0
        fi
        ip -n "$N" link add cni0 type bridge
        ip -n "$N" link set cni0 mtu 1450 up
        ip -n "$N" addr add "10.245.$i.1/24" dev cni0
        mkns "$P"
        ip -n "$N" link add veth0 mtu 1450 type veth peer name eth0 mtu 1450 netns "$P"
        ip -n "$N" link set veth0 master cni0 up
        ip -n "$P" addr add "10.245.$i.2/24" dev eth0
        ip -n "$P" link set eth0 up
        ip -n "$P" route add default via "10.245.$i.1"
    done
    x "$ID-$tag-p1" ping -c1 -W2 -q 10.245.2.2 >/dev/null
    path "hand-$mode" "$ID-$tag-p1" 10.245.2.2 "$ID-$tag-p2"
}
log "hand-built flannel-style VXLAN (pod -> pod)"
hand vxlan
log "hand-built direct route (pod -> pod)"
hand direct

# --- ferry VXLAN and DirectRouting ---------------------------------------------
for mode in vxlan direct vxlan-nomasq; do
    [[ -z $ONLY || ",$ONLY," == *",ferry-$mode,"* ]] || continue
    log "ferry $mode (pod -> pod, ferryd on the file store)"
    extra=()
    [[ $mode == direct ]] && extra=(--direct-routing)
    # Egress masquerade off: no nat chain, so no conntrack on the path (as in
    # the hand-built references, which have no masquerade either).
    [[ $mode == vxlan-nomasq ]] && extra=(--masquerade false)
    underlay "f$mode" 2
    for i in 1 2; do start_ferryd "f$mode" "$i" "file:$TMP/f$mode/store" "${extra[@]}"; done
    for i in 1 2; do wait_ready "f$mode" "$i"; done
    add_pod "f$mode" 1 p1
    add_pod "f$mode" 2 p2
    ip2=$POD_IP
    x "$ID-f$mode-p1" ping -c1 -W2 -q "$ip2" >/dev/null
    path "ferry-$mode" "$ID-f$mode-p1" "$ip2" "$ID-f$mode-p2"
done

log "measuring ${ORDER[*]}: iperf3 ${TIME}s x $REPEAT each, round-robin; 200 pings each"
declare -A RUNS
for r in $(seq 1 "$REPEAT"); do
    for p in "${ORDER[@]}"; do
        # shellcheck disable=SC2086
        g=$(tput_once ${PATHSPEC[$p]})
        RUNS[$p]="${RUNS[$p]:-} $g"
        log "  round $r: $p $g Gbit/s"
    done
done
for p in "${ORDER[@]}"; do
    # shellcheck disable=SC2086
    RESULT[$p-gbps]=$(median ${RUNS[$p]})
    set -- ${PATHSPEC[$p]}
    RESULT[$p-rtt]=$(rtt "$1" "$2")
done
teardown

# --- node-join convergence -----------------------------------------------------
# t0: the new node's ferryd starts. ready: it wrote its readiness file (subnet
# allocated, overlay up, conflist written). reachable: a pod added on it right
# then answers a ping from every existing pod (plugin ADD included).
converge() { # store-kind
    local kind=$1 tag="c$1" store
    underlay "$tag" 3
    if [[ $kind == etcd ]]; then
        mkdir -p "$TMP/$tag"
        ip netns exec "$ID-$tag-ul" etcd --name default --data-dir "$TMP/$tag/etcd" \
            --listen-client-urls http://192.168.77.254:2379 --advertise-client-urls http://192.168.77.254:2379 \
            --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
            --initial-cluster default=http://127.0.0.1:2380 >"$TMP/$tag/etcd.log" 2>&1 &
        PIDS+=($!)
        for _ in $(seq 100); do x "$ID-$tag-ul" bash -c 'exec 3<>/dev/tcp/192.168.77.254/2379' 2>/dev/null && break; sleep 0.1; done
        store=etcd:http://192.168.77.254:2379
    else
        store="file:$TMP/$tag/store"
    fi
    local pods=()
    for i in 1 2 3; do start_ferryd "$tag" "$i" "$store"; done
    for i in 1 2 3; do wait_ready "$tag" "$i"; done
    for i in 1 2 3; do
        add_pod "$tag" "$i" "p$i"; pods+=("$ID-$tag-p$i")
    done
    add_node "$tag" 4
    local t0 t_ready t_reach newip
    t0=$(date +%s%N)
    start_ferryd "$tag" 4 "$store"
    wait_ready "$tag" 4
    t_ready=$(date +%s%N)
    add_pod "$tag" 4 p4
    newip=$POD_IP
    local ok=()
    while :; do
        for k in 0 1 2; do
            [[ -n ${ok[$k]:-} ]] && continue
            x "${pods[$k]}" ping -c1 -W0.2 -q "$newip" >/dev/null 2>&1 && ok[$k]=1
        done
        [[ ${#ok[@]} == 3 ]] && break
        (( $(date +%s%N) - t0 > 20000000000 )) && { log "not converged after 20 s"; break; }
    done
    t_reach=$(date +%s%N)
    RESULT[converge-$kind-ready]=$(( (t_ready - t0) / 1000000 ))
    RESULT[converge-$kind-reach]=$(( (t_reach - t0) / 1000000 ))
    log "  $kind: ready after ${RESULT[converge-$kind-ready]} ms, reachable from all 3 existing pods after ${RESULT[converge-$kind-reach]} ms"
    teardown
}
if [[ $CONVERGE == 1 ]]; then
    log "node-join convergence"
    converge file
    converge etcd
fi
[[ -z $ONLY ]] || { log "partial run (--paths): no summary"; for p in "${ORDER[@]}"; do log "$p: median ${RESULT[$p-gbps]} Gbit/s, rtt ${RESULT[$p-rtt]} ms"; done; exit 0; }

ratio() { [[ $1 == n/a || $2 == n/a ]] && { echo n/a; return; }; echo "scale=3; $1 / $2" | bc; }
cat <<EOF

ferry overlay benchmark (underlay GRO $([[ $GRO == 1 ]] && echo on || echo off), $(nproc) cores, kernel $(uname -r), iperf3 ${TIME}s, median of $REPEAT round-robin runs, 1 TCP stream)
runs (Gbit/s): $(for p in "${ORDER[@]}"; do printf '%s:%s ' "$p" "$(echo ${RUNS[$p]} | tr ' ' ',')"; done)

path                               Gbit/s   rtt ms
underlay node<->node               $(printf '%6s' "${RESULT[underlay-gbps]:-n/a}")   ${RESULT[underlay-rtt]:-n/a}
hand-built flannel VXLAN pod->pod  $(printf '%6s' "${RESULT[hand-vxlan-gbps]:-n/a}")   ${RESULT[hand-vxlan-rtt]:-n/a}
ferry VXLAN pod->pod               $(printf '%6s' "${RESULT[ferry-vxlan-gbps]:-n/a}")   ${RESULT[ferry-vxlan-rtt]:-n/a}
ferry VXLAN, masquerade off        $(printf '%6s' "${RESULT[ferry-vxlan-nomasq-gbps]:-n/a}")   ${RESULT[ferry-vxlan-nomasq-rtt]:-n/a}
hand-built direct route pod->pod   $(printf '%6s' "${RESULT[hand-direct-gbps]:-n/a}")   ${RESULT[hand-direct-rtt]:-n/a}
ferry DirectRouting pod->pod       $(printf '%6s' "${RESULT[ferry-direct-gbps]:-n/a}")   ${RESULT[ferry-direct-rtt]:-n/a}

ferry VXLAN / hand-built VXLAN     $(ratio "${RESULT[ferry-vxlan-gbps]:-n/a}" "${RESULT[hand-vxlan-gbps]:-n/a}")   (target >= 0.98)
  same, masquerade off             $(ratio "${RESULT[ferry-vxlan-nomasq-gbps]:-n/a}" "${RESULT[hand-vxlan-gbps]:-n/a}")
ferry DirectRouting / underlay     $(ratio "${RESULT[ferry-direct-gbps]:-n/a}" "${RESULT[underlay-gbps]:-n/a}")   (target >= 0.95; the pod path adds two veth+bridge hops)
ferry DirectRouting / hand direct  $(ratio "${RESULT[ferry-direct-gbps]:-n/a}" "${RESULT[hand-direct-gbps]:-n/a}")

node join (new ferryd -> ready / -> pod on it reachable from every existing pod)
file store                         ${RESULT[converge-file-ready]:-n/a} ms / ${RESULT[converge-file-reach]:-n/a} ms   (target <= 1000)
etcd                               ${RESULT[converge-etcd-ready]:-n/a} ms / ${RESULT[converge-etcd-reach]:-n/a} ms   (target <= 2000)
EOF
