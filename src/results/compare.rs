//! `flowlab compare`: the ablation table (mean ± std over seeds) and a bpd-vs-step plot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use polars::prelude::{AnyValue, Column, DataFrame, DataType};

use super::font::{draw_text, text_width};
use super::png::Canvas;
use super::read_parquet;
use crate::{Error, Result};

/// One row of the comparison table.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CompareRow {
    /// Values of the `--by` columns.
    pub key: Vec<String>,
    pub n_runs: usize,
    pub n_done: usize,
    pub mean: Option<f64>,
    pub std: Option<f64>,
    pub params: Option<f64>,
    pub imgs_per_s: Option<f64>,
}

/// The `runs.parquet` files under `path` (a parquet file, an experiment folder, or a results root).
pub fn find_tables(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        if path.extension().is_none_or(|e| e != "parquet") {
            return Err(Error::Data(format!(
                "{}: not a .parquet table: give a results folder, an experiment's results \
                 folder or its runs.parquet",
                path.display()
            )));
        }
        return Ok(vec![path.to_path_buf()]);
    }
    let direct = path.join("runs.parquet");
    if direct.is_file() {
        return Ok(vec![direct]);
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path().join("runs.parquet")))
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(Error::Data(format!(
            "{}: no runs.parquet here or in its sub-folders (run `flowlab run` first)",
            path.display()
        )));
    }
    Ok(out)
}

fn column<'a>(df: &'a DataFrame, name: &str, path: &Path) -> Result<&'a Column> {
    df.column(name).map_err(|_| {
        let names: Vec<String> = df
            .get_column_names()
            .iter()
            .map(|s| s.to_string())
            .collect();
        Error::Data(format!(
            "{}: no column '{name}'; columns: {}",
            path.display(),
            names.join(", ")
        ))
    })
}

fn cell_text(c: &Column, i: usize) -> String {
    match c.get(i) {
        Ok(AnyValue::String(s)) => s.to_string(),
        Ok(AnyValue::StringOwned(s)) => s.to_string(),
        Ok(AnyValue::Null) | Err(_) => "-".into(),
        Ok(v) => v.to_string(),
    }
}

fn numbers(c: &Column) -> Result<Vec<Option<f64>>> {
    let f = c
        .cast(&DataType::Float64)
        .map_err(|e| Error::Data(e.to_string()))?;
    let ca = f.f64().map_err(|e| Error::Data(e.to_string()))?;
    Ok((0..ca.len()).map(|i| ca.get(i)).collect())
}

fn mean_std(v: &[f64]) -> (Option<f64>, Option<f64>) {
    if v.is_empty() {
        return (None, None);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let s = if v.len() > 1 {
        Some((v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt())
    } else {
        None
    };
    (Some(m), s)
}

/// A `--by` name: an exact column, else the one column having it as a dotted path segment
/// (`coupling` → `model.coupling.kind`, `lr` → `train.lr`).
fn group_column<'a>(df: &'a DataFrame, name: &str, path: &Path) -> Result<&'a Column> {
    if let Ok(c) = df.column(name) {
        return Ok(c);
    }
    let hits: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|s| s.to_string())
        .filter(|c| c.split('.').any(|seg| seg == name))
        .collect();
    match hits.as_slice() {
        [one] => column(df, one, path),
        [] => column(df, name, path),
        many => Err(Error::Data(format!(
            "{}: '{name}' matches several columns: {}",
            path.display(),
            many.join(", ")
        ))),
    }
}

/// Groups the runs of `df` by `by` and summarises `metric` over finished runs.
pub fn summarise(
    df: &DataFrame,
    path: &Path,
    by: &[String],
    metric: &str,
) -> Result<Vec<CompareRow>> {
    let keys: Vec<&Column> = by
        .iter()
        .map(|b| group_column(df, b, path))
        .collect::<Result<_>>()?;
    let metric_c = column(df, metric, path)?;
    if !(metric_c.dtype().is_numeric() || metric_c.dtype().is_null()) {
        let numeric: Vec<&str> = df
            .columns()
            .iter()
            .filter(|c| c.dtype().is_numeric())
            .map(|c| c.name().as_str())
            .collect();
        return Err(Error::Data(format!(
            "{}: metric '{metric}' is not a number column; number columns: {}",
            path.display(),
            numeric.join(", ")
        )));
    }
    let metric_v = numbers(metric_c)?;
    let status = column(df, "status", path)?;
    let params = numbers(column(df, "params", path)?)?;
    let speed = numbers(column(df, "train_imgs_per_s", path)?)?;
    let mut groups: BTreeMap<Vec<String>, Vec<usize>> = BTreeMap::new();
    let mut order: Vec<Vec<String>> = Vec::new();
    for i in 0..df.height() {
        let k: Vec<String> = keys.iter().map(|c| cell_text(c, i)).collect();
        if !groups.contains_key(&k) {
            order.push(k.clone());
        }
        groups.entry(k).or_default().push(i);
    }
    Ok(order
        .into_iter()
        .map(|k| {
            let idx = &groups[&k];
            let done: Vec<usize> = idx
                .iter()
                .copied()
                .filter(|&i| cell_text(status, i) == "done")
                .collect();
            let vals: Vec<f64> = done.iter().filter_map(|&i| metric_v[i]).collect();
            let (mean, std) = mean_std(&vals);
            let p: Vec<f64> = idx.iter().filter_map(|&i| params[i]).collect();
            let s: Vec<f64> = done.iter().filter_map(|&i| speed[i]).collect();
            CompareRow {
                key: k,
                n_runs: idx.len(),
                n_done: done.len(),
                mean,
                std,
                params: mean_std(&p).0,
                imgs_per_s: mean_std(&s).0,
            }
        })
        .collect())
}

/// One line per run of `df` that is not done: `name: diverged at step 3 (loss is NaN)`.
/// The table's row of such a run has no metric, so this says why.
pub fn not_done(df: &DataFrame, path: &Path) -> Result<Vec<String>> {
    let name = column(df, "name", path)?;
    let status = column(df, "status", path)?;
    let step = numbers(column(df, "status_step", path)?)?;
    let reason = column(df, "status_reason", path)?;
    Ok((0..df.height())
        .filter(|&i| cell_text(status, i) != "done")
        .map(|i| {
            let at = step[i].map(|s| format!(" at step {s}")).unwrap_or_default();
            let why = match cell_text(reason, i) {
                r if r == "-" => String::new(),
                r => format!(" ({r})"),
            };
            format!("{}: {}{at}{why}", cell_text(name, i), cell_text(status, i))
        })
        .collect())
}

/// Renders the table, aligned for a terminal or as GitHub markdown.
pub fn render(rows: &[CompareRow], by: &[String], metric: &str, markdown: bool) -> String {
    let fmt =
        |v: Option<f64>, d: usize| v.map(|x| format!("{x:.d$}")).unwrap_or_else(|| "-".into());
    let mut head: Vec<String> = by.to_vec();
    head.extend([
        format!("{metric} (mean ± std)"),
        "params".into(),
        "train img/s".into(),
        "runs (done/all)".into(),
    ]);
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut c = r.key.clone();
            let m = match (r.mean, r.std) {
                (Some(m), Some(s)) => format!("{m:.4} ± {s:.4}"),
                (Some(m), None) => format!("{m:.4}"),
                _ => "-".into(),
            };
            c.extend([
                m,
                fmt(r.params, 0),
                fmt(r.imgs_per_s, 1),
                format!("{}/{}", r.n_done, r.n_runs),
            ]);
            c
        })
        .collect();
    table(&head, &body, markdown)
}

/// Test bpd against the number of importance samples (the `test_bpd_is<K>` columns of
/// `eval.importance_study`), one row per group, mean ± std over finished runs.
/// `None` when the table has no such columns.
pub fn importance_table(
    df: &DataFrame,
    path: &Path,
    by: &[String],
    markdown: bool,
) -> Result<Option<String>> {
    let mut ks: Vec<(u64, String)> = df
        .get_column_names()
        .iter()
        .filter_map(|c| {
            c.strip_prefix(super::IMPORTANCE_PREFIX)
                .and_then(|k| k.parse().ok())
                .map(|k| (k, c.to_string()))
        })
        .collect();
    if ks.is_empty() {
        return Ok(None);
    }
    ks.sort();
    let per_k: Vec<Vec<CompareRow>> = ks
        .iter()
        .map(|(_, c)| summarise(df, path, by, c))
        .collect::<Result<_>>()?;
    let mut head: Vec<String> = by.to_vec();
    head.extend(ks.iter().map(|(k, _)| format!("K={k}")));
    let body: Vec<Vec<String>> = (0..per_k[0].len())
        .map(|i| {
            let mut row = per_k[0][i].key.clone();
            row.extend(per_k.iter().map(|rows| match (rows[i].mean, rows[i].std) {
                (Some(m), Some(s)) => format!("{m:.4} ± {s:.4}"),
                (Some(m), None) => format!("{m:.4}"),
                _ => "-".into(),
            }));
            row
        })
        .collect();
    Ok(Some(table(&head, &body, markdown)))
}

/// Aligns a header and rows for a terminal, or as a GitHub markdown table.
fn table(head: &[String], body: &[Vec<String>], markdown: bool) -> String {
    let widths: Vec<usize> = (0..head.len())
        .map(|j| {
            std::iter::once(&head[j])
                .chain(body.iter().map(|r| &r[j]))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| -> String {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        if markdown {
            format!("| {} |", padded.join(" | "))
        } else {
            padded.join("  ").trim_end().to_string()
        }
    };
    let mut out = vec![line(head)];
    if markdown {
        out.push(format!(
            "|{}|",
            widths
                .iter()
                .map(|w| "-".repeat(w + 2))
                .collect::<Vec<_>>()
                .join("|")
        ));
    } else {
        out.push(
            widths
                .iter()
                .map(|w| "-".repeat(*w))
                .collect::<Vec<_>>()
                .join("  "),
        );
    }
    out.extend(body.iter().map(|r| line(r)));
    out.join("\n")
}

const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

/// Longest legend label of the curve plot, in characters (the 34 in [`run_groups`]).
const LABEL_CHARS: usize = 34;

/// Run id → the legend label of its `--by` group: the group's values joined by " / ",
/// JSON punctuation dropped (`{"order":"reverse"}` → `order:reverse`), cut to
/// 34 characters with a `~` (the plot font is ASCII).
pub fn run_groups(df: &DataFrame, path: &Path, by: &[String]) -> Result<BTreeMap<String, String>> {
    let keys: Vec<&Column> = by
        .iter()
        .map(|b| group_column(df, b, path))
        .collect::<Result<_>>()?;
    // Tables without run ids (none written by flowlab) fall back to variant colours.
    let Ok(run) = df.column("run_id") else {
        return Ok(BTreeMap::new());
    };
    Ok((0..df.height())
        .map(|i| {
            let label = keys
                .iter()
                .map(|c| {
                    cell_text(c, i)
                        .chars()
                        .filter(|ch| !matches!(ch, '{' | '}' | '"' | '[' | ']'))
                        .collect::<String>()
                })
                .collect::<Vec<_>>()
                .join(" / ");
            let label = if label.chars().count() > LABEL_CHARS {
                let cut: String = label.chars().take(LABEL_CHARS - 1).collect();
                format!("{cut}~")
            } else {
                label
            };
            (cell_text(run, i), label)
        })
        .collect())
}

/// Plots validation bpd (solid) and train bpd (light) against step, one colour per group:
/// the run's label in `groups` (see [`run_groups`]), else its variant.
pub fn plot_curves(
    curves: &DataFrame,
    path: &Path,
    title: &str,
    groups: &BTreeMap<String, String>,
) -> Result<Canvas> {
    let step = numbers(column(curves, "step", path)?)?;
    let val = numbers(column(curves, "val_bpd", path)?)?;
    let train = numbers(column(curves, "train_bpd", path)?)?;
    let run = column(curves, "run_id", path)?;
    let variant = column(curves, "variant", path)?;
    let mut variants: Vec<String> = Vec::new();
    let mut series: BTreeMap<(String, bool), Vec<(f64, f64)>> = BTreeMap::new();
    let mut run_variant: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..curves.height() {
        let r = cell_text(run, i);
        let v = groups
            .get(&r)
            .cloned()
            .unwrap_or_else(|| cell_text(variant, i));
        if !variants.contains(&v) {
            variants.push(v.clone());
        }
        run_variant.insert(r.clone(), v);
        for (vals, is_val) in [(&val, true), (&train, false)] {
            if let (Some(s), Some(b)) = (step[i], vals[i]) {
                if b.is_finite() {
                    series.entry((r.clone(), is_val)).or_default().push((s, b));
                }
            }
        }
    }
    let pts: Vec<(f64, f64)> = series.values().flatten().copied().collect();
    let (w, h, l, r, t, b) = (720i64, 440i64, 60i64, 20i64, 30i64, 40i64);
    let mut c = Canvas::new(w as usize, h as usize, [255, 255, 255]);
    let black = [0, 0, 0];
    draw_text(&mut c, title, l, 8, 2, black);
    if pts.is_empty() {
        draw_text(&mut c, "no curve points", l + 10, h / 2, 2, black);
        return Ok(c);
    }
    let (x0, x1) = (0.0, pts.iter().map(|p| p.0).fold(1.0, f64::max));
    let mut ys: Vec<f64> = pts.iter().map(|p| p.1).collect();
    ys.sort_by(|a, b| a.total_cmp(b));
    // Robust y-range: ignore the worst 5% (the first steps) so the interesting part is visible.
    let (y0, y1) = (
        ys[0],
        ys[((ys.len() - 1) as f64 * 0.95) as usize].max(ys[0] + 1e-3),
    );
    let px = |x: f64| l + ((x - x0) / (x1 - x0) * (w - l - r) as f64).round() as i64;
    let py = |y: f64| t + ((y1 - y.min(y1)) / (y1 - y0) * (h - t - b) as f64).round() as i64;
    c.line((l, t), (l, h - b), black);
    c.line((l, h - b), (w - r, h - b), black);
    for k in 0..=4 {
        let yv = y0 + (y1 - y0) * k as f64 / 4.0;
        let label = format!("{yv:.2}");
        draw_text(
            &mut c,
            &label,
            l - 6 - text_width(&label, 2),
            py(yv) - 5,
            2,
            black,
        );
        c.line((l - 4, py(yv)), (l, py(yv)), black);
        let xv = x0 + (x1 - x0) * k as f64 / 4.0;
        let xl = format!("{}", xv.round() as i64);
        draw_text(
            &mut c,
            &xl,
            px(xv) - text_width(&xl, 2) / 2,
            h - b + 8,
            2,
            black,
        );
    }
    draw_text(
        &mut c,
        "step",
        w - r - text_width("step", 2),
        h - b + 24,
        2,
        black,
    );
    draw_text(&mut c, "bpd", 6, 8, 2, black);
    for ((run_id, is_val), mut s) in series {
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
        let vi = variants
            .iter()
            .position(|v| Some(v) == run_variant.get(&run_id))
            .unwrap_or(0);
        let base = PALETTE[vi % PALETTE.len()];
        // Train curves in a light tint of the variant's colour.
        let color = if is_val {
            base
        } else {
            base.map(|v| ((v as u16 + 2 * 255) / 3) as u8)
        };
        for pair in s.windows(2) {
            c.line(
                (px(pair[0].0), py(pair[0].1)),
                (px(pair[1].0), py(pair[1].1)),
                color,
            );
        }
        for p in &s {
            c.set(px(p.0), py(p.1), color);
        }
    }
    let text_w = variants
        .iter()
        .map(|v| text_width(v, 2))
        .max()
        .unwrap_or(0)
        .max(120);
    let lx = w - r - text_w - 26;
    for (i, v) in variants.iter().enumerate() {
        let y = t + 6 + i as i64 * 14;
        let col = PALETTE[i % PALETTE.len()];
        for dy in 0..3 {
            c.line((lx, y + dy), (lx + 20, y + dy), col);
        }
        draw_text(&mut c, v, lx + 26, y - 3, 2, black);
    }
    draw_text(
        &mut c,
        "solid: val  light: train",
        l + 8,
        t + 4,
        1,
        [90, 90, 90],
    );
    Ok(c)
}

/// Reads the table and returns it (for tests and the CLI).
pub fn load(path: &Path) -> Result<DataFrame> {
    read_parquet(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::{IntoColumn, NamedFrom, Series};

    #[test]
    fn by_names_resolve_to_path_segments_and_summaries_use_done_runs_only() {
        let df = DataFrame::new(
            4,
            vec![
                Series::new("variant".into(), ["g", "g", "g", "r"]).into_column(),
                Series::new(
                    "model.coupling.kind".into(),
                    ["affine", "affine", "additive", "affine"],
                )
                .into_column(),
                Series::new("train.lr".into(), [1e-3, 1e-3, 1e-3, 1e-3]).into_column(),
                Series::new("status".into(), ["done", "done", "done", "diverged"]).into_column(),
                Series::new("test_bpd".into(), [1.0, 2.0, 3.0, f64::NAN]).into_column(),
                Series::new("params".into(), [10u64, 10, 10, 20]).into_column(),
                Series::new("train_imgs_per_s".into(), [5.0, 7.0, 6.0, 1.0]).into_column(),
            ],
        )
        .unwrap();
        let p = Path::new("t.parquet");
        let e = summarise(&df, p, &["variant".into()], "model.coupling.kind").unwrap_err();
        assert!(
            e.to_string()
                .contains("not a number column; number columns: train.lr, test_bpd, params"),
            "{e}"
        );
        let rows = summarise(&df, p, &["variant".into(), "coupling".into()], "test_bpd").unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].key, vec!["g", "affine"]);
        assert_eq!(
            (rows[0].n_runs, rows[0].n_done, rows[0].mean),
            (2, 2, Some(1.5))
        );
        assert!((rows[0].std.unwrap() - 0.5f64.sqrt()).abs() < 1e-12);
        assert_eq!((rows[2].n_runs, rows[2].n_done, rows[2].mean), (1, 0, None));
        assert!(summarise(&df, p, &["nope".into()], "test_bpd")
            .unwrap_err()
            .to_string()
            .contains("no column 'nope'"));
        let md = render(
            &rows,
            &["variant".into(), "coupling".into()],
            "test_bpd",
            true,
        );
        assert!(
            md.contains("| g       | affine   | 1.5000 ± 0.7071"),
            "{md}"
        );
    }

    #[test]
    fn plot_groups_label_runs_by_their_by_values() {
        let df = DataFrame::new(
            3,
            vec![
                Series::new("run_id".into(), ["a", "b", "c"]).into_column(),
                Series::new("variant".into(), ["glow", "glow", "glow"]).into_column(),
                Series::new(
                    "model.layers[0].step[1]".into(),
                    [
                        r#"{"order":"reverse","type":"permute"}"#,
                        r#"{"param":"lu","type":"invconv"}"#,
                        r#"{"param":"lu","type":"invconv"}"#,
                    ],
                )
                .into_column(),
                Series::new(
                    "model.coupling.kind".into(),
                    ["additive", "affine", "affine"],
                )
                .into_column(),
            ],
        )
        .unwrap();
        let by = ["model.layers[0].step[1]".into(), "coupling".into()];
        let g = run_groups(&df, Path::new("t.parquet"), &by).unwrap();
        assert_eq!(g["b"], "param:lu,type:invconv / affine");
        assert_eq!(g["b"], g["c"]);
        assert!(
            g["a"].starts_with("order:reverse,type:permute / add") && g["a"].ends_with('~'),
            "{}",
            g["a"]
        );
        assert_eq!(g["a"].chars().count(), LABEL_CHARS);
    }
}
