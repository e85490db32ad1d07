//! Failing ADDs: the right CNI error code on stdout, and the host exactly as
//! it was before (no link, address, route, nft rule, lease or record left).

use ferry::attachment::host_veth_name;
use ferry_e2e::*;

fn conf(host: &Host) -> Value {
    ferry_net(host, "1.1.0", "10.78.1.0/24", None, json!({"ipMasq": true}))
}

/// Runs a failing ADD against a host, asserts `code` and that the host's
/// snapshot did not change.
fn expect_add_fails(host: &Host, what: &str, cni: &Cni, stdin: &str, code: u64) -> Outcome {
    let before = host.snapshot();
    let out = host.run("ferry", cni, stdin);
    let got = out.err_code();
    assert_eq!(got, code, "{what}: wrong code\n{}", out.describe());
    before.assert_same(&host.snapshot(), &format!("{what}\n{}", out.describe()));
    assert!(
        host.leases().is_empty(),
        "{what}: leases {:?}",
        host.leases()
    );
    out
}

#[test]
fn bad_environment() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    let pod = host.pod();
    let c = conf(&host).to_string();
    let add = || Cni::add("c1", &pod);

    expect_add_fails(
        &host,
        "missing CNI_CONTAINERID",
        &add().container_id(None),
        &c,
        4,
    );
    expect_add_fails(
        &host,
        "empty CNI_CONTAINERID",
        &add().container_id(Some("")),
        &c,
        4,
    );
    expect_add_fails(&host, "missing CNI_IFNAME", &add().without_ifname(), &c, 4);
    expect_add_fails(&host, "missing CNI_NETNS", &add().netns(None), &c, 4);
    expect_add_fails(
        &host,
        "container id ../x",
        &add().container_id(Some("../x")),
        &c,
        4,
    );
    expect_add_fails(
        &host,
        "container id a/b",
        &add().container_id(Some("a/b")),
        &c,
        4,
    );
    expect_add_fails(
        &host,
        "ifname of 16 bytes",
        &add().ifname("eth0123456789012"),
        &c,
        4,
    );
    expect_add_fails(&host, "ifname with /", &add().ifname("et/h0"), &c, 4);
    expect_add_fails(&host, "ifname ..", &add().ifname(".."), &c, 4);

    let file = host.root_dir().join("not-a-netns");
    std::fs::write(&file, b"x").unwrap();
    expect_add_fails(
        &host,
        "CNI_NETNS a regular file",
        &add().netns(Some(file.to_str().unwrap())),
        &c,
        4,
    );
    expect_add_fails(
        &host,
        "CNI_NETNS the plugin's own netns",
        &add().netns(Some(&host.ns.path())),
        &c,
        4,
    );
    let missing = format!("/run/netns/{}-does-not-exist", host.ns.name());
    expect_add_fails(
        &host,
        "CNI_NETNS nonexistent",
        &add().netns(Some(&missing)),
        &c,
        3,
    );
    // Nothing happened in the pod either.
    assert_eq!(pod.link_names(), vec!["lo".to_string()]);
}

#[test]
fn bad_config() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    let pod = host.pod();
    let add = Cni::add("c1", &pod);
    let base = conf(&host);
    let with = |patch: Value| {
        let mut c = base.clone();
        merge(&mut c, patch);
        c.to_string()
    };

    expect_add_fails(&host, "stdin not JSON", &add, "this is not json", 6);
    expect_add_fails(&host, "stdin empty", &add, "", 6);
    expect_add_fails(
        &host,
        "cniVersion 0.2.0",
        &add,
        &with(json!({"cniVersion": "0.2.0"})),
        1,
    );
    expect_add_fails(
        &host,
        "cniVersion 9.9.9",
        &add,
        &with(json!({"cniVersion": "9.9.9"})),
        1,
    );
    expect_add_fails(&host, "vlan 100", &add, &with(json!({"vlan": 100})), 2);
    expect_add_fails(
        &host,
        "unknown CNI_ARGS key",
        &add.clone().args("K8S_POD_NAME=web"),
        &base.to_string(),
        2,
    );
    expect_add_fails(
        &host,
        "bad ipam subnet",
        &add,
        &with(json!({"ipam": {"ranges": [[{"subnet": "10.78.1.0/33"}]]}})),
        7,
    );
    expect_add_fails(
        &host,
        "ipam subnet garbage",
        &add,
        &with(json!({"ipam": {"ranges": [[{"subnet": "garbage"}]]}})),
        7,
    );
    expect_add_fails(
        &host,
        "ipam.type not in CNI_PATH",
        &add,
        &with(json!({"ipam": {"type": "no-such-ipam"}})),
        7,
    );
    expect_add_fails(&host, "mtu 10", &add, &with(json!({"mtu": 10})), 7);
    expect_add_fails(
        &host,
        "bad network name",
        &add,
        &with(json!({"name": "../x"})),
        7,
    );
    assert_eq!(pod.link_names(), vec!["lo".to_string()]);

    // The same unknown CNI_ARGS key is fine with IgnoreUnknown=1.
    let ok = add.clone().args("IgnoreUnknown=1;K8S_POD_NAME=web");
    let r = host.cni(&ok, &base).ok();
    host.cni(
        &Cni::del("c1", &pod).args("IgnoreUnknown=1;K8S_POD_NAME=web"),
        &with_prev(&base, &r),
    )
    .ok();
}

#[test]
fn ifname_already_in_pod_rolls_back() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    let c = conf(&host);
    // A first pod, so the bridge and the nft table exist: the failing ADD
    // must then leave the snapshot exactly as it was.
    let first = host.pod();
    let r1 = host.cni(&Cni::add("first", &first), &c).ok();

    let pod = host.pod();
    pod.ok(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer",
    ]);
    let before = host.snapshot();
    let out = host.cni(&Cni::add("clash", &pod), &c);
    let code = out.err_code();
    assert!(
        code == 100 || code == 7,
        "ifname present: code {code}\n{}",
        out.describe()
    );
    before.assert_same(
        &host.snapshot(),
        &format!("failed ADD rolled back\n{}", out.describe()),
    );
    assert!(
        host.ns
            .link(&host_veth_name("ferrynet", "clash", "eth0"))
            .is_none(),
        "host veth of the failed ADD left"
    );
    assert_eq!(
        host.leases().len(),
        1,
        "only the first pod's lease: {:?}",
        host.leases()
    );
    assert_eq!(
        host.records().len(),
        1,
        "only the first pod's record: {:?}",
        host.records()
    );
    // The pre-existing eth0 in the pod is untouched.
    let l = pod.link("eth0").expect("the pod's own eth0 survives");
    assert_eq!(l["linkinfo"]["info_kind"], "veth");
    // ... and the first pod still works.
    first.assert_ping("10.78.1.1");
    host.cni(&Cni::del("first", &first), &with_prev(&c, &r1))
        .ok();
    // The failed attachment's DEL (runtimes send one) is fine too.
    host.cni(&Cni::del("clash", &pod), &c).ok();
    assert!(host.leases().is_empty() && host.records().is_empty());
    assert!(!host.has_ferry_table(), "{}", host.ns.nft_ruleset());
}

#[test]
fn second_add_of_same_attachment_changes_nothing() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    let c = conf(&host);
    let pod = host.pod();
    let r = host.cni(&Cni::add("dup", &pod), &c).ok();
    let before = host.snapshot();
    let out = host.cni(&Cni::add("dup", &pod), &c);
    let code = out.err_code();
    assert!(
        code == 7 || code == 100,
        "second ADD: code {code}\n{}",
        out.describe()
    );
    // The failed ADD must not roll back the first one's lease, veth or masq.
    before.assert_same(&host.snapshot(), &format!("second ADD\n{}", out.describe()));
    pod.assert_ping("10.78.1.1");
    host.cni(&Cni::check("dup", &pod), &with_prev(&c, &r)).ok();
    host.cni(&Cni::del("dup", &pod), &with_prev(&c, &r)).ok();
    assert!(host.leases().is_empty() && host.veths().is_empty());
}

#[test]
fn range_exhausted() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    // Exactly two usable addresses.
    let c = ferry_net(
        &host,
        "1.1.0",
        "10.78.2.0/24",
        None,
        json!({"ipMasq": true, "ipam": {"ranges": [[{
            "subnet": "10.78.2.0/24", "rangeStart": "10.78.2.10", "rangeEnd": "10.78.2.11"
        }]]}}),
    );
    let (p1, p2, p3) = (host.pod(), host.pod(), host.pod());
    let r1 = host.cni(&Cni::add("a", &p1), &c).ok();
    let r2 = host.cni(&Cni::add("b", &p2), &c).ok();
    let mut got = vec![result_ip(&r1, false), result_ip(&r2, false)];
    got.sort();
    assert_eq!(got, vec!["10.78.2.10", "10.78.2.11"]);
    let before = host.snapshot();
    let out = host.cni(&Cni::add("c", &p3), &c);
    out.expect_code(101);
    before.assert_same(
        &host.snapshot(),
        &format!("third ADD in a full range\n{}", out.describe()),
    );
    assert_eq!(p3.link_names(), vec!["lo".to_string()]);

    // A requested address that is taken is "unavailable" (101) too.
    let out = host.cni(&Cni::add("d", &p3).args("IP=10.78.2.10"), &c);
    out.expect_code(101);
    before.assert_same(
        &host.snapshot(),
        &format!("ADD of a taken IP\n{}", out.describe()),
    );

    // Freeing one makes room again.
    host.cni(&Cni::del("a", &p1), &with_prev(&c, &r1)).ok();
    let r3 = host.cni(&Cni::add("c", &p3), &c).ok();
    assert_eq!(result_ip(&r3, false), result_ip(&r1, false));
    host.cni(&Cni::del("b", &p2), &with_prev(&c, &r2)).ok();
    host.cni(&Cni::del("c", &p3), &with_prev(&c, &r3)).ok();
    assert!(host.leases().is_empty(), "{:?}", host.leases());
    assert!(host.veths().is_empty(), "{:?}", host.veths());
}
