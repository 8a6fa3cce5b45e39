//! Reader for TorchServe's `config.properties`: Java properties syntax (`key=value`,
//! `key: value` or `key value`, `#`/`!` comments, backslash continuations and escapes) and
//! TorchServe's `$$VAR$$` substitution from the environment.

use std::collections::BTreeMap;
use std::path::Path;

/// Why a properties file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PropertiesError {
    #[error("could not read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}, line {line}: {message}")]
    Syntax {
        path: String,
        line: usize,
        message: String,
    },
}

/// The keys and values of one properties file, in key order.
pub type Properties = BTreeMap<String, String>;

/// Reads and parses a properties file, substituting `$$VAR$$` from the process environment.
pub fn read(path: &Path) -> Result<Properties, PropertiesError> {
    let text = std::fs::read_to_string(path).map_err(|source| PropertiesError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string(), |name| {
        std::env::var(name).ok()
    })
}

/// Parses properties text. `env` resolves `$$VAR$$` references; an unset one is an error,
/// as in TorchServe.
pub fn parse(
    text: &str,
    origin: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Properties, PropertiesError> {
    let mut out = Properties::new();
    let mut lines = text.lines().enumerate();
    while let Some((index, raw)) = lines.next() {
        let first_line = index + 1;
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('!') {
            continue;
        }
        // Join continuation lines: an odd number of trailing backslashes continues.
        let mut logical = trimmed.to_string();
        while ends_with_continuation(&logical) {
            logical.pop();
            match lines.next() {
                Some((_, next)) => logical.push_str(next.trim_start()),
                None => break,
            }
        }
        let (key, value) = split_key_value(&logical);
        let key = unescape(key).map_err(|message| PropertiesError::Syntax {
            path: origin.to_string(),
            line: first_line,
            message,
        })?;
        let value = unescape(value)
            .and_then(|v| substitute(&v, &env))
            .map_err(|message| PropertiesError::Syntax {
                path: origin.to_string(),
                line: first_line,
                message: format!("{key}: {message}"),
            })?;
        out.insert(key, value);
    }
    Ok(out)
}

fn ends_with_continuation(line: &str) -> bool {
    line.chars().rev().take_while(|c| *c == '\\').count() % 2 == 1
}

/// Splits at the first unescaped `=`, `:` or whitespace; separators around it are dropped.
fn split_key_value(line: &str) -> (&str, &str) {
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'=' | b':' | b' ' | b'\t' | b'\x0c' => break,
            _ => i += 1,
        }
    }
    let i = i.min(bytes.len());
    let key = &line[..i];
    let mut rest = line[i..].trim_start_matches([' ', '\t', '\x0c']);
    if let Some(r) = rest.strip_prefix(['=', ':']) {
        rest = r.trim_start_matches([' ', '\t', '\x0c']);
    }
    (key, rest)
}

fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\x0c'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                let code = u32::from_str_radix(&hex, 16)
                    .ok()
                    .filter(|_| hex.len() == 4)
                    .and_then(char::from_u32)
                    .ok_or_else(|| format!("malformed \\u escape `\\u{hex}`"))?;
                out.push(code);
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    Ok(out)
}

fn substitute(value: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("$$") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("$$") else {
            break;
        };
        let name = &after[..end];
        let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            out.push_str(&rest[..start + 2]);
            rest = after;
            continue;
        }
        let v = env(name).ok_or_else(|| {
            format!("environment variable {name} (named as $${name}$$) is not set")
        })?;
        out.push_str(&rest[..start]);
        out.push_str(&v);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "STORE").then(|| "/srv/models".to_string())
    }

    #[test]
    fn parses_the_seed_config() {
        let text = "# config.properties\ninference_address=http://0.0.0.0:8080\n\
                    load_models=all\n  job_queue_size = 100\nbatch_size:32\nmax_batch_delay 100\n\
                    ! bang comment\n\n";
        let p = parse(text, "t", env).unwrap();
        assert_eq!(p["inference_address"], "http://0.0.0.0:8080");
        assert_eq!(p["load_models"], "all");
        assert_eq!(p["job_queue_size"], "100");
        assert_eq!(p["batch_size"], "32");
        assert_eq!(p["max_batch_delay"], "100");
        assert_eq!(p.len(), 5);
    }

    #[test]
    fn continuations_escapes_and_env() {
        let text =
            "models={\"a\": \\\n   {\"1.0\": {}}}\nkey\\=x=v\\u0041\nmodel_store=$$STORE$$/x\n";
        let p = parse(text, "t", env).unwrap();
        assert_eq!(p["models"], "{\"a\": {\"1.0\": {}}}");
        assert_eq!(p["key=x"], "vA");
        assert_eq!(p["model_store"], "/srv/models/x");
    }

    #[test]
    fn unset_env_is_an_error_naming_it() {
        let err = parse("a=1\nmodel_store=$$NOPE$$\n", "cfg", env).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 2") && msg.contains("NOPE"), "{msg}");
    }
}
