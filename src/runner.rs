//! `flowlab run`: every run of a sweep, with resume, divergence handling, samples and tables.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::build::build_model;
use crate::data::{self, Loader, Splits};
use crate::flow::{FlowCtx, FlowModel};
use crate::results::lock::{clear_run_dir, FileLock};
use crate::results::{self, png, RunRecord, RunRow, Status};
use crate::spec::{parse_device, Experiment, Run};
use crate::train::shard::Sharding;
use crate::train::{self, derive_seed, streams, CheckpointPaths, Outcome};
use crate::{Error, Result};

/// Options of a sweep.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Results root (`results/`).
    pub out: PathBuf,
    /// Rerun runs that already finished.
    pub force: bool,
    /// No progress bars.
    pub quiet: bool,
    /// Set (by a Ctrl-C handler, say) to stop the sweep: the run in training or evaluation
    /// stops after its current step or evaluation batch with a checkpoint, unrecorded, and
    /// no further run starts.
    pub stop: Option<&'static AtomicBool>,
}

/// Counts of a sweep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepSummary {
    pub exp_dir: PathBuf,
    pub total: usize,
    /// Runs found finished (done or diverged) and skipped.
    pub skipped: usize,
    pub done: usize,
    pub diverged: usize,
    pub failed: usize,
    /// Runs that had failed in an earlier sweep and were tried again (counted again in
    /// `done`, `diverged` or `failed`).
    pub retried: usize,
    /// Runs skipped because another `flowlab run` process was training them.
    pub busy: usize,
    /// The sweep stopped on request before its end.
    pub stopped: bool,
    /// The run stopped in training or evaluation, and where.
    pub stopped_at: Option<StoppedAt>,
}

/// Where a stop request left the run it interrupted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoppedAt {
    pub run: String,
    /// The step its checkpoint holds.
    pub step: usize,
    /// Its training steps in all: `step == steps` when it stopped in its final evaluation.
    pub steps: usize,
}

/// How [`execute`] ended.
enum Executed {
    Finished(Box<RunRow>, Vec<train::CurvePoint>),
    /// Stopped on request after step `.0` of `.1` (checkpointed, not recorded).
    Stopped(usize, usize),
}

/// The device named by a spec (`cpu`, `cuda`, `cuda:N`).
pub fn device(name: &str) -> Result<Device> {
    match parse_device(name) {
        Some(None) => Ok(Device::Cpu),
        Some(Some(n)) => Device::new_cuda(n).map_err(|e| {
            Error::Usage(format!(
                "device '{name}': {e} (build with `--features cuda` on a machine with CUDA)"
            ))
        }),
        None => Err(Error::Usage(format!("unknown device '{name}'"))),
    }
}

/// The git revision this flowlab was built from (`-modified` when the checkout's tracked
/// files differed from it), embedded by `build.rs`; `None` for a build outside a git
/// checkout. It names the code that ran, not the folder a run is started in.
pub fn git_rev() -> Option<String> {
    Some(env!("FLOWLAB_GIT_REV"))
        .filter(|s| !s.is_empty())
        .map(String::from)
}

/// Seconds between progress lines in a log (when stderr is not a terminal).
const LINE_EVERY_S: f64 = 30.0;

/// `75` → `1m15s`; `4000` → `1h06m`.
fn duration_text(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// flowlab's progress-bar look for `template` (indicatif's default if it does not parse).
pub fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// Runs every run of `runs` (from `exp`), writing under `opts.out/<experiment>/`.
pub fn run_sweep(exp: &Experiment, runs: &[Run], opts: &RunOptions) -> Result<SweepSummary> {
    // A device this build or machine lacks fails every run on it: refuse the sweep before
    // any training instead of recording each run as failed.
    let mut devices: Vec<&str> = runs.iter().map(|r| r.config.device.as_str()).collect();
    devices.sort_unstable();
    devices.dedup();
    for d in devices {
        device(d)?;
    }
    let exp_dir = results::experiment_dir(&opts.out, &exp.name);
    let mut data_cache = load_data(runs, &exp_dir, opts.force)?;
    std::fs::create_dir_all(exp_dir.join("runs")).map_err(|e| Error::io(&exp_dir, e))?;
    let multi = MultiProgress::with_draw_target(if opts.quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    // Progress bars need a terminal; a log file (nohup, a batch job) gets lines instead.
    let lines = !opts.quiet && !std::io::stderr().is_terminal();
    let sweep_bar = multi.add(ProgressBar::new(runs.len() as u64));
    sweep_bar.set_style(bar_style("sweep [{bar:30}] {pos}/{len} runs  {msg}"));
    let mut summary = SweepSummary {
        exp_dir: exp_dir.clone(),
        total: runs.len(),
        ..Default::default()
    };
    let rev = git_rev();
    let stopping = || opts.stop.is_some_and(|s| s.load(Ordering::Relaxed));
    for (i, run) in runs.iter().enumerate() {
        if stopping() {
            summary.stopped = true;
            break;
        }
        let label = format!("[{}/{}] {}", i + 1, runs.len(), run.name);
        sweep_bar.set_message(run.name.clone());
        let dir = results::run_dir(&exp_dir, &run.name, &run.id);
        // Another `flowlab run` of this sweep may be training this run: leave it to it.
        let Some(_claim) = FileLock::try_claim(&dir)? else {
            tracing::info!(run = %run.name, "in training in another flowlab process, skipped");
            summary.busy += 1;
            sweep_bar.inc(1);
            continue;
        };
        if opts.force {
            clear_run_dir(&dir)?;
        }
        match results::read_record(&dir)? {
            // A failed run is tried again, from its checkpoint if it got that far.
            Some(rec) if !rec.row.status.is_finished() => {
                tracing::info!(run = %run.name, reason = ?rec.row.status_reason, "failed before, trying again");
                summary.retried += 1;
            }
            Some(rec) => {
                tracing::info!(run = %run.name, status = rec.row.status.as_str(), "already finished, skipped");
                if lines {
                    eprintln!("{label}: already finished ({})", rec.row.status.as_str());
                }
                summary.skipped += 1;
                sweep_bar.inc(1);
                continue;
            }
            None => {}
        }
        let yaml = serde_yaml::to_string(&run.config).map_err(|e| Error::Usage(e.to_string()))?;
        train::write_atomic(&dir.join("config.yaml"), yaml.as_bytes())?;
        let started = Instant::now();
        let step_bar = multi.add(ProgressBar::new(0));
        step_bar.set_style(bar_style(
            "  {prefix} [{bar:30}] {pos}/{len} steps  {msg}  eta {eta}",
        ));
        step_bar.set_prefix(run.name.clone());
        let stop = &stopping;
        let log = lines.then_some(label.as_str());
        let (row, curves) = match execute(run, &dir, &mut data_cache, &step_bar, log, stop) {
            Ok(Executed::Finished(row, curves)) => (*row, curves),
            Ok(Executed::Stopped(step, steps)) => {
                step_bar.finish_and_clear();
                tracing::info!(run = %run.name, step, "stopped on request, checkpointed");
                summary.stopped = true;
                summary.stopped_at = Some(StoppedAt {
                    run: run.name.clone(),
                    step,
                    steps,
                });
                break;
            }
            Err(e) => {
                tracing::warn!(run = %run.name, error = %e, "run failed");
                // Whatever the run logged before failing, from its last checkpoint.
                (failed_row(run, &e.to_string()), read_curves(&dir))
            }
        };
        step_bar.finish_and_clear();
        multi.remove(&step_bar);
        let mut row = row;
        row.wall_seconds = started.elapsed().as_secs_f64();
        row.git_rev = rev.clone();
        match row.status {
            Status::Done => summary.done += 1,
            Status::Diverged => summary.diverged += 1,
            Status::Failed => summary.failed += 1,
        }
        tracing::info!(run = %run.name, status = row.status.as_str(), test_bpd = ?row.test_bpd, "finished");
        if lines {
            let bpd = row.test_bpd.map(|b| format!(", test bpd {b:.4}"));
            eprintln!(
                "{label}: {}{} ({})",
                row.status.as_str(),
                bpd.unwrap_or_default(),
                duration_text(row.wall_seconds)
            );
        }
        results::write_record(&dir, &RunRecord { row, curves })?;
        results::write_tables(&exp_dir)?;
        sweep_bar.inc(1);
    }
    sweep_bar.finish_and_clear();
    // Tables are rewritten after each run recorded; when none was (all finished, claimed
    // elsewhere, or stopped before one ended), they are written here, so they exist.
    if summary.done + summary.diverged + summary.failed == 0 {
        results::write_tables(&exp_dir)?;
    }
    Ok(summary)
}

/// The data of every run that will train (not finished yet, or all with `force`), each
/// distinct data spec loaded once. Data that cannot be trained on (a missing file, a class
/// it lacks, fewer training images than a batch) would fail every run that reads it: the
/// sweep is refused before any training, naming how many runs read it.
fn load_data(runs: &[Run], exp_dir: &Path, force: bool) -> Result<HashMap<String, Splits>> {
    let finished = |run: &Run| {
        let rec = results::read_record(&results::run_dir(exp_dir, &run.name, &run.id));
        // An unreadable record is the sweep's to report, when it reaches the run.
        matches!(rec, Ok(Some(r)) if r.row.status.is_finished())
    };
    let to_train = runs.iter().filter(|r| force || !finished(r));
    let mut cache = HashMap::new();
    for (spec, n) in data::distinct(to_train.map(|r| &r.config.data)) {
        let splits = data::load(spec).map_err(|e| {
            Error::Usage(format!(
                "{e}\n  (the data of {n} run{} to train: the sweep is refused before any \
                 training; `flowlab check` states the data of each run)",
                if n == 1 { "" } else { "s" }
            ))
        })?;
        cache.insert(data::key(spec), splits);
    }
    Ok(cache)
}

/// Records in `exp_dir` that are not runs of `spec_runs` (every run of the spec, all
/// variants): runs of an earlier version of the spec, or of other `--set` values. The
/// tables include them.
pub fn runs_from_elsewhere(exp_dir: &Path, spec_runs: &[Run]) -> Result<Vec<RunRecord>> {
    let ids: std::collections::HashSet<&str> = spec_runs.iter().map(|r| r.id.as_str()).collect();
    Ok(results::collect_records(exp_dir)?
        .into_iter()
        .filter(|r| !ids.contains(r.row.run_id.as_str()))
        .collect())
}

fn read_curves(dir: &Path) -> Vec<train::CurvePoint> {
    std::fs::read(CheckpointPaths::in_dir(dir).curves)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn base_row(run: &Run, status: Status) -> RunRow {
    let c = &run.config;
    let on_cpu = parse_device(&c.device) == Some(None);
    RunRow {
        experiment: c.experiment.clone(),
        variant: c.variant.clone(),
        run_id: run.id.clone(),
        name: run.name.clone(),
        seed: c.train.seed,
        status,
        status_step: None,
        status_reason: None,
        params: 0,
        val_bpd: None,
        test_bpd: None,
        importance_samples: c.eval.importance_samples as u64,
        train_imgs_per_s: None,
        infer_ms_per_batch: None,
        sample_ms_per_batch: None,
        train_seconds: 0.0,
        wall_seconds: 0.0,
        steps: 0,
        batch_size: c.data.batch_size as u64,
        device: c.device.clone(),
        cpu_kernels: on_cpu.then(|| crate::kernels::simd().to_string()),
        threads: on_cpu.then(|| rayon::current_num_threads() as u64),
        flowlab_version: env!("CARGO_PKG_VERSION").to_string(),
        git_rev: None,
        swept: run
            .swept
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    serde_json::to_value(v).unwrap_or(serde_json::Value::Null),
                )
            })
            .collect(),
        importance_study: Vec::new(),
        class_bpd: Vec::new(),
    }
}

fn failed_row(run: &Run, reason: &str) -> RunRow {
    // The parameter count belongs to the architecture, whatever became of the run: the
    // model built on the CPU counts it (0 if even that fails).
    let params = build_model(&run.plan, 0, DType::F32, &Device::Cpu)
        .map(|m| m.num_params() as u64)
        .unwrap_or(0);
    RunRow {
        status_reason: Some(reason.to_string()),
        params,
        ..base_row(run, Status::Failed)
    }
}

/// Median wall milliseconds of `f` over `reps` calls (after one warm-up call).
fn time_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f().map(|_| s.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

/// Images `[N, C, H, W]` (values 0..=255) → bytes.
pub fn to_bytes(x: &Tensor) -> Result<Vec<u8>> {
    Ok(x.clamp(0.0, 255.0)?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?)
}

/// Writes a sample grid of `n` images at `temperature` to `path`.
pub fn save_samples(
    model: &FlowModel,
    n: usize,
    temperature: f64,
    seed: u64,
    label: Option<usize>,
    path: &Path,
) -> Result<()> {
    let x = model.sample(n, temperature, &mut model.sample_ctx(seed, n, label)?)?;
    let s = model.data_shape();
    let scale = if s[1] <= 16 { 4 } else { 2 };
    png::image_grid(&to_bytes(&x)?, n, [s[0], s[1], s[2]], scale).save(path)
}

/// Saves a temperature study: one row of `n` samples per temperature, every row decoded
/// from the same standard-normal draws (scaled by T), labelled `t=T`.
pub fn save_temperature_grid(
    model: &FlowModel,
    n: usize,
    temperatures: &[f64],
    seed: u64,
    label: Option<usize>,
    path: &Path,
) -> Result<()> {
    let s = model.data_shape();
    let rows = temperatures
        .iter()
        .map(|&t| {
            let x = model.sample(n, t, &mut model.sample_ctx(seed, n, label)?)?;
            Ok((format!("t={t}"), to_bytes(&x)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let scale = if s[1] <= 16 { 4 } else { 2 };
    png::labelled_rows(&rows, n, [s[0], s[1], s[2]], scale).save(path)
}

/// An evaluation's progress on the run's bar (and, in a log, a line every
/// [`LINE_EVERY_S`]), and the stop request.
struct EvalProgress<'a> {
    bar: &'a ProgressBar,
    log: Option<&'a str>,
    stop: &'a dyn Fn() -> bool,
    last_line: Instant,
}

impl EvalProgress<'_> {
    fn poll(&mut self, what: &str, done: usize, all: usize) -> ControlFlow<()> {
        self.bar
            .set_message(format!("evaluating {what}: {done}/{all} images"));
        if let Some(label) = self.log {
            if self.last_line.elapsed().as_secs_f64() >= LINE_EVERY_S && done < all {
                eprintln!("{label}: evaluating {what}: {done}/{all} images");
                self.last_line = Instant::now();
            }
        }
        if (self.stop)() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

/// Trains and evaluates one run; returns its row and its training curves, or where a stop
/// request left it.
fn execute(
    run: &Run,
    dir: &Path,
    cache: &mut HashMap<String, Splits>,
    bar: &ProgressBar,
    log: Option<&str>,
    stop: &dyn Fn() -> bool,
) -> Result<Executed> {
    let c = &run.config;
    let dev = device(&c.device)?;
    let key = data::key(&c.data);
    // Loaded by `load_data`, unless the run was finished then and is not now (another
    // process cleared it with --force).
    if !cache.contains_key(&key) {
        cache.insert(key.clone(), data::load(&c.data)?);
    }
    let splits = &cache[&key];
    let model = build_model(
        &run.plan,
        derive_seed(c.train.seed, streams::INIT, 0),
        DType::F32,
        &dev,
    )?;
    let train_l = Loader::new(&splits.train, c.data.batch_size, DType::F32, &dev)?;
    let val_l = Loader::new(&splits.val, c.data.eval_batch_size, DType::F32, &dev)?;
    let test_l = Loader::new(&splits.test, c.data.eval_batch_size, DType::F32, &dev)?;
    let total = train::total_steps(c, train_l.len());
    bar.set_length(total as u64);
    let ckpt = CheckpointPaths::in_dir(dir);
    let mut last_line: Option<Instant> = None;
    let report = train::train(
        &model,
        c,
        &train_l,
        &val_l,
        Some(&ckpt),
        &mut |step, total, bpd, ips| {
            bar.set_position(step as u64);
            bar.set_message(format!("bpd {bpd:.3}  {ips:.0} img/s"));
            if let Some(label) = log {
                let due = last_line.is_none_or(|t| t.elapsed().as_secs_f64() >= LINE_EVERY_S);
                if due || step == total {
                    let eta = (total - step) as f64 * c.data.batch_size as f64 / ips.max(1e-9);
                    eprintln!(
                        "{label}: step {step}/{total}, train bpd {bpd:.3}, {ips:.0} img/s, eta {}",
                        duration_text(eta)
                    );
                    last_line = Some(Instant::now());
                }
            }
        },
        stop,
    )?;
    if let Outcome::Stopped { step } = report.outcome {
        return Ok(Executed::Stopped(step, total));
    }
    let mut row = base_row(run, Status::Done);
    row.params = model.num_params() as u64;
    row.steps = report.steps as u64;
    row.train_seconds = report.train_seconds;
    row.train_imgs_per_s = (report.steps > report.resumed_from).then_some(report.imgs_per_s);
    if let Outcome::Diverged { step, reason } = &report.outcome {
        row.status = Status::Diverged;
        row.status_step = Some(*step as u64);
        row.status_reason = Some(reason.clone());
        return Ok(Executed::Finished(Box::new(row), report.curves));
    }
    // Evaluation and samples; a stop request during evaluation leaves the run checkpointed
    // after its last step, and the same command evaluates it.
    let evaluated = (|| -> Result<()> {
        if let Some(label) = log {
            eprintln!(
                "{label}: evaluating: test bpd over {} images with {} dequantization draws each",
                test_l.len(),
                c.eval.importance_samples
            );
        }
        let seed = c.train.seed;
        let mut ev = EvalProgress {
            bar,
            log,
            stop,
            last_line: Instant::now(),
        };
        row.val_bpd = Some(train::eval::mean_bpd(
            &model,
            &val_l,
            &val_l.ordered(),
            1,
            streams::val_seed(seed),
            &mut |d, n| ev.poll("val bpd", d, n),
        )?);
        let (test_bpd, by_class) = train::eval::bpd_by_class(
            &model,
            &test_l,
            &test_l.ordered(),
            c.eval.importance_samples,
            streams::test_seed(seed, 0),
            &mut |d, n| ev.poll("test bpd", d, n),
        )?;
        row.test_bpd = Some(test_bpd);
        row.class_bpd = by_class;
        for (i, &k) in c.eval.importance_study.iter().enumerate() {
            let what = format!("importance study, K = {k}");
            let bpd = train::eval::mean_bpd(
                &model,
                &test_l,
                &test_l.ordered(),
                k,
                streams::test_seed(seed, 1 + i as u64),
                &mut |d, n| ev.poll(&what, d, n),
            )?;
            row.importance_study.push((k as u64, bpd));
        }
        let eval_batch: Vec<usize> = (0..c.data.eval_batch_size.min(test_l.len())).collect();
        let (xb, yb) = test_l.batch(&eval_batch)?;
        let sharding = Sharding::new(&model);
        row.infer_ms_per_batch = Some(time_ms(3, || {
            let bpd = |ctx: &mut FlowCtx, xs: &Tensor| model.bpd(xs, ctx).map(|_| ());
            sharding.map(&model, &xb, yb.as_ref(), 0, bpd).map(|_| ())
        })?);
        row.sample_ms_per_batch = Some(time_ms(3, || {
            model
                .sample(
                    eval_batch.len(),
                    1.0,
                    &mut model.sample_ctx(0, eval_batch.len(), None)?,
                )
                .map(|_| ())
        })?);
        for &t in &c.eval.temperatures {
            save_samples(
                &model,
                c.eval.n_samples,
                t,
                derive_seed(seed, streams::SAMPLE, 0),
                None,
                &dir.join(format!("samples-t{t}.png")),
            )?;
        }
        if c.eval.temperatures.len() > 1 {
            save_temperature_grid(
                &model,
                c.eval.n_samples.min(10),
                &c.eval.temperatures,
                derive_seed(seed, streams::SAMPLE, 1),
                None,
                &dir.join("samples-temperatures.png"),
            )?;
        }
        Ok(())
    })();
    match evaluated {
        Ok(()) => Ok(Executed::Finished(Box::new(row), report.curves)),
        Err(Error::Stopped) => Ok(Executed::Stopped(report.steps, total)),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_read_as_seconds_minutes_or_hours() {
        use super::duration_text as d;
        assert_eq!(
            [d(0.4), d(59.0), d(75.0), d(3599.0), d(4000.0), d(-3.0)],
            ["0s", "59s", "1m15s", "59m59s", "1h06m", "0s"]
        );
    }

    #[test]
    fn git_rev_is_the_revision_built_from() {
        // The sources' checkout, as `build.rs` saw it (tests run where they were built).
        let out = std::process::Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output();
        let Some(head) = out.ok().filter(|o| o.status.success()) else {
            eprintln!("skipped: not built from a git checkout");
            return;
        };
        let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
        let rev = super::git_rev().expect("a build inside a git checkout embeds its revision");
        assert!(
            rev == head || rev == format!("{head}-modified"),
            "{rev} vs {head}"
        );
    }
}
