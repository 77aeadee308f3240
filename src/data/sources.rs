//! Custom data sources: `hf://<repo>` (Hugging Face hub, parquet shards with PNG bytes),
//! a parquet file, a folder of PNGs, or a folder of MNIST-layout IDX files.
//!
//! Parquet layout (the hub's image datasets): an `image` column that is either a struct
//! with a `bytes` field (PNG) or plain binary PNG bytes, and an optional integer `label`.

use std::path::{Path, PathBuf};

use polars::prelude::{AnyValue, DataFrame};

use super::{mnist, Dataset};
use crate::results::png::decode;
use crate::{Error, Result};

/// Held-out fraction used as test set when a source has no test part.
const TEST_FRACTION: f64 = 0.1;

/// Loads (train, test) from a source string.
pub fn load(name: &str, source: &str) -> Result<(Dataset, Dataset)> {
    if let Some(repo) = source.strip_prefix("hf://") {
        return hub(name, repo);
    }
    let path = Path::new(source);
    if !path.exists() {
        // A relative source is read from the working directory, not the spec's folder.
        let from = match std::env::current_dir() {
            Ok(cwd) if path.is_relative() => format!(" in {}", cwd.display()),
            _ => String::new(),
        };
        return Err(Error::Data(format!(
            "{name}: source '{source}' does not exist{from} (expected hf://<repo>, a parquet file, a folder of PNGs or of IDX files; a relative path is read from the working directory)"
        )));
    }
    if path.is_file() {
        let all = parquet_file(name, path)?;
        return carve_test(all);
    }
    if let Ok(train) = mnist::from_dir(name, path, mnist::Part::Train) {
        return Ok((train, mnist::from_dir(name, path, mnist::Part::Test)?));
    }
    let (train_dir, test_dir) = (path.join("train"), path.join("test"));
    if train_dir.is_dir() {
        let train = png_dir(&format!("{name}/train"), &train_dir)?;
        return if test_dir.is_dir() {
            Ok((train, png_dir(&format!("{name}/test"), &test_dir)?))
        } else {
            carve_test(train)
        };
    }
    carve_test(png_dir(name, path)?)
}

/// Splits off the last 10% (of a fixed shuffle) as the test part.
fn carve_test(all: Dataset) -> Result<(Dataset, Dataset)> {
    let n_test = ((all.len() as f64 * TEST_FRACTION).round() as usize).max(1);
    let (train, mut test) = all.split(n_test, super::SPLIT_SEED ^ 0x7e57)?;
    test.name = format!("{} (held-out test)", test.name);
    Ok((train, test))
}

/// Stacks decoded images, checking they share one shape.
fn stack(
    name: &str,
    decoded: Vec<([usize; 3], Vec<u8>, String)>,
    labels: Vec<u32>,
) -> Result<Dataset> {
    let first = decoded
        .first()
        .ok_or_else(|| Error::Data(format!("{name}: no images found")))?;
    let shape = first.0;
    let mut bytes = Vec::with_capacity(decoded.len() * shape.iter().product::<usize>());
    for (s, px, origin) in &decoded {
        if *s != shape {
            return Err(Error::Data(format!("{origin}: image is {s:?}, the first image of {name} is {shape:?}; all images must share one shape")));
        }
        bytes.extend_from_slice(px);
    }
    Dataset::new(name, shape, bytes, labels)
}

/// A folder of PNGs; class sub-folders with numeric names (`3/…png`) give labels.
pub fn png_dir(name: &str, dir: &Path) -> Result<Dataset> {
    let mut files: Vec<(PathBuf, Option<u32>)> = Vec::new();
    let read = |d: &Path| -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .map_err(|e| Error::io(d, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        v.sort();
        Ok(v)
    };
    for p in read(dir)? {
        if p.is_dir() {
            let label = p
                .file_name()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u32>().ok());
            for q in read(&p)? {
                if q.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
                    files.push((q, label));
                }
            }
        } else if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
            files.push((p, None));
        }
    }
    if files.is_empty() {
        return Err(Error::Data(format!(
            "{name}: no .png files in {} (nor in its sub-folders)",
            dir.display()
        )));
    }
    let labelled = files.iter().all(|(_, l)| l.is_some());
    let mut decoded = Vec::with_capacity(files.len());
    for (p, _) in &files {
        let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
        let (s, px) = decode(&bytes, &p.display().to_string())?;
        decoded.push((s, px, p.display().to_string()));
    }
    let labels = if labelled {
        files.iter().map(|(_, l)| l.unwrap_or(0)).collect()
    } else {
        Vec::new()
    };
    stack(&format!("{name} ({})", dir.display()), decoded, labels)
}

/// Image bytes of row `i` of an `image` column (struct with `bytes`, or binary).
fn image_bytes(v: AnyValue<'_>) -> Option<Vec<u8>> {
    match v {
        AnyValue::Binary(b) => Some(b.to_vec()),
        AnyValue::BinaryOwned(b) => Some(b),
        AnyValue::Struct(..) | AnyValue::StructOwned(..) => {
            let fields: Vec<(String, AnyValue)> = match &v {
                AnyValue::StructOwned(b) => {
                    b.1.iter()
                        .map(|f| f.name.to_string())
                        .zip(b.0.iter().cloned())
                        .collect()
                }
                _ => v
                    ._iter_struct_av()
                    .zip(struct_names(&v))
                    .map(|(a, n)| (n, a.into_static()))
                    .collect(),
            };
            fields
                .into_iter()
                .find(|(n, _)| n == "bytes")
                .and_then(|(_, a)| image_bytes(a))
        }
        _ => None,
    }
}

fn struct_names(v: &AnyValue<'_>) -> Vec<String> {
    match v {
        AnyValue::Struct(_, _, fields) => fields.iter().map(|f| f.name.to_string()).collect(),
        _ => Vec::new(),
    }
}

/// Decodes a parquet table of PNG images (+ labels).
fn frame_to_dataset(name: &str, df: &DataFrame, origin: &str) -> Result<Dataset> {
    let err = |m: String| Error::Data(format!("{origin}: {m}"));
    let img = df.column("image").map_err(|_| {
        err("no 'image' column (expected PNG bytes or a struct with a 'bytes' field)".into())
    })?;
    let label = df.column("label").ok();
    let mut decoded = Vec::with_capacity(df.height());
    let mut labels = Vec::new();
    for i in 0..df.height() {
        let v = img.get(i).map_err(|e| err(e.to_string()))?;
        let bytes =
            image_bytes(v).ok_or_else(|| err(format!("row {i}: 'image' holds no PNG bytes")))?;
        let (s, px) = decode(&bytes, &format!("{origin} row {i}"))?;
        decoded.push((s, px, format!("{origin} row {i}")));
        if let Some(l) = label {
            let lv = l.get(i).map_err(|e| err(e.to_string()))?;
            let n = lv
                .extract::<i64>()
                .ok_or_else(|| err(format!("row {i}: label {lv} is not an integer")))?;
            labels.push(u32::try_from(n).map_err(|_| err(format!("row {i}: negative label {n}")))?);
        }
    }
    stack(name, decoded, labels)
}

/// A parquet file of PNG images.
pub fn parquet_file(name: &str, path: &Path) -> Result<Dataset> {
    let df = crate::results::read_parquet(path)?;
    frame_to_dataset(
        &format!("{name} ({})", path.display()),
        &df,
        &path.display().to_string(),
    )
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Parquet files of a cached dataset repo (hf-hub's layout: `datasets--org--name/snapshots/<rev>/…`).
fn cached_files(cache: &hf_hub::Cache, repo: &str) -> Vec<(String, PathBuf)> {
    let root = cache
        .path()
        .join(format!("datasets--{}", repo.replace('/', "--")));
    let rev = std::fs::read_to_string(root.join("refs/main")).unwrap_or_default();
    let snap = root.join("snapshots").join(rev.trim());
    let mut out = Vec::new();
    let mut stack = vec![snap.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                let rel = p
                    .strip_prefix(&snap)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, p));
            }
        }
    }
    out.sort();
    out
}

/// A Hugging Face hub dataset repo of parquet shards. Honours HF_ENDPOINT, HF_HOME and
/// HF_HUB_OFFLINE (then only the local cache is read).
pub fn hub(name: &str, repo: &str) -> Result<(Dataset, Dataset)> {
    let cache = hf_hub::Cache::from_env();
    let files: Vec<(String, PathBuf)> = if offline() {
        let f = cached_files(&cache, repo);
        if f.is_empty() {
            return Err(Error::Data(format!(
                "{name}: HF_HUB_OFFLINE is set and hf://{repo} is not in the cache at {} (unset HF_HUB_OFFLINE once to download it)",
                cache.path().display()
            )));
        }
        f
    } else {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(false)
            .build()
            .map_err(|e| Error::Data(format!("{name}: hub client: {e}")))?;
        let ds = api.dataset(repo.to_string());
        let info = ds.info().map_err(|e| {
            Error::Data(format!(
                "{name}: cannot reach hf://{repo} ({e}); offline, use a cached copy with HF_HUB_OFFLINE=1, a local source path, or `dataset: mnist`"
            ))
        })?;
        let mut out = Vec::new();
        for s in info
            .siblings
            .iter()
            .filter(|s| s.rfilename.ends_with(".parquet"))
        {
            let p = ds.get(&s.rfilename).map_err(|e| {
                Error::Data(format!(
                    "{name}: downloading {} from hf://{repo}: {e}",
                    s.rfilename
                ))
            })?;
            out.push((s.rfilename.clone(), p));
        }
        out
    };
    let part = |key: &str| -> Result<Option<Dataset>> {
        let shards: Vec<&(String, PathBuf)> = files
            .iter()
            .filter(|(f, _)| f.rsplit('/').next().unwrap_or(f).contains(key))
            .collect();
        if shards.is_empty() {
            return Ok(None);
        }
        let mut all: Option<Dataset> = None;
        for (f, p) in shards {
            let d = parquet_file(&format!("{name}/{f}"), p)?;
            all = Some(match all {
                None => d,
                Some(mut a) => {
                    if a.shape != d.shape {
                        return Err(Error::Data(format!(
                            "{name}: shard {f} has images {:?}, earlier shards {:?}",
                            d.shape, a.shape
                        )));
                    }
                    a.images.extend(d.images);
                    a.labels.extend(d.labels);
                    a
                }
            });
        }
        Ok(all.map(|mut d| {
            d.name = format!("{name}/{key} (hf://{repo})");
            d
        }))
    };
    match (part("train")?, part("test")?) {
        (Some(tr), Some(te)) => Ok((tr, te)),
        (Some(tr), None) => carve_test(tr),
        _ => Err(Error::Data(format!(
            "{name}: hf://{repo} has no parquet file with 'train' in its name (files: {:?})",
            files.iter().map(|f| &f.0).collect::<Vec<_>>()
        ))),
    }
}
