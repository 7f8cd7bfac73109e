//! The dashboard's logins and sessions, in this agent's memory.
//!
//! `pier dashboard` (which holds the API token) asks for a one-time login
//! code ([`Sessions::issue_code`]); the browser opens `/ui/login?code=…`,
//! which redeems the code ([`Sessions::redeem`]) for a session id, set as
//! an HttpOnly, SameSite=Strict cookie, and redirects to `/ui/` so the code
//! does not stay in the address bar. A code works once and for
//! [`CODE_TTL_MS`]; a session lasts [`SESSION_TTL_MS`]. A session allows
//! reads only (GET of `/api/v1/…` and `/ui/…`): the dashboard writes
//! nothing, so a stolen cookie cannot change the cluster.
//!
//! Both live in memory: a restart of the agent's worker ends every session
//! (run `pier dashboard` again). Ids and codes are 128 random bits from
//! the thread CSPRNG, so a guess is hopeless and a map lookup's timing
//! says nothing useful.

use std::collections::HashMap;
use std::sync::Mutex;

/// A login code is good for 2 minutes: long enough to open a browser.
pub const CODE_TTL_MS: u64 = 2 * 60 * 1000;
/// A session lasts 12 hours from its login.
pub const SESSION_TTL_MS: u64 = 12 * 60 * 60 * 1000;
/// Codes not yet redeemed, at most; the one closest to expiring goes first.
const MAX_CODES: usize = 32;
/// Sessions open at once, at most; the oldest goes first.
const MAX_SESSIONS: usize = 256;

/// The session cookie's name, before the port: `pier_session_7370`.
/// Browsers do not scope cookies by port, so two agents on one host (or
/// an agent and a test agent) each need their own name, or logging in to
/// one would log out of the other.
pub const COOKIE_PREFIX: &str = "pier_session_";

#[derive(Debug, Default)]
pub(crate) struct Sessions {
    /// A std Mutex: each critical section is a few map operations, never
    /// an `.await`.
    inner: Mutex<State>,
    /// This API's cookie name.
    cookie: String,
}

#[derive(Debug, Default)]
struct State {
    /// Code → when it expires (unix ms).
    codes: HashMap<String, u64>,
    /// Session id → when it expires (unix ms).
    sessions: HashMap<String, u64>,
}

fn random_id() -> String {
    let b: [u8; 16] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Keep `map` under `max` entries by dropping the ones expiring first,
/// after dropping the expired ones.
fn prune(map: &mut HashMap<String, u64>, now: u64, max: usize) {
    map.retain(|_, exp| *exp > now);
    while map.len() >= max {
        let Some(first) = map
            .iter()
            .min_by_key(|(_, exp)| **exp)
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        map.remove(&first);
    }
}

impl Sessions {
    /// The sessions of the API listening on `port`.
    pub(crate) fn new(port: u16) -> Sessions {
        Sessions {
            inner: Mutex::default(),
            cookie: format!("{COOKIE_PREFIX}{port}"),
        }
    }

    /// The name of this API's session cookie.
    pub(crate) fn cookie_name(&self) -> &str {
        &self.cookie
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new one-time login code, good for [`CODE_TTL_MS`] from `now`.
    pub(crate) fn issue_code(&self, now: u64) -> String {
        let code = random_id();
        let mut st = self.lock();
        prune(&mut st.codes, now, MAX_CODES);
        st.codes.insert(code.clone(), now + CODE_TTL_MS);
        code
    }

    /// Spend `code`: a new session id if the code was issued, unused and
    /// not expired; `None` otherwise. A code never works twice.
    pub(crate) fn redeem(&self, code: &str, now: u64) -> Option<String> {
        let mut st = self.lock();
        let exp = st.codes.remove(code)?;
        if exp <= now {
            return None;
        }
        let id = random_id();
        prune(&mut st.sessions, now, MAX_SESSIONS);
        st.sessions.insert(id.clone(), now + SESSION_TTL_MS);
        Some(id)
    }

    /// Whether `id` is a live session.
    pub(crate) fn valid(&self, id: &str, now: u64) -> bool {
        self.lock().sessions.get(id).is_some_and(|exp| *exp > now)
    }

    /// End a session (logout).
    pub(crate) fn end(&self, id: &str) {
        self.lock().sessions.remove(id);
    }
}

/// The value of cookie `name` in a `Cookie:` header, if there.
pub(crate) fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_works_once_and_expires() {
        let s = Sessions::new(7370);
        let c = s.issue_code(1_000);
        assert_eq!(c.len(), 32);
        let id = s.redeem(&c, 2_000).expect("a fresh code redeems");
        assert!(s.valid(&id, 3_000));
        assert_eq!(s.redeem(&c, 2_001), None, "used twice");
        let late = s.issue_code(1_000);
        assert_eq!(s.redeem(&late, 1_000 + CODE_TTL_MS), None, "expired");
        assert_eq!(s.redeem("nonsense", 1_000), None);
        assert_eq!(s.redeem("", 1_000), None);
    }

    #[test]
    fn sessions_expire_and_end() {
        let s = Sessions::new(7370);
        let id = s.redeem(&s.issue_code(0), 0).unwrap();
        assert!(s.valid(&id, SESSION_TTL_MS - 1));
        assert!(!s.valid(&id, SESSION_TTL_MS));
        let id2 = s.redeem(&s.issue_code(0), 0).unwrap();
        assert_ne!(id, id2);
        s.end(&id2);
        assert!(!s.valid(&id2, 1));
        assert!(!s.valid("", 1));
    }

    #[test]
    fn the_maps_stay_bounded() {
        let s = Sessions::new(7370);
        let first = s.issue_code(0);
        for i in 0..MAX_CODES as u64 * 3 {
            s.issue_code(i + 1);
        }
        assert!(s.lock().codes.len() <= MAX_CODES);
        assert_eq!(s.redeem(&first, 10), None, "the oldest code went first");
        let mut ids = Vec::new();
        for i in 0..MAX_SESSIONS as u64 * 2 {
            let c = s.issue_code(i);
            ids.push(s.redeem(&c, i).unwrap());
        }
        assert!(s.lock().sessions.len() <= MAX_SESSIONS);
        assert!(!s.valid(&ids[0], 1_000), "the oldest session went first");
        assert!(s.valid(ids.last().unwrap(), 1_000));
    }

    #[test]
    fn cookies_parse() {
        let c = Sessions::new(7370);
        let c = c.cookie_name();
        assert_eq!(c, "pier_session_7370");
        assert_eq!(cookie("pier_session_7370=abc", c), Some("abc"));
        assert_eq!(cookie("a=1; pier_session_7370=abc ; b=2", c), Some("abc"));
        assert_eq!(cookie("pier_session_7371=abc", c), None, "another agent's");
        assert_eq!(cookie("xpier_session_7370=abc", c), None);
        assert_eq!(cookie("", c), None);
        assert_eq!(cookie("pier_session_7370", c), None);
    }
}
