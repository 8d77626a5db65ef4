//! Unknown keys: where they are in the file and which known key was probably meant.

use std::collections::BTreeSet;

/// A key the schema does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKey {
    /// Dotted path (`policy.diffusers.timestep_fraction`).
    pub key: String,
    /// 1-based line in the file (0 when not found).
    pub line: usize,
    /// The nearest known key, as a full path.
    pub suggestion: Option<String>,
}

impl UnknownKey {
    pub fn message(&self) -> String {
        match &self.suggestion {
            Some(s) => format!(
                "unknown key `{}` (Cosmos-RL ignores it too) — did you mean `{s}`?",
                self.key
            ),
            None => format!("unknown key `{}` (Cosmos-RL ignores it too)", self.key),
        }
    }
}

/// Known key paths, array indices written as `[]`.
fn known_paths() -> BTreeSet<String> {
    let v = super::support::populated_json();
    let mut out = BTreeSet::new();
    walk(&v, String::new(), &mut out);
    out
}

fn walk(v: &serde_json::Value, prefix: String, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(p.clone());
                walk(x, p, out);
            }
        }
        serde_json::Value::Array(a) => {
            if let Some(first) = a.first() {
                if first.is_object() {
                    walk(first, format!("{prefix}[]"), out);
                }
            }
        }
        _ => {}
    }
}

/// `a.0.b` → `a[].b` (serde_ignored writes sequence indices as segments).
fn normalize(path: &str) -> String {
    let mut out = String::new();
    for seg in path.split('.') {
        if seg.chars().all(|c| c.is_ascii_digit()) && !seg.is_empty() {
            out.push_str("[]");
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn suggest(key: &str, known: &BTreeSet<String>) -> Option<String> {
    let (parent, leaf) = match key.rsplit_once('.') {
        Some((p, l)) => (p, l),
        None => ("", key),
    };
    let leaf_of = |k: &str| k.rsplit_once('.').map_or(k, |x| x.1).to_string();
    let parent_of = |k: &str| k.rsplit_once('.').map_or("", |x| x.0).to_string();
    // The same key name elsewhere (a key put in the wrong table).
    if let Some(k) = known
        .iter()
        .find(|k| leaf_of(k) == leaf && parent_of(k) != parent)
    {
        return Some(k.clone());
    }
    let limit = (leaf.len() / 3).max(2);
    known
        .iter()
        .filter(|k| parent_of(k) == parent)
        .map(|k| (levenshtein(leaf, &leaf_of(k)), k))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, k)| k.clone())
}

/// Lines of every key in a TOML text, by normalised path.
fn key_lines(text: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut table = String::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(h) = line.strip_prefix("[[") {
            let name = h.split("]]").next().unwrap_or("").trim();
            table = format!("{name}[]");
            out.push((table.clone(), i + 1));
            continue;
        }
        if let Some(h) = line.strip_prefix('[') {
            table = h.split(']').next().unwrap_or("").trim().to_string();
            out.push((table.clone(), i + 1));
            continue;
        }
        if let Some((k, _)) = line.split_once('=') {
            let k: String = k
                .split('.')
                .map(|s| s.trim().trim_matches('"').trim_matches('\''))
                .collect::<Vec<_>>()
                .join(".");
            let path = if table.is_empty() {
                k
            } else {
                format!("{table}.{k}")
            };
            out.push((path, i + 1));
        }
    }
    out
}

/// The unknown keys serde saw, each with its line and a suggestion.
pub fn describe(ignored: &[String], text: &str) -> Vec<UnknownKey> {
    let known = known_paths();
    let lines = key_lines(text);
    ignored
        .iter()
        .map(|p| {
            let norm = normalize(p);
            let line = lines
                .iter()
                .find(|(k, _)| *k == norm)
                .map_or(0, |(_, l)| *l);
            UnknownKey {
                key: p.clone(),
                line,
                suggestion: suggest(&norm, &known),
            }
        })
        .collect()
}
