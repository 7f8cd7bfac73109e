//! Reading the files: parse each, interpolate `${VARS}`, bring the list forms
//! of maps to one shape, and merge them in order (as `docker compose -f a -f b`).

use std::collections::BTreeMap;

use crate::interp;
use crate::{Ctx, Options, Source, dedup, key_str, scalar};
use serde_yaml_ng::{Mapping, Value};

pub(crate) fn merge_sources(sources: &[Source], opts: &Options, cx: &mut Ctx) -> Option<Mapping> {
    if sources.is_empty() {
        cx.err("-f", "no Compose file given");
        return None;
    }
    let mut merged: Option<Mapping> = None;
    for src in sources {
        let v: Value = match serde_yaml_ng::from_str(&src.text) {
            Ok(v) => v,
            Err(e) => {
                cx.err(&src.name, format!("not valid YAML: {e}"));
                continue;
            }
        };
        let Value::Mapping(mut m) = v else {
            cx.err(
                &src.name,
                "a Compose file is a mapping with a services: key at the top",
            );
            continue;
        };
        let mut notes = interp::Notes::default();
        for (k, v) in m.iter_mut() {
            let key = key_str(k);
            // x- keys hold YAML anchors' sources and tools' settings;
            // Compose interpolates them too, but they are not ours.
            if !key.starts_with("x-") {
                interp_value(v, &key, &opts.env, &mut notes, cx);
            }
        }
        for name in dedup(notes.unset) {
            cx.warn(
                &src.name,
                format!("variable {name} is not set; it is replaced by an empty string"),
            );
        }
        normalize(&mut m, cx);
        merged = Some(match merged {
            None => m,
            Some(base) => merge_map(base, m, ""),
        });
    }
    merged
}

pub(crate) fn interp_value(
    v: &mut Value,
    path: &str,
    env: &BTreeMap<String, String>,
    notes: &mut interp::Notes,
    cx: &mut Ctx,
) {
    match v {
        Value::String(s) => match interp::interpolate(s, env, notes) {
            Ok(n) => *s = n,
            Err(e) => cx.err(path, e),
        },
        Value::Sequence(items) => {
            for (i, it) in items.iter_mut().enumerate() {
                interp_value(it, &format!("{path}[{i}]"), env, notes, cx);
            }
        }
        Value::Mapping(m) => {
            for (k, it) in m.iter_mut() {
                let p = format!("{path}.{}", key_str(k));
                interp_value(it, &p, env, notes, cx);
            }
        }
        Value::Tagged(t) => interp_value(&mut t.value, path, env, notes, cx),
        _ => {}
    }
}

/// List forms of `environment`, `labels` and `deploy.labels` become maps,
/// so that files merge key by key.
pub(crate) fn normalize(top: &mut Mapping, cx: &mut Ctx) {
    let Some(Value::Mapping(services)) = top.get_mut("services") else {
        return;
    };
    for (name, svc) in services.iter_mut() {
        let Value::Mapping(svc) = svc else { continue };
        let base = format!("services.{}", key_str(name));
        for key in ["environment", "labels"] {
            if let Some(v) = svc.get_mut(key) {
                list_to_map(v, &format!("{base}.{key}"), cx);
            }
        }
        if let Some(Value::Mapping(d)) = svc.get_mut("deploy")
            && let Some(v) = d.get_mut("labels")
        {
            list_to_map(v, &format!("{base}.deploy.labels"), cx);
        }
    }
}

pub(crate) fn list_to_map(v: &mut Value, path: &str, cx: &mut Ctx) {
    let Value::Sequence(items) = v else { return };
    let mut m = Mapping::new();
    for (i, it) in items.iter().enumerate() {
        let Some(s) = scalar(it) else {
            cx.err(format!("{path}[{i}]"), "write KEY=VALUE as a string");
            continue;
        };
        match s.split_once('=') {
            Some((k, val)) => m.insert(Value::String(k.into()), Value::String(val.into())),
            None => m.insert(Value::String(s), Value::Null),
        };
    }
    *v = Value::Mapping(m);
}

/// Compose's merge: mappings key by key, `ports`, `expose` and `env_file`
/// appended, everything else replaced by the later file.
pub(crate) fn merge_map(mut base: Mapping, over: Mapping, path: &str) -> Mapping {
    for (k, v) in over {
        let key = key_str(&k);
        let p = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        let in_service = p.starts_with("services.") && p.matches('.').count() == 2;
        let merged = match (base.remove(&k), v) {
            (Some(Value::Mapping(a)), Value::Mapping(b)) => Value::Mapping(merge_map(a, b, &p)),
            (Some(Value::Sequence(mut a)), Value::Sequence(b))
                if in_service && matches!(key.as_str(), "ports" | "expose" | "env_file") =>
            {
                for it in b {
                    if !a.contains(&it) {
                        a.push(it);
                    }
                }
                Value::Sequence(a)
            }
            (_, v) => v,
        };
        base.insert(k, merged);
    }
    base
}
