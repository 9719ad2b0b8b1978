//! Process-wide and per-address limits (docs/protocol.md, "Limits"), counted
//! with RAII permits: a permit is given back when it is dropped, however its
//! holder ends (a panic or an early return cannot leak a slot).
//!
//! - a connection in its handshake holds a [`HandshakePermit`]: one of its
//!   address's `server.per_ip.tabs`, so one address cannot hold the
//!   process's file descriptors with half-sent requests. Once admitted, it
//!   becomes the tab's [`TabPermit`] (the address's slot carries over);
//! - a tab holds a [`TabPermit`]: one of `server.max_tabs`, and one of its
//!   client address's `server.per_ip.tabs`; through it, the tab reaches its
//!   address's shared allowance ([`crate::rate::Pool`], `per_ip.rate`);
//! - a session holds a [`SessionPermit`] from its dial to its end (linger
//!   included): one of `server.max_sessions`, and one of `per_ip.sessions`
//!   of the address whose tab opened it.
//!
//! The client address is worked out once per connection (see
//! [`crate::upgrade`]); everything here takes it as given.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use tokio::sync::Notify;

use crate::config::{Server, TabRate};
use crate::rate::Pool;

/// The process's open-file limit as found at start, and as set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    pub found: libc::rlim_t,
    pub set: libc::rlim_t,
    pub hard: libc::rlim_t,
}

/// Raises the open-file soft limit to the hard limit (docs/protocol.md,
/// "Limits"): every tab and upstream is a descriptor, and a soft limit of
/// 1,024 (a common default) would refuse connections long before
/// `max_tabs`. Call once at start, and log what it returns.
pub fn raise_open_files() -> std::io::Result<OpenFiles> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `lim`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let found = lim.rlim_cur;
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(OpenFiles {
            found,
            set: lim.rlim_cur,
            hard: lim.rlim_max,
        })
    }
}

/// Which limit refused a tab (its status, body and label are rows of
/// [`crate::cause::Refusal`]'s table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `server.max_tabs`.
    Tabs,
    /// `server.per_ip.tabs`.
    AddressTabs,
    /// `server.max_sessions`.
    Sessions,
    /// `server.per_ip.sessions`.
    AddressSessions,
}

/// A count against a maximum.
struct Count {
    held: AtomicUsize,
    max: AtomicUsize,
}

impl Count {
    fn new(max: usize) -> Count {
        Count {
            held: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        }
    }

    fn try_take(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        self.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one client address holds.
struct Held {
    tabs: usize,
    sessions: usize,
    /// What its tabs' permits share.
    address: Arc<Address>,
}

/// One client address, shared by its tabs' permits: the limits they give
/// their slots back to, and the allowance they share (`per_ip.rate`). One
/// pointer in each tab, where the limits and the address would take four.
pub struct Address {
    limits: Arc<Limits>,
    ip: IpAddr,
    pool: Pool,
}

/// The limits of the process and of each client address.
pub struct Limits {
    tabs: Count,
    sessions: Count,
    per_ip_tabs: AtomicUsize,
    per_ip_sessions: AtomicUsize,
    /// `per_ip.rate`, for the pools of addresses seen from now on.
    per_ip_rate: Mutex<TabRate>,
    /// Addresses that hold something; an address is removed once it holds
    /// nothing and its allowance is whole again (so closing every tab does
    /// not buy a fresh one), so the table is as large as the addresses
    /// connected in the last few seconds.
    addresses: DashMap<IpAddr, Held>,
    /// Notified each time a tab's slot is given back (the shutdown drain
    /// waits on it).
    pub released: Notify,
}

impl Limits {
    pub fn new(server: &Server) -> Arc<Limits> {
        Arc::new(Limits {
            tabs: Count::new(server.max_tabs),
            sessions: Count::new(server.max_sessions),
            per_ip_tabs: AtomicUsize::new(server.per_ip.tabs),
            per_ip_sessions: AtomicUsize::new(server.per_ip.sessions),
            per_ip_rate: Mutex::new(server.per_ip.rate),
            addresses: DashMap::new(),
            released: Notify::new(),
        })
    }

    /// Reloaded maxima: they apply to what is admitted from now on (what
    /// is held already stays, even above a lower maximum).
    pub fn configure(&self, server: &Server) {
        self.tabs.max.store(server.max_tabs, Ordering::Relaxed);
        self.sessions
            .max
            .store(server.max_sessions, Ordering::Relaxed);
        self.per_ip_tabs
            .store(server.per_ip.tabs, Ordering::Relaxed);
        self.per_ip_sessions
            .store(server.per_ip.sessions, Ordering::Relaxed);
        *lock(&self.per_ip_rate) = server.per_ip.rate;
        for held in self.addresses.iter() {
            held.address.pool.configure(&server.per_ip.rate);
        }
    }

    /// Tabs open (or being admitted) right now.
    pub fn tabs_open(&self) -> usize {
        self.tabs.held.load(Ordering::Relaxed)
    }

    /// Sessions alive (dialling, connected or lingering) right now.
    pub fn sessions_alive(&self) -> usize {
        self.sessions.held.load(Ordering::Relaxed)
    }

    /// Client addresses holding a tab or a session right now.
    pub fn addresses(&self) -> usize {
        self.addresses
            .iter()
            .filter(|h| h.tabs != 0 || h.sessions != 0)
            .count()
    }

    /// Forgets the addresses that hold nothing and whose allowance is whole
    /// again (called every few seconds).
    pub fn forget_idle(&self) {
        let now = crate::rate::clock_ms();
        self.addresses
            .retain(|_, h| h.tabs != 0 || h.sessions != 0 || !h.address.pool.is_full(now));
    }

    /// A tab's slot, or the limit that refuses it.
    pub fn tab(self: &Arc<Self>, ip: IpAddr) -> Result<TabPermit, Limit> {
        Ok(TabPermit(self.take(ip, Kind::Tab)?))
    }

    /// A connection's slot among its address's `per_ip.tabs` while it
    /// makes its handshake, or the limit that refuses it.
    pub fn handshake(self: &Arc<Self>, ip: IpAddr) -> Result<HandshakePermit, Limit> {
        self.take(ip, Kind::Handshake)?;
        Ok(HandshakePermit(Some(Slot {
            limits: self.clone(),
            ip,
        })))
    }

    /// A tab's slot for a connection that made its handshake holding
    /// `handshake`: if both are the same address, the address's slot
    /// carries over and only the process's is taken.
    pub fn tab_after(
        self: &Arc<Self>,
        ip: IpAddr,
        handshake: Option<HandshakePermit>,
    ) -> Result<TabPermit, Limit> {
        let Some(mut handshake) = handshake.filter(|h| h.ip() == Some(ip)) else {
            return self.tab(ip);
        };
        if !self.tabs.try_take() {
            return Err(Limit::Tabs);
        }
        // The address's slot carries over: the handshake's permit no longer
        // gives it back. The address holds that slot, so it is listed.
        handshake.0.take();
        let address = match self.addresses.get(&ip) {
            Some(held) => held.address.clone(),
            None => self.address(ip),
        };
        Ok(TabPermit(address))
    }

    /// A new session's slot, or the limit that refuses it.
    pub fn session(self: &Arc<Self>, ip: IpAddr) -> Result<SessionPermit, Limit> {
        self.take(ip, Kind::Session)?;
        Ok(SessionPermit(Slot {
            limits: self.clone(),
            ip,
        }))
    }

    fn address(self: &Arc<Self>, ip: IpAddr) -> Arc<Address> {
        Arc::new(Address {
            limits: self.clone(),
            ip,
            pool: Pool::new(&lock(&self.per_ip_rate)),
        })
    }

    /// Takes one of the process's `kind` and one of the address's; the
    /// address.
    fn take(self: &Arc<Self>, ip: IpAddr, kind: Kind) -> Result<Arc<Address>, Limit> {
        // The address's count, and the process's (none for a handshake).
        let (process, address, per_ip) = match kind {
            Kind::Handshake => (None, Limit::AddressTabs, &self.per_ip_tabs),
            Kind::Tab => (
                Some((&self.tabs, Limit::Tabs)),
                Limit::AddressTabs,
                &self.per_ip_tabs,
            ),
            Kind::Session => (
                Some((&self.sessions, Limit::Sessions)),
                Limit::AddressSessions,
                &self.per_ip_sessions,
            ),
        };
        let mut held = self.addresses.entry(ip).or_insert_with(|| Held {
            tabs: 0,
            sessions: 0,
            address: self.address(ip),
        });
        let count = match kind {
            Kind::Handshake | Kind::Tab => &mut held.tabs,
            Kind::Session => &mut held.sessions,
        };
        if *count >= per_ip.load(Ordering::Relaxed) {
            drop(held);
            self.forget_if_empty(ip);
            return Err(address);
        }
        if let Some((process, limit)) = process {
            if !process.try_take() {
                drop(held);
                self.forget_if_empty(ip);
                return Err(limit);
            }
        }
        *count += 1;
        Ok(held.address.clone())
    }

    fn give_back(&self, ip: IpAddr, kind: Kind) {
        if let Some(mut held) = self.addresses.get_mut(&ip) {
            let count = match kind {
                Kind::Handshake | Kind::Tab => &mut held.tabs,
                Kind::Session => &mut held.sessions,
            };
            *count = count.saturating_sub(1);
        }
        self.forget_if_empty(ip);
        match kind {
            Kind::Handshake => {}
            Kind::Tab => {
                self.tabs.give_back();
                self.released.notify_waiters();
            }
            Kind::Session => self.sessions.give_back(),
        }
    }

    fn forget_if_empty(&self, ip: IpAddr) {
        self.addresses.remove_if(&ip, |_, h| {
            h.tabs == 0 && h.sessions == 0 && h.address.pool.is_full(crate::rate::clock_ms())
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Which counts a permit holds.
#[derive(Clone, Copy)]
enum Kind {
    /// The address's `per_ip.tabs` only.
    Handshake,
    /// `max_tabs` and the address's `per_ip.tabs`.
    Tab,
    /// `max_sessions` and the address's `per_ip.sessions`.
    Session,
}

/// What a permit gives back.
struct Slot {
    limits: Arc<Limits>,
    ip: IpAddr,
}

/// A tab's slot (process and address), given back when dropped, and its
/// address's allowance.
pub struct TabPermit(Arc<Address>);

impl TabPermit {
    /// The tab's address's allowance (`per_ip.rate`).
    #[inline]
    pub fn pool(&self) -> &Pool {
        &self.0.pool
    }
}

impl Drop for TabPermit {
    fn drop(&mut self) {
        self.0.limits.give_back(self.0.ip, Kind::Tab);
    }
}

/// A connection's slot among its address's tabs while it makes its
/// handshake, given back when dropped (None once it became a tab's).
pub struct HandshakePermit(Option<Slot>);

/// A connection's [`HandshakePermit`], if it holds one, shared between the
/// connection's task and the request that becomes its tab.
#[derive(Clone, Default)]
pub struct Handshake(Arc<std::sync::Mutex<Option<HandshakePermit>>>);

impl Handshake {
    pub fn new(permit: Option<HandshakePermit>) -> Handshake {
        Handshake(Arc::new(std::sync::Mutex::new(permit)))
    }

    /// The permit, for the request that becomes the tab.
    pub fn take(&self) -> Option<HandshakePermit> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

impl HandshakePermit {
    fn ip(&self) -> Option<IpAddr> {
        self.0.as_ref().map(|s| s.ip)
    }
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        if let Some(slot) = &self.0 {
            slot.limits.give_back(slot.ip, Kind::Handshake);
        }
    }
}

/// A session's slot (process and address), given back when dropped.
pub struct SessionPermit(Slot);

impl Drop for SessionPermit {
    fn drop(&mut self) {
        self.0.limits.give_back(self.0.ip, Kind::Session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_tabs: usize, per_ip_tabs: usize, sessions: usize, per_ip: usize) -> Arc<Limits> {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:1\"\nmax_tabs = {max_tabs}\nmax_sessions = {sessions}\n\
             per_ip = {{ tabs = {per_ip_tabs}, sessions = {per_ip} }}\n[admin]\nlisten = \"127.0.0.1:2\"\n\
             [[route]]\npath = \"/ws\"\nupstream = \"ws://127.0.0.1:3/\"\nallowed_origins = [\"*\"]\n"
        );
        let config =
            crate::config::Config::from_toml(&text, "t", std::path::Path::new(".")).unwrap();
        Limits::new(&config.server)
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn permits_are_given_back_when_dropped() {
        let limits = limits(2, 5, 1, 1);
        let a = limits.tab(A).expect("first");
        let _b = limits.tab(B).expect("second");
        assert_eq!(limits.tab(A).err(), Some(Limit::Tabs), "at max_tabs");
        drop(a);
        assert_eq!(limits.tabs_open(), 1);
        assert!(limits.tab(A).is_ok());
    }

    #[test]
    fn one_address_cannot_take_everything() {
        let limits = limits(10, 2, 10, 1);
        let held = [limits.tab(A).unwrap(), limits.tab(A).unwrap()];
        assert_eq!(limits.tab(A).err(), Some(Limit::AddressTabs));
        // Another address is still served.
        let other = limits.tab(B).unwrap();
        let session = limits.session(A).unwrap();
        assert_eq!(limits.session(A).err(), Some(Limit::AddressSessions));
        assert_eq!(limits.sessions_alive(), 1);
        drop(session);
        assert!(limits.session(A).is_ok());
        drop(held);
        drop(other);
        // An address that holds nothing is forgotten.
        assert_eq!(limits.addresses(), 0);
        assert_eq!(limits.tabs_open(), 0);
    }

    #[test]
    fn an_address_s_tabs_share_one_allowance_that_closing_them_does_not_renew() {
        let limits = limits(10, 5, 10, 10);
        let (a1, a2, b) = (
            limits.tab(A).unwrap(),
            limits.tab(A).unwrap(),
            limits.tab(B).unwrap(),
        );
        assert!(std::ptr::eq(a1.pool(), a2.pool()), "one pool per address");
        assert!(!std::ptr::eq(a1.pool(), b.pool()));
        // A spends its allowance (two seconds of 32 MiB), then closes every
        // tab and comes back: the allowance it spent is still spent.
        a1.pool().charge(0, 64 << 20);
        assert!(!a1.pool().is_full(crate::rate::clock_ms()));
        drop((a1, a2));
        assert_eq!(limits.addresses(), 1, "B only holds something");
        let again = limits.tab(A).unwrap();
        assert!(!again.pool().is_full(crate::rate::clock_ms()));
        drop(again);
        // Sweeping keeps it while it is not whole again.
        limits.forget_idle();
        assert_eq!(limits.addresses.len(), 2);
        drop(b);
        limits.forget_idle();
        assert_eq!(
            limits.addresses.len(),
            1,
            "B's whole allowance is forgotten"
        );
    }

    #[test]
    fn handshakes_count_against_the_address_and_carry_over_to_the_tab() {
        let limits = limits(10, 2, 10, 10);
        let first = limits.handshake(A).unwrap();
        let second = limits.handshake(A).unwrap();
        assert_eq!(limits.handshake(A).err(), Some(Limit::AddressTabs));
        assert_eq!(limits.tabs_open(), 0, "not tabs yet");
        // Admitted: the address's slot carries over, nothing counted twice.
        let tab = limits.tab_after(A, Some(first)).unwrap();
        assert_eq!(limits.tabs_open(), 1);
        assert_eq!(limits.handshake(A).err(), Some(Limit::AddressTabs));
        drop(second);
        let third = limits.handshake(A).unwrap();
        // A tab whose client turned out to be another address (a trusted
        // proxy's X-Forwarded-For) takes that address's slot instead.
        let other = limits.tab_after(B, Some(third)).unwrap();
        assert_eq!(limits.tabs_open(), 2);
        assert!(limits.handshake(A).is_ok(), "A's handshake slot is back");
        drop((tab, other));
        assert_eq!(limits.addresses(), 0);
        assert_eq!(limits.tabs_open(), 0);
    }

    #[test]
    fn the_process_limit_on_sessions_holds_across_addresses() {
        let limits = limits(10, 10, 2, 5);
        let _a = limits.session(A).unwrap();
        let _b = limits.session(B).unwrap();
        assert_eq!(limits.session(A).err(), Some(Limit::Sessions));
        assert_eq!(limits.addresses(), 2, "a refusal leaves no record behind");
    }
}
