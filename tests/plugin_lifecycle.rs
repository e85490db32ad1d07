//! ADD / CHECK / DEL of pods on one ferry bridge, results per CNI version,
//! VERSION, and DEL's corner cases. Every test makes its own host netns.

use ferry::attachment::host_veth_name;
use ferry_e2e::*;

const NET: &str = "ferrynet";

/// Asserts the bridge plugin's result layout: interfaces bridge / host veth /
/// pod (with sandbox), every ip on interface 2 with a gateway, and the kernel
/// agreeing with it.
fn check_add_result(host: &Host, pod: &Netns, id: &str, r: &Value, version: &str) {
    let ctx = format!("result of ADD {id}: {r:#}");
    assert_eq!(r["cniVersion"], version, "{ctx}");
    let ifs = r["interfaces"]
        .as_array()
        .unwrap_or_else(|| panic!("no interfaces: {ctx}"));
    assert_eq!(ifs.len(), 3, "{ctx}");
    assert_eq!(ifs[0]["name"], "fbr0", "interfaces[0] is the bridge: {ctx}");
    assert!(ifs[0]["sandbox"].is_null(), "{ctx}");
    let veth = host_veth_name(NET, id, "eth0");
    assert_eq!(
        ifs[1]["name"],
        veth.as_str(),
        "interfaces[1] is the host veth: {ctx}"
    );
    assert!(
        veth.len() == 15
            && veth.starts_with("veth")
            && veth[4..].chars().all(|c| c.is_ascii_hexdigit()),
        "host veth name {veth}"
    );
    assert!(ifs[1]["sandbox"].is_null(), "{ctx}");
    assert_eq!(ifs[2]["name"], "eth0", "{ctx}");
    assert_eq!(ifs[2]["sandbox"], pod.path().as_str(), "{ctx}");
    for i in ifs {
        let mac = i["mac"].as_str().unwrap_or("");
        assert!(
            mac.len() == 17 && mac.matches(':').count() == 5,
            "mac of {i}: {ctx}"
        );
    }
    let ips = r["ips"]
        .as_array()
        .unwrap_or_else(|| panic!("no ips: {ctx}"));
    assert_eq!(ips.len(), 2, "one IPv4 and one IPv6 address: {ctx}");
    let old = version.starts_with("0.");
    for ip in ips {
        let addr = ip["address"].as_str().unwrap();
        let v6 = addr.contains(':');
        assert_eq!(ip["interface"], 2, "{ctx}");
        let (prefix, gw, len) = if v6 {
            ("fd77:1::", "fd77:1::1", "/64")
        } else {
            ("10.77.1.", "10.77.1.1", "/24")
        };
        assert!(
            addr.starts_with(prefix) && addr.ends_with(len),
            "{addr}: {ctx}"
        );
        assert_ne!(
            addr,
            format!("{gw}{len}"),
            "pod got the gateway address: {ctx}"
        );
        assert_eq!(ip["gateway"], gw, "{ctx}");
        if old {
            assert_eq!(
                ip["version"],
                if v6 { "6" } else { "4" },
                "0.x ips carry version: {ctx}"
            );
        } else {
            assert!(
                ip.get("version").is_none(),
                "1.x ips have no version: {ctx}"
            );
        }
    }
    let dsts: Vec<&str> = r["routes"]
        .as_array()
        .unwrap_or_else(|| panic!("no routes: {ctx}"))
        .iter()
        .filter_map(|r| r["dst"].as_str())
        .collect();
    assert!(
        dsts.contains(&"0.0.0.0/0") && dsts.contains(&"::/0"),
        "{ctx}"
    );

    // The kernel agrees.
    let link = host
        .ns
        .link(&veth)
        .unwrap_or_else(|| panic!("host has no {veth}"));
    assert_eq!(link["master"], "fbr0", "{veth} on the bridge");
    assert_eq!(
        link["address"],
        ifs[1]["mac"].as_str().unwrap().to_lowercase(),
        "host veth mac"
    );
    let eth0 = pod.link("eth0").expect("pod has eth0");
    assert_eq!(
        eth0["address"],
        ifs[2]["mac"].as_str().unwrap().to_lowercase()
    );
    let have = pod.addrs("eth0");
    for ip in ips {
        let a = ip["address"].as_str().unwrap();
        assert!(have.iter().any(|h| h == a), "pod lacks {a}: has {have:?}");
    }
    let bridge = host.ns.addrs("fbr0");
    assert!(
        bridge.contains(&"10.77.1.1/24".to_string()),
        "bridge addrs {bridge:?}"
    );
    assert!(
        bridge.contains(&"fd77:1::1/64".to_string()),
        "bridge addrs {bridge:?}"
    );
    assert_bridge_nf_call(host, "fbr0", &ctx);
    let default4 = pod.ok(&["ip", "-4", "route", "show", "default"]);
    assert!(
        default4.contains("via 10.77.1.1"),
        "pod default route: {default4}"
    );
    let default6 = pod.ok(&["ip", "-6", "route", "show", "default"]);
    assert!(
        default6.contains("via fd77:1::1"),
        "pod default route: {default6}"
    );
}

/// The bridge's own bridge-netfilter switches are on: a Service reply from
/// a pod to a client on the same bridge is un-DNATed only then.
fn assert_bridge_nf_call(host: &Host, bridge: &str, ctx: &str) {
    let link = host.ns.link(bridge).expect("bridge exists");
    let data = &link["linkinfo"]["info_data"];
    for key in ["nf_call_iptables", "nf_call_ip6tables"] {
        assert_eq!(data[key], 1, "{bridge} {key}: {ctx}: {data}");
    }
}

/// A bridge that exists without them (made by the reference plugin, an
/// admin, an older ferry) gets them on the next ADD.
#[test]
fn existing_bridge_gets_nf_call() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    host.ns.ok(&[
        "ip",
        "link",
        "add",
        "fbr0",
        "type",
        "bridge",
        "nf_call_iptables",
        "0",
        "nf_call_ip6tables",
        "0",
    ]);
    let conf = ferry_net(&host, "1.1.0", "10.77.1.0/24", None, json!({}));
    let pod = host.pod();
    let r = host.cni(&Cni::add("pod1", &pod), &conf).ok();
    assert_bridge_nf_call(&host, "fbr0", "after ADD on an existing bridge");
    host.cni(&Cni::del("pod1", &pod), &with_prev(&conf, &r))
        .ok();
}

#[test]
fn two_pods_add_ping_check_del() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    let conf = ferry_net(
        &host,
        "1.1.0",
        "10.77.1.0/24",
        Some("fd77:1::/64"),
        json!({"ipMasq": true}),
    );
    let before = host.snapshot();
    let (p1, p2) = (host.pod(), host.pod());
    let r1 = host.cni(&Cni::add("pod1", &p1), &conf).ok();
    check_add_result(&host, &p1, "pod1", &r1, "1.1.0");
    let r2 = host.cni(&Cni::add("pod2", &p2), &conf).ok();
    check_add_result(&host, &p2, "pod2", &r2, "1.1.0");
    assert_ne!(result_ips(&r1), result_ips(&r2), "distinct addresses");

    // Masquerade elements for both pods, in ferry's own table.
    let rules = host.ns.nft_ruleset();
    assert!(
        rules.contains("table inet ferry"),
        "no table inet ferry:\n{rules}"
    );
    for ip in result_ips(&r1).iter().chain(&result_ips(&r2)) {
        assert!(
            rules.contains(ip.as_str()),
            "no masquerade element for {ip}:\n{rules}"
        );
    }
    assert_eq!(host.leases().len(), 4, "leases: {:?}", host.leases());
    assert_eq!(host.records().len(), 2, "records: {:?}", host.records());

    // Traffic: pod to pod and pod to gateway, both families.
    p1.assert_ping(&result_ip(&r2, false));
    p1.assert_ping(&result_ip(&r2, true));
    p2.assert_ping(&result_ip(&r1, false));
    p1.assert_ping("10.77.1.1");
    p2.assert_ping("10.77.1.1");
    p1.assert_ping("fd77:1::1");
    p2.assert_ping("fd77:1::1");

    // CHECK with prevResult = ADD result.
    host.cni(&Cni::check("pod1", &p1), &with_prev(&conf, &r1))
        .ok();
    host.cni(&Cni::check("pod2", &p2), &with_prev(&conf, &r2))
        .ok();

    // CHECK notices a missing address.
    let addr4 = r1["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap())
        .find(|a| !a.contains(':'))
        .unwrap()
        .to_string();
    p1.ok(&["ip", "addr", "del", &addr4, "dev", "eth0"]);
    host.cni(&Cni::check("pod1", &p1), &with_prev(&conf, &r1))
        .expect_code(103);
    // The other pod is still fine.
    host.cni(&Cni::check("pod2", &p2), &with_prev(&conf, &r2))
        .ok();

    // DEL both (runtimes pass the ADD result as prevResult).
    host.cni(&Cni::del("pod1", &p1), &with_prev(&conf, &r1))
        .ok();
    assert!(
        host.has_ferry_table(),
        "table inet ferry dropped while pod2 still masquerades"
    );
    host.cni(&Cni::del("pod2", &p2), &with_prev(&conf, &r2))
        .ok();

    host.assert_clean("after DEL");
    assert!(p1.link("eth0").is_none(), "pod1 still has eth0");
    assert!(p2.link("eth0").is_none(), "pod2 still has eth0");
    // The bridge and its gateway addresses stay, as with the reference.
    before.without_dev("fbr0").assert_same(
        &host.snapshot().without_dev("fbr0"),
        "after ADD+DEL of two pods",
    );
}

#[test]
fn results_per_cni_version() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    for (i, version) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        .iter()
        .enumerate()
    {
        let conf = ferry_net(
            &host,
            version,
            "10.77.1.0/24",
            Some("fd77:1::/64"),
            json!({}),
        );
        let pod = host.pod();
        let id = format!("ver{i}");
        let r = host.cni(&Cni::add(&id, &pod), &conf).ok();
        check_add_result(&host, &pod, &id, &r, version);
        if *version != "0.3.0" && *version != "0.3.1" {
            host.cni(&Cni::check(&id, &pod), &with_prev(&conf, &r)).ok();
        } else {
            // CHECK does not exist before 0.4.0.
            host.cni(&Cni::check(&id, &pod), &with_prev(&conf, &r))
                .expect_code(1);
        }
        host.cni(&Cni::del(&id, &pod), &with_prev(&conf, &r)).ok();
    }
    host.assert_clean("after DEL");
}

#[test]
fn version_and_about() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    let all = json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]);
    for plugin in ["ferry", "ferry-ipam"] {
        let v = host
            .run(plugin, &Cni::bare("VERSION"), r#"{"cniVersion":"1.1.0"}"#)
            .ok();
        assert_eq!(v["cniVersion"], "1.1.0", "{plugin} VERSION: {v}");
        let mut got: Vec<String> = v["supportedVersions"]
            .as_array()
            .unwrap_or_else(|| panic!("{plugin} VERSION: {v}"))
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        got.sort();
        let want: Vec<String> = all
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        for w in &want {
            assert!(got.contains(w), "{plugin} VERSION lacks {w}: {v}");
        }
        assert!(
            got.iter().all(|g| want.contains(g)),
            "{plugin} VERSION claims versions it does not speak: {v}"
        );
        // A config of an older version gets its answer in that version.
        let v = host
            .run(plugin, &Cni::bare("VERSION"), r#"{"cniVersion":"0.4.0"}"#)
            .ok();
        assert_eq!(v["cniVersion"], "0.4.0", "{plugin} VERSION: {v}");

        // No CNI_COMMAND: an about text for humans, exit 0.
        let mut none = Cni::bare("VERSION");
        none.command = None;
        let out = host.run(plugin, &none, "");
        assert!(out.success(), "{}", out.describe());
        assert!(
            out.stdout.to_lowercase().contains("ferry"),
            "about text: {}",
            out.describe()
        );
    }
}

#[test]
fn del_corner_cases() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    let conf = ferry_net(
        &host,
        "1.1.0",
        "10.77.1.0/24",
        None,
        json!({"ipMasq": true}),
    );
    let ruleset_lacks = |ip: &str, why: &str| {
        let rules = host.ns.nft_ruleset();
        assert!(
            !rules.contains(&format!("{ip} ")) && !rules.contains(&format!("{ip},")),
            "masquerade element for {ip} left after {why}:\n{rules}"
        );
    };
    let gone = |id: &str, why: &str| {
        let veth = host_veth_name(NET, id, "eth0");
        assert!(
            wait_until(std::time::Duration::from_secs(10), || host
                .ns
                .link(&veth)
                .is_none()),
            "{veth} of {id} left after {why}"
        );
        assert!(
            !host.records().iter().any(|r| r.contains(id)),
            "record of {id} left after {why}: {:?}",
            host.records()
        );
    };
    // A pod that stays while the others come and go keeps the table alive.
    let keeper = host.pod();
    let rk = host.cni(&Cni::add("keeper", &keeper), &conf).ok();

    // DEL twice.
    let pa = host.pod();
    let ra = host.cni(&Cni::add("twice", &pa), &conf).ok();
    host.cni(&Cni::del("twice", &pa), &with_prev(&conf, &ra))
        .ok();
    host.cni(&Cni::del("twice", &pa), &with_prev(&conf, &ra))
        .ok();
    gone("twice", "DEL twice");
    ruleset_lacks(&result_ip(&ra, false), "DEL twice");

    // DEL with CNI_NETNS empty (the reference leaks its masquerade here).
    let pb = host.pod();
    let rb = host.cni(&Cni::add("nonetns", &pb), &conf).ok();
    host.cni(
        &Cni::del("nonetns", &pb).netns(Some("")),
        &with_prev(&conf, &rb),
    )
    .ok();
    gone("nonetns", "DEL with empty CNI_NETNS");
    ruleset_lacks(&result_ip(&rb, false), "DEL with empty CNI_NETNS");

    // DEL with CNI_NETNS unset altogether.
    let pb2 = host.pod();
    let rb2 = host.cni(&Cni::add("unsetns", &pb2), &conf).ok();
    host.cni(
        &Cni::del("unsetns", &pb2).netns(None),
        &with_prev(&conf, &rb2),
    )
    .ok();
    gone("unsetns", "DEL without CNI_NETNS");
    ruleset_lacks(&result_ip(&rb2, false), "DEL without CNI_NETNS");

    // DEL after the pod's netns was deleted.
    let pc = host.pod();
    let pc_path = pc.path();
    let rc = host.cni(&Cni::add("nsgone", &pc), &conf).ok();
    drop(pc);
    host.cni(&Cni::new("DEL", "nsgone", &pc_path), &with_prev(&conf, &rc))
        .ok();
    gone("nsgone", "DEL after the netns was deleted");
    ruleset_lacks(&result_ip(&rc, false), "DEL after the netns was deleted");

    // DEL when the lease file was removed by hand.
    let pd = host.pod();
    let rd = host.cni(&Cni::add("nolease", &pd), &conf).ok();
    let ip = result_ip(&rd, false);
    let lease = host.ipam_dir().join(NET).join(&ip);
    std::fs::remove_file(&lease)
        .unwrap_or_else(|e| panic!("lease file {} of nolease: {e}", lease.display()));
    host.cni(&Cni::del("nolease", &pd), &with_prev(&conf, &rd))
        .ok();
    gone("nolease", "DEL without a lease");
    ruleset_lacks(&ip, "DEL without a lease");

    // DEL of something never added (with and without prevResult).
    let pe = host.pod();
    host.cni(&Cni::del("ghost", &pe), &conf).ok();
    host.cni(&Cni::del("ghost", &pe).netns(Some("")), &conf)
        .ok();

    // Only the keeper is left, and it still works.
    assert_eq!(host.veths(), vec![host_veth_name(NET, "keeper", "eth0")]);
    assert_eq!(host.leases().len(), 1, "leases: {:?}", host.leases());
    keeper.assert_ping("10.77.1.1");
    host.cni(&Cni::del("keeper", &keeper), &with_prev(&conf, &rk))
        .ok();
    host.assert_clean("after DEL");
}
