//! A small Kubernetes API server for the tests: plain HTTP/1.1 on std::net
//! and threads, listening inside a namespace the test made, speaking the
//! real list/watch protocol for Nodes, Services and EndpointSlices.
//!
//! What it does as kube-apiserver does:
//! - one global resourceVersion counter; every write that changes an object
//!   bumps it and records an event; no-op writes change nothing;
//! - objects carry `metadata.resourceVersion`, `uid`, `creationTimestamp`;
//!   lists carry the list's resourceVersion;
//! - `?watch=true&resourceVersion=N` streams (chunked, one JSON event a
//!   line) every event after N, then live ones; `resourceVersion` absent or
//!   "0" starts with synthetic ADDED events; `allowWatchBookmarks=true`
//!   gets BOOKMARK events every [`ApiServer::set_bookmark_interval`];
//!   `timeoutSeconds` ends the stream; `sendInitialEvents=true` ends the
//!   initial ADDED events with the `k8s.io/initial-events-end` bookmark;
//! - a watch from before the compacted revision ([`ApiServer::compact`])
//!   gets an ERROR event with a 410 `Expired` Status and the stream ends;
//! - `labelSelector` (`k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (..)`,
//!   `k notin (..)`) and `fieldSelector` (`path=v`, `path==v`, `path!=v`)
//!   on lists and watches, with an object that stops (starts) matching
//!   sent as DELETED (ADDED); a requirement it does not understand is
//!   ignored;
//! - GET, PUT and PATCH of one object and of its `status` subresource (the
//!   main resource ignores status changes, `status` changes only status);
//!   merge patch (RFC 7386), strategic merge patch (lists merged by their
//!   Kubernetes merge key: conditions and addresses by `type`, `$patch`
//!   directives), JSON patch (RFC 6902), and server-side apply taken as a
//!   strategic merge; a `metadata.resourceVersion` in the body is a
//!   precondition (409 Conflict);
//! - discovery (`/api`, `/apis`, `/api/v1`, `/apis/discovery.k8s.io/v1`),
//!   `/version`, `/healthz`, `/readyz`, `/livez`.
//!
//! For the test: [`ApiServer::put`] / [`ApiServer::delete`] change state as
//! controllers would, [`node`], [`service`] and [`endpoint_slice`] build
//! objects shaped as Kubernetes 1.36 returns them, [`ApiServer::drop_watches`]
//! cuts every watch, [`ApiServer::stop`] / [`ApiServer::resume`] /
//! [`ApiServer::restart`] take the server away and back (state kept), and
//! [`ApiServer::requests`] is the log of what clients asked.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::Netns;

/// The Kubernetes version the server says it is.
pub const VERSION: (&str, &str) = ("1", "36");

// ---------------------------------------------------------------------------
// Resources

/// The resources this server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Res {
    Nodes,
    Services,
    EndpointSlices,
}

impl Res {
    pub fn kind(self) -> &'static str {
        match self {
            Res::Nodes => "Node",
            Res::Services => "Service",
            Res::EndpointSlices => "EndpointSlice",
        }
    }
    pub fn plural(self) -> &'static str {
        match self {
            Res::Nodes => "nodes",
            Res::Services => "services",
            Res::EndpointSlices => "endpointslices",
        }
    }
    pub fn api_version(self) -> &'static str {
        match self {
            Res::Nodes | Res::Services => "v1",
            Res::EndpointSlices => "discovery.k8s.io/v1",
        }
    }
    pub fn namespaced(self) -> bool {
        self != Res::Nodes
    }
    fn from_kind(kind: &str) -> Option<Res> {
        [Res::Nodes, Res::Services, Res::EndpointSlices]
            .into_iter()
            .find(|r| r.kind() == kind)
    }
    fn has_status(self) -> bool {
        self != Res::EndpointSlices
    }
}

/// (resource, namespace ("" when cluster-scoped), name)
type Key = (Res, String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    key: Key,
    ty: EventType,
    obj: Value,
    /// The object before a MODIFIED (for selector transitions).
    old: Option<Value>,
}

/// One request a client made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub peer: String,
    pub method: String,
    pub path: String,
    /// Decoded query parameters, in order.
    pub query: Vec<(String, String)>,
    pub content_type: String,
    pub body: String,
    pub status: u16,
}

impl Request {
    pub fn param(&self, k: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
    pub fn is_watch(&self) -> bool {
        self.param("watch").is_some_and(|v| v == "true" || v == "1")
    }
}

// ---------------------------------------------------------------------------
// Shared state

struct State {
    rv: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    events: Vec<Event>,
    log: Vec<Request>,
    /// Bumped by drop_watches / stop: watches of an older epoch end.
    epoch: u64,
    stopped: bool,
    bookmark_interval: Duration,
    watch_cap: Option<Duration>,
    /// Open connections; the epoch of the watch each streams, if any.
    conns: HashMap<u64, (TcpStream, Option<u64>)>,
    next_conn: u64,
}

struct Shared {
    state: Mutex<State>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    /// Writes (or deletes, `new` = None) an object; bumps the
    /// resourceVersion and records the event unless nothing changed.
    /// Returns the stored object.
    fn store(&mut self, key: Key, new: Option<Value>) -> Option<Value> {
        let old = self.objects.get(&key).cloned();
        match new {
            Some(mut obj) => {
                obj["kind"] = json!(key.0.kind());
                obj["apiVersion"] = json!(key.0.api_version());
                if !obj["metadata"].is_object() {
                    obj["metadata"] = json!({});
                }
                let m = &mut obj["metadata"];
                m["name"] = json!(key.2);
                if key.0.namespaced() {
                    m["namespace"] = json!(key.1);
                } else if let Some(o) = m.as_object_mut() {
                    o.remove("namespace");
                }
                match &old {
                    Some(o) => {
                        for f in ["uid", "creationTimestamp", "resourceVersion"] {
                            m[f] = o["metadata"][f].clone();
                        }
                        if key.0 == Res::EndpointSlices {
                            m["generation"] = o["metadata"]["generation"].clone();
                        }
                        if &obj == o {
                            return old;
                        }
                    }
                    None => {
                        m["uid"] = json!(uid());
                        m["creationTimestamp"] = json!(timestamp(SystemTime::now()));
                        if key.0 == Res::EndpointSlices {
                            m["generation"] = json!(0);
                        }
                    }
                }
                if key.0 == Res::EndpointSlices {
                    let changed = old.as_ref().is_none_or(|o| {
                        let strip = |v: &Value| {
                            let mut v = v.clone();
                            v["metadata"] = Value::Null;
                            v
                        };
                        strip(o) != strip(&obj)
                    });
                    if changed {
                        let g = obj["metadata"]["generation"].as_u64().unwrap_or(0);
                        obj["metadata"]["generation"] = json!(g + 1);
                    }
                }
                self.rv += 1;
                obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
                self.objects.insert(key.clone(), obj.clone());
                self.events.push(Event {
                    rv: self.rv,
                    key,
                    ty: if old.is_some() {
                        EventType::Modified
                    } else {
                        EventType::Added
                    },
                    obj: obj.clone(),
                    old,
                });
                Some(obj)
            }
            None => {
                let mut obj = self.objects.remove(&key)?;
                self.rv += 1;
                obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
                self.events.push(Event {
                    rv: self.rv,
                    key,
                    ty: EventType::Deleted,
                    obj,
                    old: None,
                });
                None
            }
        }
    }

    /// Shuts down connections (only watches when `watches_only`).
    fn cut(&mut self, watches_only: bool) {
        self.epoch += 1;
        for (s, watch) in self.conns.values() {
            if watch.is_some() || !watches_only {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// The test's handle on the server. Stops the server on drop.
pub struct ApiServer {
    shared: Arc<Shared>,
    ns_path: String,
    addr: SocketAddr,
    listener: Mutex<Option<(i32, JoinHandle<()>)>>,
}

impl ApiServer {
    /// Binds `addr` inside `ns` and serves until dropped.
    pub fn start(ns: &Netns, addr: &str) -> ApiServer {
        let s = ApiServer {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    rv: 100,
                    compacted: 0,
                    objects: BTreeMap::new(),
                    events: Vec::new(),
                    log: Vec::new(),
                    epoch: 0,
                    stopped: true,
                    bookmark_interval: Duration::from_secs(1),
                    watch_cap: None,
                    conns: HashMap::new(),
                    next_conn: 0,
                }),
                cond: Condvar::new(),
            }),
            ns_path: ns.path(),
            addr: addr.parse().expect("a socket address"),
            listener: Mutex::new(None),
        };
        s.resume();
        s
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at this server (no credentials: it has none).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: ferry-test\n  cluster:\n    server: {}\nusers:\n- name: ferry-test\n  user: {{}}\ncontexts:\n- name: ferry-test\n  context:\n    cluster: ferry-test\n    user: ferry-test\ncurrent-context: ferry-test\n",
            self.url()
        )
    }

    /// Binds again (after [`stop`](Self::stop)); returns once it listens.
    pub fn resume(&self) {
        let mut l = self.listener.lock().unwrap();
        assert!(l.is_none(), "API server already listening");
        self.shared.lock().stopped = false;
        let (tx, rx) = std::sync::mpsc::channel();
        let ns_path = self.ns_path.clone();
        let addr = self.addr;
        let shared = self.shared.clone();
        let h = std::thread::Builder::new()
            .name("apiserver".into())
            .spawn(move || {
                enter(&ns_path);
                // The old listener's port may take a moment to be free.
                let t0 = Instant::now();
                let listener = loop {
                    match TcpListener::bind(addr) {
                        Ok(l) => break l,
                        Err(e)
                            if e.kind() == std::io::ErrorKind::AddrInUse
                                && t0.elapsed() < Duration::from_secs(5) =>
                        {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                };
                let _ = tx.send(Ok(listener.as_raw_fd()));
                accept_loop(listener, shared);
            })
            .unwrap();
        let fd = rx.recv().unwrap().unwrap_or_else(|e| {
            let ss = std::process::Command::new("nsenter")
                .arg(format!("--net={}", self.ns_path))
                .args(["ss", "-tanpe"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            panic!("API server cannot bind {addr}: {e}\n{ss}")
        });
        *l = Some((fd, h));
    }

    /// Closes the listener and every connection (clients see the server
    /// gone: refused connections, broken watches). State is kept.
    pub fn stop(&self) {
        let Some((fd, h)) = self.listener.lock().unwrap().take() else {
            return;
        };
        {
            let mut st = self.shared.lock();
            st.stopped = true;
            st.cut(false);
        }
        self.shared.cond.notify_all();
        // SAFETY: shutdown(2) on the listening socket the accept thread
        // still owns: it wakes the blocked accept(2), which then fails.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        h.join().expect("accept thread");
        self.wait_conns(|_| true);
    }

    /// Waits (at most 5 s) until no connection is left for which `gone`
    /// holds (given its watch epoch).
    fn wait_conns(&self, gone: impl Fn(Option<u64>) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut st = self.shared.lock();
        while st.conns.values().any(|c| gone(c.1)) {
            let now = Instant::now();
            if now >= deadline {
                panic!("API server: connections did not close within 5 s");
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// [`stop`](Self::stop) then [`resume`](Self::resume).
    pub fn restart(&self) {
        self.stop();
        self.resume();
    }

    /// Cuts every watch connection mid-stream.
    /// Returns once they are all gone (new ones may have started).
    pub fn drop_watches(&self) {
        let epoch = {
            let mut st = self.shared.lock();
            st.cut(true);
            st.epoch
        };
        self.shared.cond.notify_all();
        self.wait_conns(|w| w.is_some_and(|e| e < epoch));
    }

    /// Forgets history: a watch from any resourceVersion older than the
    /// current one is answered 410 Expired.
    pub fn compact(&self) {
        let mut st = self.shared.lock();
        st.compacted = st.rv;
    }

    pub fn set_bookmark_interval(&self, d: Duration) {
        self.shared.lock().bookmark_interval = d;
        self.shared.cond.notify_all();
    }

    /// Ends every watch after at most `d` (whatever timeoutSeconds asked).
    /// (Running watches too, counted from their start.)
    pub fn set_watch_cap(&self, d: Option<Duration>) {
        self.shared.lock().watch_cap = d;
        self.shared.cond.notify_all();
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Creates or replaces an object (its kind says which resource);
    /// returns it as stored.
    pub fn put(&self, obj: Value) -> Value {
        let res = Res::from_kind(obj["kind"].as_str().unwrap_or_default())
            .unwrap_or_else(|| panic!("not a Node, Service or EndpointSlice: {obj}"));
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_string();
        let ns = if res.namespaced() {
            obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let out = self.shared.lock().store((res, ns, name), Some(obj));
        self.shared.cond.notify_all();
        out.unwrap()
    }

    /// Changes an existing object in place; returns it as stored.
    pub fn update(&self, res: Res, ns: &str, name: &str, f: impl FnOnce(&mut Value)) -> Value {
        let key = (res, ns.to_string(), name.to_string());
        let mut st = self.shared.lock();
        let mut obj = st
            .objects
            .get(&key)
            .cloned()
            .unwrap_or_else(|| panic!("no {} {ns}/{name}", res.plural()));
        f(&mut obj);
        let out = st.store(key, Some(obj)).unwrap();
        drop(st);
        self.shared.cond.notify_all();
        out
    }

    /// Deletes an object; true when it existed.
    pub fn delete(&self, res: Res, ns: &str, name: &str) -> bool {
        let key = (res, ns.to_string(), name.to_string());
        let mut st = self.shared.lock();
        let existed = st.objects.contains_key(&key);
        st.store(key, None);
        drop(st);
        self.shared.cond.notify_all();
        existed
    }

    /// A Node as the kubelet registers it, with `pod_cidr` set as the node
    /// IPAM controller would (None: not yet allocated).
    pub fn put_node(&self, name: &str, pod_cidr: Option<&str>, internal_ip: &str) -> Value {
        self.put(node(name, pod_cidr, internal_ip))
    }

    pub fn delete_node(&self, name: &str) -> bool {
        self.delete(Res::Nodes, "", name)
    }

    pub fn get(&self, res: Res, ns: &str, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .objects
            .get(&(res, ns.to_string(), name.to_string()))
            .cloned()
    }

    /// The Node as stored (panics when absent).
    pub fn node(&self, name: &str) -> Value {
        self.get(Res::Nodes, "", name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().log.clone()
    }

    /// How many watches are streaming now.
    pub fn open_watches(&self) -> usize {
        self.shared
            .lock()
            .conns
            .values()
            .filter(|c| c.1.is_some())
            .count()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Moves the calling thread into the namespace at `path` (an nsfs file).
fn enter(path: &str) {
    let f = std::fs::File::open(path).expect("open netns");
    // SAFETY: setns on a valid nsfs fd affects only the calling thread,
    // a thread spawned for this server.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let conn = listener.accept();
        if shared.lock().stopped {
            return;
        }
        let Ok((stream, peer)) = conn else {
            continue;
        };
        let id = {
            let mut st = shared.lock();
            st.next_conn += 1;
            let id = st.next_conn;
            if let Ok(c) = stream.try_clone() {
                st.conns.insert(id, (c, None));
            }
            id
        };
        let shared = shared.clone();
        std::thread::spawn(move || {
            let _ = serve_conn(&shared, id, stream, peer);
            shared.lock().conns.remove(&id);
            shared.cond.notify_all();
        });
    }
}

// ---------------------------------------------------------------------------
// HTTP

struct HttpRequest {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn param(&self, k: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
}

fn read_request(r: &mut impl BufRead) -> std::io::Result<Option<HttpRequest>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(std::io::Error::other(format!("bad request line {line:?}")));
    };
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut req = HttpRequest {
        method: method.to_string(),
        path: percent_decode(path),
        query,
        headers,
        body: Vec::new(),
    };
    if req
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(std::io::Error::other)?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            req.body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = req.header("content-length") {
        let n: usize = n.parse().map_err(std::io::Error::other)?;
        req.body = vec![0; n];
        r.read_exact(&mut req.body)?;
    }
    Ok(Some(req))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        _ => "Error",
    }
}

fn write_response(w: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    write!(
        w,
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nCache-Control: no-cache, private\r\nContent-Length: {}\r\n\r\n{body}",
        reason_phrase(code),
        body.len()
    )?;
    w.flush()
}

fn status(code: u16, reason: &str, message: String) -> (u16, Value) {
    (
        code,
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }),
    )
}

fn not_found(res: Res, name: &str) -> (u16, Value) {
    let (c, mut v) = status(
        404,
        "NotFound",
        format!("{} \"{name}\" not found", res.plural()),
    );
    v["details"] = json!({"name": name, "kind": res.plural()});
    (c, v)
}

fn serve_conn(
    shared: &Shared,
    id: u64,
    stream: TcpStream,
    peer: SocketAddr,
) -> std::io::Result<()> {
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    while let Some(req) = read_request(&mut r)? {
        let mut entry = Request {
            peer: peer.ip().to_string(),
            method: req.method.clone(),
            path: req.path.clone(),
            query: req.query.clone(),
            content_type: req.header("content-type").unwrap_or("").to_string(),
            body: String::from_utf8_lossy(&req.body).into_owned(),
            status: 200,
        };
        let close = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if req.method == "GET" && entry.is_watch() {
            if let Some(route) = route(&req.path).filter(|r| r.name.is_none()) {
                shared.lock().log.push(entry);
                let epoch = {
                    let mut st = shared.lock();
                    let e = st.epoch;
                    if let Some(c) = st.conns.get_mut(&id) {
                        c.1 = Some(e);
                    }
                    e
                };
                watch(shared, &route, &req, &mut w, epoch)?;
                if let Some(c) = shared.lock().conns.get_mut(&id) {
                    c.1 = None;
                }
                if close {
                    return Ok(());
                }
                continue;
            }
        }
        let (code, body) = handle(shared, &req);
        entry.status = code;
        shared.lock().log.push(entry);
        write_response(&mut w, code, &body)?;
        if close {
            return Ok(());
        }
    }
    Ok(())
}

struct Route {
    res: Res,
    ns: Option<String>,
    name: Option<String>,
    status: bool,
}

/// Parses `/api/v1/[namespaces/NS/]RES[/NAME[/status]]` and the
/// discovery.k8s.io/v1 equivalent.
fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match segs.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => rest,
        _ => return None,
    };
    let core = segs[0] == "api";
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let res = match *rest.first()? {
        "nodes" if core && ns.is_none() => Res::Nodes,
        "services" if core => Res::Services,
        "endpointslices" if !core => Res::EndpointSlices,
        _ => return None,
    };
    let (name, status) = match &rest[1..] {
        [] => (None, false),
        [name] => (Some(name.to_string()), false),
        [name, "status"] if res.has_status() => (Some(name.to_string()), true),
        _ => return None,
    };
    if name.is_some() && res.namespaced() && ns.is_none() {
        return None;
    }
    Some(Route {
        res,
        ns,
        name,
        status,
    })
}

fn handle(shared: &Shared, req: &HttpRequest) -> (u16, Value) {
    match (req.method.as_str(), req.path.trim_end_matches('/')) {
        ("GET", "/version") => return (200, version()),
        ("GET", "/healthz" | "/readyz" | "/livez") => return (200, json!("ok")),
        ("GET", "/api") => {
            return (
                200,
                json!({"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}),
            )
        }
        ("GET", "/apis") => return (200, api_groups()),
        ("GET", "/api/v1") => return (200, resource_list("v1")),
        ("GET", "/apis/discovery.k8s.io/v1") => return (200, resource_list("discovery.k8s.io/v1")),
        _ => {}
    }
    let Some(rt) = route(&req.path) else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
        );
    };
    let ns = rt.ns.clone().unwrap_or_default();
    match (req.method.as_str(), &rt.name) {
        ("GET", None) => list(shared, &rt, req),
        ("GET", Some(name)) => match shared.lock().objects.get(&(rt.res, ns, name.clone())) {
            Some(o) => (200, o.clone()),
            None => not_found(rt.res, name),
        },
        ("POST", None) if rt.res.namespaced() == rt.ns.is_some() => create(shared, &rt, req),
        ("PUT" | "PATCH", Some(name)) => write(shared, &rt, name, req),
        ("DELETE", Some(name)) => {
            let key = (rt.res, ns, name.clone());
            let mut st = shared.lock();
            let Some(obj) = st.objects.get(&key).cloned() else {
                return not_found(rt.res, name);
            };
            st.store(key, None);
            drop(st);
            shared.cond.notify_all();
            (200, obj)
        }
        _ => status(
            405,
            "MethodNotAllowed",
            format!("{} is not supported here", req.method),
        ),
    }
}

fn version() -> Value {
    json!({
        "major": VERSION.0, "minor": VERSION.1,
        "emulationMajor": VERSION.0, "emulationMinor": VERSION.1,
        "minCompatibilityMajor": VERSION.0, "minCompatibilityMinor": "35",
        "gitVersion": format!("v{}.{}.1", VERSION.0, VERSION.1),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.25.0", "compiler": "gc", "platform": "linux/amd64",
    })
}

fn api_groups() -> Value {
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
        "name": "discovery.k8s.io",
        "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"},
    }]})
}

fn resource_list(gv: &str) -> Value {
    let verbs = json!(["create", "delete", "get", "list", "patch", "update", "watch"]);
    let status_verbs = json!(["get", "patch", "update"]);
    let r = |name: &str, kind: &str, namespaced: bool, verbs: &Value| json!({"name": name, "singularName": "", "namespaced": namespaced, "kind": kind, "verbs": verbs});
    let resources = if gv == "v1" {
        vec![
            r("nodes", "Node", false, &verbs),
            r("nodes/status", "Node", false, &status_verbs),
            r("services", "Service", true, &verbs),
            r("services/status", "Service", true, &status_verbs),
        ]
    } else {
        vec![r("endpointslices", "EndpointSlice", true, &verbs)]
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

fn in_scope(rt: &Route, key: &Key) -> bool {
    key.0 == rt.res && rt.ns.as_ref().is_none_or(|ns| *ns == key.1)
}

fn list(shared: &Shared, rt: &Route, req: &HttpRequest) -> (u16, Value) {
    let sel = Selector::parse(req);
    let st = shared.lock();
    if req.param("resourceVersionMatch") == Some("Exact") {
        let rv: u64 = req
            .param("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if rv < st.compacted {
            return status(
                410,
                "Expired",
                format!("too old resource version: {rv} ({})", st.compacted),
            );
        }
    }
    let items: Vec<Value> = st
        .objects
        .iter()
        .filter(|(k, o)| in_scope(rt, k) && sel.matches(o))
        .map(|(_, o)| o.clone())
        .collect();
    (
        200,
        json!({
            "kind": format!("{}List", rt.res.kind()),
            "apiVersion": rt.res.api_version(),
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        }),
    )
}

fn create(shared: &Shared, rt: &Route, req: &HttpRequest) -> (u16, Value) {
    let Ok(obj) = serde_json::from_slice::<Value>(&req.body) else {
        return status(400, "BadRequest", "body is not JSON".into());
    };
    let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
        return status(422, "Invalid", "metadata.name: Required value".into());
    };
    let key = (rt.res, rt.ns.clone().unwrap_or_default(), name.clone());
    let mut st = shared.lock();
    if st.objects.contains_key(&key) {
        return status(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", rt.res.plural()),
        );
    }
    let out = st.store(key, Some(obj));
    drop(st);
    shared.cond.notify_all();
    (201, out.unwrap())
}

/// PUT or PATCH of an object or its status.
fn write(shared: &Shared, rt: &Route, name: &str, req: &HttpRequest) -> (u16, Value) {
    let key = (rt.res, rt.ns.clone().unwrap_or_default(), name.to_string());
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
        return status(400, "BadRequest", "body is not JSON".into());
    };
    let mut st = shared.lock();
    let Some(cur) = st.objects.get(&key).cloned() else {
        return not_found(rt.res, name);
    };
    let mut new = if req.method == "PUT" {
        body.clone()
    } else {
        let ct = req.header("content-type").unwrap_or("");
        let ct = ct.split(';').next().unwrap_or("").trim();
        match ct {
            "application/merge-patch+json" => merge_patch(&cur, &body),
            "application/strategic-merge-patch+json" | "application/apply-patch+yaml" => {
                strategic_merge(&cur, &body, "")
            }
            "application/json-patch+json" => match json_patch(&cur, &body) {
                Ok(v) => v,
                Err(e) => return status(422, "Invalid", format!("json patch: {e}")),
            },
            _ => {
                return status(
                    415,
                    "UnsupportedMediaType",
                    format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json; got {ct:?}"),
                )
            }
        }
    };
    if let Some(want) = body["metadata"]["resourceVersion"].as_str() {
        if want != cur["metadata"]["resourceVersion"].as_str().unwrap_or("") {
            return status(
                409,
                "Conflict",
                format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", rt.res.plural()),
            );
        }
    }
    if !new.is_object() {
        return status(422, "Invalid", "the result is not an object".into());
    }
    if rt.res.has_status() {
        if rt.status {
            // Only status changes through the status subresource.
            let s = new["status"].take();
            new = cur.clone();
            new["status"] = s;
        } else {
            new["status"] = cur["status"].clone();
        }
    }
    let out = st.store(key, Some(new));
    drop(st);
    shared.cond.notify_all();
    (200, out.unwrap())
}

// ---------------------------------------------------------------------------
// Watch

fn watch(
    shared: &Shared,
    rt: &Route,
    req: &HttpRequest,
    w: &mut TcpStream,
    epoch: u64,
) -> std::io::Result<()> {
    let sel = Selector::parse(req);
    let bookmarks = req.param("allowWatchBookmarks") == Some("true");
    let initial_events = req.param("sendInitialEvents") == Some("true");
    let from = req.param("resourceVersion").unwrap_or("");
    let start = Instant::now();
    let asked = req
        .param("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(|s| start + Duration::from_secs(s));
    write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: no-cache, private\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    w.flush()?;
    let send = |w: &mut TcpStream, ty: &str, obj: &Value| -> std::io::Result<()> {
        let line = format!("{}\n", json!({"type": ty, "object": obj}));
        write!(w, "{:x}\r\n{line}\r\n", line.len())?;
        w.flush()
    };
    let bookmark = |rv: u64, initial_end: bool| {
        let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let mut o =
            json!({"kind": rt.res.kind(), "apiVersion": rt.res.api_version(), "metadata": meta});
        match rt.res {
            Res::EndpointSlices => {
                o["addressType"] = json!("");
                o["endpoints"] = Value::Null;
            }
            _ => {
                o["spec"] = json!({});
                o["status"] = json!({});
            }
        }
        o
    };

    let (mut pos, initial) = {
        let st = shared.lock();
        match from.parse::<u64>() {
            Ok(rv) if rv > 0 && !initial_events => {
                if rv < st.compacted {
                    let (_, s) = status(
                        410,
                        "Expired",
                        format!("too old resource version: {rv} ({})", st.compacted),
                    );
                    drop(st);
                    send(w, "ERROR", &s)?;
                    return write!(w, "0\r\n\r\n").and_then(|_| w.flush());
                }
                (rv, Vec::new())
            }
            _ => {
                let objs: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(k, o)| in_scope(rt, k) && sel.matches(o))
                    .map(|(_, o)| o.clone())
                    .collect();
                (st.rv, objs)
            }
        }
    };
    for o in &initial {
        send(w, "ADDED", o)?;
    }
    if initial_events {
        send(w, "BOOKMARK", &bookmark(pos, true))?;
    }

    let mut next_bookmark = Instant::now() + shared.lock().bookmark_interval;
    loop {
        let mut out: Vec<(&'static str, Value)> = Vec::new();
        {
            let mut st = shared.lock();
            loop {
                if st.epoch != epoch || st.stopped {
                    // Cut: end without the last chunk, as a dropped
                    // connection does.
                    let _ = w.shutdown(Shutdown::Both);
                    return Ok(());
                }
                let first = st.events.partition_point(|e| e.rv <= pos);
                for e in &st.events[first..] {
                    if !in_scope(rt, &e.key) {
                        continue;
                    }
                    let now = sel.matches(&e.obj);
                    let before = e.old.as_ref().is_some_and(|o| sel.matches(o));
                    let ty = match e.ty {
                        EventType::Modified if now && before => Some(EventType::Modified),
                        EventType::Modified if now => Some(EventType::Added),
                        EventType::Modified if before => Some(EventType::Deleted),
                        EventType::Modified => None,
                        t => now.then_some(t),
                    };
                    if let Some(t) = ty {
                        out.push((t.as_str(), e.obj.clone()));
                    }
                }
                if first < st.events.len() {
                    pos = st.events.last().unwrap().rv;
                }
                let now = Instant::now();
                if bookmarks && now >= next_bookmark && out.is_empty() {
                    pos = st.rv;
                    out.push(("BOOKMARK", bookmark(pos, false)));
                    next_bookmark = now + st.bookmark_interval;
                }
                if !out.is_empty() {
                    break;
                }
                // timeoutSeconds, and the cap as it is now.
                let deadline = match (asked, st.watch_cap) {
                    (Some(d), Some(cap)) => Some(d.min(start + cap)),
                    (d, cap) => d.or(cap.map(|c| start + c)),
                };
                if deadline.is_some_and(|d| now >= d) {
                    drop(st);
                    return write!(w, "0\r\n\r\n").and_then(|_| w.flush());
                }
                let mut wake = deadline.unwrap_or(now + Duration::from_secs(3600));
                if bookmarks {
                    wake = wake.min(next_bookmark);
                }
                st = shared
                    .cond
                    .wait_timeout(st, wake.saturating_duration_since(now))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        for (ty, o) in &out {
            send(w, ty, o)?;
        }
    }
}

// ---------------------------------------------------------------------------
// Selectors

enum Req {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

enum FieldReq {
    Eq(String, String),
    NotEq(String, String),
}

#[derive(Default)]
struct Selector {
    labels: Vec<Req>,
    fields: Vec<FieldReq>,
}

impl Selector {
    fn parse(req: &HttpRequest) -> Selector {
        let mut s = Selector::default();
        if let Some(l) = req.param("labelSelector") {
            s.labels = split_top(l).iter().filter_map(|r| parse_label(r)).collect();
        }
        if let Some(f) = req.param("fieldSelector") {
            s.fields = f
                .split(',')
                .filter_map(|r| {
                    let r = r.trim();
                    if let Some((k, v)) = r.split_once("!=") {
                        Some(FieldReq::NotEq(k.trim().into(), v.trim().into()))
                    } else if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
                        Some(FieldReq::Eq(k.trim().into(), v.trim().into()))
                    } else {
                        None
                    }
                })
                .collect();
        }
        s
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            Req::Exists(k) => label(k).is_some(),
            Req::NotExists(k) => label(k).is_none(),
            Req::Eq(k, v) => label(k) == Some(v),
            Req::NotEq(k, v) => label(k) != Some(v),
            Req::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Req::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
        });
        let field = |path: &str| {
            let mut v = obj;
            for p in path.split('.') {
                v = &v[p];
            }
            match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            }
        };
        labels_ok
            && self.fields.iter().all(|r| match r {
                FieldReq::Eq(p, v) => field(p) == *v,
                FieldReq::NotEq(p, v) => field(p) != *v,
            })
    }
}

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut depth = 0;
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(String::new());
                continue;
            }
            _ => {}
        }
        out.last_mut().unwrap().push(c);
    }
    out.into_iter()
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty())
        .collect()
}

fn parse_label(r: &str) -> Option<Req> {
    let set = |rest: &str| -> Option<Vec<String>> {
        let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
        Some(inner.split(',').map(|v| v.trim().to_string()).collect())
    };
    let words: Vec<&str> = r.splitn(3, char::is_whitespace).collect();
    if words.len() == 3 && words[1] == "notin" {
        return Some(Req::NotIn(words[0].into(), set(words[2])?));
    }
    if words.len() == 3 && words[1] == "in" {
        return Some(Req::In(words[0].into(), set(words[2])?));
    }
    if let Some(k) = r.strip_prefix('!') {
        return Some(Req::NotExists(k.trim().into()));
    }
    if let Some((k, v)) = r.split_once("!=") {
        return Some(Req::NotEq(k.trim().into(), v.trim().into()));
    }
    if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
        return Some(Req::Eq(k.trim().into(), v.trim().into()));
    }
    let key_ok = !r.is_empty()
        && r.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    key_ok.then(|| Req::Exists(r.into()))
}

// ---------------------------------------------------------------------------
// Patches

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &Value, patch: &Value) -> Value {
    let Value::Object(p) = patch else {
        return patch.clone();
    };
    let mut out = match target {
        Value::Object(t) => t.clone(),
        _ => Map::new(),
    };
    for (k, v) in p {
        if v.is_null() {
            out.remove(k);
        } else {
            let merged = merge_patch(out.get(k).unwrap_or(&Value::Null), v);
            out.insert(k.clone(), merged);
        }
    }
    Value::Object(out)
}

/// The merge key of a list under `path` in a strategic merge patch (from
/// the Kubernetes types' `patchMergeKey`); lists without one are replaced.
fn merge_key(path: &str) -> Option<&'static str> {
    match path {
        "status.conditions" | "status.addresses" => Some("type"),
        "spec.taints" => Some("key"),
        "spec.ports" => Some("port"),
        "metadata.ownerReferences" => Some("uid"),
        "status.images" => None,
        _ => None,
    }
}

/// Strategic merge patch as the API server applies it to the types here:
/// maps merge (null deletes), lists with a merge key merge by it (an item
/// with `$patch: delete` is removed), other lists are replaced;
/// `$patch: replace` on a map replaces it; `$setElementOrder/...` and
/// `$retainKeys` directives are accepted and ignored.
pub fn strategic_merge(target: &Value, patch: &Value, path: &str) -> Value {
    let Value::Object(p) = patch else {
        return patch.clone();
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut p = p.clone();
        p.remove("$patch");
        return Value::Object(p);
    }
    let mut out = match target {
        Value::Object(t) => t.clone(),
        _ => Map::new(),
    };
    for (k, v) in p {
        if k.starts_with("$setElementOrder/") || k == "$retainKeys" || k == "$patch" {
            continue;
        }
        let sub = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        if v.is_null() {
            out.remove(k);
            continue;
        }
        let merged = match (v, merge_key(&sub), out.get(k)) {
            (Value::Array(items), Some(mk), Some(Value::Array(cur))) => {
                let mut list = cur.clone();
                for item in items {
                    let id = &item[mk];
                    let pos = list.iter().position(|c| &c[mk] == id);
                    let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                    match (pos, delete) {
                        (Some(i), true) => {
                            list.remove(i);
                        }
                        (None, true) => {}
                        (Some(i), false) => list[i] = strategic_merge(&list[i], item, &sub),
                        (None, false) => list.push(strategic_merge(&Value::Null, item, &sub)),
                    }
                }
                Value::Array(list)
            }
            (Value::Array(items), Some(_), _) => Value::Array(
                items
                    .iter()
                    .filter(|i| i.get("$patch").is_none())
                    .cloned()
                    .collect(),
            ),
            (Value::Object(_), _, cur) => strategic_merge(cur.unwrap_or(&Value::Null), v, &sub),
            _ => v.clone(),
        };
        out.insert(k.clone(), merged);
    }
    Value::Object(out)
}

/// RFC 6902 JSON patch (add, remove, replace, move, copy, test).
pub fn json_patch(target: &Value, patch: &Value) -> Result<Value, String> {
    fn parse_ptr(p: &str) -> Result<Vec<String>, String> {
        if p.is_empty() {
            return Ok(Vec::new());
        }
        let rest = p
            .strip_prefix('/')
            .ok_or_else(|| format!("bad pointer {p:?}"))?;
        Ok(rest
            .split('/')
            .map(|s| s.replace("~1", "/").replace("~0", "~"))
            .collect())
    }
    fn parent<'a>(doc: &'a mut Value, ptr: &[String]) -> Result<&'a mut Value, String> {
        let mut v = doc;
        for seg in ptr {
            v = match v {
                Value::Object(m) => m.get_mut(seg).ok_or(format!("no {seg:?}"))?,
                Value::Array(a) => {
                    let i: usize = seg.parse().map_err(|_| format!("bad index {seg:?}"))?;
                    a.get_mut(i).ok_or(format!("no index {i}"))?
                }
                _ => return Err(format!("cannot descend into {seg:?}")),
            };
        }
        Ok(v)
    }
    fn add(doc: &mut Value, ptr: &[String], val: Value) -> Result<(), String> {
        let Some((last, up)) = ptr.split_last() else {
            *doc = val;
            return Ok(());
        };
        match parent(doc, up)? {
            Value::Object(m) => {
                m.insert(last.clone(), val);
            }
            Value::Array(a) => {
                let i = if last == "-" {
                    a.len()
                } else {
                    last.parse().map_err(|_| format!("bad index {last:?}"))?
                };
                if i > a.len() {
                    return Err(format!("index {i} out of range"));
                }
                a.insert(i, val);
            }
            _ => return Err("cannot add into a scalar".into()),
        }
        Ok(())
    }
    fn remove(doc: &mut Value, ptr: &[String]) -> Result<Value, String> {
        let (last, up) = ptr.split_last().ok_or("cannot remove the root")?;
        match parent(doc, up)? {
            Value::Object(m) => m.remove(last).ok_or(format!("no {last:?}")),
            Value::Array(a) => {
                let i: usize = last.parse().map_err(|_| format!("bad index {last:?}"))?;
                (i < a.len())
                    .then(|| a.remove(i))
                    .ok_or(format!("no index {i}"))
            }
            _ => Err("cannot remove from a scalar".into()),
        }
    }
    let mut doc = target.clone();
    for op in patch.as_array().ok_or("a JSON patch is an array")? {
        let path = parse_ptr(op["path"].as_str().ok_or("op without path")?)?;
        match op["op"].as_str().unwrap_or("") {
            "add" => add(&mut doc, &path, op["value"].clone())?,
            "remove" => {
                remove(&mut doc, &path)?;
            }
            "replace" => {
                remove(&mut doc, &path)?;
                add(&mut doc, &path, op["value"].clone())?;
            }
            "move" => {
                let from = parse_ptr(op["from"].as_str().ok_or("move without from")?)?;
                let v = remove(&mut doc, &from)?;
                add(&mut doc, &path, v)?;
            }
            "copy" => {
                let from = parse_ptr(op["from"].as_str().ok_or("copy without from")?)?;
                let v = parent(&mut doc, &from)?.clone();
                add(&mut doc, &path, v)?;
            }
            "test" => {
                if *parent(&mut doc, &path)? != op["value"] {
                    return Err(format!("test failed at {:?}", op["path"]));
                }
            }
            other => return Err(format!("unknown op {other:?}")),
        }
    }
    Ok(doc)
}

// ---------------------------------------------------------------------------
// Objects shaped as Kubernetes 1.36 returns them

/// RFC 3339 in UTC, seconds precision, as metadata timestamps are.
pub fn timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Days since 1970-01-01 to a civil date (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A random-looking version 4 UUID (unique per process run).
pub fn uid() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ (u64::from(std::process::id()) << 32)
        ^ N.fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mix = |mut x: u64| {
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    };
    let (a, b) = (mix(seed), mix(seed ^ 0x5555_5555_5555_5555));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

/// A Node as a kind worker's kubelet registers it (not Ready: no CNI yet),
/// with `spec.podCIDR`/`podCIDRs` when `pod_cidr` is given.
pub fn node(name: &str, pod_cidr: Option<&str>, internal_ip: &str) -> Value {
    let now = timestamp(SystemTime::now());
    let cond = |ty: &str, st: &str, reason: &str, msg: &str| {
        json!({"type": ty, "status": st, "lastHeartbeatTime": now, "lastTransitionTime": now,
            "reason": reason, "message": msg})
    };
    let resources = json!({"cpu": "8", "ephemeral-storage": "102626232Ki", "hugepages-1Gi": "0",
        "hugepages-2Mi": "0", "memory": "32803832Ki", "pods": "110"});
    let mut spec = json!({
        "providerID": format!("kind://docker/kind/{name}"),
        "taints": [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}],
    });
    if let Some(c) = pod_cidr {
        spec["podCIDR"] = json!(c);
        spec["podCIDRs"] = json!([c]);
    }
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "labels": {
                "beta.kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
            },
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
            "managedFields": [{
                "manager": "kubelet",
                "operation": "Update",
                "apiVersion": "v1",
                "time": now,
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:kubernetes.io/hostname": {}}}},
            }],
        },
        "spec": spec,
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "False", "KubeletNotReady", "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:Network plugin returns error: cni plugin not initialized"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": internal_ip},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": "2b4f1e0c9d8a4f7e8c3b6a5d4e3f2a1b",
                "systemUUID": "2b4f1e0c-9d8a-4f7e-8c3b-6a5d4e3f2a1b",
                "bootID": "7c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f",
                "kernelVersion": "6.18.0",
                "osImage": "Debian GNU/Linux 12 (bookworm)",
                "containerRuntimeVersion": "containerd://2.1.1",
                "kubeletVersion": format!("v{}.{}.1", VERSION.0, VERSION.1),
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "swap": {},
            },
            "runtimeHandlers": [
                {"name": "runc", "features": {"recursiveReadOnlyMounts": true, "userNamespaces": true}},
                {"name": "", "features": {"recursiveReadOnlyMounts": true, "userNamespaces": true}},
            ],
            "features": {"supplementalGroupsPolicy": true},
        },
    })
}

/// A Service port: (name, protocol, port, targetPort, nodePort).
pub type Port<'a> = (&'a str, &'a str, u16, u16, Option<u16>);

/// A Service as the API returns it after defaulting (`type` ClusterIP or
/// NodePort; `selector` app=<name>).
pub fn service(namespace: &str, name: &str, ty: &str, cluster_ip: &str, ports: &[Port]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(pname, proto, port, target, node_port)| {
            let mut p =
                json!({"name": pname, "protocol": proto, "port": port, "targetPort": target});
            if let Some(np) = node_port {
                p["nodePort"] = json!(np);
            }
            p
        })
        .collect();
    let mut spec = json!({
        "ports": ports,
        "selector": {"app": name},
        "clusterIP": cluster_ip,
        "clusterIPs": [cluster_ip],
        "type": ty,
        "sessionAffinity": "None",
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "internalTrafficPolicy": "Cluster",
    });
    if ty == "NodePort" || ty == "LoadBalancer" {
        spec["externalTrafficPolicy"] = json!("Cluster");
    }
    json!({
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": spec,
        "status": {"loadBalancer": {}},
    })
}

/// An endpoint: (address, nodeName, ready).
pub type Endpoint<'a> = (&'a str, &'a str, bool);

/// An EndpointSlice of Service `service` as the EndpointSlice controller
/// writes it; `ports` are (name, protocol, port).
pub fn endpoint_slice(
    namespace: &str,
    service: &str,
    name: &str,
    endpoints: &[Endpoint],
    ports: &[(&str, &str, u16)],
) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (addr, node, ready))| {
            json!({
                "addresses": [addr],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "targetRef": {"kind": "Pod", "namespace": namespace,
                    "name": format!("{service}-{i}"), "uid": uid()},
                "nodeName": node,
            })
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, proto, port)| json!({"name": n, "protocol": proto, "port": port}))
        .collect();
    json!({
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "generateName": format!("{service}-"),
            "namespace": namespace,
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service,
            },
            "annotations": {
                "endpoints.kubernetes.io/last-change-trigger-time": timestamp(SystemTime::now()),
            },
        },
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": ports,
    })
}

// ---------------------------------------------------------------------------
// A raw client, for the server's own tests

/// One HTTP/1.1 request on a fresh connection from the calling thread's
/// namespace; returns (status, body) with chunked bodies reassembled.
pub fn http(addr: SocketAddr, method: &str, target: &str, ct: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the API server");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let (code, chunked) = read_head(&mut r);
    let mut out = String::new();
    if chunked {
        while let Some(c) = read_chunk(&mut r) {
            out.push_str(&c);
        }
    } else {
        r.read_to_string(&mut out).unwrap();
    }
    (code, out)
}

/// Reads a response's status line and headers: (status, chunked).
pub fn read_head(r: &mut impl BufRead) -> (u16, bool) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut chunked = false;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        if h.trim().is_empty() {
            break;
        }
        if h.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
        {
            chunked = true;
        }
    }
    (code, chunked)
}

/// One chunk of a chunked body (None at its end or when the connection
/// closed).
pub fn read_chunk(r: &mut impl BufRead) -> Option<String> {
    let mut size = String::new();
    if r.read_line(&mut size).ok()? == 0 {
        return None;
    }
    let n = usize::from_str_radix(size.trim(), 16).ok()?;
    let mut buf = vec![0; n + 2];
    r.read_exact(&mut buf).ok()?;
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDR: &str = "127.0.0.1:6443";

    /// The server in a fresh namespace, and a way to run a client there.
    fn server() -> Option<(Netns, ApiServer)> {
        if !crate::require_root() {
            return None;
        }
        let ns = Netns::new();
        let s = ApiServer::start(&ns, ADDR);
        s.set_bookmark_interval(Duration::from_millis(200));
        Some((ns, s))
    }

    fn get(ns: &Netns, target: &str) -> (u16, Value) {
        let (code, body) = ns.run(|| http(ADDR.parse().unwrap(), "GET", target, "", ""));
        (code, serde_json::from_str(&body).expect("JSON body"))
    }

    fn patch(ns: &Netns, target: &str, ct: &str, body: Value) -> (u16, Value) {
        let (code, body) = ns.run(|| {
            http(
                ADDR.parse().unwrap(),
                "PATCH",
                target,
                ct,
                &body.to_string(),
            )
        });
        (code, serde_json::from_str(&body).expect("JSON body"))
    }

    /// A watch read event by event on a thread inside `ns`: events arrive
    /// on the channel, `None` when the stream ended (cleanly or not).
    fn watch(ns: &Netns, target: &str) -> std::sync::mpsc::Receiver<Option<Value>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = ns.path();
        let target = target.to_string();
        std::thread::spawn(move || {
            enter(&path);
            let mut s = TcpStream::connect(ADDR).unwrap();
            write!(s, "GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut r = BufReader::new(s);
            let (code, chunked) = read_head(&mut r);
            assert_eq!((code, chunked), (200, true));
            while let Some(c) = read_chunk(&mut r) {
                assert!(c.ends_with('\n'), "one event a line: {c:?}");
                let _ = tx.send(Some(serde_json::from_str(&c).unwrap()));
            }
            let _ = tx.send(None);
        });
        rx
    }

    fn next(rx: &std::sync::mpsc::Receiver<Option<Value>>) -> Option<Value> {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("an event or the end within 10 s")
    }

    /// The next non-bookmark event.
    fn next_change(rx: &std::sync::mpsc::Receiver<Option<Value>>) -> Option<Value> {
        loop {
            let e = next(rx)?;
            if e["type"] != "BOOKMARK" {
                return Some(e);
            }
        }
    }

    fn rv(v: &Value) -> u64 {
        v["metadata"]["resourceVersion"]
            .as_str()
            .expect("a resourceVersion")
            .parse()
            .unwrap()
    }

    #[test]
    fn list_then_watch_from_its_resource_version() {
        let Some((ns, s)) = server() else { return };
        s.put_node("a", Some("10.244.1.0/24"), "192.168.77.11");
        let (code, list) = get(&ns, "/api/v1/nodes");
        assert_eq!(code, 200);
        assert_eq!(list["kind"], "NodeList");
        assert_eq!(list["apiVersion"], "v1");
        assert_eq!(list["items"].as_array().unwrap().len(), 1);
        let a = &list["items"][0];
        assert_eq!(a["metadata"]["name"], "a");
        assert!(a["metadata"]["uid"].as_str().unwrap().len() == 36);
        assert!(a["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap()
            .ends_with('Z'));
        assert_eq!(a["spec"]["podCIDRs"], json!(["10.244.1.0/24"]));
        let list_rv: u64 = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(list_rv, rv(a));

        // Changes made after the list, before the watch starts, are sent.
        s.put_node("b", None, "192.168.77.12");
        s.update(Res::Nodes, "", "a", |n| {
            n["metadata"]["labels"]["x"] = json!("1")
        });
        // A no-op write changes nothing.
        let before = s.resource_version();
        s.update(Res::Nodes, "", "a", |_| {});
        assert_eq!(s.resource_version(), before, "no-op write bumped the rv");
        // Another resource's change is not in this watch.
        s.put(service("default", "web", "ClusterIP", "10.96.0.10", &[]));

        let w = watch(
            &ns,
            &format!("/api/v1/nodes?watch=true&resourceVersion={list_rv}&timeoutSeconds=2"),
        );
        let e = next(&w).unwrap();
        assert_eq!(
            (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
            (Some("ADDED"), Some("b"))
        );
        let e = next(&w).unwrap();
        assert_eq!(e["type"], "MODIFIED");
        assert_eq!(e["object"]["metadata"]["labels"]["x"], "1");
        assert!(rv(&e["object"]) > list_rv);
        // Live: a delete, with the deletion's resourceVersion.
        s.delete_node("b");
        let e = next(&w).unwrap();
        assert_eq!(e["type"], "DELETED");
        assert_eq!(rv(&e["object"]), s.resource_version());
        // No bookmarks asked, none sent; the stream ends after timeoutSeconds.
        assert_eq!(next(&w), None);

        // resourceVersion=0: synthetic ADDED for what exists.
        let w = watch(
            &ns,
            "/api/v1/nodes?watch=true&resourceVersion=0&timeoutSeconds=1",
        );
        let e = next(&w).unwrap();
        assert_eq!(
            (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
            (Some("ADDED"), Some("a"))
        );
        assert_eq!(next(&w), None);
        let log = s.requests();
        assert!(log
            .iter()
            .any(|r| r.is_watch() && r.param("resourceVersion") == Some("0")));
    }

    #[test]
    fn bookmarks_when_asked_and_410_after_compaction() {
        let Some((ns, s)) = server() else { return };
        s.put_node("a", Some("10.244.1.0/24"), "192.168.77.11");
        let old = s.resource_version();
        let w = watch(
            &ns,
            &format!("/api/v1/nodes?watch=true&resourceVersion={old}&allowWatchBookmarks=true&timeoutSeconds=5"),
        );
        // Unrelated writes advance the global rv; the bookmark carries it.
        s.put(service("default", "web", "ClusterIP", "10.96.0.10", &[]));
        let e = next(&w).unwrap();
        assert_eq!(e["type"], "BOOKMARK");
        assert_eq!(e["object"]["kind"], "Node");
        let b = rv(&e["object"]);
        assert!(b >= old, "bookmark rv {b} before {old}");
        let ok = crate::wait_until(Duration::from_secs(5), || {
            next(&w).is_some_and(|e| {
                e["type"] == "BOOKMARK" && rv(&e["object"]) == s.resource_version()
            })
        });
        assert!(ok, "no bookmark at the current rv");

        s.compact();
        // A watch from before the compaction: ERROR 410 Expired, then the end.
        let w2 = watch(
            &ns,
            &format!("/api/v1/nodes?watch=true&resourceVersion={old}"),
        );
        let e = next(&w2).unwrap();
        assert_eq!(e["type"], "ERROR");
        assert_eq!(e["object"]["kind"], "Status");
        assert_eq!(e["object"]["code"], 410);
        assert_eq!(e["object"]["reason"], "Expired");
        assert_eq!(next(&w2), None);
        // The running watch is not affected; one from now is fine.
        s.update(Res::Nodes, "", "a", |n| {
            n["metadata"]["labels"]["y"] = json!("2")
        });
        assert_eq!(next_change(&w).unwrap()["type"], "MODIFIED");
        let now = s.resource_version();
        let w3 = watch(
            &ns,
            &format!("/api/v1/nodes?watch=true&resourceVersion={now}&timeoutSeconds=1"),
        );
        assert_eq!(next(&w3), None, "nothing happened after {now}");
    }

    #[test]
    fn selectors_filter_lists_and_watches() {
        let Some((ns, s)) = server() else { return };
        let mut headless = service("default", "db", "ClusterIP", "None", &[]);
        headless["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
        s.put(headless);
        s.put(service("default", "web", "ClusterIP", "10.96.0.10", &[]));
        let q = "labelSelector=%21service.kubernetes.io%2Fservice-proxy-name&fieldSelector=spec.clusterIP%21%3DNone";
        let (_, list) = get(&ns, &format!("/api/v1/services?{q}"));
        let names: Vec<&str> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["web"]);
        let (_, list) = get(
            &ns,
            "/api/v1/namespaces/default/services?labelSelector=app+in+(db,x),nonsense>>",
        );
        assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");

        let from = s.resource_version();
        let w = watch(
            &ns,
            &format!("/api/v1/services?watch=true&resourceVersion={from}&{q}"),
        );
        // web gets a proxy name: it leaves the selection (DELETED), and
        // comes back (ADDED) when the label goes.
        s.update(Res::Services, "default", "web", |o| {
            o["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = json!("other")
        });
        let e = next(&w).unwrap();
        assert_eq!(
            (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
            (Some("DELETED"), Some("web"))
        );
        s.update(Res::Services, "default", "db", |o| {
            o["spec"]["ports"] = json!([])
        });
        s.update(Res::Services, "default", "web", |o| {
            o["metadata"]["labels"]
                .as_object_mut()
                .unwrap()
                .remove("service.kubernetes.io/service-proxy-name");
        });
        let e = next(&w).unwrap();
        assert_eq!(
            (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
            (Some("ADDED"), Some("web"))
        );
        s.drop_watches();
        assert_eq!(next(&w), None, "dropped watch ends");
    }

    #[test]
    fn merge_and_strategic_patches_on_nodes_and_status() {
        let Some((ns, s)) = server() else { return };
        s.put_node("a", Some("10.244.1.0/24"), "192.168.77.11");
        let rv0 = rv(&s.node("a"));
        // Merge patch of annotations: added next to the kubelet's ones.
        let (code, n) = patch(
            &ns,
            "/api/v1/nodes/a?fieldManager=ferryd",
            "application/merge-patch+json",
            json!({"metadata": {"annotations": {"ferry.example/vtep-mac": "aa:bb:cc:dd:ee:ff"}}}),
        );
        assert_eq!(code, 200, "{n}");
        let ann = &s.node("a")["metadata"]["annotations"];
        assert_eq!(ann["ferry.example/vtep-mac"], "aa:bb:cc:dd:ee:ff");
        assert_eq!(
            ann["node.alpha.kubernetes.io/ttl"], "0",
            "patched, not replaced"
        );
        assert!(rv(&n) > rv0);
        // Status changes through the main resource are ignored.
        patch(
            &ns,
            "/api/v1/nodes/a",
            "application/merge-patch+json",
            json!({"status": {"conditions": []}}),
        );
        assert_eq!(
            s.node("a")["status"]["conditions"]
                .as_array()
                .unwrap()
                .len(),
            4
        );
        // Strategic merge on nodes/status: conditions merged by type.
        let cond = json!({"type": "NetworkUnavailable", "status": "False", "reason": "FerryIsUp",
            "message": "ferry is up", "lastTransitionTime": "2026-01-01T00:00:00Z",
            "lastHeartbeatTime": "2026-01-01T00:00:00Z"});
        let (code, _) = patch(
            &ns,
            "/api/v1/nodes/a/status",
            "application/strategic-merge-patch+json",
            json!({"status": {"conditions": [cond]}}),
        );
        assert_eq!(code, 200);
        let conds = s.node("a")["status"]["conditions"].clone();
        let types: Vec<&str> = conds
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            [
                "MemoryPressure",
                "DiskPressure",
                "PIDPressure",
                "Ready",
                "NetworkUnavailable"
            ]
        );
        // Again, changed: replaced in place.
        patch(
            &ns,
            "/api/v1/nodes/a/status",
            "application/strategic-merge-patch+json",
            json!({"status": {"conditions": [{"type": "NetworkUnavailable", "status": "True"}]}}),
        );
        let c = s.node("a")["status"]["conditions"][4].clone();
        assert_eq!(
            (c["status"].as_str(), c["reason"].as_str()),
            (Some("True"), Some("FerryIsUp"))
        );
        // A merge patch on status replaces the list (no merge keys there).
        patch(
            &ns,
            "/api/v1/nodes/a/status",
            "application/merge-patch+json",
            json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        assert_eq!(
            s.node("a")["status"]["conditions"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        // Spec is not changed through status.
        patch(
            &ns,
            "/api/v1/nodes/a/status",
            "application/merge-patch+json",
            json!({"spec": {"podCIDR": "10.0.0.0/8"}}),
        );
        assert_eq!(s.node("a")["spec"]["podCIDR"], "10.244.1.0/24");
        // A stale resourceVersion in the patch: 409.
        let (code, st) = patch(
            &ns,
            "/api/v1/nodes/a",
            "application/merge-patch+json",
            json!({"metadata": {"resourceVersion": rv0.to_string(), "labels": {"z": "1"}}}),
        );
        assert_eq!((code, st["reason"].as_str()), (409, Some("Conflict")));
        // JSON patch; unknown nodes; unknown media types.
        let (code, _) = patch(
            &ns,
            "/api/v1/nodes/a",
            "application/json-patch+json",
            json!([{"op": "add", "path": "/metadata/labels/j", "value": "p"}]),
        );
        assert_eq!(code, 200);
        assert_eq!(s.node("a")["metadata"]["labels"]["j"], "p");
        assert_eq!(
            patch(
                &ns,
                "/api/v1/nodes/zz",
                "application/merge-patch+json",
                json!({})
            )
            .0,
            404
        );
        assert_eq!(
            patch(&ns, "/api/v1/nodes/a", "text/plain", json!({})).0,
            415
        );
        let (code, n) = get(&ns, "/api/v1/nodes/a");
        assert_eq!(
            (code, n["metadata"]["labels"]["j"].as_str()),
            (200, Some("p"))
        );
        let log = s.requests();
        let p = log.iter().find(|r| r.method == "PATCH").unwrap();
        assert_eq!(
            (p.path.as_str(), p.param("fieldManager")),
            ("/api/v1/nodes/a", Some("ferryd"))
        );
        assert_eq!(p.content_type, "application/merge-patch+json");
    }

    #[test]
    fn restart_keeps_state_and_ends_watches() {
        let Some((ns, s)) = server() else { return };
        s.put_node("a", Some("10.244.1.0/24"), "192.168.77.11");
        let w = watch(&ns, "/api/v1/nodes?watch=true&resourceVersion=0");
        assert_eq!(next(&w).unwrap()["type"], "ADDED");
        assert!(crate::wait_until(Duration::from_secs(5), || s
            .open_watches()
            == 1));
        s.stop();
        assert_eq!(next(&w), None, "watch cut by the stop");
        assert!(
            ns.run(|| TcpStream::connect(ADDR)).is_err(),
            "still listening"
        );
        s.resume();
        let (code, list) = get(&ns, "/apis/discovery.k8s.io/v1/endpointslices");
        assert_eq!(
            (code, list["kind"].as_str()),
            (200, Some("EndpointSliceList"))
        );
        let (_, list) = get(&ns, "/api/v1/nodes");
        assert_eq!(list["items"][0]["metadata"]["name"], "a", "state kept");
        let (_, v) = get(&ns, "/version");
        assert_eq!(v["major"], "1");
        let (_, g) = get(&ns, "/apis");
        assert_eq!(g["groups"][0]["name"], "discovery.k8s.io");
        assert_eq!(get(&ns, "/api/v1/pods").0, 404);
    }

    #[test]
    fn timestamps_and_patch_helpers() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            timestamp(UNIX_EPOCH + Duration::from_secs(1_709_251_199)),
            "2024-02-29T23:59:59Z"
        );
        assert_ne!(uid(), uid());
        let t = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        assert_eq!(
            merge_patch(&t, &json!({"a": {"b": null, "d": 3}, "l": [3]})),
            json!({"a": {"c": 2, "d": 3}, "l": [3]})
        );
        let t = json!({"status": {"conditions": [{"type": "A", "status": "x"}, {"type": "B"}]}});
        let p = json!({"status": {"$setElementOrder/conditions": [{"type": "B"}],
            "conditions": [{"type": "A", "$patch": "delete"}, {"type": "C", "status": "y"}]}});
        assert_eq!(
            strategic_merge(&t, &p, ""),
            json!({"status": {"conditions": [{"type": "B"}, {"type": "C", "status": "y"}]}})
        );
        assert_eq!(
            json_patch(
                &json!({"a": [1, 2]}),
                &json!([{"op": "remove", "path": "/a/0"},
                {"op": "test", "path": "/a/0", "value": 2}])
            )
            .unwrap(),
            json!({"a": [2]})
        );
        assert!(json_patch(
            &json!({}),
            &json!([{"op": "test", "path": "/a", "value": 1}])
        )
        .is_err());
    }
}
