//! Network partitions on the run's own loopback ports: iptables rules in a chain of
//! the run's own, hooked into OUTPUT (every loopback packet passes it once).
//!
//! Each process runs as a user of its own (a bare uid, no account needed), so a rule
//! can tell its packets from everybody else's (`-m owner`), and a connection it opens
//! is marked (`CONNMARK`), so the answers that come back on it are dropped too: the
//! cut holds both ways. Only the run's own ports and uids are named; the chain is
//! removed when the run ends (a run killed with SIGKILL leaves it: `iptables -S`
//! shows it as `CHAOS<pid>`).

use std::process::Command;

/// One iptables rule, as the words after `-A <chain>`.
pub type Rule = Vec<String>;

/// The run's chain; removed on drop.
pub struct Firewall {
    chain: String,
}

fn iptables(args: &[&str]) -> Result<(), String> {
    let out = Command::new("iptables")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run iptables: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Firewall {
    /// The chain for this run, hooked into OUTPUT; `Err` says why partitions cannot
    /// be made here (not root, no iptables).
    pub fn new() -> Result<Firewall, String> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("partitions need root (iptables rules and a user per process)".into());
        }
        let chain = format!("CHAOS{}", std::process::id());
        iptables(&["-N", &chain])?;
        let firewall = Firewall { chain };
        iptables(&["-I", "OUTPUT", "-j", &firewall.chain])?;
        Ok(firewall)
    }

    /// Adds `rules` (a cut starts).
    pub fn add(&self, rules: &[Rule]) -> Result<(), String> {
        for rule in rules {
            let mut args = vec!["-A", self.chain.as_str()];
            args.extend(rule.iter().map(String::as_str));
            iptables(&args)?;
        }
        Ok(())
    }

    /// Removes `rules` (the cut heals). Connections the cut stalled go on, or time out
    /// and are opened again, as after a real one.
    pub fn remove(&self, rules: &[Rule]) -> Result<(), String> {
        for rule in rules {
            let mut args = vec!["-D", self.chain.as_str()];
            args.extend(rule.iter().map(String::as_str));
            iptables(&args)?;
        }
        Ok(())
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        let _ = iptables(&["-D", "OUTPUT", "-j", &self.chain]);
        let _ = iptables(&["-F", &self.chain]);
        let _ = iptables(&["-X", &self.chain]);
    }
}

fn words(rule: &str) -> Rule {
    rule.split_whitespace().map(str::to_string).collect()
}

fn ports(list: &[u16]) -> String {
    list.iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The rules that cut the process running as `uid` from `peers` (the ports it
/// connects to), both ways; `listens`: its own port that the peers connect to, if
/// they do. `mark` must be the cut's own.
pub fn cut(uid: u32, peers: &[u16], listens: Option<u16>, mark: u32) -> Vec<Rule> {
    let mut rules = vec![
        // Its connections to the peers are marked by its first packet on them...
        words(&format!(
            "-p tcp -m owner --uid-owner {uid} -m multiport --dports {} -j CONNMARK --set-mark {mark}",
            ports(peers)
        )),
        // ...and every packet of a marked connection is dropped, either way.
        words(&format!("-m connmark --mark {mark} -j DROP")),
    ];
    if let Some(port) = listens {
        // The connections the peers opened to it.
        rules.push(words(&format!("-p tcp --dport {port} -j DROP")));
        rules.push(words(&format!("-p tcp --sport {port} -j DROP")));
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_names_only_the_processes_uid_and_the_runs_ports() {
        let rules = cut(61001, &[4001, 4002], Some(4000), 0x4301);
        let text: Vec<String> = rules.iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            text,
            [
                "-p tcp -m owner --uid-owner 61001 -m multiport --dports 4001,4002 -j CONNMARK --set-mark 17153",
                "-m connmark --mark 17153 -j DROP",
                "-p tcp --dport 4000 -j DROP",
                "-p tcp --sport 4000 -j DROP",
            ]
        );
        assert_eq!(cut(61100, &[5000], None, 7).len(), 2, "no port of its own");
    }
}
