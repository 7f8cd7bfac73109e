//! Variable interpolation, as Compose does it in values (never in keys):
//! `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`,
//! `${VAR?error}`, `${VAR:+alt}`, `${VAR+alt}`, and `$$` for a `$`.

use std::collections::BTreeMap;

/// What interpolation found besides the result.
#[derive(Debug, Default)]
pub struct Notes {
    /// Variables used with no value and no default (Compose warns too).
    pub unset: Vec<String>,
}

/// Interpolate `s`. `Err` holds the message for a `${VAR:?msg}` whose
/// variable is unset, or for a malformed reference.
pub fn interpolate(
    s: &str,
    env: &BTreeMap<String, String>,
    notes: &mut Notes,
) -> Result<String, String> {
    if !s.contains('$') {
        return Ok(s.to_owned());
    }
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < s.len() {
        let c = b[i];
        if c != b'$' {
            let ch = s[i..].chars().next().expect("in bounds");
            out.push(ch);
            i += ch.len_utf8();
            continue;
        }
        match b.get(i + 1) {
            Some(b'$') => {
                out.push('$');
                i += 2;
            }
            Some(b'{') => {
                let start = i + 2;
                let mut depth = 1;
                let mut j = start;
                while j < s.len() {
                    match b[j] {
                        b'{' => depth += 1,
                        b'}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                if j >= s.len() {
                    return Err(format!(
                        "{s:?} has an unclosed ${{; write $$ for a literal $"
                    ));
                }
                out.push_str(&braced(&s[start..j], env, notes)?);
                i = j + 1;
            }
            Some(c) if c.is_ascii_alphabetic() || *c == b'_' => {
                let start = i + 1;
                let mut j = start;
                while j < s.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                let name = &s[start..j];
                match env.get(name) {
                    Some(v) => out.push_str(v),
                    None => notes.unset.push(name.to_owned()),
                }
                i = j;
            }
            _ => {
                return Err(format!(
                    "{s:?} has a $ that starts no variable; write $$ for a literal $"
                ));
            }
        }
    }
    Ok(out)
}

fn braced(
    inner: &str,
    env: &BTreeMap<String, String>,
    notes: &mut Notes,
) -> Result<String, String> {
    let name_len = inner
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(inner.len());
    let name = &inner[..name_len];
    if name.is_empty() || name.as_bytes()[0].is_ascii_digit() {
        return Err(format!("${{{inner}}} does not start with a variable name"));
    }
    let op = &inner[name_len..];
    let val = env.get(name);
    let set_nonempty = val.is_some_and(|v| !v.is_empty());
    let (kind, arg) = if let Some(a) = op.strip_prefix(":-") {
        (":-", a)
    } else if let Some(a) = op.strip_prefix(":?") {
        (":?", a)
    } else if let Some(a) = op.strip_prefix(":+") {
        (":+", a)
    } else if let Some(a) = op.strip_prefix('-') {
        ("-", a)
    } else if let Some(a) = op.strip_prefix('?') {
        ("?", a)
    } else if let Some(a) = op.strip_prefix('+') {
        ("+", a)
    } else if op.is_empty() {
        ("", "")
    } else {
        return Err(format!(
            "${{{inner}}}: unknown operator {op:?}; Compose knows :-, -, :?, ?, :+ and +"
        ));
    };
    let mut arg = || interpolate(arg, env, notes);
    Ok(match kind {
        "" => match val {
            Some(v) => v.clone(),
            None => {
                notes.unset.push(name.to_owned());
                String::new()
            }
        },
        ":-" if set_nonempty => val.cloned().unwrap_or_default(),
        ":-" => arg()?,
        "-" => match val {
            Some(v) => v.clone(),
            None => arg()?,
        },
        ":?" if set_nonempty => val.cloned().unwrap_or_default(),
        "?" if val.is_some() => val.cloned().unwrap_or_default(),
        ":?" | "?" => {
            let msg = arg()?;
            return Err(format!(
                "required variable {name} is not set{}",
                if msg.is_empty() {
                    String::new()
                } else {
                    format!(": {msg}")
                }
            ));
        }
        ":+" if set_nonempty => arg()?,
        "+" if val.is_some() => arg()?,
        _ => String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &str) -> Result<String, String> {
        let mut env = BTreeMap::new();
        env.insert("TAG".to_owned(), "v2".to_owned());
        env.insert("EMPTY".to_owned(), String::new());
        interpolate(s, &env, &mut Notes::default())
    }

    #[test]
    fn forms() {
        assert_eq!(run("app:$TAG").unwrap(), "app:v2");
        assert_eq!(run("app:${TAG}-x").unwrap(), "app:v2-x");
        assert_eq!(run("${NOPE:-def}").unwrap(), "def");
        assert_eq!(run("${EMPTY:-def}").unwrap(), "def");
        assert_eq!(run("${EMPTY-def}").unwrap(), "");
        assert_eq!(run("${NOPE-${TAG}}").unwrap(), "v2");
        assert_eq!(run("${TAG:+yes}").unwrap(), "yes");
        assert_eq!(run("${NOPE:+yes}").unwrap(), "");
        assert_eq!(run("cost $$5").unwrap(), "cost $5");
        assert_eq!(run("${TAG:?need it}").unwrap(), "v2");
        let e = run("${NOPE:?set NOPE to the image tag}").unwrap_err();
        assert!(e.contains("NOPE") && e.contains("image tag"), "{e}");
        assert!(run("${TAG").unwrap_err().contains("unclosed"));
        assert!(run("a $ b").is_err());
        let mut n = Notes::default();
        interpolate("$NOPE ${ALSO}", &BTreeMap::new(), &mut n).unwrap();
        assert_eq!(n.unset, vec!["NOPE", "ALSO"]);
    }
}
