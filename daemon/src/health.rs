//! `/healthz`, `/readyz` and Prometheus `/metrics` over a tiny HTTP/1.0
//! responder on a tokio listener (no HTTP framework: three GET endpoints do
//! not need one).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the daemon reports; updated by the reconcile loop.
#[derive(Debug, Default)]
pub struct Status {
    pub ready: AtomicBool,
    pub reconciles: AtomicU64,
    pub reconcile_errors: AtomicU64,
    pub kernel_changes: AtomicU64,
    pub peers: AtomicU64,
    pub last_reconcile_micros: AtomicU64,
    pub last_success_unix: AtomicU64,
    pub store_errors: AtomicU64,
    /// This node's pod subnet, once registered.
    pub subnet: Mutex<String>,
    /// The cluster source's own account ([`crate::store::ClusterState::describe`]).
    pub source: Mutex<serde_json::Value>,
    pub services: ServicesStatus,
}

/// What the Services reconciler last did.
#[derive(Debug, Default)]
pub struct ServicesStatus {
    pub syncs: AtomicU64,
    pub errors: AtomicU64,
    /// Service ports and the endpoints behind them, as programmed.
    pub ports: AtomicU64,
    pub endpoints: AtomicU64,
    pub last_sync_micros: AtomicU64,
    pub last_sync_unix: AtomicU64,
    pub last_error: Mutex<String>,
}

impl Status {
    pub fn metrics(&self) -> String {
        let mut s = String::new();
        let mut m = |name: &str, kind: &str, help: &str, v: String| {
            let _ = write!(
                s,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            );
        };
        m(
            "ferryd_ready",
            "gauge",
            "1 when the node is ready for pods.",
            (self.ready.load(Relaxed) as u8).to_string(),
        );
        m(
            "ferryd_reconciles_total",
            "counter",
            "Reconcile passes.",
            self.reconciles.load(Relaxed).to_string(),
        );
        m(
            "ferryd_reconcile_errors_total",
            "counter",
            "Failed reconcile passes.",
            self.reconcile_errors.load(Relaxed).to_string(),
        );
        m(
            "ferryd_kernel_changes_total",
            "counter",
            "Kernel objects created, replaced or removed.",
            self.kernel_changes.load(Relaxed).to_string(),
        );
        m(
            "ferryd_store_errors_total",
            "counter",
            "Failed store operations.",
            self.store_errors.load(Relaxed).to_string(),
        );
        m(
            "ferryd_peers",
            "gauge",
            "Remote nodes in the overlay.",
            self.peers.load(Relaxed).to_string(),
        );
        m(
            "ferryd_last_reconcile_duration_seconds",
            "gauge",
            "Duration of the last reconcile pass.",
            format!(
                "{:.6}",
                self.last_reconcile_micros.load(Relaxed) as f64 / 1e6
            ),
        );
        let sv = &self.services;
        m(
            "ferryd_service_syncs_total",
            "counter",
            "Services datapath syncs.",
            sv.syncs.load(Relaxed).to_string(),
        );
        m(
            "ferryd_service_sync_errors_total",
            "counter",
            "Failed Services datapath syncs.",
            sv.errors.load(Relaxed).to_string(),
        );
        m(
            "ferryd_service_ports",
            "gauge",
            "Service ports programmed.",
            sv.ports.load(Relaxed).to_string(),
        );
        m(
            "ferryd_service_endpoints",
            "gauge",
            "Endpoints behind the programmed Service ports.",
            sv.endpoints.load(Relaxed).to_string(),
        );
        m(
            "ferryd_last_service_sync_duration_seconds",
            "gauge",
            "Duration of the last Services sync.",
            format!("{:.6}", sv.last_sync_micros.load(Relaxed) as f64 / 1e6),
        );
        m(
            "ferryd_last_success_timestamp_seconds",
            "gauge",
            "Unix time of the last successful reconcile.",
            self.last_success_unix.load(Relaxed).to_string(),
        );
        s
    }

    /// `/status`: what `ferryctl status` shows.
    pub fn json(&self) -> String {
        let sv = &self.services;
        let text = |m: &Mutex<String>| m.lock().map(|s| s.clone()).unwrap_or_default();
        serde_json::json!({
            "ready": self.ready.load(Relaxed),
            "subnet": text(&self.subnet),
            "peers": self.peers.load(Relaxed),
            "reconciles": self.reconciles.load(Relaxed),
            "reconcileErrors": self.reconcile_errors.load(Relaxed),
            "storeErrors": self.store_errors.load(Relaxed),
            "lastReconcileUnix": self.last_success_unix.load(Relaxed),
            "source": self.source.lock().map(|s| s.clone()).unwrap_or_default(),
            "services": {
                "ports": sv.ports.load(Relaxed),
                "endpoints": sv.endpoints.load(Relaxed),
                "syncs": sv.syncs.load(Relaxed),
                "errors": sv.errors.load(Relaxed),
                "lastSyncUnix": sv.last_sync_unix.load(Relaxed),
                "lastSyncSeconds": sv.last_sync_micros.load(Relaxed) as f64 / 1e6,
                "lastError": text(&sv.last_error),
            },
        })
        .to_string()
            + "\n"
    }

    /// Status line and body for a request path.
    pub fn respond(&self, method: &str, path: &str) -> (&'static str, &'static str, String) {
        const TEXT: &str = "text/plain; charset=utf-8";
        if method != "GET" && method != "HEAD" {
            return (
                "405 Method Not Allowed",
                TEXT,
                "method not allowed\n".into(),
            );
        }
        match path.split('?').next().unwrap_or("") {
            "/healthz" => ("200 OK", TEXT, "ok\n".into()),
            "/readyz" if self.ready.load(Relaxed) => ("200 OK", TEXT, "ready\n".into()),
            "/readyz" => ("503 Service Unavailable", TEXT, "not ready\n".into()),
            "/metrics" => ("200 OK", "text/plain; version=0.0.4", self.metrics()),
            "/status" => ("200 OK", "application/json", self.json()),
            _ => ("404 Not Found", TEXT, "not found\n".into()),
        }
    }
}

/// What answers a request: (status line, content type, body) for a method
/// and path.
pub type Responder = Arc<dyn Fn(&str, &str) -> (&'static str, &'static str, String) + Send + Sync>;

/// Serves `/healthz`, `/readyz`, `/metrics` and `/status` forever.
pub async fn serve(listener: TcpListener, status: Arc<Status>) {
    serve_with(listener, Arc::new(move |m, p| status.respond(m, p))).await
}

/// A tiny HTTP/1.1 responder: one request per connection.
pub async fn serve_with(listener: TcpListener, respond: Responder) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let status = respond.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n")
                        || buf[..n].windows(2).any(|w| w == b"\n\n")
                    {
                        break;
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let mut parts = head.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (code, ctype, body) = status(method, path);
            let body = if method == "HEAD" {
                String::new()
            } else {
                body
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let s = Status::default();
        assert_eq!(s.respond("GET", "/healthz").0, "200 OK");
        assert_eq!(s.respond("GET", "/readyz").0, "503 Service Unavailable");
        s.ready.store(true, Relaxed);
        assert_eq!(s.respond("GET", "/readyz").0, "200 OK");
        assert_eq!(s.respond("GET", "/nope").0, "404 Not Found");
        assert_eq!(s.respond("POST", "/healthz").0, "405 Method Not Allowed");
        let m = s.respond("GET", "/metrics").2;
        assert!(m.contains("ferryd_ready 1\n"), "{m}");
        assert!(m.contains("# TYPE ferryd_reconciles_total counter"));
        *s.subnet.lock().unwrap() = "10.244.1.0/24".into();
        s.services.ports.store(3, Relaxed);
        let j: serde_json::Value = serde_json::from_str(&s.respond("GET", "/status").2).unwrap();
        assert_eq!(j["subnet"], "10.244.1.0/24");
        assert_eq!(j["services"]["ports"], 3);
    }
}
