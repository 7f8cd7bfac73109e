//! Small parsers Compose needs: Go durations, shell-like splitting, byte
//! sizes and `.env` files.

/// A Go duration (`1m30s`, `500ms`, `1.5s`, `2h`) in milliseconds, as
/// Compose writes `interval`, `delay` and the like. A bare number is
/// refused: Compose requires a unit.
pub fn duration_ms(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("is empty; write a duration such as 30s or 1m30s".into());
    }
    if t == "0" {
        return Ok(0);
    }
    let mut total = 0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!(
                "{t:?} is not a duration; write one such as 30s, 1m30s or 500ms"
            ));
        }
        let n: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("{t:?} is not a duration: bad number"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_len] {
            "ns" => 1e-6,
            "us" | "µs" => 1e-3,
            "ms" => 1.0,
            "s" => 1e3,
            "m" => 60e3,
            "h" => 3600e3,
            "" => {
                return Err(format!(
                    "{t:?} has no unit; write e.g. {t}s (units: ns, us, ms, s, m, h)"
                ));
            }
            u => {
                return Err(format!(
                    "{t:?}: unknown unit {u:?}; use ns, us, ms, s, m or h"
                ));
            }
        };
        total += n * mult;
        rest = &rest[unit_len..];
    }
    if !total.is_finite() || total > 1e15 {
        return Err(format!("{t:?} is too long"));
    }
    Ok(total.round() as u64)
}

/// Split a command string as Compose does (POSIX shell words: single and
/// double quotes, backslash escapes; no expansion).
pub fn shell_split(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(format!("{s:?} has an unclosed single quote")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err(format!("{s:?} ends inside a double quote")),
                        },
                        Some(c) => cur.push(c),
                        None => return Err(format!("{s:?} has an unclosed double quote")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => cur.push(c),
                    None => return Err(format!("{s:?} ends with a backslash")),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// A Compose byte size (`512m`, `1g`, `1gb`, `2048k`, `100000000`) in MiB,
/// rounded up.
pub fn size_mb(s: &str) -> Result<u32, String> {
    let t = s.trim().to_ascii_lowercase();
    let num_len = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let n: f64 = t[..num_len]
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write one such as 512M or 1G"))?;
    let mult = match t[num_len..].trim() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        u => return Err(format!("{s:?}: unknown unit {u:?}; use b, k, m or g")),
    };
    let mb = (n * mult / (1024.0 * 1024.0)).ceil();
    if !(0.0..=u32::MAX as f64).contains(&mb) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(mb as u32)
}

/// Parse a `.env` / `env_file` text: `KEY=VALUE` lines, `#` comments,
/// blank lines, an optional `export `, values optionally quoted. A line
/// with a bare `KEY` takes the value from `lookup`, or is skipped.
pub fn env_file(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let (k, v) = match line.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (line, None),
        };
        if k.is_empty() || k.contains(char::is_whitespace) {
            return Err(format!(
                "line {}: {:?} is not KEY=VALUE",
                i + 1,
                raw.chars().take(60).collect::<String>()
            ));
        }
        let v = match v {
            None => match lookup(k) {
                Some(v) => v,
                None => continue,
            },
            Some(v) => {
                if v.len() >= 2
                    && ((v.starts_with('"') && v.ends_with('"'))
                        || (v.starts_with('\'') && v.ends_with('\'')))
                {
                    v[1..v.len() - 1].to_owned()
                } else {
                    // An unquoted value ends at an inline comment.
                    match v.find(" #") {
                        Some(at) => v[..at].trim_end().to_owned(),
                        None => v.to_owned(),
                    }
                }
            }
        };
        out.push((k.to_owned(), v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration_ms("1m30s"), Ok(90_000));
        assert_eq!(duration_ms("500ms"), Ok(500));
        assert_eq!(duration_ms("1.5s"), Ok(1500));
        assert_eq!(duration_ms("2h"), Ok(7_200_000));
        assert_eq!(duration_ms("0"), Ok(0));
        assert_eq!(duration_ms("1h1m1s1ms"), Ok(3_661_001));
        assert!(duration_ms("30").unwrap_err().contains("no unit"));
        assert!(duration_ms("3d").unwrap_err().contains("unknown unit"));
        assert!(duration_ms("s").is_err());
    }

    #[test]
    fn splitting() {
        assert_eq!(
            shell_split(r#"sh -c "echo 'a b' \"c\"" d\ e"#).unwrap(),
            vec!["sh", "-c", "echo 'a b' \"c\"", "d e"]
        );
        assert_eq!(shell_split("  a   b ").unwrap(), vec!["a", "b"]);
        assert_eq!(shell_split("''").unwrap(), vec![""]);
        assert!(shell_split("a 'b").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(size_mb("512M"), Ok(512));
        assert_eq!(size_mb("1g"), Ok(1024));
        assert_eq!(size_mb("1gb"), Ok(1024));
        assert_eq!(size_mb("2048k"), Ok(2));
        assert_eq!(size_mb("1048577"), Ok(2));
        assert!(size_mb("1t").is_err());
    }

    #[test]
    fn env_files() {
        let look = |k: &str| (k == "HOME").then(|| "/root".to_owned());
        let v = env_file(
            "# c\n\nA=1\nexport B = two words \nC=\"q # not comment\"\nD=x # comment\nHOME\nNOPE\n",
            &look,
        )
        .unwrap();
        assert_eq!(
            v,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "two words".into()),
                ("C".into(), "q # not comment".into()),
                ("D".into(), "x".into()),
                ("HOME".into(), "/root".into()),
            ]
        );
        assert!(env_file("A B=1", &look).unwrap_err().contains("line 1"));
    }
}
