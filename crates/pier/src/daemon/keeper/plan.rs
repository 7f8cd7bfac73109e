//! The keeper's decisions, with no I/O: which worker to start, signal or
//! wait for ([`Plan`]), and which listening sockets to keep ([`Holdings`]);
//! and the orphan's: what a worker does when its keeper is gone
//! ([`keeper_gone`]), what a starting keeper makes of the adoption socket
//! ([`probe`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::super::fdpass::SockKey;

/// A worker, by process id.
pub type Worker = i32;

/// Exit code of a worker that found the config bad (EX_USAGE): starting it
/// again will not help.
pub const EXIT_CONFIG: i32 = 64;

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `worker` serves: DNS, the proxy's listeners, the mesh and the API.
    Ready(Worker),
    /// `worker`, told to hand off, has closed the store.
    Released(Worker),
    /// `worker` exited with `code` (128 + n for signal n) after `lived`.
    Exited {
        worker: Worker,
        code: i32,
        lived: Duration,
    },
    /// SIGHUP: start a worker from the binary on disk and hand over.
    Upgrade,
    /// SIGTERM or SIGINT.
    Stop,
    /// A delayed restart is due.
    RestartDue,
}

/// What to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Spawn,
    /// After `Duration`, feed [`Event::RestartDue`].
    SpawnAfter(Duration),
    /// SIGUSR2: stop writing to the store and close it, keep serving.
    HandOff(Worker),
    /// SIGTERM: stop accepting, drain, exit.
    Terminate(Worker),
    /// Drop every held socket `Worker` did not claim.
    Sweep(Worker),
    Exit(i32),
    Log(String),
}

/// The keeper's view of its workers.
#[derive(Debug, Default)]
pub struct Plan {
    /// The worker that owns the store and serves.
    serving: Option<Worker>,
    /// Spawned, not ready yet.
    starting: Option<Worker>,
    /// Told to hand off; still serving from its last snapshot.
    handing_off: Option<Worker>,
    /// Told to stop; they exit on their own once drained.
    draining: BTreeSet<Worker>,
    restart_pending: bool,
    /// An orphan being adopted: it sends its sockets, then `READY`, then
    /// is handed off like the old worker of an upgrade.
    adopting: Option<Worker>,
    stopping: bool,
    ever_ready: bool,
    /// Crashes in a row of workers that lived less than [`SHORT_LIFE`].
    quick_crashes: u32,
    exit_code: i32,
}

/// A worker that lived less than this before crashing counts towards the
/// restart backoff.
const SHORT_LIFE: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Plan {
    /// The plan for a keeper that has just spawned its first worker.
    pub fn started(first: Worker) -> Plan {
        Plan {
            starting: Some(first),
            ..Plan::default()
        }
    }

    /// The plan for a keeper that found an orphaned worker on its data
    /// dir's adoption socket and spawned nothing yet.
    pub fn adopting(orphan: Worker) -> Plan {
        Plan {
            starting: Some(orphan),
            adopting: Some(orphan),
            ..Plan::default()
        }
    }

    /// Records that `worker` was spawned (after [`Action::Spawn`]).
    pub fn spawned(&mut self, worker: Worker) {
        self.starting = Some(worker);
        self.restart_pending = false;
    }

    /// Every worker alive, for signals.
    pub fn workers(&self) -> Vec<Worker> {
        let mut v: Vec<Worker> = self.draining.iter().copied().collect();
        v.extend(self.serving);
        v.extend(self.starting);
        v.extend(self.handing_off);
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn on(&mut self, ev: Event) -> Vec<Action> {
        match ev {
            Event::Ready(w) if self.adopting == Some(w) => {
                // The orphan serves, with its sockets now held here too:
                // from here on it is the old worker of an upgrade.
                self.adopting = None;
                self.starting = None;
                self.ever_ready = true;
                let mut out = vec![
                    Action::Log(format!(
                        "adopted the orphaned worker {w} with its sockets; it hands off to a new worker"
                    )),
                    Action::Sweep(w),
                ];
                if self.stopping {
                    self.draining.insert(w);
                    out.push(Action::Terminate(w));
                } else {
                    self.handing_off = Some(w);
                    out.push(Action::HandOff(w));
                }
                out
            }
            Event::Ready(w) if self.starting == Some(w) => {
                self.starting = None;
                self.serving = Some(w);
                self.ever_ready = true;
                let mut out = vec![Action::Log(format!("worker ready (worker={w})"))];
                if let Some(old) = self.handing_off.take() {
                    self.draining.insert(old);
                    out.push(Action::Terminate(old));
                }
                if self.stopping {
                    out.push(Action::Terminate(w));
                } else {
                    out.push(Action::Sweep(w));
                }
                out
            }
            Event::Ready(_) => Vec::new(),
            Event::Released(w) if self.handing_off == Some(w) && self.starting.is_none() => {
                if self.stopping {
                    return Vec::new();
                }
                self.serving = None;
                vec![Action::Spawn]
            }
            Event::Released(_) => Vec::new(),
            Event::Upgrade => {
                if self.stopping {
                    return vec![Action::Log("stopping; upgrade ignored".into())];
                }
                if self.handing_off.is_some() || self.starting.is_some() || self.restart_pending {
                    return vec![Action::Log(
                        "an upgrade or restart is in progress; SIGHUP ignored".into(),
                    )];
                }
                match self.serving {
                    Some(w) => {
                        self.handing_off = Some(w);
                        vec![
                            Action::Log(format!("upgrade: worker {w} hands off")),
                            Action::HandOff(w),
                        ]
                    }
                    None => vec![Action::Log("no worker serves; SIGHUP ignored".into())],
                }
            }
            Event::Stop => {
                self.stopping = true;
                self.restart_pending = false;
                let all = self.workers();
                if all.is_empty() {
                    return vec![Action::Exit(self.exit_code)];
                }
                all.into_iter().map(Action::Terminate).collect()
            }
            Event::RestartDue => {
                // Also after a spawn that failed (restart_pending unset).
                if self.stopping || self.starting.is_some() || self.serving.is_some() {
                    return Vec::new();
                }
                vec![Action::Spawn]
            }
            Event::Exited {
                worker,
                code,
                lived,
            } => self.exited(worker, code, lived),
        }
    }

    fn exited(&mut self, w: Worker, code: i32, lived: Duration) -> Vec<Action> {
        let mut out = Vec::new();
        if self.adopting == Some(w) {
            // Gone (or it refused us) before it was adopted: start afresh;
            // a worker of ours finds its ports free, or says they are not.
            self.adopting = None;
            self.starting = None;
            if self.stopping {
                out.push(Action::Exit(self.exit_code));
                return out;
            }
            out.push(Action::Log(format!(
                "the orphaned worker {w} left before it was adopted; starting a worker"
            )));
            out.push(Action::Spawn);
            return out;
        }
        let was_serving = self.serving == Some(w);
        let was_starting = self.starting == Some(w);
        let was_handing_off = self.handing_off == Some(w);
        self.draining.remove(&w);
        if was_serving {
            self.serving = None;
            self.exit_code = code;
        }
        if was_starting {
            self.starting = None;
        }
        if was_handing_off {
            self.handing_off = None;
        }
        if self.stopping {
            if was_serving || (was_starting && !self.ever_ready) {
                self.exit_code = code;
            }
            if self.workers().is_empty() {
                out.push(Action::Exit(self.exit_code));
            }
            return out;
        }
        if code == EXIT_CONFIG {
            // A bad config or certificate: every restart would fail alike.
            self.stopping = true;
            self.exit_code = code;
            out.push(Action::Log(format!(
                "worker {w} refused its config (exit {code}); stopping"
            )));
            out.extend(self.workers().into_iter().map(Action::Terminate));
            if self.workers().is_empty() {
                out.push(Action::Exit(code));
            }
            return out;
        }
        if was_starting && !self.ever_ready {
            // The first start failed (a port taken, say): report it.
            self.stopping = true;
            self.exit_code = if code == 0 { 1 } else { code };
            out.push(Action::Exit(self.exit_code));
            return out;
        }
        if !(was_serving || was_starting || was_handing_off) {
            return out; // a drained worker finished
        }
        if was_handing_off && self.starting.is_none() && self.serving.is_none() {
            // Died before it released the store: start the new one now.
            out.push(Action::Log(format!(
                "worker {w} exited (code {code}) while handing off"
            )));
        } else if self.starting.is_some() || self.serving.is_some() {
            return out;
        } else {
            out.push(Action::Log(format!(
                "worker {w} exited (code {code}) after {} ms; restarting",
                lived.as_millis()
            )));
        }
        if lived < SHORT_LIFE {
            self.quick_crashes += 1;
        } else {
            self.quick_crashes = 0;
        }
        self.restart_pending = true;
        let delay = backoff(self.quick_crashes);
        if delay.is_zero() {
            out.push(Action::Spawn);
        } else {
            out.push(Action::SpawnAfter(delay));
        }
        out
    }
}

/// Restart at once after one crash, then 100 ms, 200 ms, … up to 5 s while
/// workers keep crashing within [`SHORT_LIFE`].
fn backoff(quick_crashes: u32) -> Duration {
    if quick_crashes <= 1 {
        return Duration::ZERO;
    }
    let ms = 100u64.saturating_mul(1 << (quick_crashes - 2).min(16));
    Duration::from_millis(ms).min(MAX_BACKOFF)
}

/// What a starting keeper found at its data dir's adoption socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No socket file: start a worker as usual.
    Absent,
    /// A file nobody listens on (an orphan that was killed): remove it,
    /// then start a worker as usual.
    Stale,
    /// An orphaned worker of this user answered: adopt it.
    Adopt(Worker),
    /// Something answered as another user: leave it alone and start a
    /// worker as usual (whose binds then say what holds the ports).
    Foreign { uid: u32 },
}

/// How connecting to the adoption socket went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connect {
    /// The peer's credentials (SO_PEERCRED).
    Peer {
        pid: i32,
        uid: u32,
    },
    NoFile,
    Refused,
}

pub fn probe(c: Connect, my_uid: u32) -> Probe {
    match c {
        Connect::NoFile => Probe::Absent,
        Connect::Refused => Probe::Stale,
        Connect::Peer { uid, .. } if uid != my_uid => Probe::Foreign { uid },
        Connect::Peer { pid, .. } => Probe::Adopt(pid),
    }
}

/// What a worker does when its keeper's socket reaches end of stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orphaned {
    /// It was told to stop (SIGTERM) first: it goes on stopping.
    Stopping,
    /// It had handed off the store (an upgrade, or an adoption, was under
    /// way): its successor, if one was started, holds the sockets and
    /// serves; this one stops accepting, drains and exits.
    Drain,
    /// It serves on (registration, lease, DNS, proxy, mesh, supervisor)
    /// and waits on the adoption socket for a keeper.
    Serve,
}

pub fn keeper_gone(stopping: bool, handed_off: bool) -> Orphaned {
    if stopping {
        Orphaned::Stopping
    } else if handed_off {
        Orphaned::Drain
    } else {
        Orphaned::Serve
    }
}

/// The listening sockets the keeper holds, each with the workers that
/// claimed it (asked for it or handed it over).
#[derive(Debug)]
pub struct Holdings<T> {
    held: BTreeMap<SockKey, (T, BTreeSet<Worker>)>,
}

impl<T> Default for Holdings<T> {
    fn default() -> Self {
        Holdings {
            held: BTreeMap::new(),
        }
    }
}

impl<T> Holdings<T> {
    /// The socket on `key`, if held; `w` now claims it.
    pub fn get(&mut self, w: Worker, key: &SockKey) -> Option<&T> {
        let (t, by) = self.held.get_mut(key)?;
        by.insert(w);
        Some(t)
    }

    /// Keeps `t` for `key`, claimed by `w`. A socket already held for the
    /// same key is returned to be closed (a worker bound anew).
    pub fn hold(&mut self, w: Worker, key: SockKey, t: T) -> Option<T> {
        self.held
            .insert(key, (t, BTreeSet::from([w])))
            .map(|(old, _)| old)
    }

    /// The socket on `key` closed for good: the keeper's copy goes too.
    pub fn release(&mut self, key: &SockKey) -> Option<T> {
        self.held.remove(key).map(|(t, _)| t)
    }

    /// `w` is ready: every socket it did not claim is no longer wanted
    /// (its service went while no worker ran, or its bind now fails), so
    /// no stale copy keeps a port open. The rest are now claimed by `w`
    /// alone.
    pub fn sweep(&mut self, w: Worker) -> Vec<(SockKey, T)> {
        let gone: Vec<SockKey> = self
            .held
            .iter()
            .filter(|(_, (_, by))| !by.contains(&w))
            .map(|(k, _)| *k)
            .collect();
        for (_, by) in self.held.values_mut() {
            by.retain(|x| *x == w);
        }
        gone.into_iter()
            .filter_map(|k| self.held.remove(&k).map(|(t, _)| (k, t)))
            .collect()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::fdpass::Proto;
    use super::*;

    fn exited(worker: Worker, code: i32, secs: u64) -> Event {
        Event::Exited {
            worker,
            code,
            lived: Duration::from_secs(secs),
        }
    }

    fn no_logs(v: Vec<Action>) -> Vec<Action> {
        v.into_iter()
            .filter(|a| !matches!(a, Action::Log(_)))
            .collect()
    }

    #[test]
    fn upgrade_hands_off_then_starts_then_stops_the_old_one() {
        let mut p = Plan::started(1);
        assert_eq!(no_logs(p.on(Event::Ready(1))), vec![Action::Sweep(1)]);
        assert_eq!(no_logs(p.on(Event::Upgrade)), vec![Action::HandOff(1)]);
        // A second SIGHUP while it runs does nothing.
        assert_eq!(no_logs(p.on(Event::Upgrade)), vec![]);
        assert_eq!(p.on(Event::Released(1)), vec![Action::Spawn]);
        p.spawned(2);
        // Both serve until the new one is ready; only then the old stops.
        assert_eq!(p.workers(), vec![1, 2]);
        assert_eq!(
            no_logs(p.on(Event::Ready(2))),
            vec![Action::Terminate(1), Action::Sweep(2)]
        );
        // The old one draining out is no crash.
        assert_eq!(p.on(exited(1, 0, 60)), vec![]);
        assert_eq!(p.workers(), vec![2]);
        // And the next upgrade works the same way.
        assert_eq!(no_logs(p.on(Event::Upgrade)), vec![Action::HandOff(2)]);
    }

    #[test]
    fn a_crash_restarts_at_once_then_backs_off() {
        let mut p = Plan::started(1);
        p.on(Event::Ready(1));
        assert_eq!(no_logs(p.on(exited(1, 137, 1))), vec![Action::Spawn]);
        p.spawned(2);
        p.on(Event::Ready(2));
        assert_eq!(
            no_logs(p.on(exited(2, 137, 1))),
            vec![Action::SpawnAfter(Duration::from_millis(100))]
        );
        // SIGHUP while a restart is pending is ignored, not queued.
        assert_eq!(no_logs(p.on(Event::Upgrade)), vec![]);
        assert_eq!(p.on(Event::RestartDue), vec![Action::Spawn]);
        p.spawned(3);
        // A worker that crashes before it is ready is restarted too.
        assert_eq!(
            no_logs(p.on(exited(3, 1, 1))),
            vec![Action::SpawnAfter(Duration::from_millis(200))]
        );
        p.on(Event::RestartDue);
        p.spawned(4);
        p.on(Event::Ready(4));
        // One that lived long resets the backoff.
        assert_eq!(no_logs(p.on(exited(4, 137, 3600))), vec![Action::Spawn]);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn first_start_failure_and_bad_config_end_the_keeper() {
        let mut p = Plan::started(1);
        assert_eq!(p.on(exited(1, 1, 0)), vec![Action::Exit(1)]);
        let mut p = Plan::started(1);
        p.on(Event::Ready(1));
        assert_eq!(
            no_logs(p.on(exited(1, EXIT_CONFIG, 5))),
            vec![Action::Exit(64)]
        );
        // A new binary that refuses the config during an upgrade: the old
        // worker is stopped too, and the keeper exits 64.
        let mut p = Plan::started(1);
        p.on(Event::Ready(1));
        p.on(Event::Upgrade);
        p.on(Event::Released(1));
        p.spawned(2);
        assert_eq!(
            no_logs(p.on(exited(2, EXIT_CONFIG, 0))),
            vec![Action::Terminate(1)]
        );
        assert_eq!(p.on(exited(1, 0, 1)), vec![Action::Exit(64)]);
    }

    #[test]
    fn a_new_worker_that_crashes_during_an_upgrade_is_restarted_while_the_old_serves() {
        let mut p = Plan::started(1);
        p.on(Event::Ready(1));
        p.on(Event::Upgrade);
        p.on(Event::Released(1));
        p.spawned(2);
        assert_eq!(no_logs(p.on(exited(2, 139, 0))), vec![Action::Spawn]);
        p.spawned(3);
        assert_eq!(p.workers(), vec![1, 3]);
        assert_eq!(
            no_logs(p.on(Event::Ready(3))),
            vec![Action::Terminate(1), Action::Sweep(3)]
        );
    }

    #[test]
    fn stop_terminates_everyone_and_exits_with_the_serving_code() {
        let mut p = Plan::started(1);
        p.on(Event::Ready(1));
        p.on(Event::Upgrade);
        p.on(Event::Released(1));
        p.spawned(2);
        assert_eq!(
            p.on(Event::Stop),
            vec![Action::Terminate(1), Action::Terminate(2)]
        );
        assert_eq!(p.on(exited(2, 0, 1)), vec![]);
        assert_eq!(p.on(exited(1, 0, 1)), vec![Action::Exit(0)]);
        let mut p = Plan::started(1);
        p.on(Event::Ready(1));
        p.on(Event::Stop);
        assert_eq!(p.on(exited(1, 3, 1)), vec![Action::Exit(3)]);
        // No restart after a stop.
        assert_eq!(p.on(Event::RestartDue), vec![]);
    }

    #[test]
    fn an_adopted_orphan_is_handed_off_then_stopped_once_the_new_worker_is_ready() {
        let mut p = Plan::adopting(50);
        // Nothing is spawned before the orphan has said it serves.
        assert_eq!(p.workers(), vec![50]);
        assert_eq!(no_logs(p.on(Event::Upgrade)), vec![]);
        assert_eq!(
            no_logs(p.on(Event::Ready(50))),
            vec![Action::Sweep(50), Action::HandOff(50)]
        );
        assert_eq!(p.on(Event::Released(50)), vec![Action::Spawn]);
        p.spawned(2);
        assert_eq!(p.workers(), vec![2, 50]);
        assert_eq!(
            no_logs(p.on(Event::Ready(2))),
            vec![Action::Terminate(50), Action::Sweep(2)]
        );
        // Its exit (its socket closing) is no crash.
        assert_eq!(p.on(exited(50, 0, 5)), vec![]);
        assert_eq!(p.workers(), vec![2]);
        // From here the keeper runs as after any start: a crash restarts.
        assert_eq!(no_logs(p.on(exited(2, 137, 60))), vec![Action::Spawn]);
    }

    #[test]
    fn an_orphan_that_leaves_before_adoption_gives_way_to_a_fresh_worker() {
        let mut p = Plan::adopting(50);
        assert_eq!(no_logs(p.on(exited(50, 0, 0))), vec![Action::Spawn]);
        p.spawned(2);
        // That worker's own first start failing still ends the keeper.
        assert_eq!(p.on(exited(2, 1, 0)), vec![Action::Exit(1)]);
        // An orphan that dies while handing off: start the new one now.
        let mut p = Plan::adopting(50);
        p.on(Event::Ready(50));
        assert_eq!(no_logs(p.on(exited(50, 137, 1))), vec![Action::Spawn]);
        // A stop during adoption stops the orphan, and then the keeper.
        let mut p = Plan::adopting(50);
        assert_eq!(p.on(Event::Stop), vec![Action::Terminate(50)]);
        assert_eq!(p.on(exited(50, 0, 1)), vec![Action::Exit(0)]);
        let mut p = Plan::adopting(50);
        p.on(Event::Stop);
        assert_eq!(
            no_logs(p.on(Event::Ready(50))),
            vec![Action::Sweep(50), Action::Terminate(50)]
        );
    }

    #[test]
    fn probe_and_keeper_gone_decide_as_documented() {
        assert_eq!(probe(Connect::NoFile, 0), Probe::Absent);
        assert_eq!(probe(Connect::Refused, 0), Probe::Stale);
        assert_eq!(probe(Connect::Peer { pid: 7, uid: 0 }, 0), Probe::Adopt(7));
        assert_eq!(
            probe(Connect::Peer { pid: 7, uid: 1000 }, 0),
            Probe::Foreign { uid: 1000 }
        );
        assert_eq!(keeper_gone(true, true), Orphaned::Stopping);
        assert_eq!(keeper_gone(true, false), Orphaned::Stopping);
        assert_eq!(keeper_gone(false, true), Orphaned::Drain);
        assert_eq!(keeper_gone(false, false), Orphaned::Serve);
    }

    #[test]
    fn holdings_keep_what_the_ready_worker_claimed_and_nothing_else() {
        let k = |p: u16| (Proto::Tcp, format!("127.0.0.1:{p}").parse().unwrap());
        let mut h = Holdings::default();
        assert!(h.hold(1, k(1), "a").is_none());
        h.hold(1, k(2), "b");
        h.hold(1, k(3), "c");
        // Worker 2 (after a crash of 1) claims two; the third's service
        // went while no worker ran.
        assert_eq!(h.get(2, &k(1)), Some(&"a"));
        assert_eq!(h.get(2, &k(2)), Some(&"b"));
        assert_eq!(h.get(2, &k(9)), None);
        assert_eq!(h.sweep(2), vec![(k(3), "c")]);
        assert_eq!(h.len(), 2);
        // A released socket goes at once.
        assert_eq!(h.release(&k(1)), Some("a"));
        assert_eq!(h.release(&k(1)), None);
        // Worker 3 claims nothing held by 2 alone: swept on its ready.
        h.hold(3, k(4), "d");
        assert_eq!(h.sweep(3), vec![(k(2), "b")]);
        // A second hold of one key returns the older socket to close.
        assert_eq!(h.hold(3, k(4), "e"), Some("d"));
    }
}
