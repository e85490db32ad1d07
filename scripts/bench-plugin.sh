#!/usr/bin/env bash
# Benchmark ferry + ferry-ipam against the reference bridge + host-local
# (Debian's containernetworking-plugins in /usr/lib/cni), same config, in a
# host network namespace made for the run (the root netns is never touched).
#
# Runs are INTERLEAVED (reference, ferry, ferry, reference, ...) so drift on
# the machine hits both alike. A small python3 driver runs inside the host
# netns and spawns each plugin directly, timing it with perf_counter_ns, so
# `ip netns exec` is not measured.
#
# Usage: scripts/bench-plugin.sh [-n ITERATIONS] [-p PARALLEL] [--no-build]
#   -n  sequential ADD/DEL/VERSION iterations per case (default 100)
#   -p  pods ADDed at once for the parallel case (default 30)
# Needs root, iproute2, python3, containernetworking-plugins.
set -euo pipefail
cd "$(dirname "$0")/.."

N=100
PAR=30
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    -n) N="$2"; shift 2 ;;
    -p) PAR="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ "$N" =~ ^[0-9]+$ && "$N" -ge 1 ]] || { echo "-n wants a positive number" >&2; exit 2; }
[[ "$PAR" =~ ^[0-9]+$ && "$PAR" -ge 1 && "$PAR" -le 200 ]] || { echo "-p wants 1..200" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
REF=/usr/lib/cni
for p in bridge host-local; do
  [ -x "$REF/$p" ] || { echo "$REF/$p missing: apt-get install containernetworking-plugins" >&2; exit 1; }
done
PY=$(command -v /usr/bin/python3 || command -v python3) || { echo "needs python3" >&2; exit 1; }

if [ "$BUILD" = 1 ]; then
  cargo build --release --quiet -p ferry-plugin
fi
TARGET=${CARGO_TARGET_DIR:-target}
BIN=$(cd "$TARGET/release" && pwd)
[ -x "$BIN/ferry" ] || { echo "$BIN/ferry missing: cargo build --release -p ferry-plugin" >&2; exit 1; }

TAG="ferry-bench-$$"
HOST="$TAG-h"
PODS=()
WORK=$(mktemp -d "${TMPDIR:-/tmp}/$TAG.XXXXXX")
cleanup() {
  set +e
  for p in "${PODS[@]}"; do ip netns del "$p" 2>/dev/null; done
  ip netns del "$HOST" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

RESIDENTS=("$TAG-r0" "$TAG-r1")
PODS+=("${RESIDENTS[@]}")
ip netns add "$HOST"
for r in "${RESIDENTS[@]}"; do ip netns add "$r"; done
ip netns exec "$HOST" ip link set lo up
for i in $(seq 0 $((PAR - 1))); do
  ip netns add "$TAG-p$i"
  PODS+=("$TAG-p$i")
done

cat >"$WORK/driver.py" <<'PY'
import json, os, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor

cfg = json.load(open(sys.argv[1]))
N, PODS, WORK = cfg["n"], cfg["pods"], cfg["work"]
IMPLS = {
    "reference": {"bin": cfg["ref"] + "/bridge", "path": cfg["ref"],
                  "bridge": "refbr0", "ipam": "host-local", "subnet": "10.90.0.0/16"},
    "ferry": {"bin": cfg["bin"] + "/ferry", "path": cfg["bin"] + ":" + cfg["ref"],
              "bridge": "fbr0", "ipam": "ferry-ipam", "subnet": "10.91.0.0/16"},
}

def conf(impl, masq):
    i = IMPLS[impl]
    c = {"cniVersion": "1.0.0", "name": impl + "net", "type": os.path.basename(i["bin"]),
         "bridge": i["bridge"], "isGateway": True, "ipMasq": masq,
         "ipam": {"type": i["ipam"], "ranges": [[{"subnet": i["subnet"]}]],
                  "routes": [{"dst": "0.0.0.0/0"}], "dataDir": f"{WORK}/{impl}-ipam"}}
    if impl == "ferry":
        c["dataDir"] = f"{WORK}/ferry-data"
    return json.dumps(c).encode()

def run(impl, cmd, cid, pod, stdin):
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
           "CNI_COMMAND": cmd, "CNI_CONTAINERID": cid, "CNI_NETNS": f"/run/netns/{pod}",
           "CNI_IFNAME": "eth0", "CNI_PATH": IMPLS[impl]["path"]}
    t = time.perf_counter_ns()
    p = subprocess.run([IMPLS[impl]["bin"]], input=stdin, env=env, capture_output=True)
    dt = time.perf_counter_ns() - t
    if p.returncode != 0:
        sys.exit(f"{impl} {cmd} {cid} failed ({p.returncode}): {p.stdout.decode()} {p.stderr.decode()}")
    return dt

def median(xs):
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2

def p99(xs):
    s = sorted(xs)
    return s[max(0, -(-99 * len(s) // 100) - 1)]

rows = []
order = lambda k: ("reference", "ferry") if k % 2 == 0 else ("ferry", "reference")

# "ipMasq on": each network also has one resident pod, as on a node that
# runs other pods, so per-network state (ferry's nft table and chains) stays.
# "lone pod": the pod is the only one, so ferry creates and drops its whole
# nft table on every ADD/DEL; the reference's iptables work is the same.
SCENARIOS = [("ipMasq on", True, True), ("ipMasq on, lone pod", True, False),
             ("ipMasq off", False, False)]
for label, masq, resident in SCENARIOS:
    c = {impl: conf(impl, masq) for impl in IMPLS}
    if resident:
        for impl, pod in zip(IMPLS, cfg["residents"]):
            run(impl, "ADD", f"{impl}-resident", pod, c[impl])
    add = {impl: [] for impl in IMPLS}
    dele = {impl: [] for impl in IMPLS}
    for k in range(-5, N):  # 5 warm-up rounds, not counted
        for impl in order(k):
            cid = f"{impl}-{int(masq)}-{k + 5}"
            a = run(impl, "ADD", cid, PODS[0], c[impl])
            d = run(impl, "DEL", cid, PODS[0], c[impl])
            if k >= 0:
                add[impl].append(a)
                dele[impl].append(d)
    rows.append((f"ADD median ({label})", median(add["reference"]), median(add["ferry"])))
    rows.append((f"ADD p99 ({label})", p99(add["reference"]), p99(add["ferry"])))
    rows.append((f"DEL median ({label})", median(dele["reference"]), median(dele["ferry"])))
    rows.append((f"DEL p99 ({label})", p99(dele["reference"]), p99(dele["ferry"])))

    if resident:
        # Parallel burst: all pods at once, 3 rounds interleaved, median wall.
        walls = {impl: [] for impl in IMPLS}
        del_walls = {impl: [] for impl in IMPLS}
        with ThreadPoolExecutor(max_workers=len(PODS)) as ex:
            for r in range(3):
                for impl in order(r):
                    ids = [f"{impl}-par{r}-{j}" for j in range(len(PODS))]
                    t = time.perf_counter_ns()
                    list(ex.map(lambda a: run(impl, "ADD", a[0], a[1], c[impl]), zip(ids, PODS)))
                    walls[impl].append(time.perf_counter_ns() - t)
                    t = time.perf_counter_ns()
                    list(ex.map(lambda a: run(impl, "DEL", a[0], a[1], c[impl]), zip(ids, PODS)))
                    del_walls[impl].append(time.perf_counter_ns() - t)
        rows.append((f"{len(PODS)} parallel ADDs wall ({label})",
                     median(walls["reference"]), median(walls["ferry"])))
        rows.append((f"{len(PODS)} parallel DELs wall ({label})",
                     median(del_walls["reference"]), median(del_walls["ferry"])))
    if resident:
        for impl, pod in zip(IMPLS, cfg["residents"]):
            run(impl, "DEL", f"{impl}-resident", pod, c[impl])

ver = {impl: [] for impl in IMPLS}
for k in range(-5, N):
    for impl in order(k):
        t = run(impl, "VERSION", "", PODS[0], b'{"cniVersion":"1.0.0"}')
        if k >= 0:
            ver[impl].append(t)
rows.append(("VERSION median (start-up)", median(ver["reference"]), median(ver["ferry"])))

ms = lambda ns: f"{ns / 1e6:.2f} ms"
w = max(len(r[0]) for r in rows)
print(f"{'metric':<{w}} | {'reference':>10} | {'ferry':>10} | ratio (ref/ferry)")
print(f"{'-' * w}-|-{'-' * 10}-|-{'-' * 10}-|------------------")
for name, ref, fer in rows:
    print(f"{name:<{w}} | {ms(ref):>10} | {ms(fer):>10} | {ref / fer:8.1f}x")

val = {name: (ref, fer) for name, ref, fer in rows}
def target(desc, ok):
    print(f"target {'met ' if ok else 'MISSED'}: {desc}")
print()
r, f = val["ADD median (ipMasq on)"]; target("ADD median <= 1/10 of reference (ipMasq on)", f * 10 <= r)
r, f = val["DEL median (ipMasq on)"]; target("DEL median <= 1/10 of reference (ipMasq on)", f * 10 <= r)
r, f = val["ADD p99 (ipMasq on)"]; target("ADD p99 <= 5 ms (ipMasq on)", f <= 5e6)
r, f = val[f"{len(PODS)} parallel ADDs wall (ipMasq on)"]
target(f"{len(PODS)} parallel ADDs <= 1/4 of reference", f * 4 <= r)
PY

python_pods=$(printf '"%s",' "${PODS[@]:2}")
cat >"$WORK/config.json" <<EOF
{"n": $N, "pods": [${python_pods%,}], "residents": ["${RESIDENTS[0]}", "${RESIDENTS[1]}"],
 "work": "$WORK", "ref": "$REF", "bin": "$BIN"}
EOF

echo "ferry: $BIN/ferry  reference: $REF/bridge + host-local  n=$N parallel=$PAR  kernel $(uname -r)"
ip netns exec "$HOST" "$PY" "$WORK/driver.py" "$WORK/config.json"
