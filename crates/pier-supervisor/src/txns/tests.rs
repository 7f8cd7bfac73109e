use super::*;

use pier_model::{Namespace, Pod, PodTemplate, Rollout, RolloutState};
use pier_store::Revision;

use crate::plan::DeleteReason;

fn n(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn set(name: &str) -> ObjectKey {
    (Namespace::default(), n(name))
}

fn create(set: &str, pod: &str, node: &str) -> Action {
    Action::Create(Box::new(Pod {
        name: n(pod),
        namespace: Namespace::default(),
        replicaset: n(set),
        node: n(node),
        template_hash: String::new(),
        template: PodTemplate::default(),
        created_at: 0,
    }))
}

fn delete(pod: &str, node: &str) -> Action {
    Action::Delete {
        pod: (Namespace::default(), n(pod)),
        node: n(node),
        reason: DeleteReason::NodeLost,
    }
}

fn fence() -> Compare {
    Compare::ModRevision(keys::election(&n("supervisor")), 7 as Revision)
}

fn pod_key(pod: &str) -> String {
    keys::pod(&Namespace::default(), &n(pod))
}

fn rollout() -> RolloutWrite {
    RolloutWrite::Put(Rollout {
        revision: 1,
        hash: String::new(),
        target: 1,
        from: None,
        state: RolloutState::Complete,
        message: String::new(),
        failures: 0,
        steps: 0,
        step_done_at: None,
        started_at: 0,
        finished_at: None,
        set_created_at: 0,
    })
}

#[test]
fn a_replacement_is_guarded_by_pod_absent_set_and_node_present() {
    let parts = set_parts(
        &set("web"),
        &[delete("web-old00", "lost"), create("web", "web-new00", "a")],
        None,
    );
    assert_eq!(parts.len(), 1);
    assert_eq!(
        parts[0].compares,
        vec![
            Compare::Absent(pod_key("web-new00")),
            Compare::Exists(keys::replicaset(&Namespace::default(), &n("web"))),
            Compare::Exists(keys::node(&n("a"))),
        ]
    );
    assert_eq!(parts[0].ops.len(), 2);
    assert_eq!(
        parts[0].ops[0],
        TxnOp::Delete {
            key: pod_key("web-old00")
        }
    );
    assert!(
        matches!(&parts[0].ops[1], TxnOp::Put { key, lease: None, .. } if *key == pod_key("web-new00"))
    );
}

#[test]
fn a_big_set_is_split_with_its_rollout_record_in_the_first_part() {
    let actions: Vec<Action> = (0..120)
        .map(|i| create("web", &format!("web-{i:05}"), "a"))
        .collect();
    let parts = set_parts(&set("web"), &actions, Some(&rollout()));
    assert_eq!(parts.len(), 3);
    assert_eq!(
        parts.iter().map(|p| p.ops.len()).collect::<Vec<_>>(),
        vec![51, 50, 20]
    );
    let rollout_key = keys::rollout(&Namespace::default(), &n("web"));
    assert!(matches!(&parts[0].ops[0], TxnOp::Put { key, .. } if *key == rollout_key));
    for p in &parts {
        // Absent per pod, the set, the node: within etcd's limit.
        assert!(p.compares.len() <= SET_CHUNK + 2, "{}", p.compares.len());
        assert_eq!(
            p.compares
                .iter()
                .filter(
                    |c| **c == Compare::Exists(keys::replicaset(&Namespace::default(), &n("web")))
                )
                .count(),
            1
        );
    }
}

#[test]
fn many_sets_share_transactions_within_etcds_limits() {
    // 100 sets each replacing one pod of a lost node on one of 3 nodes.
    let parts: Vec<(usize, Part)> = (0..100)
        .map(|i| {
            let s = format!("s{i:03}");
            let mut p = set_parts(
                &set(&s),
                &[
                    delete(&format!("{s}-old00"), "lost"),
                    create(&s, &format!("{s}-new00"), ["a", "b", "c"][i % 3]),
                ],
                None,
            );
            (i, p.remove(0))
        })
        .collect();
    let all_ops: Vec<TxnOp> = parts.iter().flat_map(|(_, p)| p.ops.clone()).collect();
    let packed = pack(&fence(), parts, MAX_TXN_OPS);
    // Each set: 2 compares (pod absent, set present) and 2 writes; the 3
    // node compares and the fence are shared: 62 sets fill the first
    // transaction (128 compares, 124 writes).
    assert_eq!(
        packed.iter().map(|p| p.sets.len()).collect::<Vec<_>>(),
        vec![62, 38]
    );
    let mut ids = Vec::new();
    let mut ops = Vec::new();
    for p in &packed {
        assert_eq!(p.txn.compares[0], fence());
        assert!(p.txn.compares.len() <= MAX_TXN_OPS);
        assert!(p.txn.success.len() <= MAX_TXN_OPS);
        assert!(p.txn.failure.is_empty());
        let node_keys: Vec<String> = ["a", "b", "c"].iter().map(|x| keys::node(&n(x))).collect();
        let node_compares = p
            .txn
            .compares
            .iter()
            .filter(|c| matches!(c, Compare::Exists(k) if node_keys.contains(k)))
            .count();
        assert_eq!(node_compares, 3, "one compare per node, not per set");
        ids.extend(p.sets.iter().copied());
        ops.extend(p.txn.success.iter().cloned());
    }
    // Every set once, in order, its writes together.
    assert_eq!(ids, (0..100).collect::<Vec<_>>());
    assert_eq!(ops, all_ops);
}

#[test]
fn a_key_written_twice_goes_in_another_transaction() {
    let a = Part {
        compares: vec![],
        ops: vec![TxnOp::Delete {
            key: pod_key("x-00000"),
        }],
    };
    let packed = pack(
        &fence(),
        vec![(0, a.clone()), (1, a.clone()), (2, a)],
        MAX_TXN_OPS,
    );
    assert_eq!(
        packed.iter().map(|p| p.sets.clone()).collect::<Vec<_>>(),
        vec![vec![0], vec![1], vec![2]]
    );
}

#[test]
fn a_part_too_big_for_one_transaction_gets_its_own() {
    let small = Part {
        compares: vec![Compare::Exists("k".into())],
        ops: vec![TxnOp::Delete { key: "d".into() }],
    };
    let big = Part {
        compares: (0..200).map(|i| Compare::Absent(format!("p{i}"))).collect(),
        ops: vec![TxnOp::Delete { key: "e".into() }],
    };
    let packed = pack(
        &fence(),
        vec![(0, small.clone()), (1, big), (2, small.clone())],
        MAX_TXN_OPS,
    );
    assert_eq!(
        packed.iter().map(|p| p.sets.clone()).collect::<Vec<_>>(),
        vec![vec![0], vec![1], vec![2]]
    );
    // The third holds its compare again: it is in a transaction of its own.
    assert_eq!(
        packed[2].txn.compares,
        vec![fence(), Compare::Exists("k".into())]
    );
}

#[test]
fn a_problem_report_lives_under_the_election_lease() {
    let key = set("web");
    let p = ReplicaSetProblem {
        message: "cannot place 1 of 2 replicas".into(),
        reported_by: n("h1"),
    };
    let put = problem_part(&key, Some(&p), LeaseId(42));
    assert!(put.compares.is_empty());
    assert!(
        matches!(&put.ops[..], [TxnOp::Put { key: k, lease: Some(LeaseId(42)), .. }] if *k == keys::problem(&key.0, &key.1))
    );
    let del = problem_part(&key, None, LeaseId(42));
    assert_eq!(
        del.ops,
        vec![TxnOp::Delete {
            key: keys::problem(&key.0, &key.1)
        }]
    );
}
