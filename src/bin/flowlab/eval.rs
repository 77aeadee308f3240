//! `flowlab eval`: a trained run's bpd again, from its last checkpoint, with other numbers
//! of importance samples or images than its sweep used.

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use flowlab::runner;
use flowlab::train::CheckpointPaths;
use flowlab::trained::{Images, Split};
use indicatif::{ProgressBar, ProgressDrawTarget};

use super::{at_least_one, load_trained};

#[derive(Args)]
pub struct EvalArgs {
    /// Runs' folders (results/<experiment>/runs/<name>-<id>), or an experiment's results
    /// folder (results/<experiment>) for all its runs that have a checkpoint.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Importance samples K per image: the dequantization draws whose logsumexp is each
    /// image's likelihood (1 = the single-draw bound). Several (`-k 1,8,64`) evaluate
    /// each. Default: the run's `eval.importance_samples` (for `--split val`: 1, as in
    /// training).
    #[arg(long = "importance-samples", short = 'k', value_delimiter = ',', value_parser = at_least_one)]
    k: Vec<usize>,
    /// The run's test images or its validation images.
    #[arg(long, value_enum, default_value_t = SplitArg::Test)]
    split: SplitArg,
    /// How many: a number, or `all` (test: the whole test set, whatever the run's
    /// `data.test_subset`). Default: the images the run's own evaluation used.
    #[arg(long, value_parser = images_arg)]
    images: Option<Images>,
    /// Seed of the dequantization draws. Default: the run's, which with the run's K and
    /// images reproduces its recorded bpd.
    #[arg(long)]
    seed: Option<u64>,
    /// Device to evaluate on (`cpu`, `cuda`, `cuda:1`). Default: the run's.
    #[arg(long)]
    device: Option<String>,
    /// One JSON object per K: `run, step, split, images, k, bpd, class_bpd, seconds`.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SplitArg {
    Test,
    Val,
}

fn images_arg(text: &str) -> Result<Images, String> {
    if text == "all" {
        return Ok(Images::All);
    }
    at_least_one(text)
        .map(Images::Count)
        .map_err(|e| format!("{e} (or `all`)"))
}

pub fn cmd_eval(a: EvalArgs) -> Result<ExitCode> {
    let mut dirs = Vec::new();
    for path in &a.runs {
        let runs = path.join("runs");
        if !path.join("config.yaml").is_file() && runs.is_dir() {
            // An experiment's folder: its runs, leaving out those with nothing to evaluate.
            let mut found: Vec<PathBuf> = std::fs::read_dir(&runs)
                .with_context(|| format!("reading {}", runs.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("config.yaml").is_file())
                .collect();
            found.sort();
            for d in found {
                if CheckpointPaths::in_dir(&d).tensors.is_file() {
                    dirs.push(d);
                } else {
                    eprintln!("{}: no checkpoint, left out", d.display());
                }
            }
        } else {
            dirs.push(path.clone());
        }
    }
    if dirs.is_empty() {
        bail!("no run with a checkpoint in {:?}", a.runs);
    }
    for (i, dir) in dirs.iter().enumerate() {
        if i > 0 && !a.json {
            say!();
        }
        eval_run(&a, dir)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Evaluates the run in `dir` as `a` asks, printing its table (or JSON lines).
fn eval_run(a: &EvalArgs, dir: &Path) -> Result<()> {
    let run = load_trained(dir, a.device.as_deref())?;
    let split = match a.split {
        SplitArg::Test => Split::Test,
        SplitArg::Val => Split::Val,
    };
    let images = a.images.unwrap_or(Images::Run);
    let set = run.eval_set(split, images)?;
    let ks = if a.k.is_empty() {
        vec![run.own_k(split)]
    } else {
        a.k.clone()
    };
    let name = run.name();
    let what = format!("{} bpd", split.as_str());
    if !a.json {
        say!(
            "{name} at step {}: {what} over {} images",
            run.step,
            set.len()
        );
        say!("{:>6}  {:>10}  {:>9}", "K", what, "seconds");
    }
    let bar = if a.quiet || !std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden())
    } else {
        ProgressBar::new(set.len() as u64)
    };
    bar.set_style(runner::bar_style(
        "{msg} [{bar:30}] {pos}/{len} images  eta {eta}",
    ));
    let mut last = None;
    for &k in &ks {
        bar.set_message(format!("K = {k}"));
        bar.reset();
        let started = Instant::now();
        let (bpd, by_class) = run.evaluate(&set, k, a.seed, &mut |done, _| {
            bar.set_position(done as u64);
            ControlFlow::Continue(())
        })?;
        let seconds = started.elapsed().as_secs_f64();
        bar.suspend(|| {
            if a.json {
                let classes: serde_json::Map<String, serde_json::Value> = by_class
                    .iter()
                    .map(|(c, b)| (c.to_string(), (*b).into()))
                    .collect();
                say!(
                    "{}",
                    serde_json::json!({
                        "run": name,
                        "step": run.step,
                        "split": split.as_str(),
                        "images": set.len(),
                        "k": k,
                        "bpd": bpd,
                        "class_bpd": classes,
                        "seconds": seconds,
                    })
                );
            } else {
                say!("{k:>6}  {bpd:>10.4}  {seconds:>9.1}");
            }
        });
        last = Some((k, by_class));
    }
    bar.finish_and_clear();
    if a.json {
        return Ok(());
    }
    if let Some((k, by_class)) = last.filter(|(_, c)| !c.is_empty()) {
        let classes: Vec<String> = by_class
            .iter()
            .map(|(c, b)| format!("{c}: {b:.4}"))
            .collect();
        say!("per class (K = {k}): {}", classes.join(", "));
    }
    // What the sweep recorded for the same images and seed, to compare with.
    let record = flowlab::results::read_record(&run.dir).ok().flatten();
    if let (Some(rec), Images::Run, None) = (record, images, a.seed) {
        let recorded = match split {
            Split::Test => rec.row.test_bpd,
            Split::Val => rec.row.val_bpd,
        };
        if let Some(b) = recorded {
            let k = run.own_k(split);
            say!("recorded by the sweep: {what} {b:.4} with K = {k}, same images and draws");
        }
    }
    Ok(())
}
