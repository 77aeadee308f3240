//! Results: one serialisable row struct per table, written as parquet atomically.
//!
//! Layout under `<out>/<experiment>/`:
//! - `runs.parquet`: one row per run ([`RunRow`] + one column per swept parameter);
//! - `curves.parquet`: one row per logged step ([`CurveRow`]);
//! - `runs/<name>-<id>/`: `config.yaml`, `result.json` (the row, written last: its presence
//!   marks the run finished), `checkpoint.safetensors`, `samples-t<T>.png`.
//!
//! The tables are rebuilt from every `result.json` after each run, so an interrupted
//! sweep never loses a finished run and a rerun skips it.

pub mod compare;
pub mod font;
pub mod lock;
pub mod png;

use std::fs::File;
use std::path::{Path, PathBuf};

use polars::prelude::*;
use serde::{Deserialize, Serialize};

use crate::train::{write_atomic, CurvePoint};
use crate::{Error, Result};

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Done,
    Diverged,
    Failed,
}

impl Status {
    /// Done and diverged runs are results, which a sweep keeps and skips; a failed run (an
    /// error, not a result) is tried again by the next sweep.
    pub fn is_finished(self) -> bool {
        self != Status::Failed
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Done => "done",
            Status::Diverged => "diverged",
            Status::Failed => "failed",
        }
    }
}

/// One row of `runs.parquet`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRow {
    pub experiment: String,
    pub variant: String,
    pub run_id: String,
    pub name: String,
    pub seed: u64,
    pub status: Status,
    /// Step at which a diverged/failed run stopped.
    pub status_step: Option<u64>,
    pub status_reason: Option<String>,
    pub params: u64,
    pub val_bpd: Option<f64>,
    pub test_bpd: Option<f64>,
    pub importance_samples: u64,
    /// Training images per second in the process that finished the run (`None` when it
    /// had no step left to train).
    pub train_imgs_per_s: Option<f64>,
    pub infer_ms_per_batch: Option<f64>,
    pub sample_ms_per_batch: Option<f64>,
    /// Seconds of optimizer steps, over every process that trained the run (a resumed
    /// run's checkpoint keeps those before).
    pub train_seconds: f64,
    /// Wall time of the `flowlab run` process that finished the run: its training since
    /// any resume, and the evaluation.
    pub wall_seconds: f64,
    pub steps: u64,
    pub batch_size: u64,
    pub device: String,
    /// For CPU runs, the microkernel set they trained on (`avx512`, `avx2` or `none`; see
    /// `kernels::simd`): it sets the speed, and the last bits of the results. `None` for
    /// GPU runs and in records written before the column existed.
    #[serde(default)]
    pub cpu_kernels: Option<String>,
    /// For CPU runs, the worker threads (rayon's pool); `None` as for `cpu_kernels`.
    #[serde(default)]
    pub threads: Option<u64>,
    pub flowlab_version: String,
    pub git_rev: Option<String>,
    /// Swept parameters (run-relative path → value), each its own column in the table.
    pub swept: Vec<(String, serde_json::Value)>,
    /// (K, test bpd with K importance samples) of `eval.importance_study`; column
    /// `test_bpd_is<K>` each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub importance_study: Vec<(u64, f64)>,
    /// (class, mean test bpd of that class's images), for labelled test sets; of p(x | y)
    /// for class-conditional models. Column `test_bpd_class<k>` each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class_bpd: Vec<(u64, f64)>,
}

/// One row of `curves.parquet`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurveRow {
    pub run_id: String,
    pub name: String,
    pub variant: String,
    #[serde(flatten)]
    pub point: CurvePoint,
}

/// What `result.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub row: RunRow,
    pub curves: Vec<CurvePoint>,
}

/// The folder of one experiment's results.
pub fn experiment_dir(out: &Path, experiment: &str) -> PathBuf {
    out.join(experiment)
}

/// The folder of one run.
pub fn run_dir(exp_dir: &Path, name: &str, id: &str) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_=.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    exp_dir.join("runs").join(format!("{safe}-{id}"))
}

/// Reads a finished run's record, if any.
pub fn read_record(run_dir: &Path) -> Result<Option<RunRecord>> {
    let p = run_dir.join("result.json");
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Data(format!("{}: {e}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(p, e)),
    }
}

/// Writes a run's record atomically (this marks the run finished).
pub fn write_record(run_dir: &Path, rec: &RunRecord) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(rec).map_err(|e| Error::Usage(e.to_string()))?;
    write_atomic(&run_dir.join("result.json"), &bytes)
}

/// All finished runs of an experiment folder, sorted by name.
pub fn collect_records(exp_dir: &Path) -> Result<Vec<RunRecord>> {
    let runs = exp_dir.join("runs");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&runs) else {
        return Ok(out);
    };
    for e in entries {
        let e = e.map_err(|err| Error::io(&runs, err))?;
        if let Some(r) = read_record(&e.path())? {
            out.push(r);
        }
    }
    out.sort_by(|a, b| {
        a.row
            .name
            .cmp(&b.row.name)
            .then(a.row.run_id.cmp(&b.row.run_id))
    });
    Ok(out)
}

fn pl_err(path: &Path) -> impl Fn(PolarsError) -> Error + '_ {
    move |e| Error::Data(format!("{}: {e}", path.display()))
}

fn write_parquet(df: &mut DataFrame, path: &Path) -> Result<()> {
    let tmp = crate::train::temporary_beside(path);
    // Errors name the file asked for, as `write_atomic`'s do.
    let f = File::create(&tmp).map_err(|e| Error::io(path, e))?;
    ParquetWriter::new(f).finish(df).map_err(pl_err(path))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn col<T, P>(name: &str, v: T) -> Column
where
    Series: NamedFrom<T, P>,
    P: ?Sized,
{
    Series::new(name.into(), v).into_column()
}

/// A typed column for a swept parameter: i64 if every value is an integer, f64 if every value is a number, bool if every
/// value is a bool, text otherwise.
fn swept_column(name: &str, vals: &[Option<&serde_json::Value>]) -> Column {
    let present: Vec<&serde_json::Value> = vals.iter().flatten().copied().collect();
    if !present.is_empty() && present.iter().all(|v| v.is_i64()) {
        col(
            name,
            vals.iter()
                .map(|v| v.and_then(|x| x.as_i64()))
                .collect::<Vec<_>>(),
        )
    } else if !present.is_empty() && present.iter().all(|v| v.is_number()) {
        col(
            name,
            vals.iter()
                .map(|v| v.and_then(|x| x.as_f64()))
                .collect::<Vec<_>>(),
        )
    } else if !present.is_empty() && present.iter().all(|v| v.is_boolean()) {
        col(
            name,
            vals.iter()
                .map(|v| v.and_then(|x| x.as_bool()))
                .collect::<Vec<_>>(),
        )
    } else {
        let text = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        col(name, vals.iter().map(|v| v.map(text)).collect::<Vec<_>>())
    }
}

/// Column-name prefix of the importance-sample study (`test_bpd_is16`).
pub const IMPORTANCE_PREFIX: &str = "test_bpd_is";
/// Column-name prefix of the per-class test bpd (`test_bpd_class3`).
pub const CLASS_PREFIX: &str = "test_bpd_class";

/// One f64 column `<prefix><key>` per key found in any row's (key, value) list.
fn keyed_columns(
    rows: &[&RunRow],
    get: fn(&RunRow) -> &Vec<(u64, f64)>,
    prefix: &str,
    cols: &mut Vec<Column>,
) {
    let mut ks: Vec<u64> = rows
        .iter()
        .flat_map(|r| get(r).iter().map(|(k, _)| *k))
        .collect();
    ks.sort_unstable();
    ks.dedup();
    for k in ks {
        let vals: Vec<Option<f64>> = rows
            .iter()
            .map(|r| get(r).iter().find(|(kk, _)| *kk == k).map(|(_, v)| *v))
            .collect();
        cols.push(col(&format!("{prefix}{k}"), vals));
    }
}

/// The `runs` table.
pub fn runs_frame(records: &[RunRecord]) -> Result<DataFrame> {
    let rows: Vec<&RunRow> = records.iter().map(|r| &r.row).collect();
    let s = |f: fn(&RunRow) -> String| rows.iter().map(|r| f(r)).collect::<Vec<String>>();
    let u = |f: fn(&RunRow) -> u64| rows.iter().map(|r| f(r)).collect::<Vec<u64>>();
    let of =
        |f: fn(&RunRow) -> Option<f64>| rows.iter().map(|r| f(r)).collect::<Vec<Option<f64>>>();
    let mut cols = vec![
        col("experiment", s(|r| r.experiment.clone())),
        col("variant", s(|r| r.variant.clone())),
        col("run_id", s(|r| r.run_id.clone())),
        col("name", s(|r| r.name.clone())),
    ];
    let mut swept_names: Vec<String> = Vec::new();
    for r in &rows {
        for (k, _) in &r.swept {
            if !swept_names.contains(k) {
                swept_names.push(k.clone());
            }
        }
    }
    for k in &swept_names {
        let vals: Vec<Option<&serde_json::Value>> = rows
            .iter()
            .map(|r| r.swept.iter().find(|(n, _)| n == k).map(|(_, v)| v))
            .collect();
        cols.push(swept_column(k, &vals));
    }
    keyed_columns(&rows, |r| &r.importance_study, IMPORTANCE_PREFIX, &mut cols);
    keyed_columns(&rows, |r| &r.class_bpd, CLASS_PREFIX, &mut cols);
    cols.extend([
        col("seed", u(|r| r.seed)),
        col("status", s(|r| r.status.as_str().to_string())),
        col(
            "status_step",
            rows.iter().map(|r| r.status_step).collect::<Vec<_>>(),
        ),
        col(
            "status_reason",
            rows.iter()
                .map(|r| r.status_reason.clone())
                .collect::<Vec<_>>(),
        ),
        col("params", u(|r| r.params)),
        col("val_bpd", of(|r| r.val_bpd)),
        col("test_bpd", of(|r| r.test_bpd)),
        col("importance_samples", u(|r| r.importance_samples)),
        col("train_imgs_per_s", of(|r| r.train_imgs_per_s)),
        col("infer_ms_per_batch", of(|r| r.infer_ms_per_batch)),
        col("sample_ms_per_batch", of(|r| r.sample_ms_per_batch)),
        col(
            "train_seconds",
            rows.iter().map(|r| r.train_seconds).collect::<Vec<_>>(),
        ),
        col(
            "wall_seconds",
            rows.iter().map(|r| r.wall_seconds).collect::<Vec<_>>(),
        ),
        col("steps", u(|r| r.steps)),
        col("batch_size", u(|r| r.batch_size)),
        col("device", s(|r| r.device.clone())),
        col(
            "cpu_kernels",
            rows.iter()
                .map(|r| r.cpu_kernels.clone())
                .collect::<Vec<_>>(),
        ),
        col(
            "threads",
            rows.iter().map(|r| r.threads).collect::<Vec<_>>(),
        ),
        col("flowlab_version", s(|r| r.flowlab_version.clone())),
        col(
            "git_rev",
            rows.iter().map(|r| r.git_rev.clone()).collect::<Vec<_>>(),
        ),
    ]);
    DataFrame::new(rows.len(), cols).map_err(|e| Error::Data(e.to_string()))
}

/// The `curves` table.
pub fn curves_frame(records: &[RunRecord]) -> Result<DataFrame> {
    let rows: Vec<CurveRow> = records
        .iter()
        .flat_map(|r| {
            r.curves.iter().map(|p| CurveRow {
                run_id: r.row.run_id.clone(),
                name: r.row.name.clone(),
                variant: r.row.variant.clone(),
                point: p.clone(),
            })
        })
        .collect();
    let n = rows.len();
    let cols = vec![
        col(
            "run_id",
            rows.iter().map(|r| r.run_id.clone()).collect::<Vec<_>>(),
        ),
        col(
            "name",
            rows.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
        ),
        col(
            "variant",
            rows.iter().map(|r| r.variant.clone()).collect::<Vec<_>>(),
        ),
        col(
            "step",
            rows.iter().map(|r| r.point.step as u64).collect::<Vec<_>>(),
        ),
        col(
            "epoch",
            rows.iter()
                .map(|r| r.point.epoch as u64)
                .collect::<Vec<_>>(),
        ),
        col(
            "train_bpd",
            rows.iter().map(|r| r.point.train_bpd).collect::<Vec<_>>(),
        ),
        col(
            "val_bpd",
            rows.iter().map(|r| r.point.val_bpd).collect::<Vec<_>>(),
        ),
        col("lr", rows.iter().map(|r| r.point.lr).collect::<Vec<_>>()),
        col(
            "grad_norm",
            rows.iter().map(|r| r.point.grad_norm).collect::<Vec<_>>(),
        ),
    ];
    DataFrame::new(n, cols).map_err(|e| Error::Data(e.to_string()))
}

/// Rebuilds `runs.parquet` and `curves.parquet` of an experiment folder from its run records.
///
/// Several `flowlab run`s of one sweep take turns (a lock on `<exp>/.tables.lock`), and each
/// reads the records after its own run's is written: the last to write sees every record.
pub fn write_tables(exp_dir: &Path) -> Result<usize> {
    let _turn = lock::FileLock::hold(&exp_dir.join(".tables.lock"))?;
    let records = collect_records(exp_dir)?;
    write_parquet(&mut runs_frame(&records)?, &exp_dir.join("runs.parquet"))?;
    write_parquet(
        &mut curves_frame(&records)?,
        &exp_dir.join("curves.parquet"),
    )?;
    Ok(records.len())
}

/// Reads a parquet file.
pub fn read_parquet(path: &Path) -> Result<DataFrame> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    ParquetReader::new(f).finish().map_err(pl_err(path))
}
