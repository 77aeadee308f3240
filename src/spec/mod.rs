//! Declarative experiment specs: YAML → typed spec → resolved runs → layer plans.
//!
//! Loading goes: parse (serde_yaml, located errors) → apply `--set` overrides → for each
//! model variant merge its `data`/`train` overrides into the shared sections → expand
//! the sweep (grid × zip) → type-check every resolved run → static checks (value
//! ranges, shape inference through the graph). All problems are reported together,
//! each as `file:line:column: key.path: message`.

pub mod error;
pub mod locate;
pub mod path;
pub mod plan;
pub mod types;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde_yaml::Value;
use sha2::{Digest, Sha256};

pub use error::{SpecError, SpecErrors};
pub use locate::{Pos, PosIndex};
pub use plan::{ModelPlan, PlannedLayer, PlannedOp};
pub use types::*;

/// A loaded, type-checked experiment file (sweep not yet expanded).
#[derive(Debug, Clone)]
pub struct Experiment {
    /// File label used in messages.
    pub file: String,
    pub name: String,
    pub spec: ExperimentSpec,
    /// The document with `--set` overrides applied.
    pub doc: Value,
    /// Variant names in file order.
    pub variants: Vec<String>,
    /// Overrides given on the command line (`path=value`).
    pub overrides: Vec<(String, String)>,
    index: PosIndex,
}

/// One expanded run of a sweep.
#[derive(Debug, Clone)]
pub struct Run {
    /// Hash of the resolved config: same config → same id, whatever the key order.
    pub id: String,
    /// Readable name: `glow-kind=additive-seed=1`.
    pub name: String,
    pub config: RunConfig,
    /// The swept parameters of this run (run-relative path → value).
    pub swept: Vec<(String, Value)>,
    pub plan: ModelPlan,
}

/// Where a sweep assignment came from: (path as written, file path of its key).
type Assignment = (String, String, Value);

impl Experiment {
    /// Reads and type-checks a spec file; `overrides` are `path=value` texts (Hydra-style `--set`).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, SpecErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            SpecErrors::one(SpecError {
                file: file.clone(),
                pos: None,
                path: String::new(),
                msg: format!("cannot read the spec: {e}"),
            })
        })?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "experiment".into());
        Self::from_text(&text, &file, &stem, overrides)
    }

    /// Like [`Experiment::load`] from text; `stem` is the default experiment name.
    pub fn from_text(
        text: &str,
        file: &str,
        stem: &str,
        overrides: &[String],
    ) -> Result<Self, SpecErrors> {
        let index = PosIndex::new(text);
        let located = |e: &serde_yaml::Error| SpecErrors::one(error::from_serde(file, e, &index));
        // Typed parse of the file as written: syntax, types and unknown keys, located.
        serde_yaml::from_str::<ExperimentSpec>(text).map_err(|e| located(&e))?;
        let mut doc: Value = serde_yaml::from_str(text).map_err(|e| located(&e))?;

        let mut parsed = Vec::new();
        let mut errs = Vec::new();
        let cli = |path: &str, msg: String| SpecError {
            file: "--set".into(),
            pos: None,
            path: path.to_string(),
            msg,
        };
        for o in overrides {
            match o.split_once('=') {
                Some((p, v)) if !p.trim().is_empty() => {
                    let p = p.trim();
                    match path::set_override(&mut doc, p, path::parse_value(v)) {
                        Ok(()) => parsed.push((p.to_string(), v.to_string())),
                        Err(m) => errs.push(cli(p, m)),
                    }
                }
                _ => errs.push(cli(o, "expected PATH=VALUE, e.g. train.steps=200".into())),
            }
        }
        if !errs.is_empty() {
            return Err(SpecErrors(errs));
        }
        let spec: ExperimentSpec = typed(&doc).map_err(|e| {
            let mut se = error::from_serde("--set", &e, &PosIndex::default());
            se.pos = None;
            SpecErrors::one(se)
        })?;
        let variants: Vec<String> = doc
            .get("models")
            .and_then(Value::as_mapping)
            .map(|m| {
                m.keys()
                    .filter_map(|k| k.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let name = spec.name.clone().unwrap_or_else(|| stem.to_string());
        let exp = Experiment {
            file: file.to_string(),
            name,
            spec,
            doc,
            variants,
            overrides: parsed,
            index,
        };
        if let Some(why) = unsafe_folder_name(&exp.name) {
            return Err(SpecErrors::one(exp.err(
                "name",
                format!(
                    "'{}' {why}: the name is the results folder (results/<name>/)",
                    exp.name
                ),
            )));
        }
        if exp.variants.is_empty() {
            return Err(SpecErrors::one(exp.err(
                "models",
                "no model variants: add at least one under `models:`".into(),
            )));
        }
        Ok(exp)
    }

    fn err(&self, path: &str, msg: String) -> SpecError {
        SpecError {
            file: self.file.clone(),
            pos: self.index.locate(path),
            path: path.to_string(),
            msg,
        }
    }

    /// The sweep as a list of points, each a list of assignments.
    fn sweep_points(&self) -> Result<Vec<Vec<Assignment>>, SpecErrors> {
        let mut errs = Vec::new();
        let mut points: Vec<Vec<Assignment>> = vec![Vec::new()];
        let as_list = |v: &Value| v.as_sequence().cloned();
        for (k, v) in &self.spec.sweep.grid {
            let key = path::short(k);
            let fpath = format!("sweep.grid.{key}");
            match as_list(v) {
                Some(vals) if !vals.is_empty() => {
                    points = points
                        .into_iter()
                        .flat_map(|pt| {
                            let key = &key;
                            vals.iter().map(move |val| {
                                let mut p = pt.clone();
                                p.push((key.clone(), format!("sweep.grid.{key}"), val.clone()));
                                p
                            })
                        })
                        .collect();
                }
                _ => errs.push(self.err(
                    &fpath,
                    "a sweep entry needs a non-empty list of values".into(),
                )),
            }
        }
        for (g, group) in self.spec.sweep.zip.iter().enumerate() {
            let mut len = None;
            let mut cols = Vec::new();
            for (k, v) in group {
                let key = path::short(k);
                let fpath = format!("sweep.zip[{g}].{key}");
                match as_list(v) {
                    Some(vals) if !vals.is_empty() => {
                        if let Some(n) = len.filter(|&n| n != vals.len()) {
                            errs.push(self.err(&fpath, format!("zipped lists must have equal lengths: this one has {}, an earlier one {n}", vals.len())));
                        }
                        len.get_or_insert(vals.len());
                        cols.push((key, fpath, vals));
                    }
                    _ => errs.push(self.err(
                        &fpath,
                        "a sweep entry needs a non-empty list of values".into(),
                    )),
                }
            }
            let n = len.unwrap_or(0);
            if errs.is_empty() && n > 0 {
                points = points
                    .into_iter()
                    .flat_map(|pt| {
                        let cols = &cols;
                        (0..n).map(move |i| {
                            let mut p = pt.clone();
                            p.extend(
                                cols.iter()
                                    .map(|(k, f, vals)| (k.clone(), f.clone(), vals[i].clone())),
                            );
                            p
                        })
                    })
                    .collect();
            }
        }
        if errs.is_empty() {
            Ok(points)
        } else {
            Err(SpecErrors(errs))
        }
    }

    /// The variant's config before sweeping, with defaults filled in.
    fn base_config(&self, variant: &str) -> Result<Value, SpecError> {
        let doc = &self.doc;
        let mut model = doc["models"][variant].clone();
        let mut section = |name: &str| {
            let mut v = doc.get(name).cloned().unwrap_or(Value::Null);
            if let Some(m) = model.as_mapping_mut() {
                if let Some(over) = m.remove(name) {
                    if v.is_null() {
                        v = Value::Mapping(Default::default());
                    }
                    path::merge(&mut v, &over);
                }
            }
            v
        };
        let data = section("data");
        let train = section("train");
        let mut m = serde_yaml::Mapping::new();
        m.insert("experiment".into(), self.name.clone().into());
        m.insert("variant".into(), variant.into());
        m.insert("data".into(), data);
        if !train.is_null() {
            m.insert("train".into(), train);
        }
        m.insert(
            "eval".into(),
            doc.get("eval")
                .cloned()
                .unwrap_or_else(|| Value::Mapping(Default::default())),
        );
        m.insert(
            "device".into(),
            doc.get("device").cloned().unwrap_or_else(|| "cpu".into()),
        );
        m.insert("model".into(), model);
        let typed: RunConfig = typed(&Value::Mapping(m)).map_err(|e| {
            let mut se = error::from_serde(&self.file, &e, &PosIndex::default());
            se.path = self.file_path(variant, &se.path);
            se.pos = self.index.locate(&se.path);
            se
        })?;
        Ok(serde_yaml::to_value(&typed).expect("serialisable"))
    }

    /// Maps a run-relative path (`model.layers[2]`, `train.lr`) to where it is written in the file.
    fn file_path(&self, variant: &str, run_path: &str) -> String {
        if let Some(rest) = run_path.strip_prefix("model") {
            return format!("models.{variant}{rest}");
        }
        for section in ["data", "train"] {
            if let Some(rest) = run_path.strip_prefix(section) {
                let over = format!("models.{variant}.{section}{rest}");
                if self
                    .index
                    .locate(&over)
                    .is_some_and(|p| Some(p) != self.index.locate(&format!("models.{variant}")))
                {
                    return over;
                }
            }
        }
        run_path.to_string()
    }

    /// Translates a sweep path to a run-relative path for `variant`; `Ok(None)` if it
    /// targets another variant.
    fn run_path(&self, variant: &str, p: &str) -> Result<Option<String>, String> {
        if p == "seed" {
            return Ok(Some("train.seed".into()));
        }
        if let Some(rest) = p.strip_prefix("models.") {
            let (v, tail) = rest.split_once('.').unwrap_or((rest, ""));
            if !self.variants.iter().any(|x| x == v) {
                let hint = error::did_you_mean(v, self.variants.iter().map(String::as_str))
                    .map(|s| format!(" (did you mean '{s}'?)"))
                    .unwrap_or_default();
                return Err(format!(
                    "unknown model variant '{v}'{hint}; variants: {}",
                    self.variants.join(", ")
                ));
            }
            if tail.is_empty() {
                return Err(
                    "a sweep path must name a key inside the model, e.g. models.glow.coupling.kind"
                        .into(),
                );
            }
            return Ok((v == variant).then(|| format!("model.{tail}")));
        }
        let head = p.split(['.', '[']).next().unwrap_or("");
        const HEADS: [&str; 5] = ["data", "train", "eval", "device", "model"];
        if HEADS.contains(&head) {
            Ok(Some(p.to_string()))
        } else {
            let hint = error::did_you_mean(head, HEADS)
                .map(|s| format!(" (did you mean '{s}'?)"))
                .unwrap_or_default();
            Err(format!("unknown sweep path '{p}'{hint}: paths start with data, train, eval, device, seed, model or models.<variant>"))
        }
    }

    /// Expands variants × sweep into runs, type-checks and statically checks each.
    /// `only` restricts to some variants. `data_shape` gives `[C, H, W]` of a data spec.
    pub fn runs(
        &self,
        only: &[String],
        data_shape: &dyn Fn(&DataSpec) -> Result<[usize; 3], String>,
    ) -> Result<Vec<Run>, SpecErrors> {
        for o in only {
            if !self.variants.contains(o) {
                let hint = error::did_you_mean(o, self.variants.iter().map(String::as_str))
                    .map(|s| format!(" (did you mean '{s}'?)"))
                    .unwrap_or_default();
                return Err(SpecErrors::one(SpecError {
                    file: "--only".into(),
                    pos: None,
                    path: String::new(),
                    msg: format!(
                        "unknown variant '{o}'{hint}; variants: {}",
                        self.variants.join(", ")
                    ),
                }));
            }
        }
        let points = self.sweep_points()?;
        let mut errs: Vec<SpecError> = Vec::new();
        let mut runs = Vec::new();
        let mut seen = HashSet::new();
        let short_names = short_names(
            points
                .first()
                .map(|p| p.iter().map(|a| a.0.clone()).collect())
                .unwrap_or_default(),
        );
        for variant in &self.variants {
            if !only.is_empty() && !only.contains(variant) {
                continue;
            }
            let base = match self.base_config(variant) {
                Ok(b) => b,
                Err(e) => {
                    errs.push(e);
                    continue;
                }
            };
            for point in &points {
                let mut cfg = base.clone();
                let mut swept = Vec::new();
                let mut sources: Vec<(String, String)> = Vec::new();
                let mut name = variant.clone();
                let mut bad = false;
                for (p, fpath, v) in point {
                    match self.run_path(variant, p) {
                        Ok(None) => {}
                        Ok(Some(rp)) => match path::set(&mut cfg, &rp, v.clone()) {
                            Ok(()) => {
                                name.push_str(&format!(
                                    "-{}={}",
                                    short_names.get(p).map(String::as_str).unwrap_or(p),
                                    path::short(v)
                                ));
                                swept.push((rp.clone(), v.clone()));
                                sources.push((rp, fpath.clone()));
                            }
                            Err(m) => {
                                errs.push(self.err(fpath, m));
                                bad = true;
                            }
                        },
                        Err(m) => {
                            errs.push(self.err(fpath, m));
                            bad = true;
                        }
                    }
                }
                if bad {
                    continue;
                }
                let locate = |run_path: &str| -> String {
                    sources
                        .iter()
                        .find(|(rp, _)| {
                            run_path == rp
                                || run_path.starts_with(&format!("{rp}."))
                                || run_path.starts_with(&format!("{rp}["))
                        })
                        .map(|(_, f)| f.clone())
                        .unwrap_or_else(|| self.file_path(variant, run_path))
                };
                let config: RunConfig = match typed(&cfg) {
                    Ok(c) => c,
                    Err(e) => {
                        let se = error::from_serde(&self.file, &e, &PosIndex::default());
                        let fp = locate(&se.path);
                        errs.push(SpecError {
                            pos: self.index.locate(&fp),
                            path: fp,
                            ..se
                        });
                        continue;
                    }
                };
                let mut issues = check_sections(&config);
                let plan = match data_shape(&config.data) {
                    Ok(shape) => match plan::plan(&config.model, shape, "model") {
                        Ok(p) => Some(p),
                        Err(is) => {
                            issues.extend(is);
                            None
                        }
                    },
                    Err(m) => {
                        issues.push(("data.dataset".into(), m));
                        None
                    }
                };
                for (p, m) in issues {
                    let fp = locate(&p);
                    let e = SpecError {
                        file: self.file.clone(),
                        pos: self.index.locate(&fp),
                        path: fp,
                        msg: m,
                    };
                    if !errs.contains(&e) {
                        errs.push(e);
                    }
                }
                let Some(plan) = plan else { continue };
                if !errs.is_empty() {
                    continue;
                }
                let id = run_id(&config);
                if seen.insert(id.clone()) {
                    runs.push(Run {
                        id,
                        name,
                        config,
                        swept,
                        plan,
                    });
                }
            }
        }
        if errs.is_empty() {
            Ok(runs)
        } else {
            Err(SpecErrors(errs))
        }
    }
}

/// Deserialises a resolved value through text, so errors carry serde_yaml's key path
/// (`from_value` drops it). Positions in such errors refer to the generated text: ignore them.
fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, serde_yaml::Error> {
    serde_yaml::from_str(&serde_yaml::to_string(v)?)
}

/// Shortest unambiguous suffix of each swept path, for run names.
fn short_names(paths: Vec<String>) -> BTreeMap<String, String> {
    let segs = |p: &str| p.split('.').map(str::to_string).collect::<Vec<_>>();
    let mut out = BTreeMap::new();
    for p in &paths {
        let s = segs(p);
        let mut n = 1;
        loop {
            let cand = s[s.len().saturating_sub(n)..].join(".");
            let clash = paths
                .iter()
                .any(|q| q != p && segs(q).ends_with(&s[s.len().saturating_sub(n)..]));
            if !clash || n >= s.len() {
                out.insert(p.clone(), cand);
                break;
            }
            n += 1;
        }
    }
    out
}

/// sha256 of the canonical (key-sorted) JSON of the resolved config, first 12 hex digits.
pub fn run_id(config: &RunConfig) -> String {
    let v = path::canonical(&serde_yaml::to_value(config).expect("serialisable"));
    let json = serde_json::to_string(&v).expect("serialisable");
    let digest = Sha256::digest(json.as_bytes());
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// Value-range checks of the non-model sections: (run path, message).
fn check_sections(c: &RunConfig) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut need = |ok: bool, path: &str, msg: String| {
        if !ok {
            out.push((path.to_string(), msg));
        }
    };
    let d = &c.data;
    let builtin = DatasetSpec::BUILTIN.contains(&d.dataset.name.as_str());
    let hint = error::did_you_mean(&d.dataset.name, DatasetSpec::BUILTIN)
        .map(|s| format!(" (did you mean '{s}'?)"))
        .unwrap_or_default();
    need(
        builtin || d.dataset.source.is_some(),
        "data.dataset",
        format!("unknown dataset '{}'{hint}: use mnist, fashion_mnist, or give {{name, source}} with a hf:// repo, a PNG folder, an IDX folder or a parquet file", d.dataset.name),
    );
    need(
        d.batch_size >= 1,
        "data.batch_size",
        "must be at least 1".into(),
    );
    need(
        d.eval_batch_size >= 1,
        "data.eval_batch_size",
        "must be at least 1".into(),
    );
    need(
        d.downscale >= 1,
        "data.downscale",
        "must be at least 1".into(),
    );
    need(
        d.train_subset != Some(0),
        "data.train_subset",
        "must be at least 1".into(),
    );
    need(
        d.test_subset != Some(0),
        "data.test_subset",
        "must be at least 1".into(),
    );
    need(
        d.classes.as_ref().is_none_or(|c| !c.is_empty()),
        "data.classes",
        "must list at least one class".into(),
    );
    let t = &c.train;
    need(
        t.lr.is_finite() && t.lr > 0.0,
        "train.lr",
        format!("must be a positive number, got {}", t.lr),
    );
    need(
        t.weight_decay.is_finite() && t.weight_decay >= 0.0,
        "train.weight_decay",
        format!("must be ≥ 0, got {}", t.weight_decay),
    );
    need(
        t.lr_decay > 0.0 && t.lr_decay <= 1.0,
        "train.lr_decay",
        format!("must be in (0, 1], got {}", t.lr_decay),
    );
    need(
        t.grad_clip.is_none_or(|g| g.is_finite() && g > 0.0),
        "train.grad_clip",
        "must be positive (or null for no clipping)".into(),
    );
    need(
        t.steps.is_some() || t.epochs.is_some(),
        "train",
        "set train.steps or train.epochs".into(),
    );
    need(
        t.steps != Some(0),
        "train.steps",
        "must be at least 1".into(),
    );
    need(
        t.epochs.is_none_or(|e| e.is_finite() && e > 0.0),
        "train.epochs",
        "must be positive".into(),
    );
    need(
        t.val_subset.is_none_or(|n| n >= 1),
        "train.val_subset",
        "must be at least 1 (or null: the whole validation set)".into(),
    );
    need(
        t.eval_every >= 1,
        "train.eval_every",
        "must be at least 1".into(),
    );
    need(
        t.log_every >= 1,
        "train.log_every",
        "must be at least 1".into(),
    );
    let e = &c.eval;
    need(
        e.importance_samples >= 1,
        "eval.importance_samples",
        "must be at least 1".into(),
    );
    need(
        e.importance_study.iter().all(|&k| k >= 1),
        "eval.importance_study",
        "every number of importance samples must be at least 1".into(),
    );
    need(
        e.n_samples >= 1,
        "eval.n_samples",
        "must be at least 1".into(),
    );
    need(
        !e.temperatures.is_empty() && e.temperatures.iter().all(|t| t.is_finite() && *t >= 0.0),
        "eval.temperatures",
        "must be a non-empty list of temperatures ≥ 0".into(),
    );
    need(
        parse_device(&c.device).is_some(),
        "device",
        format!("unknown device '{}': use cpu, cuda or cuda:N", c.device),
    );
    out
}

/// `cpu` → None index; `cuda` / `cuda:N` → Some(N).
pub fn parse_device(s: &str) -> Option<Option<usize>> {
    match s {
        "cpu" | "" => Some(None),
        "cuda" => Some(Some(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Some),
    }
}

/// Why `name` cannot name a folder inside the results root, if it cannot: it must be
/// one plain path component.
fn unsafe_folder_name(name: &str) -> Option<&'static str> {
    if name.trim().is_empty() {
        Some("is empty")
    } else if name.contains(['/', '\\']) {
        Some("contains a path separator")
    } else if name == "." || name == ".." {
        Some("is not a folder name")
    } else {
        None
    }
}
