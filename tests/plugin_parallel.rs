//! Many pods ADDed and DELeted at once on one bridge with ipMasq on, the
//! way a node starts a burst of pods: every plugin is its own process.

use std::time::Instant;

use ferry_e2e::*;

fn pods_wanted() -> usize {
    std::env::var("FERRY_E2E_PARALLEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

#[test]
fn parallel_add_and_del() {
    if !require_root() {
        return;
    }
    let n = pods_wanted();
    assert!(
        n <= 250,
        "FERRY_E2E_PARALLEL={n}: the /24 holds at most 250 pods"
    );
    let host = Host::new();
    let conf = ferry_net(
        &host,
        "1.1.0",
        "10.79.0.0/24",
        None,
        json!({"ipMasq": true}),
    );
    let before = host.snapshot();
    let pods: Vec<Netns> = (0..n).map(|_| host.pod()).collect();
    let ids: Vec<String> = (0..n).map(|i| format!("par{i}")).collect();

    let start = Instant::now();
    let results: Vec<Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .zip(&ids)
            .map(|(pod, id)| {
                let (host, conf) = (&host, &conf);
                s.spawn(move || host.cni(&Cni::add(id, pod), conf))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    println!("{n} parallel ADDs: {:?}", start.elapsed());
    assert_all_succeeded(&results, "ADDs");
    let results: Vec<Value> = results.iter().map(Outcome::ok).collect();

    let mut ips: Vec<String> = results.iter().map(|r| result_ip(r, false)).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), n, "addresses are not distinct");
    assert!(
        !ips.contains(&"10.79.0.1".to_string()),
        "a pod got the gateway"
    );
    assert_eq!(host.veths().len(), n, "host veths: {:?}", host.veths());
    assert_eq!(host.leases().len(), n, "leases: {:?}", host.leases());
    assert_eq!(host.records().len(), n, "records: {:?}", host.records());
    let rules = host.ns.nft_ruleset();
    for ip in &ips {
        assert!(
            rules.contains(&format!("{ip} ")) || rules.contains(&format!("{ip},")),
            "no masquerade element for {ip}:\n{rules}"
        );
    }
    for i in [0, n / 2, n - 1] {
        pods[i].assert_ping("10.79.0.1");
    }
    // Pods reach each other too.
    pods[0].assert_ping(&result_ip(&results[n - 1], false));

    let start = Instant::now();
    let dels: Vec<Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .zip(&ids)
            .zip(&results)
            .map(|((pod, id), r)| {
                let (host, conf) = (&host, &conf);
                s.spawn(move || host.cni(&Cni::del(id, pod), &with_prev(conf, r)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    println!("{n} parallel DELs: {:?}", start.elapsed());
    assert_all_succeeded(&dels, "DELs");

    host.assert_clean("after parallel DELs");
    before.without_dev("fbr0").assert_same(
        &host.snapshot().without_dev("fbr0"),
        "after parallel ADD+DEL",
    );
}

/// Every outcome succeeded; otherwise fail listing each failure.
fn assert_all_succeeded(outcomes: &[Outcome], what: &str) {
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.success())
        .map(Outcome::describe)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} {what} failed:\n{}",
        failed.len(),
        outcomes.len(),
        failed.join("\n")
    );
}
