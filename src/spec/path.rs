//! Dotted key paths into YAML values: `train.lr`, `models.glow.layers[0].levels`.

use serde_yaml::{Mapping, Value};

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// Parses `a.b[2].c`; `None` if malformed.
pub fn parse(path: &str) -> Option<Vec<Seg>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if key.is_empty() && (out.is_empty() || rest.is_empty()) {
            return None;
        }
        if !key.is_empty() {
            out.push(Seg::Key(key.to_string()));
        }
        while !rest.is_empty() {
            let close = rest.find(']')?;
            let n: usize = rest.get(1..close)?.parse().ok()?;
            out.push(Seg::Index(n));
            rest = &rest[close + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                return None;
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Sets `path` in `doc` to `value`. Missing mapping keys are created (the typed check
/// afterwards rejects keys that do not exist in the schema); list indices must exist.
pub fn set(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let segs = parse(path).ok_or_else(|| format!("malformed path '{path}'"))?;
    set_segs(doc, &segs, path, value)
}

/// [`set`] along parsed segments (`path` names them in errors).
fn set_segs(doc: &mut Value, segs: &[Seg], path: &str, value: Value) -> Result<(), String> {
    let mut cur = doc;
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        // `layers.0` on a list is `layers[0]` (the Hydra spelling).
        let index = match seg {
            Seg::Key(k) if cur.is_sequence() => k.parse().ok().map(Seg::Index),
            _ => None,
        };
        match index.as_ref().unwrap_or(seg) {
            Seg::Key(k) => {
                if cur.is_null() {
                    *cur = Value::Mapping(Mapping::new());
                }
                let m = match cur {
                    Value::Mapping(m) => m,
                    Value::Sequence(_) => {
                        return Err(format!(
                            "'{k}' in '{path}': the value there is a list; index it with a number"
                        ))
                    }
                    _ => {
                        return Err(format!(
                            "'{k}' in '{path}': the value there is not a mapping"
                        ))
                    }
                };
                let key = Value::String(k.clone());
                if last {
                    m.insert(key, value);
                    return Ok(());
                }
                if !m.contains_key(&key) {
                    m.insert(key.clone(), Value::Null);
                }
                cur = m.get_mut(&key).expect("inserted");
            }
            Seg::Index(n) => {
                let s = cur
                    .as_sequence_mut()
                    .ok_or_else(|| format!("[{n}] in '{path}': the value there is not a list"))?;
                let len = s.len();
                let slot = s.get_mut(*n).ok_or_else(|| {
                    format!("index [{n}] in '{path}' is out of range (the list has {len} entries)")
                })?;
                if last {
                    *slot = value;
                    return Ok(());
                }
                cur = slot;
            }
        }
    }
    unreachable!("non-empty path")
}

/// Sets `path` in `doc` like [`set`], except below `sweep.grid.`, whose keys are dotted
/// paths themselves: `sweep.grid.train.lr=[1e-3, 2e-3]` sets the grid's `train.lr` entry.
pub fn set_override(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let Some(key) = path.strip_prefix("sweep.grid.").filter(|k| !k.is_empty()) else {
        return set(doc, path, value);
    };
    let segs = ["sweep", "grid", key].map(|k| Seg::Key(k.to_string()));
    set_segs(doc, &segs, path, value)
}

/// Deep-merges mapping `over` into `base` (non-mapping values replace).
pub fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(bv) => merge(bv, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// A copy with every mapping's keys sorted (so hashes ignore key order).
pub fn canonical(v: &Value) -> Value {
    match v {
        Value::Mapping(m) => {
            let mut entries: Vec<(String, Value, Value)> = m
                .iter()
                .map(|(k, v)| {
                    (
                        serde_yaml::to_string(k).unwrap_or_default(),
                        k.clone(),
                        canonical(v),
                    )
                })
                .collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Mapping(entries.into_iter().map(|(_, k, v)| (k, v)).collect())
        }
        Value::Sequence(s) => Value::Sequence(s.iter().map(canonical).collect()),
        Value::Tagged(t) => canonical(&t.value),
        other => other.clone(),
    }
}

/// A YAML scalar from command-line text (`1e-3` → number, `affine` → string, `[1,2]` → list).
pub fn parse_value(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// Short human text of a value for run names (`{type: permute, order: reverse}` →
/// `permute-reverse`; nested lists and maps are left out).
pub fn short(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "null".into(),
        Value::Mapping(m) => m
            .values()
            .filter(|x| !matches!(x, Value::Mapping(_) | Value::Sequence(_)))
            .map(short)
            .collect::<Vec<_>>()
            .join("-"),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .replace('\n', " "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_set_merge_canonical() {
        assert_eq!(
            parse("a.b[2].c"),
            Some(vec![
                Seg::Key("a".into()),
                Seg::Key("b".into()),
                Seg::Index(2),
                Seg::Key("c".into())
            ])
        );
        assert_eq!(parse("a..b"), None);
        assert_eq!(parse("a[x]"), None);
        let mut doc: Value =
            serde_yaml::from_str("train: {lr: 1}\nlayers: [{t: 1}, {t: 2}]").unwrap();
        set(&mut doc, "train.lr", Value::from(2)).unwrap();
        set(&mut doc, "layers[1].t", Value::from(5)).unwrap();
        set(&mut doc, "new.key", Value::from(1)).unwrap();
        assert!(set(&mut doc, "layers[7].t", Value::from(5))
            .unwrap_err()
            .contains("out of range"));
        assert!(set(&mut doc, "train.lr.x", Value::from(5))
            .unwrap_err()
            .contains("not a mapping"));
        set(&mut doc, "layers.0.t", Value::from(7)).unwrap();
        assert_eq!(doc["layers"][0]["t"], Value::from(7));
        assert!(set(&mut doc, "layers.9.t", Value::from(5))
            .unwrap_err()
            .contains("out of range"));
        assert!(set(&mut doc, "layers.t", Value::from(5))
            .unwrap_err()
            .contains("is a list; index it with a number"));
        assert_eq!(doc["train"]["lr"], Value::from(2));
        assert_eq!(doc["layers"][1]["t"], Value::from(5));
        // Grid keys are dotted paths: the rest of the path is one key.
        let mut spec: Value = serde_yaml::from_str("sweep: {grid: {seed: [0]}}").unwrap();
        set_override(&mut spec, "sweep.grid.train.lr", parse_value("[1, 2]")).unwrap();
        set_override(&mut spec, "sweep.grid.seed", parse_value("[3]")).unwrap();
        assert_eq!(
            serde_yaml::to_string(&spec).unwrap(),
            "sweep:\n  grid:\n    seed:\n    - 3\n    train.lr:\n    - 1\n    - 2\n"
        );
        let mut none = Value::Null;
        set_override(
            &mut none,
            "sweep.grid.models.a.layers[0].levels",
            Value::from(1),
        )
        .unwrap();
        assert_eq!(
            none["sweep"]["grid"]["models.a.layers[0].levels"],
            Value::from(1)
        );
        let mut base: Value = serde_yaml::from_str("{a: {x: 1, y: 2}, b: 3}").unwrap();
        merge(&mut base, &serde_yaml::from_str("{a: {y: 9}}").unwrap());
        assert_eq!(base["a"]["x"], Value::from(1));
        assert_eq!(base["a"]["y"], Value::from(9));
        let a: Value = serde_yaml::from_str("{b: 1, a: {d: 1, c: 2}}").unwrap();
        let b: Value = serde_yaml::from_str("{a: {c: 2, d: 1}, b: 1}").unwrap();
        assert_eq!(
            serde_yaml::to_string(&canonical(&a)).unwrap(),
            serde_yaml::to_string(&canonical(&b)).unwrap()
        );
        assert_eq!(parse_value("1e-3"), Value::from(1e-3));
        assert_eq!(parse_value("affine"), Value::String("affine".into()));
        assert_eq!(
            short(&parse_value("{type: permute, order: reverse}")),
            "permute-reverse"
        );
        assert_eq!(
            short(&parse_value("{type: variational, layers: [1]}")),
            "variational"
        );
    }
}
