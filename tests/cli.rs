//! The `flowlab` binary: help, check, run with kill-and-resume, compare, sample.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flowlab");

fn flowlab(args: &[&str]) -> (i32, String, String) {
    flowlab_env(args, &[])
}

/// [`flowlab`] with extra environment variables.
fn flowlab_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SPEC: &str = "
name: clitest
data: {dataset: mnist, downscale: 4, batch_size: 32, eval_batch_size: 64, val_size: 64, train_subset: 256, test_subset: 64}
train: {steps: 8, eval_every: 4, log_every: 4}
eval: {importance_samples: 2, n_samples: 4}
models:
  a:
    coupling: {net: {hidden: 4, layers: 1}}
    layers: [{type: repeat, times: 2, layers: [{type: coupling, mask: checkerboard}]}]
  b:
    coupling: {net: {arch: glow, hidden: 8}}
    layers: [{type: actnorm}, {type: coupling, mask: checkerboard}]
sweep:
  grid:
    seed: [0, 1]
";

#[test]
fn help_lists_the_commands() {
    let (code, out, _) = flowlab(&["--help"]);
    assert_eq!(code, 0);
    for c in ["run", "check", "compare", "sample", "eval", "bench"] {
        assert!(out.contains(c), "{out}");
    }
    let (code, out, _) = flowlab(&["run", "--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("--set")
            && out.contains("--only")
            && out.contains("--force")
            && out.contains("--quiet"),
        "{out}"
    );
    // bench's help names its options and the environment that picks the kernels.
    let (code, out, _) = flowlab(&["bench", "--help"]);
    assert_eq!(code, 0);
    for w in ["--json", "--kernels", "FLOWLAB_SIMD", "RAYON_NUM_THREADS"] {
        assert!(out.contains(w), "{w}: {out}");
    }
}

#[test]
fn every_experiment_file_passes_check() {
    let mut n = 0;
    for e in std::fs::read_dir("experiments").unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            let (code, out, err) = flowlab(&["check", p.to_str().unwrap()]);
            assert_eq!(code, 0, "{}:\n{out}\n{err}", p.display());
            assert!(
                out.contains("invertibility") && !out.contains("FAILED"),
                "{out}"
            );
            n += 1;
        }
    }
    assert!(n >= 2);
}

/// `check` loads the data of the sweep: it states its sizes, and refuses data that no run
/// could train on before a sweep records every run as failed.
#[test]
fn check_states_the_data_and_refuses_data_that_cannot_train() {
    let (code, out, err) = flowlab(&["check", "experiments/ci_small.yaml"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("1×14×14, 4000 training, 1000 validation and 1000 test images"),
        "{out}"
    );
    let cases = [
        (
            "data.val_size=70000",
            "cannot hold out 70000 validation images from 60000",
        ),
        ("data.classes=[3,12]", "no images of class [12]"),
        (
            "data.train_subset=10",
            "only 10 training images for data.batch_size 64",
        ),
    ];
    for (set, msg) in cases {
        let (code, _, err) = flowlab(&["check", "experiments/ci_small.yaml", "--set", set]);
        assert_eq!(code, 1, "{set}: {err}");
        assert!(err.contains(msg), "{set}: {err}");
        assert!(
            err.contains("(the data of 4 runs of the sweep)"),
            "{set}: {err}"
        );
    }
}

#[test]
fn broken_spec_exits_2_with_a_located_message() {
    let (code, _, err) = flowlab(&["check", "tests/specs/broken/bad_mask_value.yaml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("tests/specs/broken/bad_mask_value.yaml:8:32: models.glow.layers[1].mask: unknown value 'chequer'"), "{err}");
    let (code, _, err) = flowlab(&["check", "experiments/ci_small.yaml", "--set", "train.lr=-1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("train.lr: must be a positive number"), "{err}");
    let (code, _, err) = flowlab(&["check", "no/such/file.yaml"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("no/such/file.yaml: cannot read the spec"),
        "{err}"
    );
}

#[test]
fn missing_paths_are_named_once_with_their_cause() {
    for args in [["compare", "no/such/results"], ["sample", "no/such/run"]] {
        let (code, _, err) = flowlab(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(args[1]), "{args:?}: {err}");
        // The OS error once: a library I/O error is not printed again as its own cause.
        assert_eq!(err.matches("os error").count(), 1, "{args:?}: {err}");
    }
    let (_, _, err) = flowlab(&["sample", "no/such/run"]);
    assert!(err.contains("a run directory is"), "{err}");
}

#[test]
fn counts_below_one_are_usage_errors() {
    for args in [
        &["bench", "experiments/ci_small.yaml", "--batch", "0"][..],
        &["bench", "experiments/ci_small.yaml", "--steps", "0"],
        &["sample", "no/such/run", "--n", "0"],
    ] {
        let (code, _, err) = flowlab(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("must be at least 1"), "{args:?}: {err}");
    }
}

#[test]
fn files_of_the_wrong_kind_are_refused_by_name() {
    let (code, _, err) = flowlab(&["compare", "experiments/ci_small.yaml"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("experiments/ci_small.yaml: not a .parquet table"),
        "{err}"
    );
    let (code, _, err) = flowlab(&["sample", "no/such/run", "-o", "grid.jpg"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("grid.jpg: samples are written as PNG"),
        "{err}"
    );
}

/// Data no run can train on refuses the sweep before any training; a run that fails in
/// training (here: its checkpoint is unreadable) is recorded as failed, the sweep goes on
/// and exits 1, and the next sweep tries the run again.
#[test]
fn failed_runs_exit_1_with_plain_logs_and_run_again_next_time() {
    let sw = sweep_of(None, "[0, 1]");
    let out = &sw.out;
    // Fewer training images than a batch: no run can train, nothing is written.
    let few = sw.run_args(&["-q", "--only", "a", "--set", "data.train_subset=8"]);
    let (code, _, err) = flowlab(&few);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("only 8 training images for data.batch_size 32")
            && err
                .contains("the data of 2 runs to train: the sweep is refused before any training"),
        "{err}"
    );
    assert!(!out.join("clitest").exists());

    let args = sw.run_args(&["-q", "--only", "a"]);
    let (code, _, err) = flowlab(&args);
    assert_eq!(code, 0, "{err}");
    // One run unfinished again, with a checkpoint that cannot be read.
    let run = std::fs::read_dir(out.join("clitest/runs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(run.join("result.json")).unwrap();
    std::fs::write(run.join("checkpoint.safetensors"), b"not a checkpoint").unwrap();
    let (code, _, err) = flowlab(&args);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("0 done, 0 diverged, 1 failed, 1 already finished"),
        "{err}"
    );
    assert!(
        err.contains("checkpoint.safetensors: cannot be read: header too large (delete the checkpoint, or run with --force, to train the run from its start)"),
        "{err}"
    );
    // stderr is a pipe here: no terminal colour codes in the log lines.
    assert!(!err.contains('\x1b'), "{err:?}");
    let rec = std::fs::read_to_string(run.join("result.json")).unwrap();
    assert!(
        rec.contains("\"status\": \"failed\"") && rec.contains("cannot be read: header too large"),
        "{rec}"
    );
    // Without its checkpoint, sampling from it says why there is nothing to sample from.
    std::fs::remove_file(run.join("checkpoint.safetensors")).unwrap();
    let (code, _, err) = flowlab(&["sample", run.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no checkpoint: the run is recorded as failed (checkpoint "),
        "{err}"
    );
    // The next sweep trains it again, from the start.
    let (code, _, err) = flowlab(&args);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("1 had failed in an earlier sweep and ran again")
            && err.contains("1 done, 0 diverged, 0 failed, 1 already finished"),
        "{err}"
    );
}

fn records(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(dir.join("clitest/runs"))
        .map(|rd| {
            rd.filter_map(|e| {
                let p = e.ok()?.path().join("result.json");
                Some((p.display().to_string(), std::fs::read_to_string(&p).ok()?))
            })
            .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A temporary folder holding SPEC (its `train:` line and seeds replaced when given) as
/// `clitest.yaml`, with `results/` beside it for the runs.
struct Sweep {
    _dir: tempfile::TempDir,
    spec: String,
    out: PathBuf,
}

impl Sweep {
    /// `run <spec> --out <results>` and `more`.
    fn run_args<'a>(&'a self, more: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["run", &self.spec, "--out", self.out.to_str().unwrap()];
        a.extend(more);
        a
    }
}

fn sweep_of(train: Option<&str>, seeds: &str) -> Sweep {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("clitest.yaml");
    let mut text = SPEC.replace("seed: [0, 1]", &format!("seed: {seeds}"));
    if let Some(t) = train {
        text = text.replace("train: {steps: 8, eval_every: 4, log_every: 4}", t);
    }
    std::fs::write(&spec, text).unwrap();
    Sweep {
        out: dir.path().join("results"),
        spec: spec.to_str().unwrap().to_string(),
        _dir: dir,
    }
}

/// Ctrl-C (SIGINT) or SIGTERM stops `flowlab run` gracefully: the run in training
/// checkpoints after its current step (between its evaluations), the process exits
/// 128 + the signal saying where it stopped, and the same command finishes the run.
#[cfg(unix)]
#[test]
fn ctrl_c_checkpoints_the_run_in_training_and_the_same_command_resumes_it() {
    stop_and_resume(libc::SIGINT, 130);
}

#[cfg(unix)]
#[test]
fn sigterm_stops_a_sweep_like_ctrl_c() {
    stop_and_resume(libc::SIGTERM, 143);
}

#[cfg(unix)]
fn stop_and_resume(signal: libc::c_int, status: i32) {
    let sw = sweep_of(
        Some("train: {steps: 3000, eval_every: 1000, log_every: 100}"),
        "[0]",
    );
    let out = &sw.out;
    let args = sw.run_args(&["--quiet", "--only", "a"]);
    let child = Command::new(BIN)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the step-1000 checkpoint exists, 2000 steps before the end.
    let runs = out.join("clitest/runs");
    let ckpt = || {
        std::fs::read_dir(&runs)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("checkpoint.safetensors"))
            .find(|p| p.is_file())
    };
    let t0 = Instant::now();
    while ckpt().is_none() && t0.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(status), "{err}");
    assert!(
        err.contains("stopping: the run in training checkpoints"),
        "{err}"
    );
    let step: usize = err
        .split("has a checkpoint at step ")
        .nth(1)
        .and_then(|r| r.split(" of 3000;").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no stop step in: {err}"));
    assert!((1000..3000).contains(&step), "{step}");
    let run_dir = ckpt().unwrap().parent().unwrap().to_path_buf();
    assert!(
        !run_dir.join("result.json").exists(),
        "a stopped run is not recorded"
    );

    let (code, _, err) = flowlab(&args);
    assert_eq!(code, 0, "{err}");
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("result.json")).unwrap()).unwrap();
    assert_eq!(rec["row"]["status"], "done");
    assert_eq!(rec["row"]["steps"], 3000);
    // Every curve point once, from the first process and the second.
    let steps: Vec<u64> = rec["curves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=30).map(|i| i * 100).collect::<Vec<_>>());
}

/// Ctrl-C during a run's test evaluation (importance sampling of the whole test set, which
/// takes minutes for the full-size models) stops it after the current batch, not at its
/// end; the same command evaluates the run again and records what an uninterrupted run does.
#[cfg(unix)]
#[test]
fn ctrl_c_during_evaluation_stops_it_and_the_same_command_evaluates_again() {
    use std::io::BufRead;
    // The whole test set (10,000 images) with 64 draws each: seconds of evaluation.
    let sw = sweep_of(None, "[0]");
    let args = sw.run_args(&[
        "--only",
        "a",
        "--set",
        "data.test_subset=null",
        "--set",
        "eval.importance_samples=64",
    ]);
    let mut child = Command::new(BIN)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Not a terminal: progress comes as lines, one of them when the evaluation starts.
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut err = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        err += &line;
        err.push('\n');
        if line.contains("evaluating: test bpd over 10000 images") {
            assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
            break;
        }
    }
    err.extend(lines.map(|l| l.unwrap() + "\n"));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(
        err.contains("finished training (step 8) and stopped in its evaluation"),
        "{err}"
    );
    let runs = sw.out.join("clitest/runs");
    let run_dir = std::fs::read_dir(&runs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert!(run_dir.join("checkpoint.safetensors").is_file());
    assert!(!run_dir.join("result.json").exists(), "{err}");

    let (code, _, err) = flowlab(&args);
    assert_eq!(code, 0, "{err}");
    assert!(
        !err.contains("step 1/8"),
        "resumed at step 8, not trained again: {err}"
    );
    let record = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("result.json")).unwrap()).unwrap()
    };
    let resumed = record(&run_dir);
    assert_eq!(resumed["row"]["status"], "done");

    // The same run uninterrupted, in another results folder.
    let other = sw.out.with_file_name("uninterrupted");
    let mut args2 = args.clone();
    let at = args2.iter().position(|a| *a == "--out").unwrap();
    args2[at + 1] = other.to_str().unwrap();
    let (code, _, err) = flowlab(&args2);
    assert_eq!(code, 0, "{err}");
    let full = record(
        &other
            .join("clitest/runs")
            .join(run_dir.file_name().unwrap()),
    );
    for key in ["test_bpd", "val_bpd", "class_bpd"] {
        assert_eq!(resumed["row"][key], full["row"][key], "{key}");
    }
    assert_eq!(resumed["curves"], full["curves"]);
}

/// `flowlab eval` evaluates a trained run again: with the run's settings it reproduces the
/// recorded bpd exactly, and it takes other numbers of importance samples and images.
#[test]
fn eval_reproduces_the_recorded_bpd_and_takes_more_samples_and_images() {
    let sw = sweep_of(None, "[0]");
    let (code, _, err) = flowlab(&sw.run_args(&["-q", "--only", "a"]));
    assert_eq!(code, 0, "{err}");
    let run = std::fs::read_dir(sw.out.join("clitest/runs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("result.json")).unwrap()).unwrap();
    let run_s = run.to_str().unwrap();
    let json_lines = |more: &[&str]| -> Vec<serde_json::Value> {
        let mut args = vec!["eval", run_s, "--json"];
        args.extend(more);
        let (code, out, err) = flowlab(&args);
        assert_eq!(code, 0, "{more:?}: {err}");
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    // The run's own evaluation: K = 2 on its 64 test images; K = 1 on its 64 validation ones.
    let test = json_lines(&[]);
    assert_eq!(test.len(), 1);
    assert_eq!((&test[0]["k"], &test[0]["images"]), (&2.into(), &64.into()));
    assert_eq!(test[0]["bpd"], rec["row"]["test_bpd"]);
    assert_eq!(test[0]["step"], 8);
    let val = json_lines(&["--split", "val"]);
    assert_eq!(val[0]["bpd"], rec["row"]["val_bpd"]);
    // More draws on the whole test set: a tighter bound than one draw.
    let more = json_lines(&["-k", "1,16", "--images", "all"]);
    assert_eq!(more.len(), 2);
    assert_eq!(more[1]["images"], 10000);
    let bpd = |v: &serde_json::Value| v["bpd"].as_f64().unwrap();
    assert!(bpd(&more[1]) < bpd(&more[0]), "{more:?}");
    assert_eq!(more[1]["class_bpd"].as_object().unwrap().len(), 10);

    // The table names what the sweep recorded, to compare with.
    let (code, out, err) = flowlab(&["eval", run_s]);
    assert_eq!(code, 0, "{err}");
    let recorded = format!("{:.4}", rec["row"]["test_bpd"].as_f64().unwrap());
    assert!(
        out.contains(&format!(
            "recorded by the sweep: test bpd {recorded} with K = 2"
        )),
        "{out}"
    );
    let (code, _, err) = flowlab(&["eval", run_s, "--images", "0"]);
    assert_eq!(code, 2, "{err}");
    // An experiment's folder stands for its runs.
    let exp = sw.out.join("clitest");
    let (code, out, err) = flowlab(&["eval", exp.to_str().unwrap(), "--json", "-k", "1"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0]["run"], run.file_name().unwrap().to_str().unwrap());
}

/// Two `flowlab run`s of one sweep at once (one per GPU, say) share its runs: each run is
/// trained by one of them, never both.
#[test]
fn two_processes_share_a_sweep_without_training_a_run_twice() {
    let sw = sweep_of(
        Some("train: {steps: 150, eval_every: 50, log_every: 50}"),
        "[0, 1, 2]",
    );
    let out = &sw.out;
    let args = sw.run_args(&["--quiet"]);
    let start = || {
        Command::new(BIN)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start(), start());
    let done = |c: std::process::Child| {
        let o = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(0), "{err}");
        let n: usize = err
            .split(" done,")
            .next()
            .and_then(|h| h.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no summary in: {err}"));
        n
    };
    let (na, nb) = (done(a), done(b));
    assert_eq!(na + nb, 6);
    assert_eq!(records(out).len(), 6);
}

#[test]
fn a_subset_larger_than_the_data_is_said() {
    let sw = sweep_of(None, "[0]");
    let args = sw.run_args(&["-q", "--only", "a", "--set", "data.train_subset=100000"]);
    let (code, _, err) = flowlab(&args);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("data.train_subset 100000 is more than the 59936 train images"),
        "{err}"
    );
}

/// Without a terminal (a log file, a batch job) progress comes as lines, not bars.
#[test]
fn a_sweep_logged_to_a_file_reports_progress_in_lines() {
    let sw = sweep_of(None, "[0]");
    let args = sw.run_args(&["--only", "a"]);
    let (code, _, err) = flowlab(&args);
    assert_eq!(code, 0, "{err}");
    for line in [
        "[1/1] a-seed=0: step 1/8, train bpd ",
        "[1/1] a-seed=0: step 8/8, train bpd ",
        "[1/1] a-seed=0: evaluating: test bpd over 64 images with 2 dequantization draws each",
        "[1/1] a-seed=0: done, test bpd ",
    ] {
        assert!(err.contains(line), "{line:?} not in:\n{err}");
    }
    let (_, _, err) = flowlab(&args);
    assert!(
        err.contains("[1/1] a-seed=0: already finished (done)"),
        "{err}"
    );
    // --quiet: neither bars nor lines.
    let (_, _, err) = flowlab(&[&args[..], &["--quiet"]].concat());
    assert!(!err.contains("[1/1]"), "{err}");
}

#[test]
fn killed_sweep_resumes_without_redoing_or_losing_runs_then_compare_and_sample() {
    let sw = sweep_of(None, "[0, 1]");
    let out = &sw.out;
    let args = sw.run_args(&["--quiet"]);

    // Start, wait for the first finished run, kill.
    let mut child = Command::new(BIN)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while records(out).is_empty() && t0.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = records(out);
    assert!(
        !before.is_empty() && before.len() < 4,
        "kill came too late to test resuming: {}",
        before.len()
    );

    let (code, stdout, stderr) = flowlab(&args);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("{} already finished", before.len())),
        "{stderr}"
    );
    let after = records(out);
    assert_eq!(after.len(), 4);
    for r in &before {
        assert!(after.contains(r), "finished run {} was redone or lost", r.0);
    }
    assert!(stdout.contains("test_bpd"), "{stdout}");

    let (code, table, err) = flowlab(&[
        "compare",
        out.to_str().unwrap(),
        "--markdown",
        "--require-done",
        "--expect-runs",
        "4",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        table.contains("| variant") && table.contains("| a ") && table.contains("| b "),
        "{table}"
    );
    assert!(out.join("clitest/bpd_vs_step.png").is_file());
    // `--by seed` finds the swept column `train.seed`.
    let (code, table, err) = flowlab(&[
        "compare",
        out.join("clitest").to_str().unwrap(),
        "--by",
        "variant,seed",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        table
            .lines()
            .filter(|l| l.starts_with("a ") || l.starts_with("b "))
            .count(),
        4,
        "{table}"
    );
    let (code, _, err) = flowlab(&["compare", out.to_str().unwrap(), "--max-metric", "0.01"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("above 0.01"), "{err}");

    let run_dir = std::fs::read_dir(out.join("clitest/runs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let png = sw.out.join("s.png");
    let (code, msg, err) = flowlab(&[
        "sample",
        run_dir.to_str().unwrap(),
        "--n",
        "9",
        "-t",
        "0.5",
        "-o",
        png.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        msg.contains("9 samples at temperature 0.5 from step 8"),
        "{msg}"
    );
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
}

#[test]
fn bench_prints_one_json_object_per_variant() {
    let (code, out, err) = flowlab(&[
        "bench",
        "experiments/ci_small.yaml",
        "--batch",
        "4",
        "--steps",
        "1",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for v in &lines {
        for k in [
            "variant",
            "batch",
            "fwd_ms",
            "bwd_ms",
            "opt_ms",
            "step_ms",
            "imgs_per_s",
            "infer_ms",
            "sample_ms",
            "params",
            "gflop_per_step",
            "gflops",
            "peak_gflops",
            "pct_peak",
            "peak_rss_mb",
        ] {
            assert!(v.get(k).is_some(), "missing {k} in {v}");
        }
        assert_eq!(v["batch"], 4);
        assert_eq!(v["shards"], 1, "a batch of ≤ 32 runs whole");
        assert!(
            v["step_ms"].as_f64().unwrap() > 0.0 && v["gflop_per_step"].as_f64().unwrap() > 0.0
        );
        // On a CPU with FMA the peak is measured and the share follows from it.
        if let Some(peak) = v["peak_gflops"].as_f64() {
            let pct = v["pct_peak"].as_f64().unwrap();
            let want = 100.0 * v["gflops"].as_f64().unwrap() / peak;
            assert!(
                peak > 0.0 && (pct - want).abs() < 1e-6 * want.max(1.0),
                "{v}"
            );
        } else {
            assert!(v["pct_peak"].is_null(), "{v}");
        }
    }
    // `--variant V` (the spelling of `--only V`) benches that variant alone, and
    // `--kernels` says which kernels ran.
    let (code, out, err) = flowlab(&[GLOW_BENCH, &["--kernels", "direct"]].concat());
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let variants: Vec<&str> = rows
        .iter()
        .map(|r| r["variant"].as_str().unwrap())
        .collect();
    assert_eq!(variants, ["glow"], "{out}");
    assert_eq!(rows[0]["kernels"], "direct", "{out}");
    let simd = rows[0]["simd"].as_str().unwrap();
    assert!(["avx512", "avx2", "none"].contains(&simd), "{out}");
}

/// `flowlab bench` of ci_small's Glow, one step of batch 2, as JSON.
const GLOW_BENCH: &[&str] = &[
    "bench",
    "experiments/ci_small.yaml",
    "--variant",
    "glow",
    "--batch",
    "2",
    "--steps",
    "1",
    "--json",
];

#[test]
fn bench_reports_the_shards_of_a_cpu_step() {
    // 70 images: ⌈70 / 32⌉ = 3 shards, whatever the thread count.
    for threads in ["1", "2"] {
        let out = Command::new(env!("CARGO_BIN_EXE_flowlab"))
            .args(["bench", "experiments/ci_small.yaml", "--variant", "realnvp"])
            .args(["--batch", "70", "--steps", "1", "--json"])
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["shards"], 3, "{v}");
        assert_eq!(v["threads"].to_string(), threads, "{v}");
    }
}

#[test]
fn bench_reports_the_vector_extension_chosen_by_flowlab_simd() {
    let (code, out, err) = flowlab_env(GLOW_BENCH, &[("FLOWLAB_SIMD", "none")]);
    assert_eq!(code, 0, "{err}");
    let row: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(row["simd"], "none", "{out}");
}

#[test]
fn bench_table_has_aligned_columns() {
    let (code, out, err) = flowlab(&[
        "bench",
        "experiments/ci_small.yaml",
        "--batch",
        "2",
        "--steps",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "a header and a row per variant: {out}");
    assert!(lines[0].starts_with("variant") && lines[0].ends_with("RSS growth MB"));
    // Every column ends where its header does: same line lengths, and each header label's
    // end is a cell's end (a digit) in every row.
    let ends: Vec<usize> = ["batch", "step ms", "params", "GFLOP/s"]
        .iter()
        .map(|h| lines[0].find(&format!(" {h} ")).unwrap() + 1 + h.len())
        .collect();
    for row in &lines[1..] {
        assert_eq!(row.len(), lines[0].len(), "{out}");
        for &e in &ends {
            assert!(row.as_bytes()[e - 1].is_ascii_digit(), "{out}");
            assert_eq!(row.as_bytes().get(e), Some(&b' '), "{out}");
        }
    }
}

#[test]
fn spline_and_conditional_runs_with_temperature_grid_importance_and_class_tables() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spline.yaml");
    std::fs::write(
        &spec,
        "
name: splinetest
data: {dataset: mnist, downscale: 4, batch_size: 32, eval_batch_size: 64, val_size: 64, train_subset: 256, test_subset: 64}
train: {steps: 6, eval_every: 3, log_every: 3}
eval: {importance_samples: 2, n_samples: 4, temperatures: [0.0, 1.0], importance_study: [1, 3]}
models:
  spline:
    coupling: {kind: spline, bins: 4, bound: 3.0, net: {hidden: 4, layers: 1}}
    layers: [{type: repeat, times: 2, layers: [{type: coupling, mask: checkerboard}]}]
  cond:
    classes: 10
    prior: learned
    coupling: {net: {hidden: 4, layers: 1}}
    layers: [{type: repeat, times: 2, layers: [{type: coupling, mask: checkerboard}]}]
",
    )
    .unwrap();
    let out = dir.path().join("out");
    let (code, _, err) = flowlab(&[
        "run",
        spec.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, table, err) = flowlab(&["compare", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        table.contains("importance samples") && table.contains("K=1") && table.contains("K=3"),
        "{table}"
    );
    let df = flowlab::results::read_parquet(&out.join("splinetest/runs.parquet")).unwrap();
    for c in [
        "test_bpd_is1",
        "test_bpd_is3",
        "test_bpd_class0",
        "test_bpd_class9",
    ] {
        assert!(df.column(c).is_ok(), "missing column {c}");
    }
    let run = |prefix: &str| {
        std::fs::read_dir(out.join("splinetest/runs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
            .unwrap()
    };
    let (run_dir, cond_dir) = (run("spline-"), run("cond-"));
    assert!(run_dir.join("samples-temperatures.png").is_file());
    let png3 = dir.path().join("three.png");
    let (code, _, err) = flowlab(&[
        "sample",
        cond_dir.to_str().unwrap(),
        "--label",
        "3",
        "-o",
        png3.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = flowlab(&["sample", cond_dir.to_str().unwrap(), "--label", "10"]);
    assert_eq!(code, 1);
    assert!(err.contains("out of range"), "{err}");
    let (code, _, err) = flowlab(&["sample", run_dir.to_str().unwrap(), "--label", "1"]);
    assert_eq!(code, 1);
    assert!(err.contains("class-conditional"), "{err}");
    let png = dir.path().join("grid.png");
    let (code, msg, err) = flowlab(&[
        "sample",
        run_dir.to_str().unwrap(),
        "-n",
        "3",
        "-t",
        "0,0.5,1",
        "-o",
        png.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(msg.contains("3 samples per temperature"), "{msg}");
    let ([_, h, _], _) =
        flowlab::results::png::decode(&std::fs::read(&png).unwrap(), "grid").unwrap();
    // Three rows of 7×7 images at scale 4 with 2-px gaps.
    assert_eq!(h, 3 * (7 * 4 + 2) + 2);
    let (code, _, err) = flowlab(&["sample", run_dir.to_str().unwrap(), "--temperature=-1"]);
    assert_eq!(code, 1);
    assert!(err.contains("temperature must be"), "{err}");
}
