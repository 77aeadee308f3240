//! The `flowlab` command line: run | check | compare | sample.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use flowlab::build::{build_model, params_under};
use flowlab::data::shape_of;
use flowlab::results::{self, compare};
use flowlab::runner::{self, RunOptions};
use flowlab::spec::DataSpec;
use flowlab::spec::{Experiment, Run, SpecErrors};
use flowlab::testing::{perturb_params, round_trip, FlowCheck};
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
    /// a diverging run is recorded as `diverged` and the sweep goes on. A run that failed
    /// (an error such as missing data, recorded as `failed`) is tried again by the next
    /// `flowlab run`, from its checkpoint if it has one. Ctrl-C (or SIGTERM) stops the sweep
    /// gracefully: the run in training checkpoints after its current step (in evaluation:
    /// after its current batch), and the same command resumes it (a second Ctrl-C quits
    /// at once).
    Run(RunArgs),
    /// Check a spec without training: layer table with shapes and parameter counts, sweep
    /// size, the data's sizes (loaded: a class it lacks or too few images is an error), and
    /// a numerical invertibility check on a random batch.
    Check(SpecArgs),
    /// Summarise results: mean ± std of a metric over seeds, grouped by columns.
    Compare(CompareArgs),
    /// Draw samples from a trained run.
    Sample(SampleArgs),
    /// Evaluate trained runs again from their last checkpoints, without training: the test
    /// (or validation) bpd with other numbers of importance samples (`-k 1,8,64`) or of
    /// images (`--images all`) than their sweep used.
    Eval(eval::EvalArgs),
    /// Time the training step (forward, backward, optimizer), inference and sampling of
    /// each variant on random batches; FLOPs from the graph, GFLOP/s and its share of the
    /// cores' FMA peak (on a CPU: the best of measurements between the timed steps); peak
    /// memory.
    #[command(after_help = BENCH_ENV)]
    Bench(BenchArgs),
}

/// The environment variables that change what `bench` (and training) runs on.
const BENCH_ENV: &str = "\
Environment:
  RAYON_NUM_THREADS=N      worker threads (default: one per logical core)
  FLOWLAB_SIMD=SET         CPU microkernels: avx512, avx2 or none (default: AVX-512 only
                           where its FMAs outrun AVX2's, else AVX2; `simd` in the output)
  FLOWLAB_HUGE_PAGES=0     tensors in 4 KiB pages instead of transparent huge pages
  FLOWLAB_MALLOC_TUNING=0  glibc's default malloc thresholds (and no huge pages)";

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// Batch size (default: the spec's).
    #[arg(long, value_parser = at_least_one)]
    batch: Option<usize>,
    /// Timed steps (after 2 warm-up steps).
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    steps: usize,
    /// One JSON object per variant per line.
    #[arg(long)]
    json: bool,
    /// Kernels for the conv/elementwise hot ops: flowlab's fused CPU kernels, the same
    /// without Winograd convolutions (direct), or candle's stock ops (to measure the
    /// difference).
    #[arg(long, value_enum, default_value_t = KernelChoice::Fast)]
    kernels: KernelChoice,
}

/// A count that must be at least 1 (batch sizes, steps, images).
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum KernelChoice {
    Fast,
    Direct,
    Candle,
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

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// Results root.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Rerun runs that already finished.
    #[arg(long)]
    force: bool,
    /// No progress output (without it: bars on a terminal; in a log file, a line at each
    /// run's start and end and every 30 s).
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
struct CompareArgs {
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

#[derive(Args)]
struct SampleArgs {
    /// A run's folder (results/<experiment>/runs/<name>-<id>).
    run_dir: PathBuf,
    /// Number of images.
    #[arg(long, short, default_value_t = 64, value_parser = at_least_one)]
    n: usize,
    /// Sampling temperature(s) (0 = the mode of every latent). Several
    /// (`-t 0,0.5,0.7,0.85,1`) write a temperature study: one labelled row of `n` images
    /// per temperature, all decoded from the same noise.
    #[arg(
        long = "temperature",
        short,
        value_delimiter = ',',
        default_value = "0.7"
    )]
    temperatures: Vec<f64>,
    /// Random seed of the latents.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Class of every sample (class-conditional models; without it they cycle through
    /// the classes).
    #[arg(long)]
    label: Option<usize>,
    /// Output PNG.
    #[arg(long, short, default_value = "samples.png")]
    output: PathBuf,
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

mod eval;

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
        Command::Run(a) => cmd_run(a),
        Command::Check(a) => cmd_check(a),
        Command::Compare(a) => cmd_compare(a),
        Command::Sample(a) => cmd_sample(a),
        Command::Eval(a) => eval::cmd_eval(a),
        Command::Bench(a) => cmd_bench(a),
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
        let key = serde_json::to_string(d).map_err(|e| e.to_string())?;
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

/// Set by the first Ctrl-C (SIGINT) or SIGTERM during `flowlab run`.
static STOP: AtomicBool = AtomicBool::new(false);
/// That signal's number (the exit status is 128 + it: 130 for Ctrl-C, 143 for SIGTERM).
static SIGNAL: AtomicI32 = AtomicI32::new(2);

/// Ctrl-C and SIGTERM (a job scheduler's pre-emption) stop a sweep gracefully: the run in
/// training checkpoints after its current step (or evaluation batch) and no other run
/// starts. A second signal ends the process at once.
#[cfg(unix)]
fn stop_gracefully_on_signals() {
    extern "C" fn on_signal(signal: libc::c_int) {
        // Only async-signal-safe calls here: atomics, write(2) and _exit(2).
        if STOP.swap(true, Ordering::SeqCst) {
            unsafe { libc::_exit(128 + signal) };
        }
        SIGNAL.store(signal, Ordering::SeqCst);
        const MSG: &[u8] = b"\nstopping: the run in training checkpoints after its current step \
            or evaluation batch; Ctrl-C again quits at once\n";
        unsafe { libc::write(2, MSG.as_ptr().cast(), MSG.len()) };
    }
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

#[cfg(not(unix))]
fn stop_gracefully_on_signals() {}

fn cmd_run(a: RunArgs) -> Result<ExitCode> {
    let shapes = Shapes::default();
    let (exp, runs) = load_runs(&a.spec, &shapes)?;
    stop_gracefully_on_signals();
    eprintln!(
        "{}: {} → {}",
        exp.name,
        runs_text(runs.len()),
        results::experiment_dir(&a.out, &exp.name).display()
    );
    let s = runner::run_sweep(
        &exp,
        &runs,
        &RunOptions {
            out: a.out.clone(),
            force: a.force,
            quiet: a.quiet,
            stop: Some(&STOP),
        },
    )?;
    let mut notes = String::new();
    if s.busy > 0 {
        notes += &format!(", {} in training in another flowlab process", s.busy);
    }
    if s.retried > 0 {
        notes += &format!(
            "; {} had failed in an earlier sweep and ran again",
            s.retried
        );
    }
    eprintln!(
        "{}: {} done, {} diverged, {} failed, {} already finished{notes}",
        runs_text(s.total),
        s.done,
        s.diverged,
        s.failed,
        s.skipped,
    );
    // Every run of the spec, all variants (a variant left out by --only may not plan: then
    // there is no note).
    if let Ok(all) = exp.runs(&[], &|d| shapes.of(d)) {
        let elsewhere = runner::runs_from_elsewhere(&s.exp_dir, &all)?;
        if !elsewhere.is_empty() {
            eprintln!(
                "note: {} in {} {} not of this spec as it is now (an earlier version of it, \
                 or other --set values); the tables include them and `compare` groups them \
                 with this spec's runs by variant: move them away, or use --out for a new folder",
                runs_text(elsewhere.len()),
                s.exp_dir.display(),
                if elsewhere.len() == 1 { "is" } else { "are" },
            );
        }
    }
    let table = s.exp_dir.join("runs.parquet");
    let df = compare::load(&table)?;
    let rows = compare::summarise(&df, &table, &["variant".to_string()], "test_bpd")?;
    say!(
        "{}",
        compare::render(&rows, &["variant".to_string()], "test_bpd", false)
    );
    say_not_done(&compare::not_done(&df, &table)?);
    say!(
        "\ntables: {}  {}",
        table.display(),
        s.exp_dir.join("curves.parquet").display()
    );
    if s.done + s.skipped > 0 {
        say!("samples: {}/runs/*/samples-t*.png", s.exp_dir.display());
    }
    if s.stopped {
        match &s.stopped_at {
            Some(at) if at.step == at.steps => eprintln!(
                "stopped: {} finished training (step {}) and stopped in its evaluation; the same \
                 `flowlab run` evaluates it and runs the runs after it",
                at.run, at.step
            ),
            Some(at) => eprintln!(
                "stopped: {} has a checkpoint at step {} of {}; the same `flowlab run` resumes \
                 it and the runs after it",
                at.run, at.step, at.steps
            ),
            None => eprintln!("stopped between runs; the same `flowlab run` goes on from there"),
        }
        return Ok(ExitCode::from((128 + SIGNAL.load(Ordering::SeqCst)) as u8));
    }
    Ok(if s.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
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

fn shape_text(s: &[usize]) -> String {
    s.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("×")
}

fn cmd_check(a: SpecArgs) -> Result<ExitCode> {
    let (exp, runs) = load_runs(&a, &Shapes::default())?;
    let mut ok = true;
    say!(
        "{}: {} variant(s), {} run(s) in the sweep",
        exp.file,
        exp.variants.len(),
        runs.len()
    );
    // The data of every run, loaded: its sizes, and what cannot be trained on (a class the
    // data lacks, more validation images than there are, fewer training images than a
    // batch), refused here rather than in the middle of a sweep.
    let mut data: Vec<(String, &DataSpec, usize)> = Vec::new();
    for run in &runs {
        let key = serde_json::to_string(&run.config.data)?;
        match data.iter_mut().find(|(k, _, _)| *k == key) {
            Some(d) => d.2 += 1,
            None => data.push((key, &run.config.data, 1)),
        }
    }
    for (_, spec, n) in data {
        match flowlab::data::load(spec) {
            Ok(s) => say!(
                "data: {} {}, {} training, {} validation and {} test images",
                s.train.name,
                shape_text(&s.train.shape),
                s.train.len(),
                s.val.len(),
                s.test.len()
            ),
            Err(e) => {
                eprintln!("error: {e}\n  (the data of {} of the sweep)", runs_text(n));
                ok = false;
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    for run in &runs {
        let v = &run.config.variant;
        if !seen.insert(v.clone()) {
            continue;
        }
        let n_runs = runs.iter().filter(|r| &r.config.variant == v).count();
        let model = build_model(
            &run.plan,
            0,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )?;
        say!(
            "\n== {v} ({n_runs} run{}) ==",
            if n_runs == 1 { "" } else { "s" }
        );
        let plan = &run.plan;
        let mut rows: Vec<[String; 5]> = vec![[
            "layer".into(),
            "type".into(),
            "in".into(),
            "out".into(),
            "params".into(),
        ]];
        if let Some(noise) = &plan.dequant_noise {
            for l in noise {
                rows.push([
                    l.name.clone(),
                    format!("{} (dequant)", l.op.kind()),
                    shape_text(&l.in_shape),
                    shape_text(&l.out_shape),
                    params_under(model.store(), &l.name).to_string(),
                ]);
            }
        }
        for l in &plan.layers {
            rows.push([
                l.name.clone(),
                l.op.kind().into(),
                shape_text(&l.in_shape),
                shape_text(&l.out_shape),
                params_under(model.store(), &l.name).to_string(),
            ]);
        }
        let w: Vec<usize> = (0..5)
            .map(|j| rows.iter().map(|r| r[j].chars().count()).max().unwrap_or(0))
            .collect();
        for r in &rows {
            say!(
                "  {:<a$}  {:<b$}  {:>c$}  {:>d$}  {:>e$}",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                a = w[0],
                b = w[1],
                c = w[2],
                d = w[3],
                e = w[4]
            );
        }
        say!(
            "  total parameters: {}   data {} → latent {}",
            model.num_params(),
            shape_text(&plan.data_shape),
            shape_text(&plan.latent_shape)
        );
        // Numerical invertibility with lightly perturbed parameters (at init the zero-initialised
        // couplings are the identity, which would make the check vacuous).
        perturb_params(model.store(), 0.01, 1)?;
        let mut check = FlowCheck::new(&plan.data_shape);
        check.batch = 4;
        if plan.classes > 0 {
            check = check.labels(plan.classes);
        }
        let rt = round_trip(model.flows(), &check)?;
        let tol_ldj = 1e-3 * rt.max_abs_ldj.max(1.0);
        let pass = rt.max_inverse_err <= 1e-3 && rt.max_ldj_sum <= tol_ldj;
        ok &= pass;
        say!(
            "  invertibility: max|x − f⁻¹(f(x))| = {:.2e}, max|ldj_f + ldj_f⁻¹| = {:.2e}  {}",
            rt.max_inverse_err,
            rt.max_ldj_sum,
            if pass { "ok" } else { "FAILED" }
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn cmd_compare(a: CompareArgs) -> Result<ExitCode> {
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
        say!("## {name} ({} runs)\n", df.height());
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

fn cmd_sample(a: SampleArgs) -> Result<ExitCode> {
    if a.output
        .extension()
        .is_some_and(|e| !e.eq_ignore_ascii_case("png"))
    {
        bail!(
            "{}: samples are written as PNG; name the output *.png",
            a.output.display()
        );
    }
    let run = load_trained(&a.run_dir, None)?;
    let (model, step) = (&run.model, run.step);
    if let Some(bad) = a
        .temperatures
        .iter()
        .find(|t| !(t.is_finite() && **t >= 0.0))
    {
        bail!("temperature must be a finite number ≥ 0, got {bad}");
    }
    if let [t] = a.temperatures[..] {
        runner::save_samples(model, a.n, t, a.seed, a.label, &a.output)?;
        say!(
            "{} samples at temperature {t} from step {step} → {}",
            a.n,
            a.output.display()
        );
    } else {
        runner::save_temperature_grid(model, a.n, &a.temperatures, a.seed, a.label, &a.output)?;
        say!(
            "{} samples per temperature at {:?} from step {step} → {}",
            a.n,
            a.temperatures,
            a.output.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_bench(a: BenchArgs) -> Result<ExitCode> {
    let (_, runs) = load_runs(&a.spec, &Shapes::default())?;
    flowlab::kernels::set_kernels(match a.kernels {
        KernelChoice::Fast => flowlab::kernels::Kernels::Fast,
        KernelChoice::Direct => flowlab::kernels::Kernels::Direct,
        KernelChoice::Candle => flowlab::kernels::Kernels::Candle,
    });
    let mut seen = std::collections::HashSet::new();
    let runs: Vec<_> = runs
        .iter()
        .filter(|r| seen.insert(r.config.variant.clone()))
        .collect();
    // Rows print as each variant finishes, so the columns get fixed widths up front: the
    // longest variant name, and each header's width for the numbers (right-aligned).
    const HEAD: [&str; 15] = [
        "variant",
        "batch",
        "fwd ms",
        "bwd ms",
        "opt ms",
        "step ms",
        "img/s",
        "infer ms",
        "sample ms",
        "params",
        "GFLOP/step",
        "GFLOP/s",
        "% FMA peak",
        "peak RSS MB",
        "RSS growth MB",
    ];
    let name_w = runs
        .iter()
        .map(|r| r.config.variant.chars().count())
        .chain([HEAD[0].len()])
        .max()
        .unwrap_or(0);
    let row = |cells: &[String]| -> String {
        cells
            .iter()
            .zip(HEAD)
            .enumerate()
            .map(|(j, (c, h))| match j {
                0 => format!("{c:<name_w$}"),
                _ => format!("{c:>w$}", w = h.len().max(7)),
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    if !a.json {
        say!("{}", row(&HEAD.map(String::from)));
    }
    for run in runs {
        let dev = runner::device(&run.config.device)?;
        let batch = a.batch.unwrap_or(run.config.data.batch_size);
        let r = flowlab::bench::bench_run(run, batch, 2, a.steps.max(1), &dev)?;
        if a.json {
            say!("{}", serde_json::to_string(&r)?);
        } else {
            say!(
                "{}",
                row(&[
                    r.variant.clone(),
                    r.batch.to_string(),
                    format!("{:.1}", r.fwd_ms),
                    format!("{:.1}", r.bwd_ms),
                    format!("{:.1}", r.opt_ms),
                    format!("{:.1}", r.step_ms),
                    format!("{:.1}", r.imgs_per_s),
                    format!("{:.1}", r.infer_ms),
                    format!("{:.1}", r.sample_ms),
                    r.params.to_string(),
                    format!("{:.3}", r.gflop_per_step),
                    format!("{:.2}", r.gflops),
                    r.pct_peak.map_or("-".into(), |p| format!("{p:.0}")),
                    format!("{:.0}", r.peak_rss_mb),
                    format!("{:.1}", r.rss_growth_mb),
                ])
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
