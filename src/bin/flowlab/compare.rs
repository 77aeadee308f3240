//! `flowlab compare`: the ablation table of finished sweeps, and their curves.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use flowlab::results::compare;

use super::{runs_text, say_not_done};

#[derive(Args)]
pub struct CompareArgs {
    /// A results folder, an experiment's results folder, or a runs.parquet file.
    path: PathBuf,
    /// Columns to group by (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "variant")]
    by: Vec<String>,
    /// Metric column to summarise.
    #[arg(long, default_value = "test_bpd")]
    metric: String,
    /// Print a markdown table.
    #[arg(long)]
    markdown: bool,
    /// Fail (exit 1) unless every run finished with status done.
    #[arg(long)]
    require_done: bool,
    /// Fail (exit 1) if any group's mean metric is above this.
    #[arg(long, value_name = "X")]
    max_metric: Option<f64>,
    /// Fail (exit 1) unless the tables hold exactly this many runs.
    #[arg(long, value_name = "N")]
    expect_runs: Option<usize>,
}

pub fn cmd_compare(a: CompareArgs) -> Result<ExitCode> {
    let tables = compare::find_tables(&a.path)?;
    let mut ok = true;
    for t in &tables {
        let df = compare::load(t)?;
        let rows = compare::summarise(&df, t, &a.by, &a.metric)?;
        let exp_dir = t.parent().unwrap_or(Path::new("."));
        let name = exp_dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        say!("## {name} ({})\n", runs_text(df.height()));
        say!("{}", compare::render(&rows, &a.by, &a.metric, a.markdown));
        say_not_done(&compare::not_done(&df, t)?);
        say!();
        if let Some(t) = compare::importance_table(&df, t, &a.by, a.markdown)? {
            say!("test bpd vs importance samples K (eval.importance_study):\n{t}\n");
        }
        let curves_path = exp_dir.join("curves.parquet");
        if curves_path.is_file() {
            let curves = compare::load(&curves_path)?;
            let plot = exp_dir.join("bpd_vs_step.png");
            let groups = compare::run_groups(&df, t, &a.by)?;
            compare::plot_curves(&curves, &curves_path, &name, &groups)?.save(&plot)?;
            say!("plot: {}\n", plot.display());
        }
        if let Some(n) = a.expect_runs {
            if df.height() != n {
                eprintln!(
                    "check failed: {} has {} runs, expected {n}",
                    t.display(),
                    df.height()
                );
                ok = false;
            }
        }
        if a.require_done {
            for r in &rows {
                if r.n_done != r.n_runs {
                    eprintln!(
                        "check failed: group {:?} has {}/{} runs done",
                        r.key, r.n_done, r.n_runs
                    );
                    ok = false;
                }
            }
        }
        if let Some(max) = a.max_metric {
            for r in &rows {
                match r.mean {
                    Some(m) if m <= max => {}
                    other => {
                        eprintln!(
                            "check failed: group {:?} has mean {} = {other:?}, above {max}",
                            r.key, a.metric
                        );
                        ok = false;
                    }
                }
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
