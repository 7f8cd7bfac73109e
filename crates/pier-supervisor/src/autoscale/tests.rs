//! Table tests of [`decide`].

use super::*;
use pier_model::Name;

const NOW: u64 = 1_800_000_000_000;

fn sla() -> Sla {
    Sla {
        max_active_per_pod: Some(5),
        scale_down_window_ms: 30_000,
        ..Default::default()
    }
}

fn m(active: u64) -> Measurement {
    Measurement {
        active,
        nodes: 1,
        ..Default::default()
    }
}

struct Case {
    name: &'static str,
    current: u32,
    ready: u32,
    sla: Sla,
    measured: Option<Measurement>,
    stale: bool,
    watching_ms: u64,
    history: Vec<Recommendation>,
    want: u32,
    reason_has: &'static str,
}

fn case(name: &'static str, current: u32, measured: Option<Measurement>, want: u32) -> Case {
    Case {
        name,
        current,
        ready: current,
        sla: sla(),
        measured,
        stale: false,
        watching_ms: 3_600_000,
        history: vec![],
        want,
        reason_has: "",
    }
}

fn run(c: &Case) -> Decision {
    decide(&Input {
        now_ms: NOW,
        current: c.current,
        ready: c.ready,
        min: 1,
        max: 4,
        sla: &c.sla,
        measured: c.measured.as_ref(),
        snapshot_stale: c.stale,
        watching_since_ms: NOW - c.watching_ms,
        history: &c.history,
    })
}

#[test]
fn decisions_table() {
    let stale_node = Measurement {
        stale_nodes: vec![Name::new("h2").unwrap()],
        ..m(0)
    };
    let latency = |p99_ms: u64| Measurement {
        p99_first_byte_us: Some(p99_ms * 1000),
        first_byte_samples: 500,
        nodes: 2,
        ..Default::default()
    };
    let lat_sla = Sla {
        p99_first_byte_ms: Some(50),
        ..sla()
    };
    let rate_sla = Sla {
        max_conn_rate_per_pod: Some(100),
        max_active_per_pod: None,
        ..sla()
    };
    let cases = vec![
        Case {
            reason_has: "open connections 16 over 1 ready pod (target 5 connections per pod) → 4",
            ..case("16 conns at 5 per pod: 4 pods at once", 1, Some(m(16)), 4)
        },
        case("30 conns: capped at max 4", 1, Some(m(30)), 4),
        case("exactly at target: stays", 2, Some(m(10)), 2),
        Case {
            reason_has: "hold",
            ..case("within the 10% tolerance: stays", 2, Some(m(11)), 2)
        },
        case("just past tolerance: up", 2, Some(m(12)), 3),
        Case {
            reason_has: "down 4 → 1",
            ..case("idle for the whole window: down to min", 4, Some(m(0)), 1)
        },
        Case {
            history: vec![(NOW - 20_000, 4), (NOW - 10_000, 4)],
            reason_has: "stabilizing",
            ..case(
                "idle, but 4 recommended within the window: stays",
                4,
                Some(m(0)),
                4,
            )
        },
        Case {
            history: vec![(NOW - 40_000, 4), (NOW - 20_000, 2)],
            ..case("highest of the window is 2: down to 2", 4, Some(m(0)), 2)
        },
        Case {
            reason_has: "no service selects",
            ..case("no service: never down", 4, None, 4)
        },
        case("no service, below min: up to min", 0, None, 1),
        case("above max: down to max", 6, Some(m(30)), 4),
        Case {
            reason_has: "stale stats from h2",
            ..case("a stale node: never down", 4, Some(stale_node.clone()), 4)
        },
        Case {
            reason_has: "",
            ..case(
                "a stale node does not stop a scale-up",
                1,
                Some(Measurement {
                    active: 16,
                    ..stale_node
                }),
                4,
            )
        },
        Case {
            stale: true,
            reason_has: "store is unreachable",
            ..case("stale snapshot: never down", 3, Some(m(0)), 3)
        },
        Case {
            ready: 2,
            reason_has: "2 of 4 pods ready",
            ..case("pods not ready yet: never down", 4, Some(m(0)), 4)
        },
        Case {
            ready: 0,
            ..case(
                "nothing ready yet, load arrives: up on the sum",
                1,
                Some(m(16)),
                4,
            )
        },
        Case {
            watching_ms: 5_000,
            reason_has: "not watched a whole scale-down window",
            ..case(
                "a new leader waits a whole window before going down",
                4,
                Some(m(0)),
                4,
            )
        },
        Case {
            sla: Sla {
                max_step: 1,
                ..sla()
            },
            ..case("max step 1", 1, Some(m(16)), 2)
        },
        Case {
            sla: Sla {
                scale_up_window_ms: 10_000,
                ..sla()
            },
            history: vec![(NOW - 5_000, 1)],
            ..case(
                "a scale-up window: a spike alone does not scale up",
                1,
                Some(m(16)),
                1,
            )
        },
        Case {
            sla: Sla {
                scale_up_window_ms: 10_000,
                ..sla()
            },
            history: vec![(NOW - 15_000, 1), (NOW - 8_000, 3), (NOW - 4_000, 4)],
            ..case(
                "a sustained breach scales up to the window's lowest",
                1,
                Some(m(16)),
                3,
            )
        },
        Case {
            sla: lat_sla.clone(),
            measured: Some(Measurement {
                active: 2,
                ..latency(100)
            }),
            reason_has: "p99 first byte 100 ms",
            ..case("p99 twice the target on 2 pods: 4", 2, None, 4)
        },
        Case {
            sla: lat_sla.clone(),
            measured: Some(latency(52)),
            ..case("p99 within tolerance: stays", 2, None, 2)
        },
        Case {
            sla: lat_sla,
            measured: Some(Measurement {
                active: 1,
                ..latency(10)
            }),
            ..case("p99 far under target, no other load: down", 3, None, 1)
        },
        Case {
            sla: rate_sla,
            measured: Some(Measurement {
                conn_rate: 250.0,
                nodes: 2,
                ..Default::default()
            }),
            reason_has: "new connections/s 250",
            ..case("250 conn/s at 100 per pod: 3", 1, None, 3)
        },
    ];
    let mut failed = vec![];
    for c in &cases {
        let d = run(c);
        if d.desired != c.want || !d.reason.contains(c.reason_has) {
            failed.push(format!(
                "{}: got {} ({:?}), want {} with {:?}",
                c.name, d.desired, d.reason, c.want, c.reason_has
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// A load that rises, holds and falls, one decision per second, with the
/// history kept as the loop keeps it: one decision up, one down, none in
/// between (no flapping), and the way down only after the window.
#[test]
fn a_burst_scales_up_once_and_down_once_after_the_window() {
    let s = Sla {
        scale_down_window_ms: 10_000,
        ..sla()
    };
    let mut current = 1;
    let mut history: Vec<Recommendation> = vec![];
    let mut changes = vec![];
    for sec in 0..60u64 {
        let now = NOW + sec * 1000;
        // 16 connections from second 5 to 20, with noise of ±1.
        let active = if (5..20).contains(&sec) {
            15 + sec % 3
        } else {
            sec % 2
        };
        let meas = m(active);
        let d = decide(&Input {
            now_ms: now,
            current,
            ready: current,
            min: 1,
            max: 4,
            sla: &s,
            measured: Some(&meas),
            snapshot_stale: false,
            watching_since_ms: NOW - 3_600_000,
            history: &history,
        });
        history.push((now, d.recommendation));
        if d.desired != current {
            changes.push((sec, current, d.desired));
            current = d.desired;
        }
    }
    assert_eq!(changes, vec![(5, 1, 4), (29, 4, 1)], "{changes:?}");
}
