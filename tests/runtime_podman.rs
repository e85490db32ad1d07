//! A real container runtime drives ferry: podman 4 (Debian bookworm's 4.3.1)
//! with its CNI backend runs `podman run --network <ferry network>` and
//! `podman rm -f`, and ferry must do the rest the way the reference `bridge`
//! would.
//!
//! Confinement (DESIGN.md, "The machine you test on"): podman's CNI backend
//! has no setting for libcni's result cache, which is hard-wired to
//! /var/lib/cni, and podman keeps a blob cache under /var/lib/containers,
//! locks in /dev/shm and runtime state under /run. So every podman process
//! (and the conmon and `podman container cleanup` processes it leaves
//! behind) runs inside one test-made *private mount namespace* entered
//! together with the test's host network namespace (`nsenter -t <holder>
//! -m -n`), in which:
//! - /var/lib and /var/tmp are bind mounts of directories in the test's temp
//!   dir, and /run and /dev/shm are fresh tmpfs;
//! - /sys is a sysfs of the host netns, with the machine's cgroup mounts
//!   moved under it (crun needs them; `cgroups = "disabled"` keeps podman
//!   from creating any cgroup);
//! - nothing propagates back (`--propagation private`): no mount made by
//!   podman is ever visible in the machine's mount namespace, and all of them
//!   vanish with the namespace.
//!
//! Everything else podman reads is passed explicitly: CONTAINERS_CONF and
//! CONTAINERS_STORAGE_CONF (only these files are read), `--root`,
//! `--runroot`, `--tmpdir`, `--network-config-dir` with a ferry conflist,
//! `cni_plugin_dirs` = a temp bin dir (logging wrappers that exec the built
//! `ferry`) + /usr/lib/cni. The storage driver is `vfs` (no overlay mounts),
//! and the image is a busybox-static rootfs imported with `podman import`
//! (no registry is reachable).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_e2e::*;

const IMAGE: &str = "localhost/ferry-bb";
const PODMAN_TIMEOUT: Duration = Duration::from_secs(120);
/// busybox applets the image links to /bin/busybox.
const APPLETS: &[&str] = &[
    "sh", "ping", "ip", "sleep", "nc", "wget", "httpd", "cat", "ls", "echo",
];
const PAGE: &str = "served-through-ferry";

// ---------------------------------------------------------------------------
// Preconditions

/// Why podman cannot run here, or None when it can.
fn missing() -> Option<String> {
    let out = match Command::new("podman").arg("--version").output() {
        Ok(o) if o.status.success() => o,
        _ => {
            return Some(
                "podman is not installed (scripts/deps.sh installs podman and busybox-static)"
                    .into(),
            )
        }
    };
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // "podman version 4.3.1": podman 5 dropped the CNI backend.
    let major = version
        .rsplit(' ')
        .next()
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    if major != Some(4) {
        return Some(format!("{version}: only podman 4 has the CNI backend"));
    }
    if !is_static_elf(Path::new("/bin/busybox")) {
        return Some("no static /bin/busybox for the image (package busybox-static)".into());
    }
    for tool in ["nsenter", "unshare", "tar", "mountpoint"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

/// A 64-bit little-endian ELF without a PT_INTERP program header.
fn is_static_elf(path: &Path) -> bool {
    let Ok(b) = std::fs::read(path) else {
        return false;
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= b.len() && u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) != 3
    })
}

// ---------------------------------------------------------------------------
// The machine's own state, which podman must not change

#[derive(Debug, PartialEq, Eq)]
struct RootView {
    links: Vec<String>,
    nft_tables: String,
    forbidden: Vec<(String, bool)>,
}

impl RootView {
    fn take() -> RootView {
        let links = run_ok("ip", &["-o", "link", "show"])
            .lines()
            .map(|l| {
                // "2: eth0: <...> ... link/ether ..": index, name and flags.
                l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
            })
            .collect();
        RootView {
            links,
            nft_tables: run_ok("nft", &["list", "tables"]),
            forbidden: [
                "/etc/cni",
                "/opt/cni",
                "/var/lib/cni",
                "/var/lib/containers",
            ]
            .iter()
            .map(|p| (p.to_string(), Path::new(p).exists()))
            .collect(),
        }
    }

    fn assert_same(&self, context: &str) {
        let now = RootView::take();
        assert_eq!(
            self, &now,
            "the machine's root netns or a forbidden path changed ({context})"
        );
    }
}

// ---------------------------------------------------------------------------
// One confined podman

/// A test host netns, a private mount namespace held by a `sleep`, and all of
/// podman's state in the host's temp dir.
struct Podman {
    host: Host,
    holder: Child,
    /// Container processes seen, with their netns, killed on drop if alive.
    pids: std::cell::RefCell<Vec<(u32, String)>>,
}

/// What `podman inspect` says about a container.
#[derive(Debug, Clone)]
struct Ctr {
    name: String,
    id: String,
    ip: String,
    gateway: String,
    prefix: u64,
    sandbox: String,
    conmon_pid: u32,
}

/// One plugin invocation recorded by a wrapper in the temp bin dir.
#[derive(Debug, Clone)]
struct Call {
    plugin: String,
    env: BTreeMap<String, String>,
    stdin: String,
    stdout: String,
    rc: String,
}

impl Call {
    fn command(&self) -> &str {
        self.env
            .get("CNI_COMMAND")
            .map(String::as_str)
            .unwrap_or("")
    }

    fn var(&self, k: &str) -> &str {
        self.env.get(k).map(String::as_str).unwrap_or("")
    }

    fn stdin_json(&self) -> Value {
        serde_json::from_str(&self.stdin).unwrap_or(Value::Null)
    }

    fn describe(&self) -> String {
        format!(
            "{} {:?}\n  stdin: {}\n  stdout: {}\n  exit: {}",
            self.plugin, self.env, self.stdin, self.stdout, self.rc
        )
    }
}

impl Podman {
    fn new() -> Podman {
        let host = Host::new();
        let d = host.root_dir().join("podman");
        for sub in [
            "bin",
            "log",
            "net.d",
            "varlib",
            "vartmp",
            "root",
            "runroot",
            "tmp",
            "cg",
            "rootfs/bin",
            "rootfs/proc",
            "rootfs/sys",
            "rootfs/dev",
            "rootfs/etc",
            "rootfs/tmp",
            "rootfs/www",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let p = |s: &str| d.join(s).display().to_string();

        // Plugins: wrappers that log what podman hands over, then run the
        // real plugin (ferry runs ferry-ipam in-process; it is linked in
        // anyway so that the directory holds a complete ferry install).
        write_wrapper(&d, "ferry", &bin_dir().join("ferry"));
        write_wrapper(&d, "portmap", &Path::new(REFERENCE_DIR).join("portmap"));
        std::os::unix::fs::symlink(bin_dir().join("ferry-ipam"), d.join("bin/ferry-ipam")).unwrap();

        std::fs::write(
            d.join("containers.conf"),
            format!(
                r#"[containers]
# No cgroups: nothing under /sys/fs/cgroup is created.
cgroups = "disabled"
# Podman's defaults for root (nofile/nproc 1048576) exceed this machine's
# hard limits without CAP_SYS_RESOURCE.
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{events}"
tmp_dir = "{tmp}"
image_copy_tmp_dir = "{vartmp}"

[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin}", "{reference}"]
network_config_dir = "{netd}"
"#,
                events = p("events.log"),
                tmp = p("tmp"),
                vartmp = p("vartmp"),
                bin = p("bin"),
                reference = REFERENCE_DIR,
                netd = p("net.d"),
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                p("root"),
                p("runroot")
            ),
        )
        .unwrap();

        // The image: busybox-static and its applets.
        std::fs::copy("/bin/busybox", d.join("rootfs/bin/busybox")).unwrap();
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", d.join("rootfs/bin").join(a)).unwrap();
        }
        std::fs::write(d.join("rootfs/www/index.html"), PAGE).unwrap();
        run_ok("tar", &["-C", &p("rootfs"), "-cf", &p("rootfs.tar"), "."]);

        let holder = spawn_holder(&host, &d);
        let pm = Podman {
            host,
            holder,
            pids: Default::default(),
        };
        pm.ok(&["import", "--quiet", &p("rootfs.tar"), IMAGE]);
        pm
    }

    fn dir(&self) -> PathBuf {
        self.host.root_dir().join("podman")
    }

    fn command(&self, args: &[&str]) -> Command {
        let d = self.dir();
        let p = |s: &str| d.join(s).display().to_string();
        let mut c = Command::new("nsenter");
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("CNI_") || k.starts_with("CONTAINERS_") {
                c.env_remove(k);
            }
        }
        c.args(["-t", &self.holder.id().to_string(), "-m", "-n", "podman"])
            .args(["--root", &p("root"), "--runroot", &p("runroot")])
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file", "--tmpdir", &p("tmp")])
            .args(["--network-config-dir", &p("net.d")])
            .args(args)
            .env("CONTAINERS_CONF", p("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", p("storage.conf"))
            .env("TMPDIR", p("vartmp"));
        c
    }

    fn run(&self, args: &[&str]) -> (Option<i32>, String, String) {
        spawn_with_timeout(self.command(args), b"", PODMAN_TIMEOUT)
    }

    /// Run podman; panics unless it succeeds. Returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(args);
        assert!(
            code == Some(0),
            "`podman {}` failed ({code:?}):\nstdout: {out}\nstderr: {err}\nplugin calls:\n{}",
            args.join(" "),
            self.calls()
                .iter()
                .map(Call::describe)
                .collect::<Vec<_>>()
                .join("\n")
        );
        out
    }

    fn write_conflist(&self, name: &str, conf: &Value) {
        std::fs::write(
            self.dir().join("net.d").join(format!("{name}.conflist")),
            serde_json::to_string_pretty(conf).unwrap(),
        )
        .unwrap();
    }

    /// `podman run -d --network net ...`, then what inspect says.
    fn start(&self, name: &str, net: &str, extra: &[&str], cmd: &[&str]) -> Ctr {
        let mut args = vec!["run", "-d", "--name", name, "--network", net];
        args.extend_from_slice(extra);
        args.push(IMAGE);
        args.extend_from_slice(cmd);
        self.ok(&args);
        self.inspect(name, net)
    }

    fn inspect(&self, name: &str, net: &str) -> Ctr {
        let text = self.ok(&["container", "inspect", name]);
        let v: Value = serde_json::from_str(&text).expect("inspect JSON");
        let c = &v[0];
        let n = &c["NetworkSettings"]["Networks"][net];
        let pid = c["State"]["Pid"].as_u64().unwrap_or(0) as u32;
        if pid != 0 {
            if let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/net")) {
                self.pids.borrow_mut().push((pid, ns.display().to_string()));
            }
        }
        let s = |v: &Value| v.as_str().unwrap_or("").to_string();
        Ctr {
            name: name.to_string(),
            id: s(&c["Id"]),
            ip: s(&n["IPAddress"]),
            gateway: s(&n["Gateway"]),
            prefix: n["IPPrefixLen"].as_u64().unwrap_or(0),
            sandbox: s(&c["NetworkSettings"]["SandboxKey"]),
            conmon_pid: c["State"]["ConmonPid"].as_u64().unwrap_or(0) as u32,
        }
    }

    /// Every plugin call the wrappers logged, oldest first.
    fn calls(&self) -> Vec<Call> {
        let log = self.dir().join("log");
        let mut stems: Vec<String> = files_under(&log)
            .into_iter()
            .filter_map(|f| f.strip_suffix(".env").map(str::to_string))
            .collect();
        stems.sort();
        let read = |stem: &str, ext: &str| {
            std::fs::read_to_string(log.join(format!("{stem}.{ext}"))).unwrap_or_default()
        };
        stems
            .iter()
            .map(|stem| Call {
                plugin: stem.rsplit('-').next().unwrap_or("").to_string(),
                env: read(stem, "env")
                    .lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                stdin: read(stem, "in"),
                stdout: read(stem, "out"),
                rc: read(stem, "rc").trim().to_string(),
            })
            .collect()
    }

    /// The one call of `plugin` for `command` and container `id`.
    fn call(&self, plugin: &str, command: &str, id: &str) -> Call {
        let all = self.calls();
        let found: Vec<&Call> = all
            .iter()
            .filter(|c| c.plugin == plugin && c.command() == command)
            .filter(|c| c.var("CNI_CONTAINERID") == id)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "expected one {plugin} {command} for {id}, calls:\n{}",
            all.iter()
                .map(Call::describe)
                .collect::<Vec<_>>()
                .join("\n")
        );
        found[0].clone()
    }

    /// `podman exec <ctr> ping` until answered (10 s).
    fn assert_ping(&self, from: &Ctr, addr: &str) {
        let ok = wait_until(Duration::from_secs(10), || {
            self.run(&["exec", &from.name, "ping", "-c1", "-W1", addr])
                .0
                .is_some_and(|c| c == 0)
        });
        assert!(
            ok,
            "container {} ({}) cannot ping {addr}:\n{}\nhost netns:\n{}",
            from.name,
            from.ip,
            self.ok(&["exec", &from.name, "ip", "addr"]),
            self.host.ns.ok(&["ip", "addr"])
        );
    }

    /// libcni's result cache (podman's /var/lib/cni, bind-mounted here).
    fn cni_cache(&self) -> Vec<String> {
        files_under(&self.dir().join("varlib/cni"))
            .into_iter()
            .collect()
    }

    /// Processes of this test's podman (conmon, cleanup) still running.
    fn leftover_processes(&self) -> Vec<u32> {
        let needle = self.dir().display().to_string();
        let me = std::process::id();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != me)
            .filter(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let running = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
                    .unwrap_or(false);
                running && String::from_utf8_lossy(&cmd).contains(&needle)
            })
            .collect()
    }
}

/// `bin/<name>`: logs env, stdin, stdout and exit code under `log/`, then
/// behaves exactly like `real`.
fn write_wrapper(d: &Path, name: &str, real: &Path) {
    let path = d.join("bin").join(name);
    std::fs::write(
        &path,
        format!(
            r#"#!/bin/sh
n="{log}/$(date +%s%N)-$$-{name}"
env | grep '^CNI_' > "$n.env.tmp"
cat > "$n.in"
"{real}" < "$n.in" > "$n.out"
rc=$?
echo "$rc" > "$n.rc"
mv "$n.env.tmp" "$n.env"
cat "$n.out"
exit "$rc"
"#,
            log = d.join("log").display(),
            real = real.display(),
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The process that holds the private mount namespace: entered into the host
/// netns, it sets up the mounts described at the top of this file, prints
/// "ready" and sleeps (killed on drop, or by PDEATHSIG when the test dies).
fn spawn_holder(host: &Host, d: &Path) -> Child {
    let p = |s: &str| d.join(s).display().to_string();
    let script = format!(
        r#"set -e
mount --rbind /sys/fs/cgroup {cg}
mount -t sysfs sysfs /sys
mount --move {cg} /sys/fs/cgroup
# crun refuses a cgroup v1/v2 hybrid: show it the v1 hierarchies only.
if [ "$(stat -fc %T /sys/fs/cgroup)" != cgroup2fs ] && mountpoint -q /sys/fs/cgroup/unified; then
  umount -l /sys/fs/cgroup/unified
fi
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
mount --bind {varlib} /var/lib
mount --bind {vartmp} /var/tmp
echo ready
exec sleep 3600
"#,
        cg = p("cg"),
        varlib = p("varlib"),
        vartmp = p("vartmp"),
    );
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", host.ns.path()))
        .args(["unshare", "--mount", "--propagation", "private"])
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn nsenter/unshare");
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line);
    if line.trim() != "ready" {
        let _ = child.kill();
        let _ = child.wait();
        panic!("could not set up podman's private mount namespace (see stderr)");
    }
    child
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers first (their DELs need podman's view), then anything
        // of ours still running, then the namespace holder. Host (netns and
        // temp dir, including vfs storage: no mounts) goes after.
        let (code, out, err) = self.run(&["rm", "-fa", "-t", "0"]);
        if code != Some(0) {
            eprintln!("cleanup: podman rm -fa failed ({code:?}): {out} {err}");
        }
        // conmon exits once its exit command has run: give it a moment.
        wait_until(Duration::from_secs(5), || {
            self.leftover_processes().is_empty()
        });
        for pid in self.leftover_processes() {
            eprintln!("cleanup: killing leftover process {pid}");
            // SAFETY: plain kill(2) of a pid whose cmdline names our temp dir.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        for (pid, ns) in self.pids.borrow().iter() {
            let same = std::fs::read_link(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|l| l.display().to_string() == *ns);
            if same {
                eprintln!("cleanup: killing leftover container process {pid}");
                // SAFETY: plain kill(2) of the container process we saw.
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
            }
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// None (after printing why) when the test cannot run here.
fn setup() -> Option<Podman> {
    if !require_root() {
        return None;
    }
    if let Some(why) = missing() {
        skip(&why);
        return None;
    }
    Some(Podman::new())
}

/// A bridge name unique to this test process (the bridge lives in the test's
/// host netns anyway).
fn bridge_name(tag: &str) -> String {
    format!("fp{tag}{}", std::process::id() % 1_000_000)
}

fn assert_torn_down(pm: &Podman, bridge: &str, ctrs: &[&Ctr]) {
    let host = &pm.host;
    host.assert_clean("after podman rm");
    assert!(
        pm.cni_cache().iter().all(|f| !f.starts_with("results/")),
        "libcni cache entries left: {:?}",
        pm.cni_cache()
    );
    assert!(
        host.ns.link(bridge).is_some(),
        "the bridge stays, like the reference plugin's"
    );
    for c in ctrs {
        let gone = wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(format!("/proc/{}/stat", c.conmon_pid))
                .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
                .unwrap_or(true)
        });
        assert!(gone, "conmon {} of {} still runs", c.conmon_pid, c.name);
    }
    assert_eq!(pm.ok(&["ps", "-aq"]).trim(), "", "containers left");
}

// ---------------------------------------------------------------------------
// Tests

/// Two containers on a ferry network: addresses, traffic between them and to
/// the gateway, what podman passes to ferry, and ferry's DEL on `podman rm`.
#[test]
fn podman_runs_containers_on_a_ferry_network() {
    let Some(pm) = setup() else {
        return;
    };
    let start = Instant::now();
    let root = RootView::take();
    let net = "ferrypm";
    let bridge = bridge_name("a");
    pm.write_conflist(
        net,
        &json!({
            "cniVersion": "1.0.0",
            "name": net,
            "plugins": [pm.host.conf(json!({
                "type": "ferry",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": true,
                "ipam": {
                    "type": "ferry-ipam",
                    "ranges": [[{ "subnet": "10.124.7.0/24" }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                },
            }))],
        }),
    );

    // podman's network commands, on the temp config dir only.
    let ls = pm.ok(&["network", "ls", "--format", "{{.Name}} {{.Driver}}"]);
    assert!(
        ls.lines().any(|l| l == format!("{net} ferry")),
        "podman network ls:\n{ls}"
    );
    pm.ok(&["network", "exists", net]);
    let inspect: Value =
        serde_json::from_str(&pm.ok(&["network", "inspect", net])).expect("network inspect");
    assert_eq!(inspect[0]["driver"], "ferry", "{inspect}");

    let a = pm.start("fa", net, &[], &["sleep", "120"]);
    let b = pm.start("fb", net, &[], &["sleep", "120"]);
    let started = start.elapsed();
    for c in [&a, &b] {
        assert!(c.ip.starts_with("10.124.7."), "{c:?}");
        assert_eq!(c.gateway, "10.124.7.1", "{c:?}");
        assert_eq!(c.prefix, 24, "{c:?}");
    }
    assert_ne!(a.ip, b.ip);

    // What podman handed ferry.
    for c in [&a, &b] {
        let add = pm.call("ferry", "ADD", &c.id);
        assert_eq!(add.rc, "0", "{}", add.describe());
        assert_eq!(add.var("CNI_IFNAME"), "eth0", "{}", add.describe());
        assert_eq!(add.var("CNI_NETNS"), c.sandbox, "{}", add.describe());
        assert!(
            add.var("CNI_ARGS")
                .split(';')
                .any(|kv| kv == format!("K8S_POD_NAME={}", c.name)),
            "{}",
            add.describe()
        );
        let conf = add.stdin_json();
        assert_eq!(conf["name"], net, "{}", add.describe());
        assert_eq!(conf["cniVersion"], "1.0.0", "{}", add.describe());
        let result: Value = serde_json::from_str(&add.stdout).expect("ADD result");
        assert_eq!(result_ip(&result, false), c.ip, "{}", add.describe());
    }
    let first = pm.call("ferry", "ADD", &a.id);
    println!(
        "podman -> ferry ADD env: {:?}\nstdin: {}",
        first.env, first.stdin
    );

    // The host side, inside the test's host netns only.
    let host = &pm.host;
    assert!(
        host.ns
            .addrs(&bridge)
            .contains(&"10.124.7.1/24".to_string()),
        "bridge {bridge}: {:?}",
        host.ns.addrs(&bridge)
    );
    let veths = host.veths();
    assert_eq!(veths.len(), 2, "{veths:?}");
    for v in &veths {
        let l = host.ns.link(v).expect("veth");
        assert_eq!(l["master"], bridge.as_str(), "{l}");
    }
    assert!(host.has_ferry_table(), "ipMasq: nft table inet ferry");
    let mut leases: Vec<String> = host
        .leases()
        .iter()
        .map(|f| f.rsplit('/').next().unwrap().to_string())
        .collect();
    leases.sort();
    let mut ips = vec![a.ip.clone(), b.ip.clone()];
    ips.sort();
    assert_eq!(leases, ips);
    assert_eq!(
        pm.cni_cache()
            .iter()
            .filter(|f| f.starts_with("results/"))
            .count(),
        2,
        "libcni's cache went to the temp dir: {:?}",
        pm.cni_cache()
    );
    root.assert_same("containers running");

    // Traffic: container to container, to the gateway, host to container.
    pm.assert_ping(&a, &b.ip);
    pm.assert_ping(&a, &a.gateway);
    pm.assert_ping(&b, &a.ip);
    host.ns.assert_ping(&a.ip);
    let route = pm.ok(&["exec", "fa", "ip", "route"]);
    assert!(
        route.contains("default via 10.124.7.1 dev eth0"),
        "routes in fa:\n{route}"
    );

    // podman rm: ferry's DEL for both, with the cached result.
    let rm = Instant::now();
    pm.ok(&["rm", "-f", "-t", "0", "fa", "fb"]);
    let removed = rm.elapsed();
    for c in [&a, &b] {
        let del = pm.call("ferry", "DEL", &c.id);
        assert_eq!(del.rc, "0", "{}", del.describe());
        assert_eq!(del.var("CNI_IFNAME"), "eth0", "{}", del.describe());
        assert!(
            del.stdin_json()["prevResult"]["ips"].is_array(),
            "DEL carries libcni's cached result: {}",
            del.describe()
        );
    }
    assert_torn_down(&pm, &bridge, &[&a, &b]);

    pm.ok(&["network", "rm", net]);
    assert!(!pm.dir().join(format!("net.d/{net}.conflist")).exists());
    root.assert_same("after podman rm");
    println!(
        "timing: 2 containers up {started:?}, rm {removed:?}, test body {:?}",
        start.elapsed()
    );
}

/// A network made by `podman network create` (reference bridge and
/// host-local, then portmap, firewall and tuning) with ferry and ferry-ipam
/// dropped in for bridge and host-local: static IP via CNI_ARGS, a published port through
/// the chained portmap, and a clean DEL.
#[test]
fn podman_generated_network_with_ferry_dropped_in() {
    let Some(pm) = setup() else {
        return;
    };
    if Command::new("iptables").arg("-V").output().is_err() {
        skip("portmap and firewall need iptables (package iptables)");
        return;
    }
    let root = RootView::take();
    let net = "ferrydrop";
    let bridge = bridge_name("b");
    pm.ok(&["network", "create", "--subnet", "10.124.9.0/24", net]);
    let path = pm.dir().join(format!("net.d/{net}.conflist"));
    let mut conf: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("podman wrote the conflist"))
            .unwrap();
    let types: Vec<&str> = conf["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["type"].as_str())
        .collect();
    assert_eq!(types[0], "bridge", "{conf}");
    assert_eq!(conf["plugins"][0]["ipam"]["type"], "host-local", "{conf}");
    assert!(types.contains(&"portmap"), "{conf}");
    let first = conf["plugins"][0].clone();
    // Same config otherwise; Host::conf adds dataDir and ipam.dataDir.
    conf["plugins"][0] = pm.host.conf(merge_into(
        first,
        json!({"type": "ferry", "bridge": bridge, "ipam": {"type": "ferry-ipam"}}),
    ));
    std::fs::write(&path, serde_json::to_string_pretty(&conf).unwrap()).unwrap();

    let c = pm.start(
        "fc",
        net,
        &["--ip", "10.124.9.50", "-p", "18080:80"],
        &["httpd", "-f", "-p", "80", "-h", "/www"],
    );
    assert_eq!(c.ip, "10.124.9.50", "{c:?}");
    let add = pm.call("ferry", "ADD", &c.id);
    assert_eq!(add.rc, "0", "{}", add.describe());
    assert!(
        add.var("CNI_ARGS")
            .split(';')
            .any(|kv| kv == "IP=10.124.9.50"),
        "static IP in CNI_ARGS: {}",
        add.describe()
    );
    let pmap = pm.call("portmap", "ADD", &c.id);
    let pconf = pmap.stdin_json();
    assert_eq!(
        pconf["runtimeConfig"]["portMappings"][0]["hostPort"],
        18080,
        "{}",
        pmap.describe()
    );
    assert_eq!(
        result_ip(&pconf["prevResult"], false),
        "10.124.9.50",
        "portmap gets ferry's result: {}",
        pmap.describe()
    );
    println!(
        "podman -> portmap ADD env: {:?}\nstdin: {}",
        pmap.env, pmap.stdin
    );

    // The published port, from the host netns to its gateway address
    // (portmap's OUTPUT DNAT), lands in the container through ferry's veth.
    let fetch = "import urllib.request as u; \
        print(u.urlopen('http://10.124.9.1:18080/index.html', timeout=2).read().decode())";
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(10), || {
        let out = pm.host.ns.exec(&[python3(), "-c", fetch]);
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.status.success() && last.contains(PAGE)
    });
    assert!(
        ok,
        "published port 18080 does not reach the container: {last}"
    );
    root.assert_same("container running");

    pm.ok(&["rm", "-f", "-t", "0", "fc"]);
    let del = pm.call("ferry", "DEL", &c.id);
    assert_eq!(del.rc, "0", "{}", del.describe());
    assert_torn_down(&pm, &bridge, &[&c]);
    pm.ok(&["network", "rm", net]);
    assert!(!path.exists());
    root.assert_same("after podman rm");
}

/// `base` with `patch` merged in (objects recursively).
fn merge_into(mut base: Value, patch: Value) -> Value {
    merge(&mut base, patch);
    base
}
