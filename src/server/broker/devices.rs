//! The named devices of each id: which number each name has, and which to forget when
//! an id has too many.
//!
//! A session names its device; the broker gives each name of an id a number (the
//! default device, every connection without a session, is 0 and is not counted), so
//! the registry and the store key devices by `(id, number)`. A new device gets a number
//! above every one its id has (or had, when it takes a forgotten one's place), while
//! numbers are left. At `--max-devices` named devices, a new name takes the
//! place of the one seen longest ago that is not online; when every one is online, the
//! new one is refused.

use std::collections::HashMap;

use crate::ids::NO_DEVICE as NOT_OURS;
use crate::protocol::session::Device;
use crate::store::KnownDevice;

#[derive(Debug, Clone)]
struct Known {
    device: u16,
    name: Device,
    last_seen: u64,
}

/// What a session's device name came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Assigned {
    /// A device the id had: its number.
    Known(u16),
    /// A new device, numbered; `forgotten` made room for it.
    New {
        device: u16,
        forgotten: Option<(u16, Device)>,
    },
    /// Every one of the id's devices is online: no room.
    Full { max: usize },
}

#[derive(Debug, Default)]
pub(super) struct Devices {
    ids: HashMap<u32, Vec<Known>>,
    max: usize,
}

impl Devices {
    /// What the store remembers, with at most `max` named devices per id.
    pub fn new(known: Vec<KnownDevice>, max: usize) -> Devices {
        let mut ids: HashMap<u32, Vec<Known>> = HashMap::new();
        for k in known {
            let Ok(name) = Device::new(&k.name) else {
                continue;
            };
            if k.endpoint.device != 0 {
                ids.entry(k.endpoint.id).or_default().push(Known {
                    device: k.endpoint.device,
                    name,
                    last_seen: k.last_seen,
                });
            }
        }
        Devices { ids, max }
    }

    /// The number of `id`'s device `name`, at `now` (ms); `online` says whether a
    /// device of the id is online (an online device is never forgotten).
    pub fn assign(
        &mut self,
        id: u32,
        name: &Device,
        now: u64,
        online: impl Fn(u16) -> bool,
    ) -> Assigned {
        let list = self.ids.entry(id).or_default();
        if let Some(k) = list.iter_mut().find(|k| &k.name == name) {
            k.last_seen = now;
            return Assigned::Known(k.device);
        }
        // Numbered before one is forgotten, so the new one does not take its number.
        let device = next_number(list);
        let mut forgotten = None;
        if list.len() >= self.max {
            let oldest = list
                .iter()
                .enumerate()
                .filter(|(_, k)| !online(k.device))
                .min_by_key(|(_, k)| k.last_seen)
                .map(|(i, _)| i);
            let Some(i) = oldest else {
                return Assigned::Full { max: self.max };
            };
            let k = list.swap_remove(i);
            forgotten = Some((k.device, k.name));
        }
        list.push(Known {
            device,
            name: name.clone(),
            last_seen: now,
        });
        Assigned::New { device, forgotten }
    }

    /// Whether `id` has named devices (then a frame for it, or from it, may be for
    /// devices that are away).
    pub fn has(&self, id: u32) -> bool {
        self.ids.get(&id).is_some_and(|list| !list.is_empty())
    }

    /// A device was in use until `now` (its connection closed): it is not the one
    /// seen longest ago.
    pub fn seen(&mut self, id: u32, device: u16, now: u64) {
        if let Some(k) = self
            .ids
            .get_mut(&id)
            .and_then(|list| list.iter_mut().find(|k| k.device == device))
        {
            k.last_seen = now;
        }
    }

    /// Forgets every named device of `id` (an operator deleted what is stored for it).
    pub fn forget_id(&mut self, id: u32) {
        self.ids.remove(&id);
    }

    /// Forgets device `e` if it was last seen before `cutoff` (ms): its name, if so.
    pub fn forget_idle(&mut self, e: crate::ids::Endpoint, cutoff: u64) -> Option<Device> {
        let list = self.ids.get_mut(&e.id)?;
        let i = list
            .iter()
            .position(|k| k.device == e.device && k.last_seen < cutoff)?;
        let k = list.swap_remove(i);
        if list.is_empty() {
            self.ids.remove(&e.id);
        }
        Some(k.name)
    }

    /// The name of a device, if the id has it.
    #[cfg(test)]
    pub fn name(&self, e: crate::ids::Endpoint) -> Option<&Device> {
        self.ids
            .get(&e.id)?
            .iter()
            .find(|k| k.device == e.device)
            .map(|k| &k.name)
    }
}

/// The lowest number above every one in use, or the lowest free one once those run
/// out; never 0 (the default device) nor [`NOT_OURS`].
fn next_number(list: &[Known]) -> u16 {
    let top = list.iter().map(|k| k.device).max().unwrap_or(0);
    if top < NOT_OURS - 1 {
        return top + 1;
    }
    (1..NOT_OURS)
        .find(|d| !list.iter().any(|k| k.device == *d))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Endpoint;

    fn name(n: &str) -> Device {
        Device::new(n).expect("a name")
    }

    #[test]
    fn a_name_keeps_its_number_and_new_names_get_new_ones() {
        let known = vec![KnownDevice {
            endpoint: Endpoint { id: 7, device: 3 },
            name: "laptop".into(),
            last_seen: 1,
        }];
        let mut d = Devices::new(known, 8);
        let none = |_| false;
        assert_eq!(d.assign(7, &name("laptop"), 5, none), Assigned::Known(3));
        assert_eq!(
            d.assign(7, &name("phone"), 6, none),
            Assigned::New {
                device: 4,
                forgotten: None
            }
        );
        assert_eq!(
            d.assign(8, &name("phone"), 6, none),
            Assigned::New {
                device: 1,
                forgotten: None
            },
            "numbers are per id"
        );
        assert_eq!(d.name(Endpoint { id: 7, device: 4 }), Some(&name("phone")));
    }

    #[test]
    fn past_the_limit_the_device_seen_longest_ago_and_offline_makes_room() {
        let mut d = Devices::new(Vec::new(), 2);
        d.assign(7, &name("a"), 10, |_| false);
        d.assign(7, &name("b"), 20, |_| false);
        // "a" is online: "b" goes, though seen later.
        assert_eq!(
            d.assign(7, &name("c"), 30, |dev| dev == 1),
            Assigned::New {
                device: 3,
                forgotten: Some((2, name("b")))
            }
        );
        assert_eq!(
            d.assign(7, &name("d"), 40, |_| true),
            Assigned::Full { max: 2 }
        );
        assert_eq!(d.name(Endpoint { id: 7, device: 2 }), None);
    }

    #[test]
    fn only_a_device_not_seen_since_the_cutoff_is_forgotten_as_idle() {
        let mut d = Devices::new(Vec::new(), 8);
        d.assign(7, &name("a"), 10, |_| false);
        d.assign(7, &name("b"), 10, |_| false);
        d.seen(7, 2, 50);
        let b = Endpoint { id: 7, device: 2 };
        assert_eq!(d.forget_idle(b, 40), None, "seen at 50: not idle at 40");
        assert_eq!(
            d.forget_idle(Endpoint { id: 7, device: 1 }, 40),
            Some(name("a"))
        );
        assert_eq!(d.forget_idle(b, 60), Some(name("b")));
        assert!(!d.has(7), "the id has no named devices left");
    }

    #[test]
    fn numbers_are_not_reused_while_higher_ones_are_free() {
        let k = |device| Known {
            device,
            name: name(&format!("d{device}")),
            last_seen: 0,
        };
        assert_eq!(next_number(&[]), 1);
        assert_eq!(next_number(&[k(1), k(5)]), 6);
        assert_eq!(next_number(&[k(1), k(NOT_OURS - 1)]), 2);
    }
}
