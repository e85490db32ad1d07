#!/usr/bin/env bash
# ferry demo: 3 nodes x 2 pods, all in network namespaces this script makes,
# on the file store. Shows the cross-node ping matrix, a TCP transfer, and a
# Service (ferryctl apply) answering from endpoints on every node, by
# ClusterIP and by NodePort from outside; then cleans up (--keep leaves
# everything up and prints how to look around).
#
# Never touches the root network namespace: every link, address, route and
# nft rule is created inside a namespace this script made (ip -n / ip netns
# exec). Needs root, iproute2, nftables, iputils-ping, iperf3 (optional), jq,
# python3 (the demo's little servers); scripts/deps.sh installs them.
set -euo pipefail

KEEP=0
NODES=3
PODS=2
STORE_KIND=file
for a in "$@"; do
    case "$a" in
        --keep) KEEP=1 ;;
        --nodes=*) NODES=${a#*=} ;;
        --pods=*) PODS=${a#*=} ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "unknown argument $a" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ID="fd$$"
TMP=$(mktemp -d "/tmp/ferry-demo.XXXXXX")
UL="$ID-ul"
BIN="${FERRY_BIN_DIR:-$ROOT/target/release}"
PIDS=()
NSES=()

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
info() { printf '    %s\n' "$*"; }

cleanup() {
    local rc=$?
    if [[ $KEEP == 1 && $rc == 0 ]]; then return; fi
    step "cleaning up"
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    for ns in "${NSES[@]}"; do ip netns delete "$ns" 2>/dev/null || true; done
    rm -rf "$TMP"
    info "removed ${#NSES[@]} namespaces and $TMP"
    exit $rc
}
trap cleanup EXIT INT TERM

mkns() { ip netns add "$1"; NSES+=("$1"); ip -n "$1" link set lo up; }

[[ $(id -u) == 0 ]] || { echo "run as root (it makes network namespaces)" >&2; exit 1; }
. "$ROOT/scripts/deps.sh"
ferry_demo_deps

if [[ -z ${FERRY_BIN_DIR:-} ]]; then
    step "building ferry, ferry-ipam and ferryd (release)"
    (cd "$ROOT" && cargo build --release -q -p ferry-plugin -p ferry-daemon)
fi
info "binaries in $BIN"

step "underlay: a bridge in namespace $UL, one veth per node (192.168.77.0/24)"
mkns "$UL"
ip -n "$UL" link add br0 type bridge
ip -n "$UL" addr add 192.168.77.254/24 dev br0
ip -n "$UL" link set br0 up
info "the underlay namespace is also the 'outside' host, 192.168.77.254"
for i in $(seq 1 "$NODES"); do
    N="$ID-n$i"
    mkns "$N"
    ip -n "$UL" link add "v$i" type veth peer name eth0 netns "$N"
    ip -n "$UL" link set "v$i" master br0 up
    ip -n "$N" addr add "192.168.77.$((10 + i))/24" dev eth0
    ip -n "$N" link set eth0 up
    ip -n "$N" route add default via 192.168.77.254
    info "node$i: namespace $N, underlay eth0 192.168.77.$((10 + i))"
done

step "starting one ferryd per node (store: file:$TMP/store)"
for i in $(seq 1 "$NODES"); do
    N="$ID-n$i"
    D="$TMP/node$i"
    mkdir -p "$D"
    ip netns exec "$N" "$BIN/ferryd" run \
        --node-name "node$i" --underlay-iface eth0 \
        --store "file:$TMP/store" \
        --cni-conf-dir "$D/net.d" --cni-bin-dir "$BIN" \
        --cni-data-dir "$D/ferry-data" --ipam-data-dir "$D/ipam" \
        --run-dir "$D/run" --reconcile-interval 2s \
        >"$D/ferryd.log" 2>&1 &
    PIDS+=($!)
done
for i in $(seq 1 "$NODES"); do
    D="$TMP/node$i"
    for _ in $(seq 100); do [[ -e "$D/run/ready" ]] && break; sleep 0.1; done
    [[ -e "$D/run/ready" ]] || { echo "node$i did not become ready:"; cat "$D/ferryd.log"; exit 1; }
    info "node$i ready: $(cat "$D/run/ready")"
done
info "conflist written by node1:"
sed 's/^/      /' "$TMP/node1/net.d/10-ferry.conflist"

step "adding $PODS pods per node with the ferry plugin and the conflist ferryd wrote"
declare -A POD_IP
cni() { # node-index pod-ns command
    local i=$1 pod=$2 cmd=$3 D="$TMP/node$1"
    jq '{cniVersion, name} + .plugins[0]' "$D/net.d/10-ferry.conflist" |
        ip netns exec "$ID-n$i" env CNI_COMMAND="$cmd" CNI_CONTAINERID="$pod" \
            CNI_NETNS="/var/run/netns/$pod" CNI_IFNAME=eth0 CNI_PATH="$BIN" "$BIN/ferry"
}
for i in $(seq 1 "$NODES"); do
    for j in $(seq 1 "$PODS"); do
        P="$ID-n$i-p$j"
        mkns "$P"
        ip=$(cni "$i" "$P" ADD | jq -r '.ips[0].address' | cut -d/ -f1)
        POD_IP[$P]=$ip
        info "node$i/pod$j: namespace $P, eth0 $ip"
    done
done

step "node1's view of the overlay"
ip -n "$ID-n1" -d link show "ferry.1" | sed 's/^/    /' | head -4
info "routes:";     ip -n "$ID-n1" route show proto 0xfe | sed 's/^/      /'
info "neighbours:"; ip -n "$ID-n1" neigh show dev ferry.1 | sed 's/^/      /'
info "fdb:";        bridge -n "$ID-n1" fdb show dev ferry.1 | sed 's/^/      /'

step "ping matrix (every pod to every pod, 1 packet each)"
ALL=()
for i in $(seq 1 "$NODES"); do for j in $(seq 1 "$PODS"); do ALL+=("$ID-n$i-p$j"); done; done
printf '    %-14s' "from\\to"
for d in "${ALL[@]}"; do printf '%-14s' "${d#"$ID"-}"; done
echo
FAIL=0
for s in "${ALL[@]}"; do
    printf '    %-14s' "${s#"$ID"-}"
    for d in "${ALL[@]}"; do
        if [[ $s == "$d" ]]; then printf '%-14s' "-"; continue; fi
        if ip netns exec "$s" ping -c1 -W2 -q "${POD_IP[$d]}" >/dev/null 2>&1; then
            printf '%-14s' "ok"
        else
            printf '%-14s' "FAIL"; FAIL=1
        fi
    done
    echo
done
[[ $FAIL == 0 ]] || { echo "some pings failed"; exit 1; }

SRC="$ID-n1-p1"; DST="$ID-n$NODES-p1"
step "TCP transfer between pods on different nodes (${SRC#"$ID"-} -> ${DST#"$ID"-})"
if command -v iperf3 >/dev/null; then
    ip netns exec "$DST" iperf3 -s -1 -D -B "${POD_IP[$DST]}" --logfile "$TMP/iperf3-server.log"
    sleep 0.3
    ip netns exec "$SRC" iperf3 -c "${POD_IP[$DST]}" -t 2 -f g | grep -E 'sender|receiver' | sed 's/^/    /'
    info "the server saw the client as: $(grep -m1 'Accepted connection from' "$TMP/iperf3-server.log" | sed 's/.*from \([0-9.]*\).*/\1/') (pod ${POD_IP[$SRC]}: not masqueraded)"
else
    info "iperf3 not installed; skipping"
fi

step "a Service with an endpoint on every node (ferryctl apply)"
# Each node's first pod answers every connection with its name.
for i in $(seq 1 "$NODES"); do
    ip netns exec "$ID-n$i-p1" python3 -c "
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 8080)); s.listen(64)
while True:
    c, a = s.accept(); c.sendall(b'node$i/pod1'); c.close()
" &
    PIDS+=($!)
done
{
    cat <<YAML
apiVersion: v1
kind: Service
metadata: {name: hello}
spec:
  type: NodePort
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hello-1, labels: {kubernetes.io/service-name: hello}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
YAML
    for i in $(seq 1 "$NODES"); do
        echo "- {addresses: [${POD_IP[$ID-n$i-p1]}], nodeName: node$i}"
    done
} >"$TMP/hello.yaml"
sed 's/^/      /' "$TMP/hello.yaml"
CTL=("$BIN/ferryctl" --store "file:$TMP/store")
"${CTL[@]}" apply -f "$TMP/hello.yaml" 2>&1 | sed 's/^/    /'
"${CTL[@]}" get services | sed 's/^/    /'
CIP=$("${CTL[@]}" get services -o json | jq -r '.items[0].spec.clusterIP')
NPORT=$("${CTL[@]}" get services -o json | jq -r '.items[0].spec.ports[0].nodePort')
ask() { # netns ip port count: who answered, counted
    ip netns exec "$1" python3 -c "
import socket, collections
n = collections.Counter()
for _ in range($4):
    try:
        s = socket.create_connection(('$2', $3), timeout=2); n[s.recv(64).decode().strip()] += 1; s.close()
    except OSError as e:
        n[type(e).__name__] += 1
print(', '.join('%s: %d' % kv for kv in sorted(n.items())))
"
}
CLIENT="$ID-n1-p$PODS"
for _ in $(seq 50); do
    [[ $(ask "$CLIENT" "$CIP" 80 1) == node* ]] && break
    sleep 0.1
done
info "30 requests from ${CLIENT#"$ID"-} to $CIP:80 (ClusterIP): $(ask "$CLIENT" "$CIP" 80 30)"
info "30 requests from outside (192.168.77.254) to node2's 192.168.77.12:$NPORT (NodePort): $(ask "$UL" 192.168.77.12 "$NPORT" 30)"
info "node1's status (ferryctl status):"
ip netns exec "$ID-n1" "$BIN/ferryctl" status | sed 's/^/      /'

if [[ $KEEP == 1 ]]; then
    step "left running (--keep). Look around:"
    info "ip netns list | grep $ID"
    info "ip netns exec $ID-n1 ip route show proto 0xfe"
    info "ip netns exec $ID-n1 bridge fdb show dev ferry.1"
    info "ip netns exec $ID-n1 nft list table inet ferry"
    info "ip netns exec $ID-n1 nft list table inet ferry-svc"
    info "$BIN/ferryctl --store file:$TMP/store get services"
    info "ip netns exec $ID-n1-p1 ping ${POD_IP[$ID-n$NODES-p$PODS]}"
    info "logs: $TMP/node*/ferryd.log ; ferryd pids: ${PIDS[*]}"
    info "clean up: kill ${PIDS[*]}; for n in \$(ip netns list | awk '{print \$1}' | grep '^$ID-'); do ip netns delete \$n; done; rm -rf $TMP"
fi
step "done"
