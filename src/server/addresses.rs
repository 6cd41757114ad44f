//! Connections per client address, so that one address cannot hold every place on a
//! listener (`--max-connections-per-ip`).
//!
//! Each listener keeps a table of the addresses it is serving and how many connections
//! each has open: an entry exists only while its address has a connection, so the
//! table is bounded by the listener's own connection limit. A place is an
//! [`AddressSlot`], given back when dropped, like the listener's [`Slot`].
//!
//! IPv6 addresses count by their /64: one host is routinely given a whole /64, so
//! counting single addresses would let it open as many connections as it likes. An
//! IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`, what a dual-stack socket reports)
//! counts as the IPv4 address it is.
//!
//! [`Slot`]: crate::server::listener::Slot

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The share of a listener's connections one address may hold when no flag says
/// otherwise: a tenth of the chat listener's, a quarter of an HTTP listener's (a
/// browser opens several HTTP connections to load one page).
pub const CHAT_SHARE: usize = 10;
pub const HTTP_SHARE: usize = 4;

/// The bound per address on a chat listener of `max` connections, given
/// `--max-connections-per-ip` (`per_ip`) or not.
pub fn chat_bound(max: usize, per_ip: Option<usize>) -> usize {
    per_ip.unwrap_or((max / CHAT_SHARE).max(1))
}

/// How many connections each address holds on one listener.
#[derive(Debug)]
pub struct PerAddress {
    /// 0: no bound.
    max: usize,
    open: Mutex<HashMap<Key, usize>>,
}

/// What an address counts as: IPv4 by the address, IPv6 by its first 64 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    V4(u32),
    V6(u64),
}

impl Key {
    fn of(ip: IpAddr) -> Key {
        match ip {
            IpAddr::V4(v4) => Key::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Key::V4(v4.into()),
                None => Key::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

impl PerAddress {
    /// At most `max` connections per address (0: any number).
    pub fn new(max: usize) -> Arc<PerAddress> {
        Arc::new(PerAddress {
            max,
            open: Mutex::default(),
        })
    }

    /// The bound, 0 when there is none.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A place for one more connection from `ip`, unless it already holds `max`.
    pub fn take(self: &Arc<PerAddress>, ip: IpAddr) -> Option<AddressSlot> {
        let key = Key::of(ip);
        if self.max > 0 {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            let n = open.entry(key).or_insert(0);
            if *n >= self.max {
                return None;
            }
            *n += 1;
        }
        Some(AddressSlot {
            table: self.clone(),
            key,
        })
    }

    /// Connections `ip` holds now.
    #[cfg(test)]
    fn holds(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&Key::of(ip)).copied().unwrap_or(0)
    }
}

/// One connection's place in its address's count, given back when dropped.
#[derive(Debug)]
pub struct AddressSlot {
    table: Arc<PerAddress>,
    key: Key,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if self.table.max == 0 {
            return;
        }
        let mut open = self.table.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn an_address_holds_at_most_max_and_gets_places_back_when_they_drop() {
        let table = PerAddress::new(2);
        let a = table.take(ip("10.0.0.1")).expect("first");
        let b = table.take(ip("10.0.0.1")).expect("second");
        assert!(
            table.take(ip("10.0.0.1")).is_none(),
            "a third is over the bound"
        );
        let other = table.take(ip("10.0.0.2"));
        assert!(other.is_some(), "another address has its own count");
        drop(a);
        assert_eq!(table.holds(ip("10.0.0.1")), 1);
        let c = table.take(ip("10.0.0.1"));
        assert!(c.is_some(), "a place given back is free again");
        drop((b, c, other));
        assert!(
            table.open.lock().expect("lock").is_empty(),
            "no entry outlives its address's connections"
        );
    }

    #[test]
    fn ipv6_counts_by_its_slash_64_and_mapped_ipv4_as_ipv4() {
        let table = PerAddress::new(1);
        let _a = table.take(ip("2001:db8:1:2::1")).expect("first");
        assert!(
            table.take(ip("2001:db8:1:2:ffff::9")).is_none(),
            "same /64, same count"
        );
        assert!(table.take(ip("2001:db8:1:3::1")).is_some(), "another /64");
        let _v4 = table.take(ip("192.0.2.7")).expect("v4");
        assert!(table.take(ip("::ffff:192.0.2.7")).is_none(), "mapped is v4");
    }

    #[test]
    fn zero_means_no_bound() {
        let table = PerAddress::new(0);
        let places: Vec<_> = (0..100)
            .filter_map(|_| table.take(ip("10.0.0.1")))
            .collect();
        assert_eq!(places.len(), 100);
        assert_eq!(table.holds(ip("10.0.0.1")), 0, "nothing is counted");
    }
}
