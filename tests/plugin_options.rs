//! Bridge-plugin options and how they show in the kernel: hairpinMode, mtu,
//! promiscMode, isDefaultGateway, requested MACs and IPs.

use ferry_e2e::*;

#[test]
fn hairpin_mtu_promisc() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    let conf = ferry_net(
        &host,
        "1.1.0",
        "10.81.1.0/24",
        None,
        json!({"hairpinMode": true, "mtu": 1400, "promiscMode": true}),
    );
    let pod = host.pod();
    let r = host.cni(&Cni::add("opts", &pod), &conf).ok();
    let veth = result_host_veth(&r);
    let link = host.ns.link(&veth).expect("host veth");
    assert_eq!(
        link["linkinfo"]["info_slave_data"]["hairpin"],
        true,
        "hairpin on {veth}: {}",
        host.ns.ok(&["ip", "-d", "link", "show", &veth])
    );
    assert_eq!(link["mtu"], 1400, "host veth mtu: {link}");
    let eth0 = pod.link("eth0").expect("pod eth0");
    assert_eq!(eth0["mtu"], 1400, "pod mtu: {eth0}");
    assert_eq!(r["interfaces"][2]["mtu"], 1400, "result mtu: {r}");
    let bridge = host.ns.link("fbr0").expect("bridge");
    let flags: Vec<&str> = bridge["flags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(flags.contains(&"PROMISC"), "bridge flags {flags:?}");
    pod.assert_ping("10.81.1.1");
    host.cni(&Cni::del("opts", &pod), &with_prev(&conf, &r))
        .ok();

    // Defaults: hairpin off.
    let plain = ferry_net(&host, "1.1.0", "10.81.1.0/24", None, json!({}));
    let r = host.cni(&Cni::add("plain", &pod), &plain).ok();
    let link = host.ns.link(&result_host_veth(&r)).expect("host veth");
    assert_eq!(
        link["linkinfo"]["info_slave_data"]["hairpin"], false,
        "{link}"
    );
    host.cni(&Cni::del("plain", &pod), &with_prev(&plain, &r))
        .ok();
}

#[test]
fn requested_mac_and_ips() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    let base = ferry_net(
        &host,
        "1.1.0",
        "10.81.2.0/24",
        Some("fd81:2::/64"),
        json!({}),
    );

    // runtimeConfig.mac and runtimeConfig.ips.
    let mut conf = base.clone();
    conf["runtimeConfig"] = json!({"mac": "0a:58:0a:51:02:63", "ips": ["10.81.2.99/24"]});
    let pod = host.pod();
    let r = host.cni(&Cni::add("rc", &pod), &conf).ok();
    assert_eq!(pod.link("eth0").unwrap()["address"], "0a:58:0a:51:02:63");
    assert_eq!(
        r["interfaces"][2]["mac"].as_str().unwrap().to_lowercase(),
        "0a:58:0a:51:02:63"
    );
    assert!(result_ips(&r).contains(&"10.81.2.99".to_string()), "{r}");
    assert!(pod.addrs("eth0").contains(&"10.81.2.99/24".to_string()));
    host.cni(&Cni::del("rc", &pod), &with_prev(&conf, &r)).ok();

    // CNI_ARGS IP= and MAC=.
    let pod2 = host.pod();
    let cni = Cni::add("args", &pod2).args("IgnoreUnknown=1;IP=10.81.2.77;MAC=0a:58:0a:51:02:4d");
    let r = host.cni(&cni, &base).ok();
    assert_eq!(pod2.link("eth0").unwrap()["address"], "0a:58:0a:51:02:4d");
    assert!(
        pod2.addrs("eth0").contains(&"10.81.2.77/24".to_string()),
        "{r}"
    );
    pod2.assert_ping("10.81.2.1");
    host.cni(
        &Cni::del("args", &pod2).args("IgnoreUnknown=1;IP=10.81.2.77;MAC=0a:58:0a:51:02:4d"),
        &with_prev(&base, &r),
    )
    .ok();
    assert!(host.leases().is_empty(), "{:?}", host.leases());
}

#[test]
fn default_gateway_without_ipam_routes() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    let conf = ferry_net(
        &host,
        "1.1.0",
        "10.81.3.0/24",
        None,
        json!({"isDefaultGateway": true, "ipam": {"routes": []}}),
    );
    let pod = host.pod();
    let r = host.cni(&Cni::add("dgw", &pod), &conf).ok();
    let route = pod.ok(&["ip", "-4", "route", "show", "default"]);
    assert!(
        route.contains("via 10.81.3.1"),
        "default route {route}; result {r}"
    );
    host.cni(&Cni::check("dgw", &pod), &with_prev(&conf, &r))
        .ok();
    host.cni(&Cni::del("dgw", &pod), &with_prev(&conf, &r)).ok();
}

/// A host with an "outside" netns behind a veth: 10.255.0.1 (host) <->
/// 10.255.0.2 (outside). The outside has no route to the pod subnet, so a
/// pod reaches it only when its traffic is masqueraded.
fn outside(host: &Host) -> Netns {
    let ext = Netns::new();
    let (a, b) = ("fext0", "fext1");
    host.ns
        .ok(&["ip", "link", "add", a, "type", "veth", "peer", "name", b]);
    host.ns.ok(&["ip", "link", "set", b, "netns", ext.name()]);
    host.ns
        .ok(&["ip", "addr", "add", "10.255.0.1/24", "dev", a]);
    host.ns.ok(&["ip", "link", "set", a, "up"]);
    ext.ok(&["ip", "addr", "add", "10.255.0.2/24", "dev", b]);
    ext.ok(&["ip", "link", "set", b, "up"]);
    ext
}

#[test]
fn masquerade_reaches_outside() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    let _ext = outside(&host);
    let masq = ferry_net(
        &host,
        "1.1.0",
        "10.81.4.0/24",
        None,
        json!({"ipMasq": true}),
    );
    let pod = host.pod();
    let r = host.cni(&Cni::add("masq", &pod), &masq).ok();
    pod.assert_ping("10.255.0.2");
    host.cni(&Cni::del("masq", &pod), &with_prev(&masq, &r))
        .ok();

    // Negative control: without ipMasq the outside cannot answer.
    let plain = ferry_net(
        &host,
        "1.1.0",
        "10.81.4.0/24",
        None,
        json!({"ipMasq": false}),
    );
    let r = host.cni(&Cni::add("plain", &pod), &plain).ok();
    pod.assert_ping("10.81.4.1");
    assert!(
        !pod.ping_once("10.255.0.2"),
        "unmasqueraded pod reached the outside:\n{}",
        host.ns.nft_ruleset()
    );
    host.cni(&Cni::del("plain", &pod), &with_prev(&plain, &r))
        .ok();
    assert!(!host.has_ferry_table(), "{}", host.ns.nft_ruleset());
}

#[test]
fn ipv6_only_and_layer2_only() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    let v6 = host.conf(json!({
        "cniVersion": "1.1.0", "name": "v6net", "type": "ferry", "bridge": "fbr6",
        "isGateway": true, "ipMasq": true,
        "ipam": {"type": "ferry-ipam", "ranges": [[{"subnet": "fd81:6::/64"}]],
                 "routes": [{"dst": "::/0"}]}
    }));
    let pod = host.pod();
    let r = host.cni(&Cni::add("six", &pod), &v6).ok();
    let ip = result_ip(&r, true);
    assert_eq!(result_ips(&r).len(), 1, "{r}");
    assert!(
        host.ns.nft_ruleset().contains(&ip),
        "{}",
        host.ns.nft_ruleset()
    );
    pod.assert_ping("fd81:6::1");
    host.cni(&Cni::check("six", &pod), &with_prev(&v6, &r)).ok();
    host.cni(&Cni::del("six", &pod), &with_prev(&v6, &r)).ok();
    assert!(!host.has_ferry_table(), "{}", host.ns.nft_ruleset());

    // No ipam at all: layer 2 only, like the reference.
    let l2 = host.conf(json!({
        "cniVersion": "1.1.0", "name": "l2net", "type": "ferry", "bridge": "fbr2"
    }));
    let r = host.cni(&Cni::add("l2", &pod), &l2).ok();
    assert!(r["ips"].as_array().is_none_or(|a| a.is_empty()), "{r}");
    assert_eq!(r["interfaces"].as_array().map(Vec::len), Some(3), "{r}");
    assert!(pod.link("eth0").is_some());
    assert_eq!(
        host.ns.link(&result_host_veth(&r)).unwrap()["master"],
        "fbr2"
    );
    host.cni(&Cni::del("l2", &pod), &with_prev(&l2, &r)).ok();
    assert!(host.veths().is_empty(), "{:?}", host.veths());
    assert!(host.records().is_empty(), "{:?}", host.records());
}
