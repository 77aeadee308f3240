//! `flowlab run`: a sweep trained, stopped gracefully on Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use anyhow::Result;
use clap::Args;
use flowlab::results::{self, compare};
use flowlab::runner::{self, RunOptions};

use super::{load_runs, runs_text, say_not_done, Shapes, SpecArgs};

#[derive(Args)]
pub struct RunArgs {
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

pub fn cmd_run(a: RunArgs) -> Result<ExitCode> {
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
