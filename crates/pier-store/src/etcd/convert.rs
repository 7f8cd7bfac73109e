//! Conversions between pier-store's types and etcd-client's: key-values,
//! transaction operations and compares, watch events, prefix ranges.

use etcd_client::{CompareOp, EventType, PutOptions};

use crate::{Compare, KeyValue, LeaseId, TxnOp, WatchEvent};

/// Keys under pier's prefixes are ASCII; a foreign non-UTF-8 key is kept
/// (lossily) so that the reflector logs and skips it rather than the watch
/// failing.
pub(crate) fn convert_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    }
}

/// The end of the range of keys starting with `prefix` (etcd's convention).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

pub(crate) fn convert_op(op: &TxnOp) -> etcd_client::TxnOp {
    match op {
        TxnOp::Put { key, value, lease } => etcd_client::TxnOp::put(
            key.as_str(),
            value.clone(),
            lease.map(|l| PutOptions::new().with_lease(l.0)),
        ),
        TxnOp::Delete { key } => etcd_client::TxnOp::delete(key.as_str(), None),
    }
}

pub(crate) fn convert_compare(c: &Compare) -> etcd_client::Compare {
    match c {
        Compare::ModRevision(k, rev) => {
            etcd_client::Compare::mod_revision(k.as_str(), CompareOp::Equal, *rev)
        }
        Compare::Absent(k) => {
            etcd_client::Compare::create_revision(k.as_str(), CompareOp::Equal, 0)
        }
        Compare::Exists(k) => {
            etcd_client::Compare::create_revision(k.as_str(), CompareOp::Greater, 0)
        }
    }
}

pub(crate) fn convert_events(resp: &etcd_client::WatchResponse) -> Vec<WatchEvent> {
    let mut out = Vec::with_capacity(resp.events().len());
    for ev in resp.events() {
        let Some(kv) = ev.kv() else { continue };
        let kv = convert_kv(kv);
        out.push(match ev.event_type() {
            EventType::Put => WatchEvent::Put(kv),
            EventType::Delete => WatchEvent::Delete {
                key: kv.key,
                mod_revision: kv.mod_revision,
            },
        });
    }
    out
}
