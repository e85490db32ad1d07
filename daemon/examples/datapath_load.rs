//! Times the Services datapath alone, without a store or traffic: N
//! Services × E endpoints rendered and synced into the calling network
//! namespace, then one endpoint change, one Service replaced by a new one,
//! then a full resync that finds nothing to do. With a third argument S,
//! the N Services are loaded in S growing steps first (what ferryd does
//! while an apply's files arrive), each step's sync timed. Run it inside a
//! namespace you made:
//!
//! ```sh
//! ip netns add dp; ip netns exec dp target/release/examples/datapath_load 10000 5 [S]; ip netns del dp
//! ```

use std::net::Ipv4Addr;
use std::time::Instant;

use ferryd::service::datapath::Datapath;
use ferryd::service::plan::{Ep, Plan, PortPlan, Targets};
use ferryd::service::render::render;

fn plan(n: u32, e: u32, shift: u32) -> Plan {
    let ports = (0..n)
        .map(|i| {
            let eps = (0..e)
                .map(|j| Ep {
                    ip: Ipv4Addr::from(
                        u32::from(Ipv4Addr::new(10, 244, 0, 0)) + (i * e + j + shift) % 60000,
                    ),
                    port: 8080,
                })
                .collect();
            PortPlan {
                id: format!("default/s-{i}:http:TCP"),
                proto: 6,
                port: 80,
                cluster_ips: vec![Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + i)],
                external_ips: vec![],
                node_port: None,
                affinity: None,
                internal: Targets::Endpoints(eps),
                external: Targets::Reject,
                external_local: false,
                local: vec![],
            }
        })
        .collect();
    Plan {
        ports,
        health_checks: vec![],
    }
}

/// (user, system) CPU seconds of this process so far.
fn cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let hz = 100.0;
    (
        f.get(11).copied().unwrap_or(0.0) / hz,
        f.get(12).copied().unwrap_or(0.0) / hz,
    )
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let e: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let steps: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1).max(1);
    let mut dp = Datapath::open().expect("nfnetlink");
    if steps > 1 {
        let mut total = 0.0;
        for k in 1..steps {
            let s = dp
                .sync(&render(&plan(n * k / steps, e, 0)), false)
                .expect("step");
            let ms = s.took.as_secs_f64() * 1e3;
            total += ms;
            println!(
                "step {k}/{steps}: {} Services, sync {ms:.1} ms",
                n * k / steps
            );
        }
        println!("steps before the last: {total:.1} ms in all");
    }
    let t = Instant::now();
    let rs = render(&plan(n, e, 0));
    let render_ms = t.elapsed().as_secs_f64() * 1e3;
    let (u0, s0) = cpu();
    let s = dp.sync(&rs, true).expect("full load");
    let (u1, s1) = cpu();
    println!(
        "full load: {n} Services x {e}: render {render_ms:.1} ms, sync {:.1} ms \
         (cpu: user {:.0} ms, kernel {:.0} ms), {} requests",
        s.took.as_secs_f64() * 1e3,
        (u1 - u0) * 1e3,
        (s1 - s0) * 1e3,
        s.requests
    );
    // One endpoint of the last Service replaced.
    let mut p = plan(n, e, 0);
    if let Some(Targets::Endpoints(eps)) = p.ports.last_mut().map(|pp| &mut pp.internal) {
        eps[0].ip = Ipv4Addr::new(10, 245, 0, 1);
    }
    let t = Instant::now();
    let rs2 = render(&p);
    let s = dp.sync(&rs2, false).expect("one change");
    println!(
        "one endpoint changed: render+sync {:.1} ms (sync {:.1} ms, {} requests)",
        t.elapsed().as_secs_f64() * 1e3,
        s.took.as_secs_f64() * 1e3,
        s.requests
    );
    // One new Service with its endpoints (a chain, a verdict element, the
    // endpoint elements).
    let t = Instant::now();
    let mut p = plan(n + 1, e, 0);
    p.ports.swap_remove(0);
    let rs3 = render(&p);
    let s = dp.sync(&rs3, false).expect("one new Service");
    println!(
        "one new Service: render+sync {:.1} ms (sync {:.1} ms, {} requests)",
        t.elapsed().as_secs_f64() * 1e3,
        s.took.as_secs_f64() * 1e3,
        s.requests
    );
    let s = dp.sync(&rs3, true).expect("resync");
    println!(
        "full resync, nothing to change: {:.1} ms, {} requests",
        s.took.as_secs_f64() * 1e3,
        s.requests
    );
}
