//! `ipam.resolvConf`: a resolv.conf file turned into the result's `dns`.

use std::path::Path;

use crate::cni::error::io_error;
use crate::cni::{CniResult, Dns};

pub fn read(path: &Path) -> CniResult<Dns> {
    std::fs::read_to_string(path)
        .map(|text| parse(&text))
        .map_err(|e| io_error(format!("cannot read ipam.resolvConf {}", path.display()), e))
}

/// The keys host-local understands; the last `domain` wins, comments
/// (`#`, `;`) and other keys are skipped.
pub fn parse(text: &str) -> Dns {
    let mut dns = Dns::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let key = words.next().unwrap_or("");
        let rest: Vec<String> = words.map(String::from).collect();
        if key.starts_with(['#', ';']) || rest.is_empty() {
            continue;
        }
        match key {
            "nameserver" => dns.nameservers.push(rest[0].clone()),
            "domain" => dns.domain = rest[0].clone(),
            "search" => dns.search.extend(rest),
            "options" => dns.options.extend(rest),
            _ => {}
        }
    }
    dns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_keys() {
        let dns = parse(
            "# generated\n nameserver 10.0.0.10\nnameserver fd00::10\n; x\n\
             search a.svc b.svc\nsearch c\noptions ndots:5 edns0\ndomain x.local\nsortlist 1\nnameserver\n",
        );
        assert_eq!(dns.nameservers, ["10.0.0.10", "fd00::10"]);
        assert_eq!(dns.search, ["a.svc", "b.svc", "c"]);
        assert_eq!(dns.options, ["ndots:5", "edns0"]);
        assert_eq!(dns.domain, "x.local");
        assert!(parse("").is_empty());
    }

    #[test]
    fn a_missing_file_is_an_io_error() {
        let e = read(Path::new("/nonexistent/ferry/resolv.conf")).unwrap_err();
        assert_eq!(e.code, 5);
        assert!(e.msg.contains("ipam.resolvConf"));
    }
}
