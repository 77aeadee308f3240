//! Spec errors: every message names `file:line:column`, the key path, and what to do.

use std::fmt;

use super::locate::{Pos, PosIndex};

/// One problem in a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub file: String,
    pub pos: Option<Pos>,
    /// Dotted key path (`models.glow.layers[3].mask`); empty for whole-file problems.
    pub path: String,
    pub msg: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(p) = self.pos {
            write!(f, ":{}:{}", p.line, p.col)?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.msg)
    }
}

/// All problems found in a spec (reported together).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl SpecErrors {
    pub fn one(e: SpecError) -> Self {
        SpecErrors(vec![e])
    }
}

/// Levenshtein distance.
pub fn edit_distance(a: &str, b: &str) -> usize {
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

/// The candidate closest to `word`, if close enough to be a plausible typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let limit = word.chars().count().div_ceil(3).max(2);
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Text between backticks, in order.
fn backticked(s: &str) -> Vec<&str> {
    s.split('`').skip(1).step_by(2).collect()
}

/// Turns a serde_yaml error into a located [`SpecError`], rewording serde's phrasing
/// (`unknown variant `chequer`, expected one of …`) and adding a did-you-mean.
pub fn from_serde(file: &str, e: &serde_yaml::Error, index: &PosIndex) -> SpecError {
    let full = e.to_string();
    // Drop serde_yaml's own " at line L column C" suffix; the position goes in front.
    let text = match full.rfind(" at line ") {
        Some(i) => full[..i].to_string(),
        None => full.clone(),
    };
    // serde_yaml prefixes the key path: "models.glow.layers[3]: unknown variant …".
    let (mut path, mut msg) = match text.split_once(": ") {
        Some((p, m)) if !p.contains(' ') && !p.is_empty() => (p.to_string(), m.to_string()),
        _ => (String::new(), text.clone()),
    };
    let mut pos = e.location().map(|l| Pos {
        line: l.line(),
        col: l.column(),
    });

    let kind = ["unknown variant", "unknown field"]
        .into_iter()
        .find(|k| msg.starts_with(k));
    if let Some(kind) = kind {
        let owned = msg.clone();
        let ticks = backticked(&owned);
        if let Some((&bad, rest)) = ticks.split_first() {
            let what = if kind == "unknown field" {
                "unknown key"
            } else {
                "unknown value"
            };
            let expected = rest.join(", ");
            let mut m = if expected.is_empty() {
                format!("{what} '{bad}'")
            } else {
                format!("{what} '{bad}', expected one of {expected}")
            };
            if let Some(s) = did_you_mean(bad, rest.iter().copied()) {
                m.push_str(&format!(" (did you mean '{s}'?)"));
            }
            msg = m;
            if kind == "unknown field" {
                let p = if path.is_empty() {
                    bad.to_string()
                } else {
                    format!("{path}.{bad}")
                };
                if let Some(q) = index
                    .locate(&p)
                    .filter(|_| !path.is_empty() || index.locate(bad).is_some())
                {
                    pos = Some(q);
                }
                path = p;
            } else if let Some(p) = index.find_scalar_under(&path, bad) {
                // Internally tagged enums lose the innermost key; find it by its value.
                pos = index.locate_value(&p).or(pos);
                path = p;
            }
        }
    }
    SpecError {
        file: file.to_string(),
        pos,
        path,
        msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(
            did_you_mean("chequer", ["checkerboard", "channel", "split"]),
            None
        );
        assert_eq!(
            did_you_mean("chanel", ["checkerboard", "channel", "split"]),
            Some("channel")
        );
        assert_eq!(
            did_you_mean("lerning_rate", ["lr", "learning_rate"]),
            Some("learning_rate")
        );
        assert_eq!(
            did_you_mean("coupler", ["coupling", "actnorm"]),
            Some("coupling")
        );
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
