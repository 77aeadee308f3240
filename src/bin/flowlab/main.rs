//! The `flowlab` command line: run | check | compare | sample | eval | bench, one module each.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use flowlab::data::shape_of;
use flowlab::spec::DataSpec;
use flowlab::spec::{Experiment, Run, SpecErrors};
use flowlab::trained::TrainedRun;

/// The system allocator, advising transparent huge pages for tensors (2 MiB and up).
#[global_allocator]
static ALLOC: flowlab::kernels::HugePageAlloc = flowlab::kernels::HugePageAlloc;

/// Normalizing flows for images: declarative YAML experiments, exact log-determinants,
/// parquet results.
#[derive(Parser)]
#[command(name = "flowlab", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train every run of an experiment's sweep and write results/<experiment>/.
    ///
    /// Finished runs are skipped, an interrupted run resumes from its last checkpoint,
    /// a diverging run is recorded as `diverged` and the sweep goes on. Data no run can
    /// train on (missing, a class it lacks, fewer images than a batch) and a missing device
    /// refuse the sweep before any training. A run that fails in training (an unreadable
    /// checkpoint, a full disk) is recorded as `failed` and tried again by the next
    /// `flowlab run`, from its checkpoint if it has one. Ctrl-C (or SIGTERM) stops the sweep
    /// gracefully: the run in training checkpoints after its current step (in evaluation:
    /// after its current batch), and the same command resumes it (a second Ctrl-C quits
    /// at once).
    Run(run::RunArgs),
    /// Check a spec without training.
    ///
    /// Prints the layer table with shapes and parameter counts, the sweep size, the data's
    /// sizes (loaded: a class it lacks or too few images is an error), and a numerical
    /// invertibility check on a random batch.
    Check(SpecArgs),
    /// Summarise results: mean ± std of a metric over seeds, grouped by columns.
    Compare(compare::CompareArgs),
    /// Draw samples from a trained run.
    Sample(sample::SampleArgs),
    /// Evaluate trained runs again from their checkpoints, without training.
    ///
    /// The test (or validation) bpd with other numbers of importance samples (`-k 1,8,64`)
    /// or of images (`--images all`) than their sweep used; with a run's own settings, its
    /// recorded bpd exactly.
    Eval(eval::EvalArgs),
    /// Time each variant's training step, inference and sampling.
    ///
    /// The training step (forward, backward, optimizer), inference and sampling of each
    /// variant on random batches; FLOPs from the graph, GFLOP/s and its share of the cores'
    /// FMA peak (on a CPU: the best of measurements between the timed steps); peak memory.
    #[command(after_help = bench::BENCH_ENV)]
    Bench(bench::BenchArgs),
}

/// A count that must be at least 1 (batch sizes, steps, images).
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Args)]
struct SpecArgs {
    /// Experiment file (YAML).
    spec: PathBuf,
    /// Override a spec value, Hydra-style: `--set train.steps=200` (repeatable); list
    /// entries as `models.glow.layers[0].levels=2` or `layers.0`; a sweep axis as
    /// `sweep.grid.train.lr=[1e-3,2e-3]`.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    set: Vec<String>,
    /// Only these model variants (repeatable or comma-separated; `--variant` is the same).
    #[arg(long, visible_alias = "variant", value_delimiter = ',')]
    only: Vec<String>,
}

/// `println!` that ends the process quietly when stdout is closed (`flowlab … | head`)
/// instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

mod bench;
mod check;
mod compare;
mod eval;
mod run;
mod sample;

/// Exit code for spec errors (distinct from 1 = a failed check or run).
const SPEC_ERROR: u8 = 2;

fn main() -> ExitCode {
    // Before any thread or tensor op exists (it sets an environment variable).
    flowlab::kernels::tune_candle_pool();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a terminal; plain text in logs and pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    flowlab::kernels::tune_allocator();
    let result = match cli.command {
        Command::Run(a) => run::cmd_run(a),
        Command::Check(a) => check::cmd_check(a),
        Command::Compare(a) => compare::cmd_compare(a),
        Command::Sample(a) => sample::cmd_sample(a),
        Command::Eval(a) => eval::cmd_eval(a),
        Command::Bench(a) => bench::cmd_bench(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(spec) = e.downcast_ref::<SpecErrors>() {
                eprintln!("{spec}");
                let n = spec.0.len();
                eprintln!(
                    "error: the spec has {n} problem{}",
                    if n == 1 { "" } else { "s" }
                );
                return ExitCode::from(SPEC_ERROR);
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// [`shape_of`], each distinct data spec looked up once: a local or hub source is loaded
/// to learn its shape, and a spec's runs (all of them, then those of `--only`) ask for it
/// once each.
#[derive(Default)]
struct Shapes(RefCell<HashMap<String, Result<[usize; 3], String>>>);

impl Shapes {
    fn of(&self, d: &DataSpec) -> Result<[usize; 3], String> {
        let key = flowlab::data::key(d);
        if let Some(r) = self.0.borrow().get(&key) {
            return r.clone();
        }
        let r = shape_of(d);
        self.0.borrow_mut().insert(key, r.clone());
        r
    }
}

fn load_runs(a: &SpecArgs, shapes: &Shapes) -> Result<(Experiment, Vec<Run>)> {
    let exp = Experiment::load(&a.spec, &a.set)?;
    let runs = exp.runs(&a.only, &|d| shapes.of(d))?;
    Ok((exp, runs))
}

/// `1 run`, `2 runs`.
fn runs_text(n: usize) -> String {
    format!("{n} run{}", if n == 1 { "" } else { "s" })
}

/// The runs of a table that are not done, and why, under it.
fn say_not_done(lines: &[String]) {
    if !lines.is_empty() {
        say!("\nnot done ({}):", runs_text(lines.len()));
        for l in lines {
            say!("  {l}");
        }
    }
}

/// [`TrainedRun::load`], saying what a run folder is when `dir` is not one.
fn load_trained(dir: &Path, device: Option<&str>) -> Result<TrainedRun> {
    TrainedRun::load(dir, device).map_err(|e| match e {
        flowlab::Error::Io { path, cause } => anyhow::anyhow!(
            "reading {} (a run directory is results/<experiment>/runs/<run>): {cause}",
            path.display()
        ),
        e => e.into(),
    })
}
