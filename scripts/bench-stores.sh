#!/usr/bin/env bash
# Store benchmark (not a test): what one change costs a ferryd as the
# cluster grows. For 100, 1,000 and 5,000 simulated node records (written
# straight into the store, as other nodes' ferryds would) next to 10k
# Services x 5 endpoints, on etcd and on the file store, one ferryd in a
# node namespace; then one peer's record rewritten 200 times at 20/s (a new
# underlay address each time: the peer's FDB entry changes). Measured:
#
#   cpu/change   ferryd's utime+stime (/proc/<pid>/stat) over the 200 changes, / 200
#                (clock ticks of 10 ms: a resolution of 0.05 ms)
#   write->kernel  from the write to `bridge monitor fdb` showing the new
#                entry in the node namespace (median, 99th percentile, max)
#   rss          ferryd's VmRSS after the changes
#   etcd B/change  bytes received on the node's interface over the 200
#                changes, / 200 (etcd -> ferryd; the only traffic there)
#   full pass    the overlay's timer reconcile against the kernel (nothing
#                to change), as ferryd's /metrics reports it
#
# Everything runs in namespaces this script makes (never the root one).
# Usage: scripts/bench-stores.sh [--sizes=100,1000,5000] [--services=10000]
#        [--stores=etcd,file] [--no-build]
set -euo pipefail

SIZES=100,1000,5000
SERVICES=10000
STORES=etcd,file
BUILD=1
for a in "$@"; do
    case "$a" in
        --sizes=*) SIZES=${a#*=} ;;
        --services=*) SERVICES=${a#*=} ;;
        --stores=*) STORES=${a#*=} ;;
        --no-build) BUILD=0 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown argument $a" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN="${FERRY_BIN_DIR:-$ROOT/target/release}"
ID="fs$$"
TMP=$(mktemp -d /tmp/ferry-bench-stores.XXXXXX)
NSES=()
PIDS=()
# How often ferryd's timers run: the changes are made between two ticks,
# so that the full passes are measured apart from them.
EVERY=20

need() { command -v "$1" >/dev/null || apt-get install -y -q "$2" >/dev/null; }
need etcd etcd-server; need curl curl; need python3 python3; need bridge iproute2

cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    for ns in "${NSES[@]}"; do ip netns delete "$ns" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT INT TERM
log() { printf '%s\n' "$*" >&2; }
mkns() { ip netns add "$1"; NSES+=("$1"); ip -n "$1" link set lo up; }

if [[ $BUILD == 1 && -z ${FERRY_BIN_DIR:-} ]]; then
    log "building (release) ..."
    (cd "$ROOT" && cargo build --release -q -p ferry-plugin -p ferry-daemon)
fi
log "machine: $(nproc) cores, kernel $(uname -r)"

# The driver: writes records and changes, watches the kernel, reads /proc.
cat >"$TMP/drive.py" <<'EOF'
import base64, json, os, select, subprocess, sys, time, urllib.request

mode, store, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ETCD = "http://192.168.77.254:2379"

def subnet(i):  # /24s of the cluster CIDR 10.128.0.0/9 (ferryd takes a free one)
    return "10.%d.%d.0" % (128 + i // 256, i % 256)

def record(i, under):
    return {"node": "sim%d" % i, "subnet": subnet(i) + "/24", "underlayIp": under,
            "vtepMac": "02:5e:%02x:%02x:%02x:01" % (i >> 16 & 255, i >> 8 & 255, i & 255)}

def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()

def etcd_puts(kvs):
    for c in range(0, len(kvs), 100):
        ops = [{"request_put": {"key": b64(k), "value": b64(v)}} for k, v in kvs[c:c + 100]]
        req = urllib.request.Request(ETCD + "/v3/kv/txn", json.dumps({"success": ops}).encode(),
                                     {"Content-Type": "application/json"})
        urllib.request.urlopen(req).read()

def file_put(i, rec):
    d = store + "/subnets"
    path = "%s/%s-24.json" % (d, subnet(i))
    tmp = "%s/.tmp-bench-%d" % (d, i)
    with open(tmp, "w") as f:
        json.dump({"record": rec, "expiresMs": int(time.time() * 1000) + 86400000}, f)
    os.rename(tmp, path)

def put(recs):
    if store == "etcd":
        etcd_puts([("/ferry/subnets/%s-24" % subnet(i), json.dumps(r)) for i, r in recs])
    else:
        for i, r in recs:
            file_put(i, r)

CHANGES = 200

def cpu(pid):
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

if mode == "records":
    put([(i, record(i, "172.16.%d.%d" % (i // 250, 1 + i % 250))) for i in range(n)])
elif mode == "services":
    items = []
    for s in range(n):
        name = "svc%d" % s
        items.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                      "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
        items.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                      "metadata": {"name": name + "-1", "labels": {"kubernetes.io/service-name": name}},
                      "addressType": "IPv4",
                      "endpoints": [{"addresses": ["10.%d.%d.%d" % (200 + s // 5000, s // 20 % 250, 1 + (s % 20) * 5 + e)],
                                     "conditions": {"ready": True}} for e in range(5)],
                      "ports": [{"name": "http", "port": 8080}]})
    json.dump({"apiVersion": "v1", "kind": "List", "items": items}, sys.stdout)
elif mode == "changes":
    pid, node_ns = int(sys.argv[4]), sys.argv[5]
    mon = subprocess.Popen(["bridge", "-n", node_ns, "monitor", "fdb"], stdout=subprocess.PIPE, bufsize=0)
    time.sleep(0.3)  # the monitor subscribed
    buf = b""
    def wait_for(text, deadline):
        global buf
        while time.time() < deadline:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if text in line:
                    return time.time()
            r, _, _ = select.select([mon.stdout], [], [], max(0, deadline - time.time()))
            if r:
                buf += os.read(mon.stdout.fileno(), 65536)
        return None
    rx0 = int(open(sys.argv[6]).read()) if len(sys.argv) > 6 else 0
    c0, lat, t_next = cpu(pid), [], time.time()
    for k in range(CHANGES):
        i = (k * 7919) % n
        under = "172.20.%d.%d" % (k // 250, 1 + k % 250)
        t0 = time.time()
        put([(i, record(i, under))])
        t1 = wait_for(("dst %s " % under).encode(), t0 + 5)
        lat.append((t1 - t0) * 1000 if t1 else float("inf"))
        t_next += 1 / 20
        time.sleep(max(0, t_next - time.time()))
    c1 = cpu(pid)
    rx1 = int(open(sys.argv[6]).read()) if len(sys.argv) > 6 else 0
    mon.kill()
    lat.sort()
    print(json.dumps({"cpu_ms": (c1 - c0) * 1000 / CHANGES, "lat_med": lat[CHANGES // 2],
                      "lat_p99": lat[CHANGES * 99 // 100], "lat_max": lat[-1],
                      "rx_per_change": (rx1 - rx0) / CHANGES}))
EOF

metric() { # node-ns name
    ip netns exec "$1" curl -s http://127.0.0.1:9477/metrics | awk -v m="$2" '$1 == m {print $2}'
}

# ferryd idle: no CPU used over 300 ms.
settle() {
    local pid=$1 a b
    for _ in $(seq 1 200); do
        a=$(awk '{print $14 + $15}' "/proc/$pid/stat"); sleep 0.3
        b=$(awk '{print $14 + $15}' "/proc/$pid/stat")
        [[ $a == "$b" ]] && return
    done
}

ROWS=()
run() { # store size
    local store=$1 n=$2 tag="$ID-$1-$2"
    local UL="$tag-ul" N="$tag-n"
    mkns "$UL"; mkns "$N"
    ip -n "$UL" link add br0 type bridge
    ip -n "$UL" addr add 192.168.77.254/24 dev br0
    ip -n "$UL" link set br0 up
    ip -n "$UL" link add v1 type veth peer name eth0 netns "$N"
    ip -n "$UL" link set v1 master br0 up
    ip -n "$N" addr add 192.168.77.11/24 dev eth0
    ip -n "$N" link set eth0 up
    ip -n "$N" route add default via 192.168.77.254
    local D="$TMP/$store-$n" spec
    mkdir -p "$D"
    if [[ $store == etcd ]]; then
        ip netns exec "$UL" etcd --name b --data-dir "$D/etcd" \
            --listen-client-urls http://192.168.77.254:2379 --advertise-client-urls http://192.168.77.254:2379 \
            --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
            --initial-cluster b=http://127.0.0.1:2380 --log-level error >"$D/etcd.log" 2>&1 &
        PIDS+=($!)
        for _ in $(seq 1 200); do ip netns exec "$UL" curl -sf http://192.168.77.254:2379/health >/dev/null && break; sleep 0.05; done
        spec="etcd:http://192.168.77.254:2379"
    else
        spec="file:$D/store"
        mkdir -p "$D/store/subnets"
    fi
    log "$store, $n node records + $SERVICES Services: writing ..."
    ip netns exec "$UL" python3 "$TMP/drive.py" records "${store/file/$D/store}" "$n"
    python3 "$TMP/drive.py" services - "$SERVICES" >"$D/services.json"
    ip netns exec "$N" "$BIN/ferryctl" --store "$spec" apply -f "$D/services.json" >/dev/null
    ip netns exec "$N" "$BIN/ferryd" run --node-name self --underlay-iface eth0 --store "$spec" \
        --cni-conf-dir "$D/net.d" --cni-bin-dir "$BIN" --cni-data-dir "$D/data" \
        --ipam-data-dir "$D/ipam" --run-dir "$D/run" --listen 127.0.0.1:9477 \
        --cluster-cidr 10.128.0.0/9 --reconcile-interval "${EVERY}s" --log-level warn >"$D/ferryd.log" 2>&1 &
    local pid=$!
    PIDS+=($pid)
    local t0=$SECONDS
    until [[ $(metric "$N" ferryd_peers 2>/dev/null) == "$n" ]]; do
        sleep 0.1
        (( SECONDS - t0 < 300 )) || { log "ferryd never reached $n peers"; tail "$D/ferryd.log" >&2; exit 1; }
    done
    # The first timer pass (a full reconcile finding nothing to change).
    local r0; r0=$(metric "$N" ferryd_reconciles_total)
    until (( $(metric "$N" ferryd_reconciles_total) > r0 )); do sleep 0.2; done
    local full; full=$(metric "$N" ferryd_last_reconcile_duration_seconds)
    settle "$pid"
    local rx=""
    [[ $store == etcd ]] && rx=/sys/class/net/eth0/statistics/rx_bytes
    local out
    out=$(ip netns exec "$N" python3 "$TMP/drive.py" changes "${store/file/$D/store}" "$n" "$pid" "$N" $rx)
    local rss; rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    ROWS+=("$(python3 -c '
import json, sys
o = json.loads(sys.argv[1]); store, n, rss, full = sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
bpc = "%.0f" % o["rx_per_change"] if store == "etcd" else "-"
print("| %-5s | %5s | %8.2f ms | %6.1f / %6.1f / %6.1f ms | %6.1f MiB | %9s | %7.1f ms |" % (
    store, n, o["cpu_ms"], o["lat_med"], o["lat_p99"], o["lat_max"], rss / 1024, bpc, full * 1000))
' "$out" "$store" "$n" "$rss" "$full")")
    log "${ROWS[-1]}"
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
    for ns in "${NSES[@]}"; do ip netns delete "$ns" 2>/dev/null || true; done
    NSES=()
}

IFS=, read -ra S <<<"$STORES"
IFS=, read -ra Z <<<"$SIZES"
for store in "${S[@]}"; do
    for n in "${Z[@]}"; do run "$store" "$n"; done
done
echo
echo "| store | nodes | cpu/change | write->kernel med / p99 / max | ferryd RSS | etcd B/change | full pass |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
