//! End-to-end runs on tiny MNIST subsets (7×7, a few steps): tables, resume, divergence,
//! reload, reproducibility.

use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device};
use flowlab::build::build_model;
use flowlab::data::{shape_of, Loader};
use flowlab::results::lock::FileLock;
use flowlab::results::{self, Status};
use flowlab::runner::{run_sweep, RunOptions};
use flowlab::spec::Experiment;
use flowlab::train::{self, derive_seed, streams, CheckpointPaths, Outcome};

const TINY: &str = "
name: tiny
data: {dataset: mnist, downscale: 4, batch_size: 32, eval_batch_size: 64, val_size: 64, train_subset: 256, test_subset: 64}
train: {steps: 6, eval_every: 3, log_every: 2, lr: 2.0e-3}
eval: {importance_samples: 2, n_samples: 4, temperatures: [1.0, 0.7]}
models:
  realnvp:
    coupling: {net: {hidden: 4, layers: 1}}
    layers:
      - {type: repeat, times: 2, layers: [{type: coupling, mask: checkerboard}]}
  glow:
    coupling: {scale: sigmoid, net: {arch: glow, hidden: 8}}
    layers:
      - {type: repeat, times: 2, layers: [{type: actnorm}, {type: invconv}, {type: coupling, mask: checkerboard}]}
sweep:
  grid:
    seed: [0, 1]
";

/// A quiet sweep's options, writing under `out`.
fn options(out: &Path, stop: Option<&'static AtomicBool>) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        force: false,
        quiet: true,
        stop,
    }
}

fn sweep(text: &str, out: &Path, overrides: &[&str]) -> flowlab::runner::SweepSummary {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let exp = Experiment::from_text(text, "tiny.yaml", "tiny", &o).unwrap();
    let runs = exp.runs(&[], &shape_of).unwrap();
    run_sweep(&exp, &runs, &options(out, None)).unwrap()
}

/// The error of a sweep of TINY with `overrides`, which must be refused having written
/// nothing.
fn refused(overrides: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let exp = Experiment::from_text(TINY, "tiny.yaml", "tiny", &o).unwrap();
    let runs = exp.runs(&[], &shape_of).unwrap();
    let e = run_sweep(&exp, &runs, &options(dir.path(), None))
        .unwrap_err()
        .to_string();
    assert!(!dir.path().join("tiny").exists(), "{overrides:?}: {e}");
    e
}

#[test]
fn tiny_sweep_writes_tables_samples_and_skips_finished_runs() {
    let dir = tempfile::tempdir().unwrap();
    let s = sweep(TINY, dir.path(), &[]);
    assert_eq!((s.total, s.done, s.failed, s.diverged), (4, 4, 0, 0));
    let exp = dir.path().join("tiny");
    let runs = results::read_parquet(&exp.join("runs.parquet")).unwrap();
    assert_eq!(runs.height(), 4);
    for c in [
        "experiment",
        "variant",
        "run_id",
        "train.seed",
        "seed",
        "status",
        "params",
        "val_bpd",
        "test_bpd",
        "importance_samples",
        "train_imgs_per_s",
        "infer_ms_per_batch",
        "sample_ms_per_batch",
        "train_seconds",
        "steps",
        "device",
        "cpu_kernels",
        "threads",
        "flowlab_version",
        "git_rev",
    ] {
        assert!(runs.column(c).is_ok(), "runs.parquet lacks column {c}");
    }
    let curves = results::read_parquet(&exp.join("curves.parquet")).unwrap();
    // log every 2 of 6 steps → points at 2, 4, 6 (3 is an eval too) per run.
    assert_eq!(curves.height(), 4 * 4);
    let recs = results::collect_records(&exp).unwrap();
    for r in &recs {
        assert_eq!(r.row.status, Status::Done);
        // A CPU run records the kernel set and threads its speed came from.
        assert_eq!(r.row.cpu_kernels.as_deref(), Some(flowlab::kernels::simd()));
        assert!(r.row.threads.is_some_and(|t| t >= 1), "{:?}", r.row.threads);
        let (v, t) = (r.row.val_bpd.unwrap(), r.row.test_bpd.unwrap());
        assert!(v.is_finite() && t.is_finite() && t > 0.0, "{v} {t}");
        let d = results::run_dir(&exp, &r.row.name, &r.row.run_id);
        for f in [
            "config.yaml",
            "checkpoint.safetensors",
            "samples-t1.png",
            "samples-t0.7.png",
        ] {
            assert!(d.join(f).is_file(), "{} lacks {f}", d.display());
        }
    }
    // Rerun: everything is skipped, nothing lost.
    let again = sweep(TINY, dir.path(), &[]);
    assert_eq!((again.skipped, again.done), (4, 0));
    assert_eq!(results::collect_records(&exp).unwrap(), recs);

    // A record written before the kernel-set and thread columns existed still reads (as
    // nulls) and its run still counts as finished.
    let r0 = &recs[0];
    let f = results::run_dir(&exp, &r0.row.name, &r0.row.run_id).join("result.json");
    let mut old: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
    let row = old["row"].as_object_mut().unwrap();
    assert!(row.remove("cpu_kernels").is_some() && row.remove("threads").is_some());
    std::fs::write(&f, serde_json::to_vec(&old).unwrap()).unwrap();
    let again = sweep(TINY, dir.path(), &[]);
    assert_eq!((again.skipped, again.done), (4, 0));
    let read = results::collect_records(&exp).unwrap();
    let r = read.iter().find(|r| r.row.run_id == r0.row.run_id).unwrap();
    assert_eq!((r.row.cpu_kernels.as_deref(), r.row.threads), (None, None));
    let runs = results::read_parquet(&exp.join("runs.parquet")).unwrap();
    assert_eq!(runs.column("cpu_kernels").unwrap().null_count(), 1);
}

/// Without the `cuda` feature no CUDA device exists: a sweep on one is refused whole,
/// before any run starts or is recorded.
#[cfg(not(feature = "cuda"))]
#[test]
fn a_sweep_on_a_missing_device_is_refused_before_training() {
    let e = refused(&["device=cuda:0"]);
    assert!(
        e.contains("device 'cuda:0'") && e.contains("--features cuda"),
        "{e}"
    );
}

#[test]
fn a_stop_request_ends_the_sweep_before_its_next_run() {
    static STOP: AtomicBool = AtomicBool::new(true);
    let dir = tempfile::tempdir().unwrap();
    let exp = Experiment::from_text(TINY, "tiny.yaml", "tiny", &[]).unwrap();
    let runs = exp.runs(&[], &shape_of).unwrap();
    let opts = options(dir.path(), Some(&STOP));
    let s = run_sweep(&exp, &runs, &opts).unwrap();
    assert!(s.stopped && s.stopped_at.is_none(), "{s:?}");
    assert_eq!((s.done, s.failed, s.skipped), (0, 0, 0), "{s:?}");
    assert!(results::collect_records(&dir.path().join("tiny"))
        .unwrap()
        .is_empty());
}

#[test]
fn a_run_claimed_by_another_process_is_left_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let exp = Experiment::from_text(TINY, "tiny.yaml", "tiny", &[]).unwrap();
    let runs = exp.runs(&[], &shape_of).unwrap();
    let exp_dir = dir.path().join("tiny");
    let claimed = results::run_dir(&exp_dir, &runs[1].name, &runs[1].id);
    let claim = FileLock::try_claim(&claimed).unwrap().unwrap();
    let s = sweep(TINY, dir.path(), &[]);
    assert_eq!((s.done, s.busy, s.skipped), (3, 1, 0), "{s:?}");
    assert!(!claimed.join("result.json").exists());
    drop(claim);
    let s = sweep(TINY, dir.path(), &[]);
    assert_eq!((s.done, s.busy, s.skipped), (1, 0, 3), "{s:?}");
}

#[test]
fn runs_of_an_earlier_version_of_the_spec_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let exp_dir = dir.path().join("tiny");
    let runs_of = |o: &[String]| {
        Experiment::from_text(TINY, "tiny.yaml", "tiny", o)
            .unwrap()
            .runs(&[], &shape_of)
            .unwrap()
    };
    // Part of the sweep trained (seed 0 of its seeds 0 and 1): all of it is the spec's.
    sweep(TINY, dir.path(), &["sweep.grid.seed=[0]"]);
    let now = runs_of(&[]);
    assert!(flowlab::runner::runs_from_elsewhere(&exp_dir, &now)
        .unwrap()
        .is_empty());
    // The spec changed (another learning rate): both earlier runs are from elsewhere.
    let changed = runs_of(&["train.lr=1.0e-3".into()]);
    let other = flowlab::runner::runs_from_elsewhere(&exp_dir, &changed).unwrap();
    assert_eq!(other.len(), 2);
}

/// Data no run can train on fails every run that reads it: the sweep is refused before
/// any training (nothing is written), naming the problem and how many runs read the data;
/// data good for some runs of the sweep and not for others refuses it too.
#[test]
fn a_sweep_on_data_that_cannot_train_is_refused_before_training() {
    let cases: [(&[&str], &str); 3] = [
        (
            &["data.train_subset=8"],
            "only 8 training images for data.batch_size 32",
        ),
        (&["data.classes=[3,12]"], "no images of class [12]"),
        (
            &["data.val_size=70000"],
            "cannot hold out 70000 validation images",
        ),
    ];
    for (set, msg) in cases {
        let e = refused(set);
        assert!(e.contains(msg), "{set:?}: {e}");
        assert!(
            e.contains("the data of 4 runs to train: the sweep is refused before any training"),
            "{set:?}: {e}"
        );
    }
    // The data of two of the sweep's four runs: refused all the same, counting those two.
    let e = refused(&[
        "sweep.grid.data.train_subset=[8,256]",
        "sweep.grid.seed=[0]",
    ]);
    assert!(
        e.contains("only 8 training images") && e.contains("the data of 2 runs to train"),
        "{e}"
    );
}

#[test]
fn a_failed_run_runs_again_in_the_next_sweep_from_its_checkpoint() {
    // A run that failed after training (say, a full disk while writing samples): the next
    // sweep resumes it from its final checkpoint, evaluates it and records it done,
    // without training again; finished runs are left alone.
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("tiny");
    let s = sweep(TINY, dir.path(), &[]);
    assert_eq!((s.done, s.skipped), (4, 0), "{s:?}");
    let before = results::collect_records(&exp).unwrap();
    let r0 = before
        .iter()
        .find(|r| r.row.status == Status::Done)
        .unwrap();
    let f = results::run_dir(&exp, &r0.row.name, &r0.row.run_id).join("result.json");
    let mut rec: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
    rec["row"]["status"] = "failed".into();
    rec["row"]["status_reason"] = "No space left on device".into();
    rec["row"]["test_bpd"] = serde_json::Value::Null;
    std::fs::write(&f, serde_json::to_vec(&rec).unwrap()).unwrap();
    let s = sweep(TINY, dir.path(), &[]);
    assert_eq!(
        (s.done, s.failed, s.skipped, s.retried),
        (1, 0, 3, 1),
        "{s:?}"
    );
    let after = results::collect_records(&exp).unwrap();
    let r = after
        .iter()
        .find(|r| r.row.run_id == r0.row.run_id)
        .unwrap();
    assert_eq!(r.row.status, Status::Done);
    assert_eq!(r.row.steps, r0.row.steps);
    // Nothing was trained: the run resumed at its last step.
    assert_eq!(r.row.train_imgs_per_s, None);
    assert_eq!(r.curves, r0.curves);
    // Evaluation draws from the run's own seeds: the same test bpd as before.
    assert_eq!(r.row.test_bpd, r0.row.test_bpd);
}

#[test]
fn a_diverging_run_is_recorded_and_the_sweep_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let text = TINY.replace(
        "  glow:\n    coupling: {scale: sigmoid,",
        "  glow:\n    train: {lr: 1.0e+12, grad_clip: null}\n    coupling: {scale: exp,",
    );
    let s = sweep(&text, dir.path(), &[]);
    assert_eq!((s.done, s.diverged, s.failed), (2, 2, 0), "{s:?}");
    let recs = results::collect_records(&dir.path().join("tiny")).unwrap();
    for r in recs.iter().filter(|r| r.row.variant == "glow") {
        assert_eq!(r.row.status, Status::Diverged);
        assert!(r.row.status_step.is_some());
        assert!(
            r.row.status_reason.as_deref().unwrap().contains("is"),
            "{:?}",
            r.row.status_reason
        );
    }
    // The table's summary says which runs diverged, where and why.
    let table = dir.path().join("tiny/runs.parquet");
    let df = results::compare::load(&table).unwrap();
    let lines = results::compare::not_done(&df, &table).unwrap();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        let r = recs.iter().find(|r| l.starts_with(&r.row.name)).unwrap();
        let want = format!(
            "{}: diverged at step {} ({})",
            r.row.name,
            r.row.status_step.unwrap(),
            r.row.status_reason.as_deref().unwrap()
        );
        assert_eq!(l, &want);
    }
}

#[test]
fn checkpoint_reloads_to_the_same_val_bpd_and_temperature_zero_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    sweep(TINY, dir.path(), &["sweep.grid.seed=[3]"]);
    let exp_dir = dir.path().join("tiny");
    let recs = results::collect_records(&exp_dir).unwrap();
    let rec = recs.iter().find(|r| r.row.variant == "glow").unwrap();
    let run_dir = results::run_dir(&exp_dir, &rec.row.name, &rec.row.run_id);
    let cfg: flowlab::spec::RunConfig =
        serde_yaml::from_str(&std::fs::read_to_string(run_dir.join("config.yaml")).unwrap())
            .unwrap();
    let plan =
        flowlab::spec::plan::plan(&cfg.model, shape_of(&cfg.data).unwrap(), "model").unwrap();
    // A fresh model from another seed, then the checkpoint.
    let model = build_model(&plan, 12345, DType::F32, &Device::Cpu).unwrap();
    train::load_checkpoint(&model, None, &CheckpointPaths::in_dir(&run_dir)).unwrap();
    let splits = flowlab::data::load(&cfg.data).unwrap();
    let val = Loader::new(
        &splits.val,
        cfg.data.eval_batch_size,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let v = train::eval::mean_bpd(
        &model,
        &val,
        &val.ordered(),
        1,
        derive_seed(cfg.train.seed, streams::VAL, 0),
        &mut train::eval::stop_when(&|| false),
    )
    .unwrap();
    assert!(
        (v - rec.row.val_bpd.unwrap()).abs() < 1e-9,
        "{v} vs {:?}",
        rec.row.val_bpd
    );

    // The same through `trained`, which `flowlab eval` uses: the run's own evaluations.
    use flowlab::trained::{Images, Split, TrainedRun};
    let run = TrainedRun::load(&run_dir, None).unwrap();
    assert_eq!(run.step, rec.row.steps as usize);
    let mut go = train::eval::stop_when(&|| false);
    for (split, k, want) in [
        (Split::Val, 1, rec.row.val_bpd),
        (Split::Test, cfg.eval.importance_samples, rec.row.test_bpd),
    ] {
        let set = run.eval_set(split, Images::Run).unwrap();
        let (got, _) = run.evaluate(&set, k, None, &mut go).unwrap();
        assert_eq!(Some(got), want, "{split:?}");
    }

    let ctx = flowlab::flow::FlowCtx::new;
    let a = model.sample(3, 0.0, &mut ctx(1)).unwrap();
    let b = model.sample(3, 0.0, &mut ctx(2)).unwrap();
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn same_spec_and_seed_reproduce_curves_and_bpd() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    sweep(TINY, d1.path(), &["sweep.grid.seed=[0]"]);
    sweep(TINY, d2.path(), &["sweep.grid.seed=[0]"]);
    let strip = |p: &Path| {
        results::collect_records(&p.join("tiny"))
            .unwrap()
            .into_iter()
            .map(|r| (r.row.run_id, r.row.val_bpd, r.row.test_bpd, r.curves))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(d1.path()), strip(d2.path()));
}

#[test]
fn an_interrupted_run_resumes_exactly_from_its_checkpoint() {
    // RealNVP on whole batches of 32; Glow on batches of 48, which the CPU trains as two
    // shards (`train::shard`) once ActNorm has initialised itself from the first one.
    for (variant, batch) in [("realnvp", 32), ("glow", 48)] {
        resumes_exactly(variant, batch);
    }
}

fn resumes_exactly(variant: &str, batch: usize) {
    // Validation in four batches, so that a stop request can come in the middle of one.
    let overrides = [
        "sweep.grid.seed=[0]".to_string(),
        format!("data.batch_size={batch}"),
        "data.eval_batch_size=16".to_string(),
    ];
    let exp = Experiment::from_text(TINY, "tiny.yaml", "tiny", &overrides).unwrap();
    let runs = exp.runs(&[variant.into()], &shape_of).unwrap();
    let run = &runs[0];
    let splits = flowlab::data::load(&run.config.data).unwrap();
    let loaders = |c: &flowlab::spec::RunConfig| {
        (
            Loader::new(&splits.train, c.data.batch_size, DType::F32, &Device::Cpu).unwrap(),
            Loader::new(
                &splits.val,
                c.data.eval_batch_size,
                DType::F32,
                &Device::Cpu,
            )
            .unwrap(),
        )
    };
    let (tl, vl) = loaders(&run.config);
    // Trains a model of `seed` on `cfg` with checkpoints in `dir`. From step `stop_at` on,
    // stop requests come after `grace` polls: 0 stops after that step (or before its
    // validation's first batch), 1 after its validation's first batch.
    let train_in = |seed: u64, cfg: &flowlab::spec::RunConfig, dir: &Path, stop_at, grace| {
        let (step, polls) = (Cell::new(0), Cell::new(0));
        train::train(
            &build_model(&run.plan, seed, DType::F32, &Device::Cpu).unwrap(),
            cfg,
            &tl,
            &vl,
            Some(&CheckpointPaths::in_dir(dir)),
            &mut |s, _, _, _| step.set(s),
            &|| {
                if step.get() < stop_at {
                    return false;
                }
                polls.set(polls.get() + 1);
                polls.get() > grace
            },
        )
        .unwrap()
    };
    let init = derive_seed(0, streams::INIT, 0);

    // Uninterrupted.
    let d1 = tempfile::tempdir().unwrap();
    let full = train_in(init, &run.config, d1.path(), usize::MAX, 0);

    // Stopped after the step-3 checkpoint (as if killed), then resumed by a new process
    // (whose model starts from other parameters: the checkpoint replaces them).
    let d2 = tempfile::tempdir().unwrap();
    let mut first = run.config.clone();
    first.train.steps = Some(3);
    train_in(init, &first, d2.path(), usize::MAX, 0);
    let resumed = train_in(999, &run.config, d2.path(), usize::MAX, 0);
    assert_eq!(resumed.resumed_from, 3, "{variant}");
    assert_eq!(resumed.steps, 6, "{variant}");
    assert_eq!(resumed.curves, full.curves, "{variant}");

    // Stopped on request after step 5, between curve points (log every 2, evaluate every
    // 3): a checkpoint there, and the resumed run's curves are the uninterrupted ones
    // (the average since the step-4 point is kept in the checkpoint).
    let d3 = tempfile::tempdir().unwrap();
    let stopped = train_in(init, &run.config, d3.path(), 5, 0);
    assert_eq!(stopped.outcome, Outcome::Stopped { step: 5 }, "{variant}");
    assert_eq!(stopped.steps, 5, "{variant}");
    let resumed = train_in(999, &run.config, d3.path(), usize::MAX, 0);
    assert_eq!(resumed.resumed_from, 5, "{variant}");
    assert_eq!(resumed.outcome, Outcome::Done, "{variant}");
    assert_eq!(resumed.curves, full.curves, "{variant}");
    // The training seconds of the first process are kept, and the second's added.
    assert!(
        resumed.train_seconds > stopped.train_seconds,
        "{variant}: {} then {}",
        stopped.train_seconds,
        resumed.train_seconds
    );

    // Stopped while validating after step 3, and after the last step (6): the checkpoint
    // holds that step without its curve point, and the resumed run validates first.
    for at in [3, 6] {
        let d4 = tempfile::tempdir().unwrap();
        let stopped = train_in(init, &run.config, d4.path(), at, 1);
        assert_eq!(stopped.outcome, Outcome::Stopped { step: at }, "{variant}");
        let before: Vec<_> = full
            .curves
            .iter()
            .filter(|c| c.step < at)
            .cloned()
            .collect();
        assert_eq!(
            stopped.curves, before,
            "{variant}: no point for the interrupted step"
        );
        let resumed = train_in(999, &run.config, d4.path(), usize::MAX, 0);
        assert_eq!(resumed.resumed_from, at, "{variant}");
        assert_eq!(resumed.outcome, Outcome::Done, "{variant}");
        assert_eq!(resumed.curves, full.curves, "{variant}");
    }
}
