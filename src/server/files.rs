//! The open-files limit: every connection is a descriptor, so `--max-connections` is
//! only real if the process may open that many.

/// Descriptors the server needs besides its connections: the listener, the store's
/// file, the runtime's poller and wakers, stdio, and the spare kept for refusals.
pub const RESERVED: u64 = 32;

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns how many connections
/// fit under it: `wanted`, or fewer with one warning naming both numbers.
#[cfg(unix)]
pub fn fit_connections(wanted: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return wanted;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            log::debug!(
                "open-files limit raised from {} to {}",
                limit.rlim_cur,
                limit.rlim_max
            );
            limit.rlim_cur = limit.rlim_max;
        }
    }
    let room = usize::try_from(limit.rlim_cur.saturating_sub(RESERVED)).unwrap_or(usize::MAX);
    if room < wanted {
        log::warn!(
            "the open-files limit is {}, too low for --max-connections {wanted}; serving at most {room} connections (raise the hard limit, e.g. ulimit -Hn or LimitNOFILE=, to allow more)",
            limit.rlim_cur
        );
        return room.max(1);
    }
    wanted
}

#[cfg(not(unix))]
pub fn fit_connections(wanted: usize) -> usize {
    wanted
}

/// A descriptor held in reserve: when accept fails for lack of descriptors, giving it
/// up lets the server accept the waiting client just long enough to tell it
/// `server-busy`, instead of leaving it hanging in the backlog.
pub struct Spare(Option<std::fs::File>);

impl Spare {
    pub fn new() -> Spare {
        Spare(std::fs::File::open("/dev/null").ok())
    }

    /// Frees the descriptor; true if there was one to free.
    pub fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    /// Takes a descriptor back into reserve, if one is free again.
    pub fn restore(&mut self) {
        if self.0.is_none() {
            self.0 = std::fs::File::open("/dev/null").ok();
        }
    }
}
