#!/usr/bin/env bash
# Services benchmark (not a test): ferryd's Services proxy against
# kube-proxy's nftables layout, in one run, in network namespaces this
# script makes (never the root namespace; nothing in /etc/cni, /opt/cni,
# /var/lib/cni: every CNI directory is in a temp dir).
#
# Setup: an underlay namespace (bridge) and one node namespace on it running
# ferryd (file store in a temp dir, --cluster-cidr 10.244.0.0/16); pods added
# with the `ferry` plugin and the conflist that ferryd wrote: 5 endpoint pods
# and 1 spare each serving TCP 8080 (python3, answers its name and closes),
# and 1 client pod. Every Service has port 80 -> 8080, an explicit clusterIP
# from 10.96.0.10 upwards and one EndpointSlice of the same 5 pods.
#
#  1. full programming, for each size in SERVICES: `ferryctl apply -f` of one
#     YAML file with N Services + N slices; time from the start of apply to
#     all live: the later of the moment the LAST Service's ClusterIP answers
#     a TCP connect from the client pod (a new non-blocking connect every
#     POLL_US us, many in flight) and the end of ferryd's sync that left all
#     N programmed (its log line follows the commit); also the apply alone
#     and ferryd's own "services synced ... took_ms=" log lines. Then every
#     ClusterIP is checked once.
#     Reference: kube-proxy's nftables layout for the same N x 5 (a chain per
#     Service and per endpoint, service-ips vmap, numgen vmap), written to a
#     file and loaded with `nft -f` into a fresh namespace (timed).
#  2. one change at the largest size (REPEAT times each): one new Service
#     with endpoints -> its ClusterIP answers; one endpoint of s-0 replaced
#     by the spare pod -> the spare pod answers through s-0 (polled every
#     CHANGE_POLL_US us).
#  3. connect latency (connect + first byte, sequential, CONNECTS of them)
#     to s-0's ClusterIP with 10 and with the largest size programmed, and
#     to a pod IP directly (no Service) as the floor. The 10 Services live on
#     a second node (own underlay, store and ferryd) so that the series can
#     be measured in alternating rounds: load on the machine drifts.
#  4. ferryd VmRSS / VmHWM at the largest size. Then, to see where time
#     goes: a whole read of the store (`ferryctl get services`), the size of
#     ferry's table and an `nft list` of it; for every step, ferryd's syncs
#     on the same clock as the apply (from the timestamps of its log).
#
# Usage: scripts/bench-services.sh [--no-build] [--no-reference]
# Env:   SERVICES="1000 10000"  REPEAT=5  CONNECTS=2000  POLL_US=1000
#        CHANGE_POLL_US=200  LOG_LEVEL=info
# Needs root. Installs what is missing with scripts/deps.sh.
set -euo pipefail

BUILD=1
REFERENCE=1
for a in "$@"; do
    case "$a" in
        --no-build) BUILD=0 ;;
        --no-reference) REFERENCE=0 ;;
        -h|--help) sed -n '2,42p' "$0"; exit 0 ;;
        *) echo "unknown argument $a" >&2; exit 2 ;;
    esac
done
SERVICES=${SERVICES:-"1000 10000"}
REPEAT=${REPEAT:-5}
CONNECTS=${CONNECTS:-2000}
POLL_US=${POLL_US:-1000}
CHANGE_POLL_US=${CHANGE_POLL_US:-200}
LOG_LEVEL=${LOG_LEVEL:-info}
BASE=10   # the small size the connect latency is compared against
for n in $SERVICES; do [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 100000 ]] || { echo "SERVICES: sizes 1..100000" >&2; exit 2; }; done
BIG=$(printf '%s\n' $SERVICES | sort -n | tail -1)
[ "$(id -u)" -eq 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. scripts/deps.sh
ferry_install_deps
BIN="${FERRY_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}"
HELP="$ROOT/scripts/bench-services.py"
PY=/usr/bin/python3
ID="fs$$"
TMP=$(mktemp -d /tmp/ferry-bench-svc.XXXXXX)
NSES=()
PIDS=()
FERRYD_PID=
T=

cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
    for ns in "${NSES[@]}"; do ip netns delete "$ns" 2>/dev/null; done
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM
trap 'echo "FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

log() { printf '%s\n' "$*" >&2; }
die() { log "FAILED: $*"; if [[ -f ${LOGF:-/nonexistent} ]]; then log "--- ferryd log of node $T (tail) ---"; tail -20 "$LOGF" >&2; fi; exit 1; }
mkns() { ip netns add "$1"; NSES+=("$1"); ip -n "$1" link set lo up; }
x() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
jget() { $PY -c 'import json,sys; v=json.loads(sys.argv[1]).get(sys.argv[2]); print("n/a" if v is None else (("%.1f" % v) if isinstance(v, float) else v))' "$1" "$2"; }
ratio() { [[ $1 == n/a || $2 == n/a || $2 == 0 ]] && { echo n/a; return; }; $PY -c "import sys; print('%.3f' % (float(sys.argv[1]) / float(sys.argv[2])))" "$1" "$2"; }
median() { printf '%s\n' "$@" | sort -g | sed -n "$((($# + 1) / 2))p"; }
maxof() { printf '%s\n' "$@" | sort -g | tail -1; }

if [[ $BUILD == 1 && -z ${FERRY_BIN_DIR:-} ]]; then
    log "building (release) ..."
    cargo build --release -q -p ferry-daemon -p ferry-plugin
fi
for b in ferryd ferryctl ferry ferry-ipam; do [[ -x $BIN/$b ]] || die "$BIN/$b missing: cargo build --release -p ferry-daemon -p ferry-plugin"; done
log "machine: $(nproc) cores, kernel $(uname -r), $(nft --version)"

declare -A R

# --- reference: kube-proxy's nftables layout, loaded with nft -f ---------------
# Pod IPs do not matter for a load into an empty namespace; the same shape
# as ferry's case (5 endpoints on 10.244.x).
if [[ $REFERENCE == 1 ]]; then
    for n in $SERVICES; do
        f="$TMP/kube-proxy-$n.nft"
        $PY "$HELP" gen-kube-proxy "$n" "$f" 10.244.0.2 10.244.0.3 10.244.0.4 10.244.0.5 10.244.0.6
        ns="$ID-ref$n"
        mkns "$ns"
        log "reference: nft -f kube-proxy layout, $n Services x 5 ($(wc -l <"$f") commands) ... (~30 s at 10k here)"
        t0=$(date +%s%N)
        x "$ns" nft -f "$f" || die "nft -f $f"
        R[ref-$n]=$(ms_since "$t0")
        chains=$(x "$ns" nft list table ip kube-proxy | grep -c "^\s*chain ")
        log "  loaded in ${R[ref-$n]} ms ($chains chains)"
        ip netns delete "$ns"
        rm -f "$f"
    done
fi

# --- the ferry nodes ---------------------------------------------------------------
# Node "a" takes the sizes of SERVICES; node "b" (its own underlay, store and
# ferryd: a cluster of its own) holds the 10 Services the connect latency is
# compared against, so both can be measured in alternating rounds (this
# machine is shared: load drifts).
declare -A EPSS SPARES FPIDS
use() { # tag: make node <tag> the current one
    T=$1
    STORE="file:$TMP/$T/store"; NODE="$ID-$T-n1"; D="$TMP/$T/node1"; LOGF="$TMP/$T/ferryd.log"
    CLIENT="$ID-$T-client"
    read -r -a EPS <<<"${EPSS[$T]:-}"
    SPARE_IP=${SPARES[$T]:-}; FERRYD_PID=${FPIDS[$T]:-}
}
add_pod() { # name; sets POD_IP
    local pod="$ID-$T-$1"
    mkns "$pod"
    POD_IP=$(jq '{cniVersion, name} + .plugins[0]' "$D/net.d/10-ferry.conflist" |
        x "$NODE" env CNI_COMMAND=ADD CNI_CONTAINERID="$1" CNI_NETNS="/var/run/netns/$pod" \
            CNI_IFNAME=eth0 CNI_PATH="$BIN" "$BIN/ferry" | jq -r '.ips[0].address' | cut -d/ -f1)
    [[ $POD_IP =~ ^[0-9.]+$ ]] || die "ADD of pod $1"
}
serve() { # name
    # `ip netns exec` directly so that $! is the server itself: through
    # the x function, $! was a subshell, and the cleanup's kill left the
    # servers running in their deleted namespaces.
    ip netns exec "$ID-$T-$1" "$PY" -u "$HELP" serve "$1" 8080 >"$TMP/$T/serve-$1.log" 2>&1 &
    PIDS+=($!)
}
mknode() { # tag
    use "$1"
    log "setting up node $T: underlay, node namespace, ferryd, 7 pods"
    local ul="$ID-$T-ul" eps=() p
    mkdir -p "$D"
    mkns "$ul"
    ip -n "$ul" link add br0 type bridge
    ip -n "$ul" addr add 192.168.77.254/24 dev br0
    ip -n "$ul" link set br0 up
    mkns "$NODE"
    ip -n "$ul" link add v1 type veth peer name eth0 netns "$NODE"
    ip -n "$ul" link set v1 master br0 up
    ip -n "$NODE" addr add 192.168.77.11/24 dev eth0
    ip -n "$NODE" link set eth0 up
    # `ip netns exec` directly so that $! is ferryd itself.
    ip netns exec "$NODE" "$BIN/ferryd" run --node-name node1 --underlay-iface eth0 \
        --store "$STORE" --cluster-cidr 10.244.0.0/16 --cni-conf-dir "$D/net.d" \
        --cni-bin-dir "$BIN" --cni-data-dir "$D/data" --ipam-data-dir "$D/ipam" \
        --run-dir "$D/run" --listen off --log-level "$LOG_LEVEL" >>"$LOGF" 2>&1 &
    FPIDS[$T]=$!
    PIDS+=("${FPIDS[$T]}")
    for _ in $(seq 1 1000); do [[ -e $D/run/ready ]] && break; kill -0 "${FPIDS[$T]}" 2>/dev/null || die "ferryd exited"; sleep 0.01; done
    [[ -e $D/run/ready ]] || die "ferryd not ready after 10 s"
    for p in p1 p2 p3 p4 p5 spare; do
        add_pod "$p"
        if [[ $p == spare ]]; then SPARES[$T]=$POD_IP; else eps+=("$POD_IP"); fi
        serve "$p"
    done
    EPSS[$T]="${eps[*]}"
    add_pod client
    for p in p1 p2 p3 p4 p5 spare; do
        for _ in $(seq 1 300); do grep -q listening "$TMP/$T/serve-$p.log" 2>/dev/null && break; sleep 0.01; done
    done
    use "$T"
    log "  endpoints ${EPS[*]}, spare $SPARE_IP, client $(x "$CLIENT" ip -4 -o addr show dev eth0 | awk '{print $4}')"
    x "$CLIENT" "$PY" "$HELP" check 8080 <(printf '%s\n' "${EPS[@]}" "$SPARE_IP") | grep -q '^6 6$' || die "pods do not answer directly"
}
mknode b
mknode a

ctl() { "$BIN/ferryctl" --store "$STORE" "$@"; }
# Byte offset of ferryd's log, to read only what a step logged.
logpos() { stat -c %s "$LOGF"; }
# "services synced" lines logged since offset $1: "count sum_ms last_ms max_ms"
syncs_since() {
    tail -c +"$(($1 + 1))" "$LOGF" | grep 'services synced' |
        sed -n 's/.*took_ms=\([0-9.]*\).*/\1/p' |
        awk '{n++; s+=$1; l=$1; if ($1>m) m=$1} END {if (n) printf "%d %.1f %.1f %.1f\n", n, s, l, m; else print "0 n/a n/a n/a"}'
}
# Waits until ferryd logged a sync with ports=$2 after offset $1 (10 s at most).
wait_ports() {
    for _ in $(seq 1 2000); do
        tail -c +"$(($1 + 1))" "$LOGF" | grep 'services synced' | grep -q "ports=$2 " && return 0
        sleep 0.005
    done
    return 1
}
live() { # ip [--want NAME] [--interval-us U] -- cmd...
    x "$CLIENT" "$PY" "$HELP" live "$@"
}
# Waits until ferryd's log has been quiet for $1 ms (no sync still running).
settle() {
    local last now quiet=0
    last=$(logpos)
    while (( quiet < $1 )); do
        sleep 0.1; quiet=$((quiet + 100)); now=$(logpos)
        if [[ $now != "$last" ]]; then last=$now; quiet=0; fi
    done
}

gen() { # n file -> ClusterIPs in file.ips
    $PY "$HELP" gen-ferry "$1" "$2" "${EPS[@]}" >"$2.ips"
}

# --- 1. full programming (and the 10-Service latency baseline) ---------------------
full() { # n
    local n=$1 f="$TMP/$T/svc-$1.yaml" pos out lastip
    gen "$n" "$f"
    lastip=$(tail -1 "$f.ips")
    settle 300
    pos=$(logpos)
    log "ferry: apply $n Services x 5 endpoints, polling the last ClusterIP $lastip every ${POLL_US} us ..."
    out=$(live "$lastip" 80 --interval-us "$POLL_US" --timeout 300 -- "$BIN/ferryctl" --store "$STORE" apply -f "$f")
    [[ $(jget "$out" cmd_rc) == 0 ]] || die "ferryctl apply: $(jget "$out" cmd_err)"
    [[ $(jget "$out" live_ms) != n/a ]] || die "$lastip never answered: $out"
    R[live-$n]=$(jget "$out" live_ms)
    R[apply-$n]=$(jget "$out" cmd_ms)
    wait_ports "$pos" "$n" || log "  (no sync with ports=$n logged)"
    settle 500
    read -r R[syncs-$n] R[syncsum-$n] R[synclast-$n] R[syncmax-$n] <<<"$(syncs_since "$pos")"
    R[tl-$n]=$($PY "$HELP" timeline "$LOGF" "$pos" "$(jget "$out" t0_wall_ns)")
    # All live: the last ClusterIP answered and the sync that programmed
    # the last of the n Services committed (the file store writes them in
    # buckets, in no order of name: the last ClusterIP is not the last one
    # written).
    R[synced-$n]=$($PY "$HELP" synced "$LOGF" "$pos" "$(jget "$out" t0_wall_ns)" "$n")
    [[ ${R[synced-$n]} != n/a ]] || die "no sync with ports=$n logged"
    R[all-$n]=$($PY -c "import sys; print('%.1f' % max(map(float, sys.argv[1:])))" "${R[live-$n]}" "${R[synced-$n]}")
    log "  all live after ${R[all-$n]} ms (last ClusterIP answered after ${R[live-$n]} ms, last sync ended after ${R[synced-$n]} ms; apply exited after ${R[apply-$n]} ms; ferryd logged ${R[syncs-$n]} sync(s), ${R[syncsum-$n]} ms in all)"
    grep 'services synced' <(tail -c +"$((pos + 1))" "$LOGF") | sed 's/^/    ferryd: /' | tail -5 >&2
    log "  ferryd's syncs, ms since apply started: start-end(ports) ${R[tl-$n]}"
    log "  checking every ClusterIP once ..."
    read -r ok all < <(x "$CLIENT" "$PY" "$HELP" check 80 "$f.ips")
    R[check-$n]="$ok/$all"
    log "  $ok of $all ClusterIPs answered"
}
remove() { # n
    local pos
    pos=$(logpos)
    log "removing the $1 Services ..."
    ctl delete -f "$TMP/$T/svc-$1.yaml" >/dev/null || die "ferryctl delete"
    wait_ports "$pos" 0 || die "ferryd did not sync down to 0 Services"
    settle 300
}

use b
full "$BASE"
use a
for n in $(printf '%s\n' $SERVICES | sort -n); do
    full "$n"
    [[ $n == "$BIG" ]] || remove "$n"
done

# --- 4. RSS at the largest size --------------------------------------------------
R[rss]=$(awk '/^VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$FERRYD_PID/status")
R[hwm]=$(awk '/^VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$FERRYD_PID/status")
log "ferryd at $BIG Services: VmRSS ${R[rss]} MiB, VmHWM ${R[hwm]} MiB"

# --- where the time goes, at the largest size (diagnostics) --------------------------
# Reading the whole store back (what ferryd and ferryctl do to see it).
t0=$(date +%s%N); ctl get services >/dev/null; R[get]=$(ms_since "$t0")
# ferry's own table: its size and the time `nft list` takes to dump it.
# (The dump does not load back with `nft -f`: nft prints the numgen DNAT
# without a transport protocol match and the map keys byte-swapped.)
t0=$(date +%s%N)
x "$NODE" nft list table inet ferry-svc >"$TMP/ferry-svc.nft" || true
R[dump]=$(ms_since "$t0")
R[fchains]=$(grep -c '^\s*chain ' "$TMP/ferry-svc.nft" || true)
log "diagnostics at $BIG: ferryctl get services ${R[get]} ms; ferry's table has ${R[fchains]} chains, nft list ${R[dump]} ms "

# --- 3. connect latency, 10 vs the largest size, alternating rounds -------------------
ROUNDS=10
PER=$(( (CONNECTS + ROUNDS - 1) / ROUNDS ))
log "connect latency: $ROUNDS alternating rounds of $PER sequential connects each to s-0 (node b: $BASE Services, node a: $BIG) and to a pod IP ..."
for r in $(seq 1 "$ROUNDS"); do
    # Odd rounds start with node b, even ones with node a.
    for k in $( ((r % 2)) && echo "base big pod" || echo "pod big base"); do
        case $k in
            base) use b; x "$CLIENT" "$PY" "$HELP" lat 10.96.0.10 80 "$PER" "$TMP/lat-base" ;;
            big) use a; x "$CLIENT" "$PY" "$HELP" lat 10.96.0.10 80 "$PER" "$TMP/lat-big" ;;
            pod) use a; x "$CLIENT" "$PY" "$HELP" lat "${EPS[0]}" 8080 "$PER" "$TMP/lat-pod" ;;
        esac
    done
done
use a
for k in base big pod; do
    out=$($PY "$HELP" stats "$TMP/lat-$k")
    R[lat-$k-med]=$(jget "$out" median_us); R[lat-$k-p99]=$(jget "$out" p99_us); R[lat-$k-fail]=$(jget "$out" fail)
    log "  $k: median ${R[lat-$k-med]} us, p99 ${R[lat-$k-p99]} us, failed ${R[lat-$k-fail]}"
done

# --- 2. one change at the largest size ---------------------------------------------
NEWS=(); EPCH=(); NEWSYNC=(); EPSYNC=(); NEWTL=(); EPTL=()
for r in $(seq 1 "$REPEAT"); do
    f="$TMP/new-$r.yaml"
    $PY "$HELP" gen-ferry 1 "$f" "${EPS[@]}" --first-ip "10.100.0.$r" --name "new$r" >"$f.ips"
    settle 300
    pos=$(logpos)
    out=$(live "10.100.0.$r" 80 --interval-us "$CHANGE_POLL_US" --timeout 30 -- "$BIN/ferryctl" --store "$STORE" apply -f "$f")
    [[ $(jget "$out" live_ms) != n/a && $(jget "$out" cmd_rc) == 0 ]] || die "new Service $r: $out"
    NEWS+=("$(jget "$out" live_ms)")
    wait_ports "$pos" "$((BIG + r))" || true
    read -r _ s _ _ <<<"$(syncs_since "$pos")"; NEWSYNC+=("$s")
    tl=$($PY "$HELP" timeline "$LOGF" "$pos" "$(jget "$out" t0_wall_ns)")
    NEWTL+=("apply $(jget "$out" cmd_ms), sync $tl, live ${NEWS[-1]}")
    log "one new Service on top of $((BIG + r - 1)): live after ${NEWS[-1]} ms (ms since apply started: apply exited $(jget "$out" cmd_ms), ferryd sync start-end(ports) $tl; $(jget "$out" attempts) connects tried)"
done
# s-0's slice with p5 replaced by the spare pod, and back: the change is live
# when the pod that just came in answers through s-0's ClusterIP.
slice() { # file ip...
    local f=$1; shift
    local eps="" ip
    for ip in "$@"; do eps+="${eps:+, }{addresses: [$ip], nodeName: node1, conditions: {ready: true}}"; done
    cat >"$f" <<EOF
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-0-1, labels: {kubernetes.io/service-name: s-0}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [$eps]
EOF
}
slice "$TMP/ep-spare.yaml" "${EPS[@]:0:4}" "$SPARE_IP"
slice "$TMP/ep-back.yaml" "${EPS[@]}"
for r in $(seq 1 "$REPEAT"); do
    for dir in spare back; do
        want=spare; [[ $dir == back ]] && want=p5
        settle 300
        pos=$(logpos)
        out=$(live 10.96.0.10 80 --want "$want" --interval-us "$CHANGE_POLL_US" --timeout 30 -- "$BIN/ferryctl" --store "$STORE" apply -f "$TMP/ep-$dir.yaml")
        [[ $(jget "$out" live_ms) != n/a && $(jget "$out" cmd_rc) == 0 ]] || die "endpoint change to $want: $out"
        EPCH+=("$(jget "$out" live_ms)")
        read -r _ s _ _ <<<"$(syncs_since "$pos")"; EPSYNC+=("$s")
        tl=$($PY "$HELP" timeline "$LOGF" "$pos" "$(jget "$out" t0_wall_ns)")
        EPTL+=("apply $(jget "$out" cmd_ms), sync $tl, live ${EPCH[-1]}")
        log "endpoint change (s-0: $([[ $dir == spare ]] && echo "p5 -> spare" || echo "spare -> p5")): live after ${EPCH[-1]} ms (ms since apply started: apply exited $(jget "$out" cmd_ms), ferryd sync $tl; answers from the others before: $(jget "$out" others))"
    done
done
# After the last change (back to p1..p5) the spare must get nothing.
settle 300
SPREAD=$(x "$CLIENT" "$PY" "$HELP" spread 10.96.0.10 80 500)
log "spread of 500 connections to s-0 after the changes: $SPREAD"

R[new-med]=$(median "${NEWS[@]}"); R[new-max]=$(maxof "${NEWS[@]}")
R[ep-med]=$(median "${EPCH[@]}"); R[ep-max]=$(maxof "${EPCH[@]}")
R[newsync-med]=$(median "${NEWSYNC[@]}"); R[epsync-med]=$(median "${EPSYNC[@]}")

# --- table ----------------------------------------------------------------------
row() { printf '%-46s %12s %12s %10s   %s\n' "$@"; }
{
echo
echo "ferry Services benchmark ($(nproc) cores, kernel $(uname -r), $(nft --version | cut -d' ' -f1-2); 5 endpoints per Service, 1 node)"
echo
echo "full programming (ms)   (node a; s-i has clusterIP 10.96.0.10 + i)"
row "" "ferry" "kube-proxy" "ratio" ""
row "" "live" "nft -f" "" ""
for n in $(printf '%s\n' $SERVICES | sort -n); do
    row "  $n Services: apply -> all live" "${R[all-$n]}" "${R[ref-$n]:-n/a}" "$(ratio "${R[all-$n]}" "${R[ref-$n]:-n/a}")" \
        "$([[ $n == 10000 ]] && echo "(target <= 1000 ms and <= 0.05)")"
    row "    last ClusterIP answers / last sync ended" "${R[live-$n]}/${R[synced-$n]}" "" "" ""
    row "    of which ferryctl apply" "${R[apply-$n]}" "" "" ""
    row "    ferryd syncs logged: count / sum / max" "${R[syncs-$n]}/${R[syncsum-$n]}/${R[syncmax-$n]}" "" "" ""
    row "    ClusterIPs answering afterwards" "${R[check-$n]}" "" "" ""
    echo "    ferryd syncs, ms since apply started, start-end(ports): ${R[tl-$n]}"
done
echo
row "one change at $BIG Services (ms, median/max of $REPEAT)" "live" "ferryd sync" "" ""
row "  new Service with 5 endpoints" "${R[new-med]}/${R[new-max]}" "${R[newsync-med]}" "" "(target <= 20 ms)"
row "  one endpoint replaced (new one answers)" "${R[ep-med]}/${R[ep-max]}" "${R[epsync-med]}" "" "(target <= 20 ms)"
echo "  runs: new ${NEWS[*]}; endpoint ${EPCH[*]}"
echo "  last new Service, ms since apply started: ${NEWTL[-1]}"
echo "  last endpoint change, ms since apply started: ${EPTL[-1]}"
echo "  spread of 500 connects to s-0 after switching back to p1..p5: $SPREAD"
echo
row "connect + first byte ($CONNECTS sequential, us)" "median" "p99" "" ""
row "  pod IP directly (no Service)" "${R[lat-pod-med]}" "${R[lat-pod-p99]}" "" ""
row "  ClusterIP, $BASE Services programmed" "${R[lat-base-med]}" "${R[lat-base-p99]}" "" ""
row "  ClusterIP, $BIG Services programmed" "${R[lat-big-med]}" "${R[lat-big-p99]}" "" ""
row "  ratio $BIG / $BASE" "$(ratio "${R[lat-big-med]}" "${R[lat-base-med]}")" "$(ratio "${R[lat-big-p99]}" "${R[lat-base-p99]}")" "" "(target <= 1.1)"
echo "  ($ROUNDS rounds alternating between the two nodes, $PER connects per round each; failed: ${R[lat-base-fail]}/${R[lat-big-fail]}/${R[lat-pod-fail]})"
echo
row "ferryd memory at $BIG Services (MiB)" "VmRSS" "VmHWM" "" ""
row "" "${R[rss]}" "${R[hwm]}" "" "(target RSS <= 64 MiB)"
echo
echo "where the time goes at $BIG: ferryctl get services (whole store read) ${R[get]} ms; ferry's table: ${R[fchains]} chains, nft list of it ${R[dump]} ms"
echo
echo "poll: a new non-blocking connect every ${POLL_US} us (full programming) / ${CHANGE_POLL_US} us (changes), many in flight;"
echo "live = first connection established whose first bytes came from the wanted server, measured from just before ferryctl was spawned."
}
