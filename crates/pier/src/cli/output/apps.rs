//! What an apply did, and `pier get apps`.

use pier_model::app::{AppPlan, AppView, ChangeAction};

fn sign(a: ChangeAction) -> &'static str {
    match a {
        ChangeAction::Create => "created",
        ChangeAction::Update => "configured",
        ChangeAction::Delete => "deleted",
        ChangeAction::Unchanged => "unchanged",
    }
}

pub(in crate::cli) fn print_app_plan(p: &AppPlan, dry: bool) {
    for c in &p.changes {
        if c.kind == "app" {
            continue;
        }
        let fields = if c.fields.is_empty() {
            String::new()
        } else {
            format!(" ({})", c.fields.join(", "))
        };
        if dry {
            let mark = match c.action {
                ChangeAction::Create => "+",
                ChangeAction::Update => "~",
                ChangeAction::Delete => "-",
                ChangeAction::Unchanged => "=",
            };
            outln!("{mark} {}/{}{fields}", c.kind, c.name);
        } else {
            outln!("{}/{} {}{fields}", c.kind, c.name, sign(c.action));
        }
    }
}

/// `pier get apps` as a table.
pub(in crate::cli) fn apps_table(apps: &[AppView], wide: bool) -> String {
    let mut rows = vec![vec![
        "NAMESPACE".to_owned(),
        "APP".into(),
        "READY".into(),
        "SERVICES".into(),
        "REVISION".into(),
    ]];
    if wide {
        rows[0].push("PORTS".into());
    }
    for a in apps {
        let svcs: Vec<String> = a
            .services
            .iter()
            .map(|s| format!("{} {}/{}", s.name, s.ready, s.desired))
            .collect();
        let mut r = vec![
            a.namespace.to_string(),
            a.name.to_string(),
            if a.ready { "yes".into() } else { "no".into() },
            svcs.join(", "),
            a.revision.to_string(),
        ];
        if wide {
            let ports: Vec<String> = a
                .services
                .iter()
                .flat_map(|s| s.ports.iter().map(move |p| format!("{}={p}", s.name)))
                .collect();
            r.push(ports.join(", "));
        }
        rows.push(r);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}
