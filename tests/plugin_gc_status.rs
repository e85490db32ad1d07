//! CNI 1.1's GC and STATUS verbs.

use ferry::attachment::host_veth_name;
use ferry_e2e::*;

const NET: &str = "ferrynet";

fn masq_has(host: &Host, ip: &str) -> bool {
    let rules = host.ns.nft_ruleset();
    rules.contains(&format!("{ip} ")) || rules.contains(&format!("{ip},"))
}

/// ADDs `ids`, runs GC with `key` listing only `keep`, and checks that
/// everything of the others is gone while `keep` still works.
fn gc_keeps_only(key: &str) {
    let host = Host::new();
    let conf = ferry_net(
        &host,
        "1.1.0",
        "10.80.1.0/24",
        None,
        json!({"ipMasq": true}),
    );
    let ids = ["keep", "drop1", "drop2"];
    let pods: Vec<Netns> = ids.iter().map(|_| host.pod()).collect();
    let results: Vec<Value> = ids
        .iter()
        .zip(&pods)
        .map(|(id, pod)| host.cni(&Cni::add(id, pod), &conf).ok())
        .collect();
    for r in &results {
        assert!(
            masq_has(&host, &result_ip(r, false)),
            "{}",
            host.ns.nft_ruleset()
        );
    }

    let mut gc = conf.clone();
    gc[key] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    host.cni(&Cni::bare("GC"), &gc).ok();

    for (id, r) in ids.iter().zip(&results).skip(1) {
        let ip = result_ip(r, false);
        let veth = host_veth_name(NET, id, "eth0");
        assert!(
            host.ns.link(&veth).is_none(),
            "GC ({key}) left {veth} of {id}"
        );
        assert!(
            !masq_has(&host, &ip),
            "GC ({key}) left masquerade of {id} {ip}:\n{}",
            host.ns.nft_ruleset()
        );
        assert!(
            !host.leases().iter().any(|l| l.ends_with(&format!("/{ip}"))),
            "GC ({key}) left the lease of {id}: {:?}",
            host.leases()
        );
        assert!(
            !host.records().iter().any(|f| f.contains(id)),
            "GC ({key}) left the record of {id}: {:?}",
            host.records()
        );
    }
    let keep_ip = result_ip(&results[0], false);
    assert_eq!(host.veths(), vec![host_veth_name(NET, "keep", "eth0")]);
    assert_eq!(host.leases().len(), 1, "{:?}", host.leases());
    assert_eq!(host.records().len(), 1, "{:?}", host.records());
    assert!(
        masq_has(&host, &keep_ip),
        "GC ({key}) removed the kept pod's masquerade"
    );
    pods[0].assert_ping("10.80.1.1");
    host.cni(
        &Cni::check("keep", &pods[0]),
        &with_prev(&conf, &results[0]),
    )
    .ok();

    // GC again is a no-op; then the kept one is DELeted normally.
    host.cni(&Cni::bare("GC"), &gc).ok();
    assert_eq!(host.veths().len(), 1);
    host.cni(&Cni::del("keep", &pods[0]), &with_prev(&conf, &results[0]))
        .ok();
    assert!(host.veths().is_empty() && host.leases().is_empty() && host.records().is_empty());
    assert!(!host.has_ferry_table(), "{}", host.ns.nft_ruleset());
}

#[test]
fn gc_valid_attachments() {
    if !require_root() {
        return;
    }
    gc_keeps_only("cni.dev/valid-attachments");
}

#[test]
fn gc_older_attachments_key() {
    if !require_root() {
        return;
    }
    gc_keeps_only("cni.dev/attachments");
}

#[test]
fn gc_finds_masquerade_without_records() {
    if !require_root() {
        return;
    }
    // A lost dataDir: GC still finds the elements by their key.
    let host = Host::new();
    let conf = ferry_net(
        &host,
        "1.1.0",
        "10.80.2.0/24",
        None,
        json!({"ipMasq": true}),
    );
    let pod = host.pod();
    let r = host.cni(&Cni::add("lost", &pod), &conf).ok();
    std::fs::remove_dir_all(host.data_dir()).unwrap();
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    host.cni(&Cni::bare("GC"), &gc).ok();
    let ip = result_ip(&r, false);
    assert!(
        !masq_has(&host, &ip),
        "GC left {ip}:\n{}",
        host.ns.nft_ruleset()
    );
    assert!(host.leases().is_empty(), "{:?}", host.leases());
    // The veth has no record to be found by; DEL still removes it.
    host.cni(&Cni::del("lost", &pod), &conf).ok();
    assert!(host.veths().is_empty(), "{:?}", host.veths());
}

/// A GC without the list of valid attachments knows of no stale one: it
/// removes nothing (taking it as "none is valid" would tear down every pod).
#[test]
fn gc_without_the_list_removes_nothing() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    let conf = ferry_net(
        &host,
        "1.1.0",
        "10.80.5.0/24",
        None,
        json!({"ipMasq": true}),
    );
    let pod = host.pod();
    let r = host.cni(&Cni::add("a", &pod), &conf).ok();
    host.cni(&Cni::bare("GC"), &conf).ok();
    assert_eq!(host.veths(), vec![host_veth_name(NET, "a", "eth0")]);
    assert_eq!(host.leases().len(), 1, "{:?}", host.leases());
    assert_eq!(host.records().len(), 1, "{:?}", host.records());
    let ip = result_ip(&r, false);
    assert!(masq_has(&host, &ip), "GC removed the masquerade of {ip}");
    pod.assert_ping("10.80.5.1");
    host.cni(&Cni::del("a", &pod), &with_prev(&conf, &r)).ok();
    assert!(host.veths().is_empty() && host.leases().is_empty());
}

#[test]
fn gc_needs_cni_1_1() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    let mut conf = ferry_net(&host, "1.0.0", "10.80.3.0/24", None, json!({}));
    conf["cni.dev/valid-attachments"] = json!([]);
    host.cni(&Cni::bare("GC"), &conf).expect_code(1);
    host.cni(&Cni::bare("STATUS"), &conf).expect_code(1);
}

#[test]
fn status() {
    if !require_root() {
        return;
    }
    let host = Host::new();
    let conf = ferry_net(&host, "1.1.0", "10.80.4.0/24", None, json!({}));
    let out = host.cni(&Cni::bare("STATUS"), &conf);
    assert!(
        out.success() && out.stdout.trim().is_empty(),
        "{}",
        out.describe()
    );
    // ferry-ipam on its own too.
    let mut ipam_conf = conf.clone();
    ipam_conf["type"] = json!("ferry-ipam");
    let out = host.cni(&Cni::bare("STATUS"), &ipam_conf);
    assert!(out.success(), "{}", out.describe());

    // ipam.dataDir a regular file: the plugin cannot allocate.
    let file = host.root_dir().join("leases-are-a-file");
    std::fs::write(&file, b"x").unwrap();
    let mut broken = conf.clone();
    broken["ipam"]["dataDir"] = json!(file.display().to_string());
    host.cni(&Cni::bare("STATUS"), &broken).expect_code(50);
    broken["type"] = json!("ferry-ipam");
    host.cni(&Cni::bare("STATUS"), &broken).expect_code(50);

    // The conflist ferryd writes names its readiness file: 50 until it exists.
    let ready = host.root_dir().join("ferryd-ready");
    let mut managed = conf.clone();
    managed["ferrydReadyFile"] = json!(ready.display().to_string());
    host.cni(&Cni::bare("STATUS"), &managed).expect_code(50);
    std::fs::write(&ready, b"").unwrap();
    let out = host.cni(&Cni::bare("STATUS"), &managed);
    assert!(out.success(), "{}", out.describe());
}
