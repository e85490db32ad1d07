//! Harness for ferry's end-to-end tests: "hosts" and "pods" made of network
//! namespaces, the plugins run as processes the way a container runtime runs
//! them, and snapshots of a host to prove that nothing was left behind.
//!
//! Safety rules (DESIGN.md, "The machine you test on"):
//! - the machine's root network namespace is never changed: every plugin runs
//!   inside a test-made host netns (`ip netns exec`, which also mounts that
//!   netns's /sys), every command that reads or changes state runs there too;
//! - namespaces are named `ferry-t<pid>-<n>` and deleted on drop (also when a
//!   test panics); leftovers of a killed earlier run (dead pid) are swept;
//! - data dirs are per-test temp dirs, passed explicitly in every config:
//!   /etc/cni, /opt/cni and /var/lib/cni are never used.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use serde_json::{json, Value};

/// Where Debian's containernetworking-plugins live.
pub const REFERENCE_DIR: &str = "/usr/lib/cni";
/// A plugin that runs longer than this is killed and the test fails.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);
const NETNS_PREFIX: &str = "ferry-t";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn next_id() -> usize {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

// ---------------------------------------------------------------------------
// Preconditions and binaries

/// Env var that turns every skipped test into a failure. `scripts/test.sh`
/// (and so CI) sets it: a run that is green must have run every test.
pub const REQUIRE_ALL_ENV: &str = "FERRY_REQUIRE_ALL";

/// A test cannot run here because of `why`. Returns false after printing
/// "skipped: <test>: <why>" so that a developer without root sees what did not
/// run; panics instead when FERRY_REQUIRE_ALL is set, so a skip can never
/// read as a pass in CI.
pub fn skip(why: &str) -> bool {
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string();
    if std::env::var_os(REQUIRE_ALL_ENV).is_some_and(|v| !v.is_empty() && v != "0") {
        panic!("{test} cannot run here ({why}) and {REQUIRE_ALL_ENV} forbids skipping");
    }
    println!("skipped: {test}: {why}");
    false
}

/// True when the tests can run: root, with `ip` and `nft`. Otherwise
/// [`skip`]s (a failure under FERRY_REQUIRE_ALL).
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return skip("needs root");
    }
    for tool in ["ip", "nft"] {
        if Command::new(tool).arg("-V").output().is_err() {
            panic!("`{tool}` is not installed (packages iproute2, nftables)");
        }
    }
    sweep_stale_netns();
    true
}

/// The directory holding the built `ferry` and `ferry-ipam`.
///
/// Test binaries live in `target/<profile>/deps/`; the plugin binaries in
/// `target/<profile>/`. Cargo does not build a dependency's binaries for
/// another package's tests, so this runs `cargo build -p ferry-plugin --bins`
/// once per test process (a no-op when they are fresh; set
/// FERRY_E2E_NO_BUILD=1 to skip it) and then insists that they exist.
/// FERRY_E2E_BIN_DIR points at prebuilt binaries instead.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("FERRY_E2E_BIN_DIR") {
            return check_bins(PathBuf::from(dir));
        }
        let exe = std::env::current_exe().expect("current_exe");
        let deps = exe.parent().expect("test binary has a parent dir");
        let profile_dir = if deps.file_name().is_some_and(|n| n == "deps") {
            deps.parent().expect("deps has a parent").to_path_buf()
        } else {
            deps.to_path_buf()
        };
        build_bins("ferry-plugin", &profile_dir);
        check_bins(profile_dir)
    })
}

/// `cargo build -p <package> --bins` into the profile dir of this test
/// binary (same target dir, same profile), unless FERRY_E2E_BIN_DIR or
/// FERRY_E2E_NO_BUILD says to use what is there.
pub fn build_bins(package: &str, profile_dir: &Path) {
    if std::env::var_os("FERRY_E2E_BIN_DIR").is_some()
        || std::env::var_os("FERRY_E2E_NO_BUILD").is_some()
    {
        return;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        package,
        "--bins",
        "--manifest-path",
    ])
    .arg(&manifest);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
    }
    if let Some(target) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("warning: `cargo build -p {package} --bins` failed ({s})"),
        Err(e) => eprintln!("warning: cannot run cargo to build {package}: {e}"),
    }
}

/// The built `ferryctl` (built once per test process, like the plugins).
pub fn ferryctl_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = bin_dir().to_path_buf();
        build_bins("ferry-daemon", &dir);
        let bin = dir.join("ferryctl");
        assert!(
            bin.is_file(),
            "{} is missing: run `cargo build --workspace`",
            bin.display()
        );
        bin
    })
    .clone()
}

fn check_bins(dir: PathBuf) -> PathBuf {
    for bin in ["ferry", "ferry-ipam"] {
        assert!(
            dir.join(bin).is_file(),
            "plugin binary {} is missing: run `cargo build --workspace` first",
            dir.join(bin).display()
        );
    }
    dir
}

/// CNI_PATH for every invocation: ferry's binaries first, then the reference.
pub fn cni_path() -> String {
    format!("{}:{REFERENCE_DIR}", bin_dir().display())
}

/// Absolute path of a plugin, looked up in CNI_PATH order.
pub fn plugin_path(plugin: &str) -> PathBuf {
    let ours = bin_dir().join(plugin);
    if ours.is_file() {
        return ours;
    }
    let reference = Path::new(REFERENCE_DIR).join(plugin);
    assert!(
        reference.is_file(),
        "plugin {plugin} not found in {} nor {REFERENCE_DIR} (package containernetworking-plugins)",
        bin_dir().display()
    );
    reference
}

/// python3 for small helpers (servers in pods); Debian's first.
pub fn python3() -> &'static str {
    if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

// ---------------------------------------------------------------------------
// Commands

/// Run a command, return its output (never panics on a non-zero exit).
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Run a command that must succeed; returns stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "`{cmd} {}` failed ({}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Poll `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------
// Network namespaces

/// A named network namespace made by the test, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add ferry-t<pid>-<n>` with `lo` up.
    pub fn new() -> Netns {
        let name = format!("{NETNS_PREFIX}{}-{}", std::process::id(), next_id());
        run_ok("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The nsfs path a runtime passes as CNI_NETNS.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// A `Command` that runs `args` inside this netns.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Run inside this netns; never panics on failure.
    pub fn exec(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run ip netns exec: {e}"))
    }

    /// Run inside this netns; panics unless it succeeds. Returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "`{}` in netns {} failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip -j <args>` inside this netns, parsed (an empty output is `[]`).
    pub fn ip_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["ip", "-j"];
        a.extend_from_slice(args);
        let text = self.ok(&a);
        if text.trim().is_empty() {
            return json!([]);
        }
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("ip -j {args:?}: {e}: {text}"))
    }

    /// One link (`ip -j -d link show dev`), or None.
    pub fn link(&self, dev: &str) -> Option<Value> {
        let out = self.exec(&["ip", "-j", "-d", "link", "show", "dev", dev]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()?
            .as_array()?
            .first()
            .cloned()
    }

    /// Names of every link in this netns.
    pub fn link_names(&self) -> Vec<String> {
        self.ip_json(&["link", "show"])
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// Addresses on `dev` as "addr/prefix" (link-local ones too).
    pub fn addrs(&self, dev: &str) -> Vec<String> {
        let v = self.ip_json(&["addr", "show", "dev", dev]);
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or(""), a["prefixlen"]))
            .collect()
    }

    /// A veth pair: `dev` here, its peer `eth0` inside `other`.
    pub fn veth_to(&self, dev: &str, other: &Netns) {
        self.ok(&[
            "ip",
            "link",
            "add",
            dev,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            other.name(),
        ]);
    }

    /// Runs `f` on a fresh thread that has entered this namespace (to call
    /// ferry's library in-process; the caller's thread never moves).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter();
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }

    /// Moves the calling thread into this namespace: only for threads the
    /// test spawned for that purpose.
    pub fn enter(&self) {
        let f = std::fs::File::open(self.path()).expect("open netns");
        // SAFETY: setns on a valid nsfs fd affects only the calling thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }

    /// `nft -j list ruleset` in this netns: the `nftables` array of objects.
    pub fn nft_objects(&self) -> Vec<Value> {
        let text = self.ok(&["nft", "-j", "list", "ruleset"]);
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("nft -j: {e}: {text}"));
        v["nftables"].as_array().cloned().unwrap_or_default()
    }

    /// Names of the objects of `kind` ("table", "chain", "map", "set") in
    /// `table` (any table when None), from `nft -j`.
    pub fn nft_names(&self, kind: &str, table: Option<&str>) -> Vec<String> {
        self.nft_objects()
            .iter()
            .filter_map(|o| o.get(kind))
            .filter(|o| {
                table.is_none_or(|t| o["table"] == t || (kind == "table" && o["name"] == t))
            })
            .filter_map(|o| o["name"].as_str().map(str::to_string))
            .collect()
    }

    /// The keys of set or map `name` (in any table), from `nft -j`
    /// (empty when it does not exist).
    pub fn nft_keys(&self, name: &str) -> Vec<String> {
        let key = |e: &Value| -> String {
            let k = e.as_array().and_then(|kv| kv.first()).unwrap_or(e);
            let k = k.get("elem").map(|x| &x["val"]).unwrap_or(k);
            k.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| k.to_string())
        };
        self.nft_objects()
            .iter()
            .filter_map(|o| o.get("map").or_else(|| o.get("set")))
            .filter(|o| o["name"] == name)
            .flat_map(|o| o["elem"].as_array().cloned().unwrap_or_default())
            .map(|e| key(&e))
            .collect()
    }

    /// `nft list ruleset` in this netns.
    pub fn nft_ruleset(&self) -> String {
        self.ok(&["nft", "list", "ruleset"])
    }

    /// `sysctl -n key` in this netns.
    pub fn sysctl(&self, key: &str) -> String {
        self.ok(&["sysctl", "-n", key]).trim().to_string()
    }

    /// One ping from this netns; true when answered.
    pub fn ping_once(&self, addr: &str) -> bool {
        self.exec(&["ping", "-c1", "-W1", "-n", "-q", addr])
            .status
            .success()
    }

    /// Ping until answered, at most `timeout` (IPv6 DAD on a fresh bridge
    /// address can take a second or two).
    pub fn ping(&self, addr: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.ping_once(addr))
    }

    /// Panics with context unless `addr` answers a ping within 10 s.
    pub fn assert_ping(&self, addr: &str) {
        let start = Instant::now();
        let ok = self.ping(addr, Duration::from_secs(10));
        if start.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "slow: {} pinged {addr} after {:?}",
                self.name,
                start.elapsed()
            );
        }
        assert!(
            ok,
            "netns {} cannot ping {addr}\naddrs: {}\nroutes: {}{}",
            self.name,
            self.ok(&["ip", "addr"]),
            self.ok(&["ip", "route"]),
            self.ok(&["ip", "-6", "route"])
        );
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Deletes `ferry-t<pid>-<n>` namespaces whose creating process is gone
/// (a test run killed before its guards ran). Live runs are left alone.
fn sweep_stale_netns() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Ok(entries) = std::fs::read_dir("/run/netns") else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((pid, n)) = name
                .strip_prefix(NETNS_PREFIX)
                .and_then(|rest| rest.split_once('-'))
            else {
                continue;
            };
            let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            if numeric(pid) && numeric(n) && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = run("ip", &["netns", "del", &name]);
            }
        }
    });
}

// ---------------------------------------------------------------------------
// Temp dirs

/// A unique directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        let path =
            std::env::temp_dir().join(format!("ferry-e2e-{}-{}", std::process::id(), next_id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Every file under `dir`, as paths relative to it (sorted).
pub fn files_under(dir: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

// ---------------------------------------------------------------------------
// Plugin invocations

/// The CNI environment of one invocation. `None` leaves a variable unset.
#[derive(Clone, Debug)]
pub struct Cni {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl Cni {
    /// A full environment: `command` for container `id` in `netns`, ifname eth0.
    pub fn new(command: &str, id: &str, netns: &str) -> Cni {
        Cni {
            command: Some(command.to_string()),
            container_id: Some(id.to_string()),
            netns: Some(netns.to_string()),
            ifname: Some("eth0".to_string()),
            args: None,
            path: Some(cni_path()),
        }
    }

    pub fn add(id: &str, pod: &Netns) -> Cni {
        Cni::new("ADD", id, &pod.path())
    }

    pub fn del(id: &str, pod: &Netns) -> Cni {
        Cni::new("DEL", id, &pod.path())
    }

    pub fn check(id: &str, pod: &Netns) -> Cni {
        Cni::new("CHECK", id, &pod.path())
    }

    /// STATUS, GC and VERSION carry no container.
    pub fn bare(command: &str) -> Cni {
        Cni {
            command: Some(command.to_string()),
            container_id: None,
            netns: None,
            ifname: None,
            args: None,
            path: Some(cni_path()),
        }
    }

    pub fn ifname(mut self, ifname: &str) -> Cni {
        self.ifname = Some(ifname.to_string());
        self
    }

    pub fn args(mut self, args: &str) -> Cni {
        self.args = Some(args.to_string());
        self
    }

    pub fn netns(mut self, netns: Option<&str>) -> Cni {
        self.netns = netns.map(str::to_string);
        self
    }

    pub fn container_id(mut self, id: Option<&str>) -> Cni {
        self.container_id = id.map(str::to_string);
        self
    }

    pub fn without_ifname(mut self) -> Cni {
        self.ifname = None;
        self
    }

    fn vars(&self) -> Vec<(&'static str, &str)> {
        [
            ("CNI_COMMAND", &self.command),
            ("CNI_CONTAINERID", &self.container_id),
            ("CNI_NETNS", &self.netns),
            ("CNI_IFNAME", &self.ifname),
            ("CNI_ARGS", &self.args),
            ("CNI_PATH", &self.path),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }
}

/// What one plugin run produced.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub what: String,
    pub stdin: String,
    /// Exit code; None when killed (signal or timeout).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Everything about the run, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "{}\n  stdin: {}\n  exit: {:?} after {:?}\n  stdout: {}\n  stderr: {}",
            self.what,
            self.stdin,
            self.code,
            self.elapsed,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }

    /// stdout parsed as JSON (Null when empty or not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or(Value::Null)
    }

    /// Asserts exit 0; returns stdout as JSON (Null when empty).
    pub fn ok(&self) -> Value {
        assert!(self.success(), "plugin failed:\n{}", self.describe());
        if self.stdout.trim().is_empty() {
            return Value::Null;
        }
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.describe()))
    }

    /// Asserts a failure with a CNI error object on stdout; returns its code.
    pub fn err_code(&self) -> u64 {
        assert!(
            !self.success() && self.code.is_some(),
            "expected the plugin to fail with a CNI error:\n{}",
            self.describe()
        );
        let v = self.json();
        assert!(
            v["code"].is_u64() && v["msg"].is_string(),
            "a failure must print the CNI error JSON (code, msg) on stdout:\n{}",
            self.describe()
        );
        v["code"].as_u64().unwrap()
    }

    /// Asserts a failure with CNI error `code`.
    pub fn expect_code(&self, code: u64) {
        let got = self.err_code();
        assert_eq!(got, code, "wrong error code:\n{}", self.describe());
    }
}

/// Run `program` (an absolute path) inside `ns` with `cni` and `stdin`.
pub fn run_plugin_in(ns: &Netns, program: &Path, cni: &Cni, stdin: &str) -> Outcome {
    let mut cmd = ns.command(&[program.to_str().expect("utf-8 path")]);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CNI_") {
            cmd.env_remove(k);
        }
    }
    if std::env::var_os("PATH").is_none() {
        cmd.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    let vars = cni.vars();
    cmd.envs(vars.iter().copied());
    let what = format!(
        "{} in netns {} with {}",
        program.display(),
        ns.name(),
        vars.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let start = Instant::now();
    let (code, stdout, stderr) = spawn_with_timeout(cmd, stdin.as_bytes(), PLUGIN_TIMEOUT);
    Outcome {
        what,
        stdin: stdin.to_string(),
        code,
        stdout,
        stderr,
        elapsed: start.elapsed(),
    }
}

/// Spawn, feed stdin, collect output; kill the child after `timeout`.
pub fn spawn_with_timeout(
    mut cmd: Command,
    stdin: &[u8],
    timeout: Duration,
) -> (Option<i32>, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn plugin");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out_pipe.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err_pipe.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status: ExitStatus = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let _ = writer.join();
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap()).into_owned();
    let mut stderr = String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned();
    if timed_out {
        let _ = write!(stderr, "\n[harness: killed after {timeout:?}]");
    }
    (status.code(), stdout, stderr)
}

// ---------------------------------------------------------------------------
// Hosts

/// A test node: a host netns where the plugins run, plus data dirs.
pub struct Host {
    pub ns: Netns,
    dir: TempDir,
}

impl Host {
    pub fn new() -> Host {
        let dir = TempDir::new();
        std::fs::create_dir_all(dir.path().join("ferry")).unwrap();
        std::fs::create_dir_all(dir.path().join("ipam")).unwrap();
        Host {
            ns: Netns::new(),
            dir,
        }
    }

    /// A fresh pod netns (not wired to anything).
    pub fn pod(&self) -> Netns {
        Netns::new()
    }

    pub fn root_dir(&self) -> &Path {
        self.dir.path()
    }

    /// ferry's `dataDir` (its per-attachment records).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("ferry")
    }

    /// `ipam.dataDir` (leases).
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    /// Adds `dataDir` and, when there is an `ipam` object, `ipam.dataDir`,
    /// unless the config sets them already.
    pub fn conf(&self, mut conf: Value) -> Value {
        let obj = conf.as_object_mut().expect("config is an object");
        obj.entry("dataDir")
            .or_insert_with(|| json!(self.data_dir().display().to_string()));
        if let Some(ipam) = obj.get_mut("ipam").and_then(Value::as_object_mut) {
            ipam.entry("dataDir")
                .or_insert_with(|| json!(self.dir.path().join("ipam").display().to_string()));
        }
        conf
    }

    /// Run a plugin (found in CNI_PATH order) inside the host netns.
    pub fn run(&self, plugin: &str, cni: &Cni, stdin: &str) -> Outcome {
        run_plugin_in(&self.ns, &plugin_path(plugin), cni, stdin)
    }

    /// Run a plugin with a JSON config.
    pub fn call(&self, plugin: &str, cni: &Cni, conf: &Value) -> Outcome {
        self.run(plugin, cni, &conf.to_string())
    }

    /// Run the plugin named by the config's `type`.
    pub fn cni(&self, cni: &Cni, conf: &Value) -> Outcome {
        let plugin = conf["type"].as_str().expect("config has a type");
        self.call(plugin, cni, conf)
    }

    /// Lease files (named by an IP address) under `ipam.dataDir`.
    pub fn leases(&self) -> Vec<String> {
        files_under(&self.ipam_dir())
            .into_iter()
            .filter(|f| {
                Path::new(f)
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.parse::<std::net::IpAddr>().is_ok())
            })
            .collect()
    }

    /// ferry's attachment records under `dataDir`.
    pub fn records(&self) -> Vec<String> {
        files_under(&self.data_dir()).into_iter().collect()
    }

    /// Host-side veths ferry would have made (`veth` + 11 hex digits), and
    /// any other veth.
    pub fn veths(&self) -> Vec<String> {
        self.ns
            .ip_json(&["link", "show", "type", "veth"])
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// Does the host netns have nft table `inet ferry`?
    pub fn has_ferry_table(&self) -> bool {
        self.ns
            .exec(&["nft", "list", "table", "inet", "ferry"])
            .status
            .success()
    }

    /// Nothing of any attachment is left on this host: no host veth, lease,
    /// ferry record or `inet ferry` table.
    pub fn assert_clean(&self, context: &str) {
        let (veths, leases, records) = (self.veths(), self.leases(), self.records());
        assert!(veths.is_empty(), "{context}: host veths left: {veths:?}");
        assert!(leases.is_empty(), "{context}: leases left: {leases:?}");
        assert!(
            records.is_empty(),
            "{context}: ferry records left: {records:?}"
        );
        assert!(
            !self.has_ferry_table(),
            "{context}: nft table inet ferry left in the host netns:\n{}",
            self.ns.nft_ruleset()
        );
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot::take(&self.ns, &[self.data_dir(), self.ipam_dir()])
    }
}

impl Default for Host {
    fn default() -> Self {
        Host::new()
    }
}

// ---------------------------------------------------------------------------
// Snapshots

/// What a host looks like from the outside: links, addresses, routes, the
/// nftables ruleset, and the files in the data dirs (minus IPAM's `lock` and
/// `last_reserved_ip.*`, which host-local keeps too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub links: BTreeSet<String>,
    pub addrs: BTreeSet<String>,
    pub routes: BTreeSet<String>,
    pub nft: String,
    pub files: BTreeSet<String>,
}

impl Snapshot {
    pub fn take(ns: &Netns, dirs: &[PathBuf]) -> Snapshot {
        let s = |v: &Value, k: &str| v[k].as_str().unwrap_or("").to_string();
        let links = ns
            .ip_json(&["-d", "link", "show"])
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                format!(
                    "{} kind={} master={} mtu={}",
                    s(l, "ifname"),
                    l["linkinfo"]["info_kind"].as_str().unwrap_or(""),
                    s(l, "master"),
                    l["mtu"]
                )
            })
            .collect();
        let addrs = ns
            .ip_json(&["addr", "show"])
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|l| {
                let dev = s(l, "ifname");
                l["addr_info"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |a| format!("dev {dev} {}/{}", s(&a, "local"), a["prefixlen"]))
            })
            .collect();
        let mut routes = BTreeSet::new();
        for family in ["-4", "-6"] {
            for r in ns
                .ip_json(&[family, "route", "show", "table", "all"])
                .as_array()
                .unwrap()
            {
                routes.insert(format!(
                    "table {} {} {} dev {} via {}",
                    r["table"].as_str().unwrap_or("main"),
                    s(r, "type"),
                    s(r, "dst"),
                    s(r, "dev"),
                    s(r, "gateway")
                ));
            }
        }
        let files = dirs
            .iter()
            .flat_map(|d| {
                files_under(d)
                    .into_iter()
                    .map(move |f| format!("{}/{f}", d.display()))
            })
            .filter(|f| {
                let name = Path::new(f).file_name().unwrap().to_string_lossy();
                name != "lock" && !name.starts_with("last_reserved_ip.")
            })
            .collect();
        Snapshot {
            links,
            addrs,
            routes,
            nft: ns.nft_ruleset(),
            files,
        }
    }

    /// The snapshot with everything on link `dev` left out (a bridge the
    /// reference plugin also leaves behind, with its gateway addresses).
    pub fn without_dev(&self, dev: &str) -> Snapshot {
        let mut s = self.clone();
        s.links.retain(|l| !l.starts_with(&format!("{dev} ")));
        s.addrs.retain(|a| !a.starts_with(&format!("dev {dev} ")));
        s.routes.retain(|r| !r.contains(&format!(" dev {dev} ")));
        s
    }

    /// Human-readable differences ("" when equal).
    pub fn diff(&self, after: &Snapshot) -> String {
        let mut out = String::new();
        let mut sets = |what: &str, a: &BTreeSet<String>, b: &BTreeSet<String>| {
            for x in b.difference(a) {
                let _ = writeln!(out, "  + {what}: {x}");
            }
            for x in a.difference(b) {
                let _ = writeln!(out, "  - {what}: {x}");
            }
        };
        sets("link", &self.links, &after.links);
        sets("addr", &self.addrs, &after.addrs);
        sets("route", &self.routes, &after.routes);
        sets("file", &self.files, &after.files);
        if self.nft != after.nft {
            let _ = writeln!(
                out,
                "  nft ruleset before:\n{}\n  nft ruleset after:\n{}",
                self.nft, after.nft
            );
        }
        out
    }

    /// Panics with the differences unless `after` equals `self`.
    pub fn assert_same(&self, after: &Snapshot, context: &str) {
        let d = self.diff(after);
        assert!(d.is_empty(), "host changed ({context}):\n{d}");
    }
}

// ---------------------------------------------------------------------------
// Configs and results

/// A ferry network with ferry-ipam: IPv4 `subnet4` (e.g. "10.77.1.0/24"),
/// optionally a second range set with IPv6 `subnet6`. Bridge `fbr0`,
/// isGateway on. Data dirs are filled in by `Host::conf`.
pub fn ferry_net(
    host: &Host,
    version: &str,
    subnet4: &str,
    subnet6: Option<&str>,
    extra: Value,
) -> Value {
    let mut ranges = vec![json!([{ "subnet": subnet4 }])];
    let mut routes = vec![json!({"dst": "0.0.0.0/0"})];
    if let Some(s6) = subnet6 {
        ranges.push(json!([{ "subnet": s6 }]));
        routes.push(json!({"dst": "::/0"}));
    }
    let mut conf = json!({
        "cniVersion": version,
        "name": "ferrynet",
        "type": "ferry",
        "bridge": "fbr0",
        "isGateway": true,
        "ipam": { "type": "ferry-ipam", "ranges": ranges, "routes": routes },
    });
    merge(&mut conf, extra);
    host.conf(conf)
}

/// Recursive merge of JSON objects; `null` in `patch` deletes a key.
pub fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(&k);
                } else {
                    merge(b.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (b, p) => *b = p,
    }
}

/// `conf` with `prevResult` set (for CHECK, DEL and chained plugins).
pub fn with_prev(conf: &Value, prev: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = prev.clone();
    c
}

/// The pod's addresses in a result ("10.1.0.5/24" → "10.1.0.5").
pub fn result_ips(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|ip| {
            ip["address"]
                .as_str()
                .unwrap_or("")
                .split('/')
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// The result's IPv4 (or IPv6) pod address without prefix.
pub fn result_ip(result: &Value, v6: bool) -> String {
    result_ips(result)
        .into_iter()
        .find(|a| a.contains(':') == v6)
        .unwrap_or_else(|| {
            panic!(
                "no IPv{} address in result {result}",
                if v6 { 6 } else { 4 }
            )
        })
}

/// The host veth a result names (the interface without a sandbox that is
/// not the bridge, i.e. index 1 in the bridge plugin's layout).
pub fn result_host_veth(result: &Value) -> String {
    result["interfaces"][1]["name"]
        .as_str()
        .unwrap_or_else(|| panic!("no host interface in result {result}"))
        .to_string()
}
pub mod apiserver;
pub mod cluster;
pub mod pki;
pub mod traffic;
