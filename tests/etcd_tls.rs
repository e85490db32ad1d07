//! ferryd and ferryctl on etcd as it runs in production: TLS with client
//! certificates (a real `etcd` with --client-cert-auth in the underlay
//! namespace, certificates made by the test), then etcd's own users with a
//! role limited to ferry's prefix. Every way of getting it wrong is tried
//! on a node that must stay exactly as it was.

use std::time::{Duration, Instant};

use ferry_e2e::cluster::{Cluster, EtcdConfig, EtcdTls, Opts, OUTSIDE_IP};
use ferry_e2e::pki::{Pair, Pki};
use ferry_e2e::traffic::{ask, web_yaml, who_server, Answer};
use ferry_e2e::{require_root, wait_until};

/// A second address of the underlay's bridge that etcd also listens on,
/// but that its server certificate does not name.
const UNNAMED_IP: &str = "192.168.77.253";

fn flags(v: &[&std::path::Path]) -> Vec<String> {
    v.iter().map(|p| p.display().to_string()).collect()
}

/// Runs `ferryd run` on node `i` (not started) with `store` and `extra`
/// flags; returns its exit code and stderr, and asserts that it failed
/// quickly and left the node as it was.
fn fails(c: &Cluster, i: usize, store: &str, extra: &[&str]) -> (i32, String) {
    let node = &c.nodes[i];
    let links = node.ns.link_names();
    let routes = node.ns.ok(&["ip", "route"]);
    let args = c.ferryd_args_with(i, store, extra);
    let bin = ferry_e2e::cluster::ferryd_bin();
    let mut argv = vec![bin.to_str().unwrap()];
    argv.extend(args.iter().map(String::as_str));
    let t0 = Instant::now();
    let out = node.ns.exec(&argv);
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code().unwrap_or(-1);
    assert_ne!(code, 0, "ferryd {extra:?} succeeded:\n{err}");
    assert!(took < Duration::from_secs(12), "took {took:?}: {err}");
    assert_eq!(node.ns.link_names(), links, "links changed by {extra:?}");
    assert_eq!(node.ns.ok(&["ip", "route"]), routes, "routes changed");
    assert!(
        node.ns.nft_ruleset().trim().is_empty(),
        "nft tables left by {extra:?}:\n{}",
        node.ns.nft_ruleset()
    );
    assert!(
        !node.conflist_path().exists() && !node.ready_file().exists(),
        "files written by {extra:?}"
    );
    // Only the error line, not a log of what ferryd did first.
    let last = err.lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("ferryd: error: "), "{err}");
    (code, last)
}

struct Tls {
    pki: Pki,
    ca: std::path::PathBuf,
    node: Pair,
    /// Signed by a CA etcd does not trust.
    stranger: Pair,
    other_ca: std::path::PathBuf,
    config: EtcdConfig,
}

fn tls() -> Tls {
    let pki = Pki::new();
    let ca = pki.ca("etcd-ca");
    let other = pki.ca("other-ca");
    let server = pki.issue(&ca, "etcd-server", &[OUTSIDE_IP]);
    let node = pki.issue(&ca, "ferry-node", &["ferry-node"]);
    let stranger = pki.issue(&other, "stranger", &["stranger"]);
    Tls {
        config: EtcdConfig {
            tls: Some(EtcdTls {
                server,
                client_ca: Some(ca.cert.clone()),
            }),
            also_listen: vec![UNNAMED_IP.into()],
            args: Vec::new(),
        },
        ca: ca.cert,
        node,
        stranger,
        other_ca: other.cert,
        pki,
    }
}

/// Nodes mesh, a Service answers, a node leaves: all through an etcd that
/// takes only TLS clients with certificates of its CA.
#[test]
fn etcd_tls_client_certificates() {
    if !require_root() {
        return;
    }
    let t = tls();
    let f = flags(&[&t.ca, &t.node.cert, &t.node.key]);
    let store_flags = [
        "--etcd-ca-file",
        &f[0],
        "--etcd-cert-file",
        &f[1],
        "--etcd-key-file",
        &f[2],
    ];
    let mut c = Cluster::with_etcd(3, Opts::default(), t.config.clone(), &store_flags);
    assert!(
        c.store_arg().starts_with("etcd:https://"),
        "{}",
        c.store_arg()
    );
    c.start_all();
    c.wait_all_ready();
    let a = c.add_pod(0);
    let b = c.add_pod(1);
    c.pods[a].ns.assert_ping(&c.pods[b].ip);
    c.pods[b].ns.assert_ping(&c.pods[a].ip);

    // A Service through ferryctl with the same flags.
    let _server = who_server(&c.pods[b].ns, 8080, "b");
    let endpoints = format!(
        "- {{addresses: [{}], nodeName: {}}}\n",
        c.pods[b].ip, c.nodes[1].name
    );
    c.apply(&web_yaml("10.96.0.10", "", &endpoints));
    let mut last = Vec::new();
    let answered = wait_until(Duration::from_secs(15), || {
        last = ask(
            &c.pods[a].ns,
            "10.96.0.10",
            80,
            1,
            false,
            0,
            Duration::from_secs(2),
        );
        matches!(last.first(), Some(Answer::From(n, _)) if n == "b")
    });
    assert!(
        answered,
        "the Service did not answer: {last:?}\n{}",
        c.logs()
    );

    // A node leaves (ferryd leave with the TLS flags): the others prune it.
    let gone = c.nodes[2].subnet().unwrap();
    assert!(c.nodes[0].routes().contains(&gone));
    c.stop_ferryd(2, libc::SIGTERM);
    c.leave(2, 0);
    let pruned = wait_until(Duration::from_secs(10), || {
        c.nodes[..2].iter().all(|n| !n.routes().contains(&gone))
    });
    assert!(pruned, "node3 still routed:\n{}", c.logs());
    drop(t.pki);
}

/// Every wrong certificate, file or URL: a clear message naming the cause,
/// a non-zero exit, and the node exactly as it was.
#[test]
fn etcd_tls_failures_are_clear_and_change_nothing() {
    if !require_root() {
        return;
    }
    let t = tls();
    let mut c = Cluster::with_etcd(0, Opts::default(), t.config.clone(), &[]);
    let n = c.add_node();
    let store = c.store_arg();
    let f = flags(&[
        &t.ca,
        &t.node.cert,
        &t.node.key,
        &t.stranger.cert,
        &t.stranger.key,
        &t.other_ca,
    ]);
    let (ca, cert, key, s_cert, s_key, other_ca) = (&f[0], &f[1], &f[2], &f[3], &f[4], &f[5]);
    let not_pem = t.pki.file("not-pem.txt", "hello\n").display().to_string();
    let expect = |extra: &[&str], store: &str, code: i32, want: &str| {
        let (got, err) = fails(&c, n, store, extra);
        assert_eq!(got, code, "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: want {want:?} in: {err}");
        eprintln!("{extra:?}\n  -> {err}");
    };

    // A client certificate from a CA etcd does not trust.
    expect(
        &[
            "--etcd-ca-file",
            ca,
            "--etcd-cert-file",
            s_cert,
            "--etcd-key-file",
            s_key,
        ],
        &store,
        1,
        "etcd rejected the client certificate in --etcd-cert-file",
    );
    // No client certificate at all.
    expect(
        &["--etcd-ca-file", ca],
        &store,
        1,
        "etcd wants a client certificate",
    );
    // A CA that did not sign etcd's certificate.
    expect(
        &[
            "--etcd-ca-file",
            other_ca,
            "--etcd-cert-file",
            cert,
            "--etcd-key-file",
            key,
        ],
        &store,
        1,
        "not signed by the CA in --etcd-ca-file",
    );
    // etcd's certificate does not name the address in the URL.
    let unnamed = format!("etcd:https://{UNNAMED_IP}:2379");
    expect(
        &[
            "--etcd-ca-file",
            ca,
            "--etcd-cert-file",
            cert,
            "--etcd-key-file",
            key,
        ],
        &unnamed,
        1,
        "not valid for the host in the URL",
    );
    // A key that is not the certificate's.
    expect(
        &[
            "--etcd-ca-file",
            ca,
            "--etcd-cert-file",
            cert,
            "--etcd-key-file",
            s_key,
        ],
        &store,
        1,
        "is not the key of the certificate in --etcd-cert-file",
    );
    // Files that cannot be read, or are not PEM.
    expect(
        &["--etcd-ca-file", "/nonexistent/ca.pem"],
        &store,
        1,
        "--etcd-ca-file /nonexistent/ca.pem: cannot read it",
    );
    expect(
        &["--etcd-ca-file", &not_pem],
        &store,
        1,
        "no certificate in it",
    );
    expect(
        &[
            "--etcd-ca-file",
            ca,
            "--etcd-cert-file",
            cert,
            "--etcd-key-file",
            &not_pem,
        ],
        &store,
        1,
        "no PEM private key",
    );
    // http:// with TLS flags: refused before anything is read.
    let plain = format!("etcd:http://{OUTSIDE_IP}:2379");
    expect(&["--etcd-ca-file", ca], &plain, 2, "is plain http://");
    expect(
        &["--etcd-cert-file", cert],
        &store,
        2,
        "needs --etcd-key-file",
    );

    // ferryctl says the same, and writes nothing.
    let ctl = |extra: &[&str], args: &[&str]| {
        let bin = ferry_e2e::ferryctl_bin();
        let mut argv = vec![bin.to_str().unwrap(), "--store", &store];
        argv.extend_from_slice(extra);
        argv.extend_from_slice(args);
        c.nodes[n].ns.exec(&argv)
    };
    let yaml = t.pki.file(
        "web.yaml",
        &web_yaml("10.96.0.10", "", "- {addresses: [10.244.9.9]}\n"),
    );
    let yaml = yaml.display().to_string();
    let out = ctl(&["--etcd-ca-file", ca], &["apply", "-f", &yaml]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("etcd wants a client certificate"), "{err}");
    let good = [
        "--etcd-ca-file",
        ca,
        "--etcd-cert-file",
        cert,
        "--etcd-key-file",
        key,
    ];
    let out = ctl(&good, &["get", "services", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(!listed.contains("\"web\""), "{listed}");
    // ...and the same apply with the right flags works (the check above
    // can see a Service).
    let out = ctl(&good, &["apply", "-f", &yaml]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(&good, &["get", "services", "-o", "json"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"web\""));

    // With the right flags the same node comes up.
    let f2: Vec<String> = good.iter().map(|s| s.to_string()).collect();
    c.store_flags = f2;
    c.start_ferryd(n);
    c.wait_ready(n, Duration::from_secs(20));
}

/// etcd's own users: a role that may read and write only ferry's prefix is
/// enough for ferryd and ferryctl; a wrong password, a user of another
/// prefix, or no user are each named. A restarted etcd forgets its tokens:
/// ferryd logs in again and keeps following the cluster.
#[test]
fn etcd_user_limited_to_the_prefix() {
    if !require_root() {
        return;
    }
    let pki = Pki::new();
    let pw = pki.file("ferry.pw", "ferry-s3cret\n");
    let wrong = pki.file("wrong.pw", "nope\n");
    let other_pw = pki.file("other.pw", "other-s3cret\n");
    let (pw, wrong, other_pw) = (
        pw.display().to_string(),
        wrong.display().to_string(),
        other_pw.display().to_string(),
    );
    let user = ["--etcd-username", "ferry", "--etcd-password-file", &pw];
    let mut c = Cluster::with_etcd(0, Opts::default(), EtcdConfig::default(), &user);
    {
        // What README tells a user to run, for ferry and for another
        // tenant's user.
        let (etcd, u) = (c.etcd.as_ref().unwrap(), &c.underlay);
        etcd.ctl(u, &["user", "add", "root:root-s3cret"]);
        etcd.ctl(u, &["user", "grant-role", "root", "root"]);
        for (name, prefix) in [("ferry", "/ferry/"), ("other", "/other/")] {
            let grant = [
                "role",
                "grant-permission",
                name,
                "--prefix=true",
                "readwrite",
                prefix,
            ];
            etcd.ctl(u, &["role", "add", name]);
            etcd.ctl(u, &grant);
            etcd.ctl(u, &["user", "add", &format!("{name}:{name}-s3cret")]);
            etcd.ctl(u, &["user", "grant-role", name, name]);
        }
        etcd.ctl(u, &["auth", "enable"]);
    }
    let spare = c.add_node();
    let store = c.store_arg();
    let expect = |extra: &[&str], store: &str, want: &str| {
        let (code, err) = fails(&c, spare, store, extra);
        assert_eq!(code, 1, "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: want {want:?} in: {err}");
        eprintln!("{extra:?}\n  -> {err}");
    };
    expect(
        &["--etcd-username", "ferry", "--etcd-password-file", &wrong],
        &store,
        "invalid user ID or password",
    );
    expect(
        &[
            "--etcd-username",
            "other",
            "--etcd-password-file",
            &other_pw,
        ],
        &store,
        "permission denied",
    );
    expect(&[], &store, "user name is empty");
    // https:// to an etcd that serves plain http.
    let ca = pki.ca("some-ca").cert.display().to_string();
    expect(
        &["--etcd-ca-file", &ca],
        &format!("etcd:https://{OUTSIDE_IP}:2379"),
        "does not speak TLS",
    );

    // The user of ferry's prefix: two nodes mesh, ferryctl applies.
    c.add_node();
    c.start_all();
    c.wait_all_ready();
    let a = c.add_pod(0);
    let b = c.add_pod(1);
    c.pods[a].ns.assert_ping(&c.pods[b].ip);
    c.apply(&web_yaml("10.96.0.20", "", "- {addresses: [10.244.9.9]}\n"));
    let out = c.ferryctl(&["get", "services"], "");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("10.96.0.20"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // etcd restarts and forgets every token; a third node joins after it:
    // the running nodes must log in again to see it.
    let underlay = &c.underlay;
    let etcd = c.etcd.as_mut().unwrap();
    etcd.kill();
    etcd.spawn(underlay);
    let n3 = c.add_node();
    c.start_ferryd(n3);
    c.wait_ready(n3, Duration::from_secs(30));
    let new = c.nodes[n3].subnet().unwrap();
    for n in &c.nodes[..2] {
        let ok = wait_until(Duration::from_secs(20), || n.routes().contains(&new));
        assert!(
            ok,
            "{} never learnt of {new} after etcd restarted:\n{}",
            n.name,
            c.logs()
        );
    }
    assert!(
        c.nodes[0].logs().contains("logged in again"),
        "{}",
        c.nodes[0].logs()
    );
}
