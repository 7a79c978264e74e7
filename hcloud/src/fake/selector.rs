//! Label selectors as the Hetzner API reads them (Kubernetes' syntax): terms separated
//! by commas, all of which must hold: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`,
//! `k notin (a,b)`.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(Vec<Term>);

impl Selector {
    /// Parses a selector; the error is the API's `invalid_input` message.
    pub fn parse(s: &str) -> Result<Selector, String> {
        let mut terms = Vec::new();
        for raw in split_terms(s) {
            let t = raw.trim();
            if t.is_empty() {
                return Err(format!("invalid label_selector {s:?}: empty term"));
            }
            terms.push(term(t).ok_or_else(|| format!("invalid label_selector {s:?} at {t:?}"))?);
        }
        Ok(Selector(terms))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::Ne(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
            Term::Absent(k) => !labels.contains_key(k),
            Term::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Term::NotIn(k, vs) => !labels.get(k).is_some_and(|v| vs.contains(v)),
        })
    }
}

/// Commas inside `( )` belong to a set.
fn split_terms(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn key_ok(k: &str) -> bool {
    !k.is_empty()
        && k.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'/'))
}

fn term(t: &str) -> Option<Term> {
    if let Some(k) = t.strip_prefix('!') {
        let k = k.trim();
        return key_ok(k).then(|| Term::Absent(k.to_owned()));
    }
    if let Some((k, v)) = t.split_once("!=") {
        let k = k.trim();
        return key_ok(k).then(|| Term::Ne(k.to_owned(), v.trim().to_owned()));
    }
    if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
        let k = k.trim();
        return key_ok(k).then(|| Term::Eq(k.to_owned(), v.trim().to_owned()));
    }
    for (word, not) in [(" notin ", true), (" in ", false)] {
        if let Some((k, set)) = t.split_once(word) {
            let k = k.trim();
            let set = set.trim().strip_prefix('(')?.strip_suffix(')')?;
            let values = set.split(',').map(|v| v.trim().to_owned()).collect();
            if !key_ok(k) {
                return None;
            }
            return Some(if not {
                Term::NotIn(k.to_owned(), values)
            } else {
                Term::In(k.to_owned(), values)
            });
        }
    }
    key_ok(t).then(|| Term::Exists(t.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn each_operator() {
        let l = labels(&[("basalt.io/image", "k3s-node"), ("env", "prod")]);
        let cases = [
            ("basalt.io/image=k3s-node", true),
            ("basalt.io/image==k3s-node", true),
            ("basalt.io/image=other", false),
            ("env!=prod", false),
            ("env!=dev", true),
            ("missing!=x", true),
            ("env", true),
            ("missing", false),
            ("!missing", true),
            ("!env", false),
            ("env in (dev, prod)", true),
            ("env in (dev)", false),
            ("env notin (dev)", true),
            ("env notin (dev,prod)", false),
            ("env=prod,basalt.io/image=k3s-node", true),
            ("env=prod,basalt.io/image=x", false),
        ];
        for (sel, want) in cases {
            assert_eq!(Selector::parse(sel).unwrap().matches(&l), want, "{sel}");
        }
    }

    #[test]
    fn bad_selectors_are_refused() {
        for bad in ["", "a,", "=x", "k in dev", "a b"] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
    }
}
