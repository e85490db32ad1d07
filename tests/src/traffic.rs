//! Traffic for Service tests: servers that answer with their name, and
//! clients that count who answered.

use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::Netns;

/// A server in `ns` that answers every TCP connection on `port` (and every
/// UDP datagram, when `udp`) with `name` and the client's address as it
/// sees it ("<name> <peer ip>"). Returns once it listens. Killed on drop.
pub struct WhoServer {
    child: Child,
}

impl Drop for WhoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn who_server(ns: &Netns, port: u16, name: &str) -> WhoServer {
    let script = format!(
        r#"
import socket, threading, sys
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('0.0.0.0', {port})); s.listen(512)
    ready.set()
    while True:
        c, a = s.accept()
        try: c.sendall(('{name} %s\n' % a[0]).encode())
        except OSError: pass
        c.close()
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    u.bind(('0.0.0.0', {port}))
    ready2.set()
    while True:
        b, a = u.recvfrom(2048)
        u.sendto(('{name} %s\n' % a[0]).encode(), a)
ready = threading.Event(); ready2 = threading.Event()
threading.Thread(target=tcp, daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
ready.wait(); ready2.wait()
print('listening', flush=True)
threading.Event().wait()
"#
    );
    let mut child = ns
        .command(&[crate::python3(), "-u", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn python3");
    let mut line = String::new();
    {
        use std::io::Read;
        let out = child.stdout.as_mut().expect("stdout");
        let mut b = [0u8];
        while out.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
            line.push(b[0] as char);
        }
    }
    assert_eq!(line, "listening", "who server on {port} in {}", ns.name());
    WhoServer { child }
}

/// What one request got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The server's name and the client address it saw.
    From(String, String),
    /// Connection refused (TCP RST or ICMP port unreachable).
    Refused,
    /// No answer within the timeout.
    Timeout,
    Other(String),
}

/// `n` requests from `ns` to ip:port over TCP (or UDP), one connection
/// each (`src_port` fixes the UDP client's port); the answers in order.
pub fn ask(
    ns: &Netns,
    ip: &str,
    port: u16,
    n: usize,
    udp: bool,
    src_port: u16,
    timeout: Duration,
) -> Vec<Answer> {
    let script = format!(
        r#"
import socket, errno
for i in range({n}):
    try:
        if {udp}:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if {src_port}: s.bind(('0.0.0.0', {src_port}))
            s.settimeout({t}); s.connect(('{ip}', {port})); s.send(b'?')
            print('ok', s.recv(200).decode().strip(), flush=True)
        else:
            s = socket.create_connection(('{ip}', {port}), timeout={t})
            s.settimeout({t})
            print('ok', s.recv(200).decode().strip(), flush=True)
        s.close()
    except ConnectionRefusedError:
        print('refused', flush=True)
    except socket.timeout:
        print('timeout', flush=True)
    except OSError as e:
        print('error', e, flush=True)
"#,
        udp = if udp { "True" } else { "False" },
        t = timeout.as_secs_f64(),
    );
    let out = ns.exec(&[crate::python3(), "-c", &script]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let mut w = l.split_whitespace();
            match w.next() {
                Some("ok") => match (w.next(), w.next()) {
                    (Some(name), Some(peer)) => Answer::From(name.into(), peer.into()),
                    _ => Answer::Other(l.into()),
                },
                Some("refused") => Answer::Refused,
                Some("timeout") => Answer::Timeout,
                _ => Answer::Other(l.into()),
            }
        })
        .collect()
}

/// Who answered how often; failures under "refused", "timeout", "other".
pub fn tally(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for a in answers {
        let k = match a {
            Answer::From(name, _) => name.clone(),
            Answer::Refused => "refused".into(),
            Answer::Timeout => "timeout".into(),
            Answer::Other(_) => "other".into(),
        };
        *t.entry(k).or_insert(0) += 1;
    }
    t
}

/// Asserts that `n` answers spread over `names` within ±`tolerance` (a
/// fraction) of a fair share each, and nothing else answered.
pub fn assert_fair(t: &BTreeMap<String, usize>, names: &[&str], n: usize, tolerance: f64) {
    let fair = n as f64 / names.len() as f64;
    for name in names {
        let got = *t.get(*name).unwrap_or(&0) as f64;
        assert!(
            (got - fair).abs() <= fair * tolerance,
            "{name} got {got} of {n}, fair is {fair:.0} ±{:.0}%: {t:?}",
            tolerance * 100.0
        );
    }
    let total: usize = names.iter().map(|n| t.get(*n).unwrap_or(&0)).sum();
    assert_eq!(total, n, "other answers: {t:?}");
}

/// Service `web` on `cluster_ip`:80 → 8080 (`spec` lines added to its
/// spec) and its EndpointSlice `web-1` listing `endpoints` (YAML list
/// items, one per line), as a user would write them.
pub fn web_yaml(cluster_ip: &str, spec: &str, endpoints: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  clusterIP: {cluster_ip}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
{spec}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
{endpoints}"#
    )
}
