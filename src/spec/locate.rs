//! Source positions of YAML keys and values, by key path.
//!
//! serde_yaml's `Value` carries no spans, so semantic errors found after parsing (an odd
//! squeeze, a bad sweep path) are located by walking the document's events once with
//! yaml-rust2 and recording where each path (`models.glow.layers[3].mask`) starts.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

/// Where each path of a YAML document starts, and the text of scalar values.
#[derive(Debug, Default, Clone)]
pub struct PosIndex {
    pos: HashMap<String, Pos>,
    scalars: HashMap<String, String>,
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

struct Walker {
    stack: Vec<Frame>,
    index: PosIndex,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl Walker {
    /// The path of the node that starts now, or `None` if it is a mapping key.
    fn node_path(&mut self, mark: Marker, scalar: Option<&str>) -> Option<String> {
        let pos = Pos {
            line: mark.line(),
            col: mark.col() + 1,
        };
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { path, key }) => match key.take() {
                None => {
                    // This scalar is a key.
                    let k = scalar.unwrap_or("?").to_string();
                    let p = join(path, &k);
                    self.index.pos.insert(p, pos);
                    *key = Some(k);
                    None
                }
                Some(k) => Some(join(path, &k)),
            },
            Some(Frame::Seq { path, index }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                self.index.pos.entry(p.clone()).or_insert(pos);
                Some(p)
            }
        }
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(v, ..) => {
                if let Some(p) = self.node_path(mark, Some(&v)) {
                    self.index.scalars.insert(p.clone(), v);
                    let pos = Pos {
                        line: mark.line(),
                        col: mark.col() + 1,
                    };
                    self.index.pos.entry(format!("{p}=")).or_insert(pos);
                }
            }
            Event::MappingStart(..) => {
                let path = self.node_path(mark, None).unwrap_or_default();
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.node_path(mark, None).unwrap_or_default();
                self.stack.push(Frame::Seq { path, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Alias(_) => {
                self.node_path(mark, None);
            }
            _ => {}
        }
    }
}

impl PosIndex {
    /// Indexes a document; a document that does not parse gives an empty index (its syntax
    /// error is reported by serde_yaml with its own position).
    pub fn new(text: &str) -> Self {
        let mut w = Walker {
            stack: Vec::new(),
            index: PosIndex::default(),
        };
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut w, false).is_err() {
            return PosIndex::default();
        }
        w.index
    }

    /// Position of `path`, or of its nearest ancestor that appears in the file.
    pub fn locate(&self, path: &str) -> Option<Pos> {
        let mut p = path.to_string();
        loop {
            if let Some(pos) = self.pos.get(&p) {
                return Some(*pos);
            }
            let cut = p.rfind(['.', '['])?;
            p.truncate(cut);
        }
    }

    /// Position of the value (not the key) at `path`, if it is a scalar.
    pub fn locate_value(&self, path: &str) -> Option<Pos> {
        self.pos.get(&format!("{path}=")).copied()
    }

    /// The path under `prefix` (itself included) whose scalar value is `value`, if exactly one is.
    pub fn find_scalar_under(&self, prefix: &str, value: &str) -> Option<String> {
        let mut hits = self.scalars.iter().filter(|(p, v)| {
            v.as_str() == value
                && (p.as_str() == prefix
                    || p.starts_with(&format!("{prefix}."))
                    || p.starts_with(&format!("{prefix}[")))
        });
        let first = hits.next()?;
        if hits.next().is_some() {
            return None;
        }
        Some(first.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_get_line_and_column() {
        let text = "data:\n  dataset: mnist\nmodels:\n  glow:\n    layers:\n      - type: squeeze\n      - {type: coupling, mask: chequer}\n";
        let idx = PosIndex::new(text);
        assert_eq!(idx.locate("data.dataset"), Some(Pos { line: 2, col: 3 }));
        assert_eq!(
            idx.locate("models.glow.layers[0].type"),
            Some(Pos { line: 6, col: 9 })
        );
        assert_eq!(
            idx.locate("models.glow.layers[1].mask"),
            Some(Pos { line: 7, col: 26 })
        );
        assert_eq!(
            idx.locate_value("models.glow.layers[1].mask"),
            Some(Pos { line: 7, col: 32 })
        );
        // Missing leaf → nearest ancestor.
        assert_eq!(
            idx.locate("models.glow.layers[1].net.hidden"),
            Some(Pos { line: 7, col: 9 })
        );
        assert_eq!(
            idx.find_scalar_under("models.glow.layers[1]", "chequer")
                .as_deref(),
            Some("models.glow.layers[1].mask")
        );
        assert!(PosIndex::new("a: [").locate("a").is_none());
    }
}
