#!/usr/bin/env bash
# Single-node demo of the ferry CNI plugin alone (no ferryd): a "node" and
# three "pods", all network namespaces this script makes, wired by running
# `ferry` exactly as a container runtime would. Shows the result JSON, the
# pods pinging each other and the gateway, the masquerade map, then DELs
# everything and shows nothing is left. Never touches the root namespace.
# Usage: sudo scripts/demo-plugin.sh [--keep]
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=0; [ "${1:-}" = "--keep" ] && KEEP=1
[ "$(id -u)" -eq 0 ] || { echo "needs root (it makes network namespaces)" >&2; exit 1; }
. scripts/deps.sh
ferry_demo_deps

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
ID="fdp$$"; NODE="$ID-node"; PODS=("$ID-a" "$ID-b" "$ID-c")
DATA=$(mktemp -d /tmp/ferry-demo-plugin.XXXXXX)
BIN="$PWD/target/release"
cleanup() {
  rc=$?
  if [ $KEEP = 1 ] && [ $rc = 0 ]; then return; fi
  for ns in "$NODE" "${PODS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$DATA"
  exit $rc
}
trap cleanup EXIT INT TERM

step "building ferry and ferry-ipam (release)"
cargo build --release --quiet -p ferry-plugin

step "namespaces: node $NODE, pods ${PODS[*]}"
ip netns add "$NODE"; ip -n "$NODE" link set lo up
for p in "${PODS[@]}"; do ip netns add "$p"; done

CONF=$(cat <<JSON
{"cniVersion":"1.1.0","name":"demo","type":"ferry","bridge":"cni0",
 "isDefaultGateway":true,"ipMasq":true,"hairpinMode":true,"dataDir":"$DATA/ferry",
 "ipam":{"type":"ferry-ipam","dataDir":"$DATA/ipam",
         "ranges":[[{"subnet":"10.88.0.0/24"}],[{"subnet":"fd88::/64"}]]}}
JSON
)
cni() { # verb pod
  echo "$CONF" | ip netns exec "$NODE" env CNI_COMMAND="$1" CNI_CONTAINERID="$2" \
    CNI_NETNS="/run/netns/$2" CNI_IFNAME=eth0 CNI_PATH="$BIN:/usr/lib/cni" "$BIN/ferry"
}

for p in "${PODS[@]}"; do
  step "ADD $p"
  cni ADD "$p" | tee "$DATA/$p.result" | jq -c '{ips: [.ips[].address], routes: [.routes[].dst]}'
done

step "ping matrix (IPv4 and IPv6)"
addr() { ip -n "$1" -j addr show eth0 | jq -r ".[0].addr_info[] | select(.family==\"$2\" and .scope==\"global\") | .local"; }
for from in "${PODS[@]}"; do
  for to in "${PODS[@]}"; do
    [ "$from" = "$to" ] && continue
    for fam in inet inet6; do
      a=$(addr "$to" $fam)
      if ip netns exec "$from" ping -c1 -W1 "$a" >/dev/null; then r=ok; else r=FAIL; fi
      printf '    %-10s -> %-10s %-14s %s\n' "${from#$ID-}" "${to#$ID-}" "$a" "$r"
      [ $r = ok ]
    done
  done
done
ip netns exec "${PODS[0]}" ping -c1 -W1 10.88.0.1 >/dev/null && echo "    pod a -> gateway 10.88.0.1 ok"

step "the node's nftables masquerade (one element per pod, keyed by attachment)"
ip netns exec "$NODE" nft list map inet ferry cni-masq4

step "CHECK ${PODS[0]} against its ADD result (prevResult)"
CONF=$(jq -c --slurpfile prev "$DATA/${PODS[0]}.result" '. + {prevResult: $prev[0]}' <<<"$CONF")
cni CHECK "${PODS[0]}" && echo "    CHECK ok"
CONF=$(jq -c 'del(.prevResult)' <<<"$CONF")

if [ $KEEP = 1 ]; then
  step "left up: try  ip netns exec ${PODS[0]} ping $(addr "${PODS[1]}" inet)  and  ip netns exec $NODE nft list ruleset"
  echo "    remove with: ip netns del $NODE; for p in ${PODS[*]}; do ip netns del \$p; done; rm -rf $DATA"
  exit 0
fi

for p in "${PODS[@]}"; do step "DEL $p"; cni DEL "$p"; done
step "left on the node after DEL: links, nftables, leases"
ip -n "$NODE" -br link
echo "    nft tables: $(ip netns exec "$NODE" nft list tables | wc -l)"
echo "    leases: $(find "$DATA/ipam/demo" -maxdepth 1 -name '10.*' -o -maxdepth 1 -name 'fd*' | wc -l)"
