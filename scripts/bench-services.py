#!/usr/bin/env python3
"""Helpers for scripts/bench-services.sh (run inside the script's namespaces).

  gen-ferry N OUT IP... [--first-ip A.B.C.D] [--name PREFIX]
      N Services (port 80 -> 8080, clusterIP explicitly assigned, counting
      up from --first-ip) each with one EndpointSlice of the given pod IPs,
      as one multi-document YAML file for `ferryctl apply -f`. Prints the
      ClusterIPs, one a line, on stdout.
  gen-kube-proxy N OUT IP...
      The same N Services x endpoints in kube-proxy's nftables layout
      (pkg/proxy/nftables: a chain per Service port, a chain per endpoint
      with the masquerade mark and the DNAT, the service-ips verdict map,
      `numgen random mod N vmap` in each Service chain), as the commands
      kube-proxy hands to `nft -f` on a full sync.
  serve NAME PORT
      TCP server: on every connection, send NAME + newline and close.
  live IP PORT [--want NAME] [--interval-us U] [--timeout S] -- CMD...
      Start CMD (t0 = just before it is spawned) and, from then on, open a
      new non-blocking TCP connection to IP:PORT every U microseconds (many
      in flight). "Live" = the first connection that is established and
      whose first bytes are NAME (any server with no --want). Prints JSON:
      live_ms (t0 -> live), cmd_ms (t0 -> CMD exited), cmd_rc, attempts.
  lat IP PORT COUNT [OUT]
      COUNT sequential connect + first byte timings (after 20 warm-up
      ones). Prints JSON: median_us, p99_us, mean_us, min_us, max_us, fail;
      with OUT, appends the samples to OUT instead.
  stats OUT
      The JSON statistics of the samples collected in OUT.
  timeline LOG OFFSET T0_WALL_NS
      ferryd's "services synced" lines after byte OFFSET of LOG as
      start-end(ports) in ms since T0 (wall clock of live's t0).
  check PORT FILE
      One connect + first byte to every address in FILE; prints the number
      that answered and the number of addresses.
  spread IP PORT COUNT
      COUNT sequential connections; prints JSON {server name: count}.
"""
import base64
import hashlib
import ipaddress
import json
import selectors
import socket
import subprocess
import sys
import tempfile
import time


def ns():
    return time.monotonic_ns()


def gen_ferry(argv):
    n, out = int(argv[0]), argv[1]
    rest = argv[2:]
    first, prefix = "10.96.0.10", "s"
    ips = []
    i = 0
    while i < len(rest):
        if rest[i] == "--first-ip":
            first = rest[i + 1]
            i += 2
        elif rest[i] == "--name":
            prefix = rest[i + 1]
            i += 2
        else:
            ips.append(rest[i])
            i += 1
    base = int(ipaddress.IPv4Address(first))
    eps = ", ".join(
        "{addresses: [%s], nodeName: node1, conditions: {ready: true}}" % ip for ip in ips
    )
    cips = []
    with open(out, "w") as f:
        for k in range(n):
            cip = str(ipaddress.IPv4Address(base + k))
            cips.append(cip)
            name = "%s-%d" % (prefix, k)
            f.write(
                "---\napiVersion: v1\nkind: Service\n"
                "metadata: {name: %s}\n"
                "spec: {clusterIP: %s, ports: [{name: http, port: 80, targetPort: 8080}]}\n"
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
                "metadata: {name: %s-1, labels: {kubernetes.io/service-name: %s}}\n"
                "addressType: IPv4\n"
                "ports: [{name: http, port: 8080, protocol: TCP}]\n"
                "endpoints: [%s]\n" % (name, cip, name, name, eps)
            )
    sys.stdout.write("\n".join(cips) + "\n")


def chain_hash(s):
    # kube-proxy names chains <prefix>-<8 chars of base32(sha256(name))>-<name>
    return base64.b32encode(hashlib.sha256(s.encode()).digest()).decode()[:8]


def gen_kube_proxy(argv):
    n, out, ips = int(argv[0]), argv[1], argv[2:]
    t = "ip kube-proxy"
    cluster_cidr = "10.244.0.0/16"
    w = []
    a = w.append
    # The skeleton kube-proxy's nftables mode creates in its table.
    a('add table %s { comment "rules for kube-proxy" ; }' % t)
    for name, hook, prio in [
        ("nat-prerouting", "prerouting", "-100"),
        ("nat-output", "output", "-100"),
        ("nat-postrouting", "postrouting", "100"),
    ]:
        a("add chain %s %s { type nat hook %s priority %s ; }" % (t, name, hook, prio))
    for name, hook, prio in [
        ("filter-prerouting", "prerouting", "-110"),
        ("filter-input", "input", "-110"),
        ("filter-forward", "forward", "-110"),
        ("filter-output", "output", "-110"),
        ("filter-output-post-dnat", "output", "-90"),
    ]:
        a("add chain %s %s { type filter hook %s priority %s ; }" % (t, name, hook, prio))
    for c in [
        "services", "service-endpoints-check", "nodeport-endpoints-check",
        "cluster-ips-check", "firewall-check", "mark-for-masquerade", "masquerading",
        "reject-chain",
    ]:
        a("add chain %s %s" % (t, c))
    a("add set %s cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }" % t)
    a("add set %s nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }" % t)
    for m, key in [
        ("service-ips", "ipv4_addr . inet_proto . inet_service"),
        ("service-nodeports", "inet_proto . inet_service"),
        ("no-endpoint-services", "ipv4_addr . inet_proto . inet_service"),
        ("no-endpoint-nodeports", "inet_proto . inet_service"),
        ("firewall-ips", "ipv4_addr . inet_proto . inet_service"),
    ]:
        a("add map %s %s { type %s : verdict ; }" % (t, m, key))
    for c in ["nat-prerouting", "nat-output"]:
        a("add rule %s %s jump services" % (t, c))
    a("add rule %s nat-postrouting jump masquerading" % t)
    a("add rule %s filter-prerouting ct state new jump firewall-check" % t)
    a("add rule %s filter-input ct state new jump nodeport-endpoints-check" % t)
    a("add rule %s filter-input ct state new jump service-endpoints-check" % t)
    a("add rule %s filter-forward ct state new jump service-endpoints-check" % t)
    a("add rule %s filter-forward ct state new jump cluster-ips-check" % t)
    a("add rule %s filter-output ct state new jump service-endpoints-check" % t)
    a("add rule %s filter-output ct state new jump firewall-check" % t)
    a("add rule %s filter-output-post-dnat ct state new jump cluster-ips-check" % t)
    a("add rule %s mark-for-masquerade mark set mark or 0x4000" % t)
    a("add rule %s masquerading mark and 0x4000 == 0 return" % t)
    a("add rule %s masquerading mark set mark xor 0x4000" % t)
    a("add rule %s masquerading masquerade fully-random" % t)
    a("add rule %s services ip daddr . meta l4proto . th dport vmap @service-ips" % t)
    a("add rule %s services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports" % t)
    a("add rule %s service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services" % t)
    a("add rule %s nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports" % t)
    a("add rule %s cluster-ips-check ip daddr @cluster-ips reject" % t)
    a("add rule %s cluster-ips-check ip daddr { 10.96.0.0/12 } drop" % t)
    a("add rule %s firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips" % t)
    a("add rule %s reject-chain reject" % t)
    base = int(ipaddress.IPv4Address("10.96.0.10"))
    for k in range(n):
        cip = str(ipaddress.IPv4Address(base + k))
        spn = "default/s-%d/tcp/http" % k
        svc = "service-%s-%s" % (chain_hash(spn), spn)
        epchains = []
        for ip in ips:
            epn = "%s__%s/8080" % (spn, ip)
            ep = "endpoint-%s-%s" % (chain_hash(epn), epn)
            epchains.append(ep)
            a('add chain %s %s' % (t, ep))
            a('add rule %s %s ip saddr %s jump mark-for-masquerade' % (t, ep, ip))
            a('add rule %s %s meta l4proto tcp dnat to %s:8080' % (t, ep, ip))
        a('add chain %s %s' % (t, svc))
        a('add rule %s %s ip daddr %s tcp dport 80 ip saddr != %s jump mark-for-masquerade'
          % (t, svc, cip, cluster_cidr))
        vm = ", ".join('%d : goto %s' % (j, c) for j, c in enumerate(epchains))
        a('add rule %s %s numgen random mod %d vmap { %s }' % (t, svc, len(epchains), vm))
        a('add element %s service-ips { %s . tcp . 80 comment "default/s-%d:http" : goto %s }'
          % (t, cip, k, svc))
        a("add element %s cluster-ips { %s }" % (t, cip))
    with open(out, "w") as f:
        f.write("\n".join(w) + "\n")


def serve(argv):
    name, port = argv[0].encode() + b"\n", int(argv[1])
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(4096)
    print("listening", flush=True)
    while True:
        c, _ = s.accept()
        try:
            c.sendall(name)
        except OSError:
            pass
        c.close()


def live(argv):
    sep = argv.index("--")
    opts, cmd = argv[:sep], argv[sep + 1:]
    ip, port = opts[0], int(opts[1])
    want, interval_ns, timeout_s = None, 1000_000, 120.0
    i = 2
    while i < len(opts):
        if opts[i] == "--want":
            want = opts[i + 1]
        elif opts[i] == "--interval-us":
            interval_ns = int(float(opts[i + 1]) * 1000)
        elif opts[i] == "--timeout":
            timeout_s = float(opts[i + 1])
        i += 2
    want_b = want.encode() if want else None
    sel = selectors.DefaultSelector()
    errf = tempfile.TemporaryFile()
    t0_wall = time.time_ns()
    t0 = ns()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf) if cmd else None
    deadline = t0 + int(timeout_s * 1e9)
    t_live = None
    t_cmd = None
    attempts = 0
    others = {}
    nxt = t0
    last_expire = t0
    last_progress = t0
    while t_live is None:
        t = ns()
        if t > deadline:
            break
        if p is not None and t_cmd is None and p.poll() is not None:
            t_cmd = t
        if t >= nxt:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect((ip, port))
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                s = None
            if s is not None:
                sel.register(s, selectors.EVENT_WRITE, [t, 0])
                attempts += 1
            nxt += interval_ns
            if nxt < t:
                nxt = t + interval_ns
        if t - last_expire > 10_000_000:
            last_expire = t
            for key in list(sel.get_map().values()):
                if t - key.data[0] > 300_000_000:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
        if t - last_progress > 5_000_000_000:
            last_progress = t
            sys.stderr.write("    ... %.0f s, not live yet%s\n"
                             % ((t - t0) / 1e9, "" if t_cmd is None else " (apply done)"))
        wait = max(0.0, (nxt - ns()) / 1e9)
        for key, _ in sel.select(wait):
            s, st = key.fileobj, key.data
            if st[1] == 0:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    sel.unregister(s)
                    s.close()
                    continue
                st[1] = 1
                sel.modify(s, selectors.EVENT_READ, st)
                continue
            try:
                b = s.recv(64)
            except OSError:
                b = b""
            sel.unregister(s)
            s.close()
            b = b.strip()
            if b and (want_b is None or b == want_b):
                t_live = ns()
                break
            if b:
                others[b.decode()] = others.get(b.decode(), 0) + 1
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    rc = None
    err = ""
    if p is not None:
        p.wait()
        errf.seek(0)
        err = errf.read().decode(errors="replace")[-500:]
        if t_cmd is None:
            t_cmd = ns()
        rc = p.returncode
    print(json.dumps({
        "live_ms": None if t_live is None else (t_live - t0) / 1e6,
        "cmd_ms": None if t_cmd is None else (t_cmd - t0) / 1e6,
        "cmd_rc": rc, "cmd_err": err, "attempts": attempts, "others": others,
        "t0_wall_ns": t0_wall,
    }))


def syncs_logged(path, off, t0):
    """(start_ms, end_ms, ports) of each "services synced" line ferryd logged
    after byte OFF, relative to T0 (the log's timestamp is the end of the
    sync, after its transaction committed; start = end - took_ms)."""
    import datetime
    import re
    with open(path, "rb") as f:
        f.seek(off)
        text = f.read().decode(errors="replace")
    out = []
    for line in text.splitlines():
        if "services synced" not in line:
            continue
        m = re.match(r"(\S+)Z", line)
        took = re.search(r"took_ms=([0-9.]+)", line)
        ports = re.search(r"ports=(\d+)", line)
        if not (m and took and ports):
            continue
        ts = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc)
        end = (ts.timestamp() * 1e9 - t0) / 1e6
        out.append((end - float(took.group(1)), end, int(ports.group(1))))
    return out


def timeline(argv):
    """timeline LOG OFFSET T0_WALL_NS: "start_ms-end_ms(ports)" of each sync."""
    out = ["%.0f-%.0f(%d)" % s for s in syncs_logged(argv[0], int(argv[1]), int(argv[2]))]
    print(" ".join(out) if out else "none")


def synced(argv):
    """synced LOG OFFSET T0_WALL_NS PORTS: when the first sync that left PORTS
    ports programmed ended (ms since T0), or n/a."""
    want = int(argv[3])
    ends = [e for _, e, p in syncs_logged(argv[0], int(argv[1]), int(argv[2])) if p >= want]
    print("%.1f" % ends[0] if ends else "n/a")


def one(ip, port, timeout=2.0):
    t = ns()
    s = socket.create_connection((ip, port), timeout=timeout)
    try:
        b = s.recv(64)
    finally:
        s.close()
    return ns() - t, b.strip().decode()


def lat(argv):
    """lat IP PORT COUNT [OUT]: with OUT, append the samples (us) to OUT
    instead of printing the statistics."""
    ip, port, count = argv[0], int(argv[1]), int(argv[2])
    fail = 0
    for _ in range(20):
        try:
            one(ip, port)
        except OSError:
            pass
    d = []
    for _ in range(count):
        try:
            dt, _ = one(ip, port)
            d.append(dt / 1000)
        except OSError:
            fail += 1
    if len(argv) > 3:
        with open(argv[3], "a") as f:
            f.write("".join("%.1f\n" % v for v in d) + "fail %d\n" % fail)
        return
    print(json.dumps(stats_of(d, fail)))


def stats_of(d, fail):
    d = sorted(d)
    if not d:
        return {"fail": fail}
    return {
        "median_us": d[len(d) // 2], "p99_us": d[min(len(d) - 1, int(len(d) * 0.99))],
        "mean_us": sum(d) / len(d), "min_us": d[0], "max_us": d[-1], "fail": fail,
        "n": len(d),
    }


def stats(argv):
    d, fail = [], 0
    for l in open(argv[0]):
        if l.startswith("fail"):
            fail += int(l.split()[1])
        elif l.strip():
            d.append(float(l))
    print(json.dumps(stats_of(d, fail)))


def check(argv):
    port, path = int(argv[0]), argv[1]
    ips = [l.strip() for l in open(path) if l.strip()]
    ok = 0
    for ip in ips:
        try:
            one(ip, port, 1.0)
            ok += 1
        except OSError:
            pass
    print(ok, len(ips))


def spread(argv):
    ip, port, count = argv[0], int(argv[1]), int(argv[2])
    t = {}
    for _ in range(count):
        try:
            _, name = one(ip, port)
        except OSError:
            name = "(failed)"
        t[name] = t.get(name, 0) + 1
    print(json.dumps(t, sort_keys=True))


if __name__ == "__main__":
    {
        "gen-ferry": gen_ferry, "gen-kube-proxy": gen_kube_proxy, "serve": serve,
        "live": live, "lat": lat, "stats": stats, "timeline": timeline, "synced": synced, "check": check, "spread": spread,
    }[sys.argv[1]](sys.argv[2:])
