//! Session keys: who shares an upstream, named without the cookie.
//!
//! Two tabs share a session exactly when their route, session cookie,
//! requested subprotocols and (with `forward_query`) query string are the
//! same. The key is an HMAC-SHA256 of those, under a key made fresh for each
//! process: the cookie is never stored or shown, and a session's public
//! name (the first 16 hex digits) cannot be traced back to it, nor compared
//! across runs.

use std::sync::atomic::{AtomicU64, Ordering};

/// A session key: a keyed hash (HMAC-SHA256) of route, session cookie,
/// requested subprotocols and forwarded query. The cookie itself is never
/// stored or shown; [`SessionKey::name`] is what logs and pages print.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionKey([u8; 32]);

impl SessionKey {
    /// The session's public name: the first 8 bytes of the hash, in hex.
    pub fn name(&self) -> String {
        hex(&self.0[..8])
    }
}

/// Lower-case hex of `bytes`, in one allocation.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionKey({})", self.name())
    }
}

/// Hashes session identities with a key made fresh for each process, so a
/// session name cannot be traced back to a cookie, nor compared across runs.
pub struct SessionHasher {
    key: ring::hmac::Key,
    direct: AtomicU64,
}

impl SessionHasher {
    /// A hasher with a random key.
    pub fn new() -> SessionHasher {
        let rng = ring::rand::SystemRandom::new();
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
            .expect("the system random number generator failed");
        SessionHasher {
            key,
            direct: AtomicU64::new(0),
        }
    }

    /// The key of a shared session. Each part is length-prefixed, so no two
    /// different identities can produce the same input.
    /// The route is named by its path, so that a session keeps its key
    /// when a reload reorders the routes.
    pub fn shared(&self, route: &str, cookie: &[u8], protocols: &[u8], query: &[u8]) -> SessionKey {
        self.keyed(b"S", &[route.as_bytes(), cookie, protocols, query])
    }

    /// The key of a shared session whose connections are also told apart
    /// by what the tab's first frame says (a `graphql` route's
    /// `connection_init` payload, as canonical JSON): another tag, so no
    /// such key is ever one of [`SessionHasher::shared`]'s.
    pub fn shared_by_init(
        &self,
        route: &str,
        cookie: &[u8],
        protocols: &[u8],
        query: &[u8],
        init: &[u8],
    ) -> SessionKey {
        self.keyed(b"I", &[route.as_bytes(), cookie, protocols, query, init])
    }

    fn keyed(&self, tag: &[u8], parts: &[&[u8]]) -> SessionKey {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        ctx.update(tag);
        for part in parts {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        SessionKey::from_tag(ctx.sign())
    }

    /// A key no other tab can ever produce (`missing_cookie = "direct"`).
    pub fn direct(&self) -> SessionKey {
        let n = self.direct.fetch_add(1, Ordering::Relaxed);
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        ctx.update(b"D");
        ctx.update(&n.to_be_bytes());
        SessionKey::from_tag(ctx.sign())
    }
}

impl Default for SessionHasher {
    fn default() -> Self {
        SessionHasher::new()
    }
}

impl SessionKey {
    fn from_tag(tag: ring::hmac::Tag) -> SessionKey {
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        SessionKey(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn session_names_are_16_hex_digits_and_keyed() {
        let a = SessionHasher::new();
        let name = a.shared("/ws", b"cookie", b"", b"").name();
        assert_eq!(name.len(), 16);
        assert!(name.bytes().all(|c| c.is_ascii_hexdigit()));
        // Same identity, same key: same name; another process key: another.
        assert_eq!(name, a.shared("/ws", b"cookie", b"", b"").name());
        assert_ne!(
            name,
            SessionHasher::new()
                .shared("/ws", b"cookie", b"", b"")
                .name()
        );
    }
}
