//! Training one run: Adam(W), warm-up and per-epoch decay, global-norm clipping, a NaN
//! guard, periodic validation, atomic checkpoints, and exact resume.
//!
//! Randomness is derived from the run seed per epoch (shuffling) and per step
//! (dequantization noise), so a run resumed from a checkpoint at step k continues exactly
//! as the uninterrupted run would have.

pub mod eval;
pub mod optim;
pub mod shard;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::data::Loader;
use crate::flow::FlowModel;
use crate::spec::RunConfig;
use crate::{Error, Result};

pub use optim::Adam;

/// One logged point of a training curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub step: usize,
    pub epoch: usize,
    /// Mean train bpd over the steps since the previous point.
    pub train_bpd: Option<f64>,
    pub val_bpd: Option<f64>,
    pub lr: f64,
    pub grad_norm: Option<f64>,
}

/// How training ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    Done,
    /// A non-finite loss or gradient at `step`.
    Diverged {
        step: usize,
        reason: String,
    },
    /// Stopped on request (see [`Stop`]) after `step`, or while validating after it, with
    /// a checkpoint there when training had one; training the same run again resumes from
    /// it (first with that validation, when it was interrupted).
    Stopped {
        step: usize,
    },
}

/// What [`train`] reports.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub outcome: Outcome,
    pub steps: usize,
    pub curves: Vec<CurvePoint>,
    /// Seconds of optimization steps (evaluation excluded), over every process that
    /// trained the run: those before a resume are kept in its checkpoint.
    pub train_seconds: f64,
    /// Training images per second in this process.
    pub imgs_per_s: f64,
    /// Step at which this process started (> 0 after a resume).
    pub resumed_from: usize,
}

/// Mixes a seed with a stream tag and an index (SplitMix64), for independent streams.
pub fn derive_seed(seed: u64, stream: u64, index: u64) -> u64 {
    let mut z = seed
        ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Random streams of a run.
pub mod streams {
    pub const SHUFFLE: u64 = 1;
    pub const DEQUANT: u64 = 2;
    pub const VAL: u64 = 3;
    pub const TEST: u64 = 4;
    pub const SAMPLE: u64 = 5;
    pub const INIT: u64 = 6;

    /// The dequantization draws of a run's validation bpd (in training and at its end).
    pub fn val_seed(run_seed: u64) -> u64 {
        super::derive_seed(run_seed, VAL, 0)
    }

    /// The dequantization draws of a run's test bpd (`index` 0) and of its importance
    /// study's `i`-th K (`index` 1 + i). `flowlab eval` reproduces a recorded bpd with these.
    pub fn test_seed(run_seed: u64, index: u64) -> u64 {
        super::derive_seed(run_seed, TEST, index)
    }
}

/// Total optimizer steps of a run.
pub fn total_steps(cfg: &RunConfig, train_len: usize) -> usize {
    let per_epoch = steps_per_epoch(cfg, train_len);
    match (cfg.train.steps, cfg.train.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => ((e * per_epoch as f64).ceil() as usize).max(1),
        (None, None) => per_epoch,
    }
}

/// Full batches per epoch.
pub fn steps_per_epoch(cfg: &RunConfig, train_len: usize) -> usize {
    (train_len / cfg.data.batch_size).max(1)
}

/// Files of a run's checkpoint.
pub struct CheckpointPaths {
    pub tensors: PathBuf,
    pub curves: PathBuf,
}

impl CheckpointPaths {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            tensors: dir.join("checkpoint.safetensors"),
            curves: dir.join("checkpoint-curves.json"),
        }
    }
}

/// A temporary file's path in `path`'s folder, for a write then rename: `.name.PID.tmp`,
/// so that two processes writing the same file never share one.
pub fn temporary_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Writes `bytes` to `path` atomically (temporary file in the same folder, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_beside(path);
    // Errors name the file asked for; the temporary one beside it is a detail.
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(path, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Sums since the last curve point: (train bpd, steps, gradient norm). A checkpoint keeps
/// them, so a run stopped between two curve points resumes to the same curves.
type Accumulator = (f64, usize, f64);

/// Where training stands: what a checkpoint holds besides parameters and optimizer.
#[derive(Debug, Clone, Default)]
struct State {
    /// Optimizer steps done.
    step: usize,
    curves: Vec<CurvePoint>,
    acc: Accumulator,
    /// Seconds of optimizer steps up to `step`, over every process that trained the run.
    seconds: f64,
}

fn save_checkpoint(
    model: &FlowModel,
    opt: &Adam,
    st: &State,
    paths: &CheckpointPaths,
) -> Result<()> {
    let mut all = model.store().tensors();
    all.extend(opt.state()?);
    let cpu = &candle_core::Device::Cpu;
    let acc = st.acc;
    all.insert("train.step".into(), Tensor::new(&[st.step as f64], cpu)?);
    all.insert(
        "train.acc".into(),
        Tensor::new(&[acc.0, acc.1 as f64, acc.2], cpu)?,
    );
    all.insert("train.seconds".into(), Tensor::new(&[st.seconds], cpu)?);
    let tmp = temporary_beside(&paths.tensors);
    candle_core::safetensors::save(&all, &tmp)?;
    // Curves first: a crash between the two renames leaves curves ahead of tensors, which
    // the loader trims to the checkpoint's step.
    write_atomic(
        &paths.curves,
        &serde_json::to_vec(&st.curves).map_err(|e| Error::Usage(e.to_string()))?,
    )?;
    std::fs::rename(&tmp, &paths.tensors).map_err(|e| Error::io(&paths.tensors, e))
}

/// Restores model, optimizer and curves from a checkpoint; returns the step reached.
pub fn load_checkpoint(
    model: &FlowModel,
    opt: Option<&mut Adam>,
    paths: &CheckpointPaths,
) -> Result<(usize, Vec<CurvePoint>)> {
    load_all(model, opt, paths).map(|st| (st.step, st.curves))
}

/// [`load_checkpoint`] with the rest of the training state: the accumulator since the last
/// curve point (zero in checkpoints written at a curve point) and the training seconds
/// (zero in checkpoints written before either was kept).
fn load_all(model: &FlowModel, opt: Option<&mut Adam>, paths: &CheckpointPaths) -> Result<State> {
    let all = crate::params::read_safetensors(&paths.tensors, model.device())?;
    let params: std::collections::HashMap<String, Tensor> = all
        .iter()
        .filter(|(k, _)| !k.starts_with("optim.") && !k.starts_with("train."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    model.store().load_tensors(&params, &paths.tensors)?;
    if let Some(opt) = opt {
        opt.load_state(&all)?;
    }
    let step = all
        .get("train.step")
        .ok_or_else(|| Error::Checkpoint {
            path: paths.tensors.clone(),
            msg: "no train.step".into(),
        })?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?[0] as usize;
    let mut curves: Vec<CurvePoint> = match std::fs::read(&paths.curves) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::Checkpoint {
            path: paths.curves.clone(),
            msg: e.to_string(),
        })?,
        Err(_) => Vec::new(),
    };
    curves.retain(|c| c.step <= step);
    let numbers = |key: &str, n: usize| -> Result<Option<Vec<f64>>> {
        let Some(t) = all.get(key) else {
            return Ok(None);
        };
        let v = t.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
        if v.len() != n {
            return Err(Error::Checkpoint {
                path: paths.tensors.clone(),
                msg: format!("{key} is not {n} number(s)"),
            });
        }
        Ok(Some(v))
    };
    let acc = numbers("train.acc", 3)?.map_or((0.0, 0, 0.0), |v| (v[0], v[1] as usize, v[2]));
    let seconds = numbers("train.seconds", 1)?.map_or(0.0, |v| v[0]);
    Ok(State {
        step,
        curves,
        acc,
        seconds,
    })
}

/// Progress callback after every step: (step, total, latest train bpd, images/s).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, f64, f64);

/// A stop request, polled after every training step and before every evaluation batch:
/// `true` stops there ([`Outcome::Stopped`] in training, [`Error::Stopped`] in evaluation).
pub type Stop<'a> = &'a dyn Fn() -> bool;

/// What recording a curve point needs besides the training state.
struct Recorder<'a> {
    model: &'a FlowModel,
    val: &'a Loader,
    val_batches: Vec<Vec<usize>>,
    seed: u64,
    ckpt: Option<&'a CheckpointPaths>,
    stop: Stop<'a>,
}

impl Recorder<'_> {
    /// Appends the curve point of the state's step (of `epoch`, at learning rate `lr`) from
    /// its accumulator, which it then resets; with `eval`, validates first and checkpoints
    /// after. A stop request during the validation returns `Ok(false)` with neither point
    /// nor reset, and checkpoints the state that way: resuming records the point first.
    fn point(
        &self,
        opt: &Adam,
        (epoch, lr): (usize, f64),
        eval: bool,
        st: &mut State,
    ) -> Result<bool> {
        let step = st.step;
        let val_bpd = if eval {
            let seed = streams::val_seed(self.seed);
            let poll = &mut eval::stop_when(self.stop);
            match eval::mean_bpd(self.model, self.val, &self.val_batches, 1, seed, poll) {
                Ok(v) => Some(v),
                Err(Error::Stopped) => {
                    if let Some(p) = self.ckpt {
                        save_checkpoint(self.model, opt, st, p)?;
                    }
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let acc = st.acc;
        st.curves.push(CurvePoint {
            step,
            epoch,
            train_bpd: (acc.1 > 0).then(|| acc.0 / acc.1 as f64),
            val_bpd,
            lr,
            grad_norm: (acc.1 > 0).then(|| acc.2 / acc.1 as f64),
        });
        st.acc = (0.0, 0, 0.0);
        if eval {
            if let Some(p) = self.ckpt {
                save_checkpoint(self.model, opt, st, p)?;
            }
        }
        Ok(true)
    }
}

/// [`load_all`] for training on: a checkpoint that cannot be resumed fails its run until it
/// is gone, and the error says so.
fn resume(model: &FlowModel, opt: &mut Adam, paths: &CheckpointPaths) -> Result<State> {
    load_all(model, Some(opt), paths).map_err(|e| match e {
        Error::Checkpoint { path, msg } => Error::Checkpoint {
            path,
            msg: format!(
                "{msg} (delete the checkpoint, or run with --force, to train the run from its \
                 start)"
            ),
        },
        e => e,
    })
}

/// Trains `model` on `train`, validating on `val`. Checkpoints go to `ckpt` (if given) at
/// every evaluation, at a stop and at the end; an existing checkpoint there is resumed.
pub fn train(
    model: &FlowModel,
    cfg: &RunConfig,
    train: &Loader,
    val: &Loader,
    ckpt: Option<&CheckpointPaths>,
    progress: Progress<'_>,
    stop: Stop<'_>,
) -> Result<TrainReport> {
    let t = &cfg.train;
    let seed = t.seed;
    let mut opt = Adam::new(model.store().named_vars(), t.optimizer, t.weight_decay)?;
    let vars = model.store().trainable_vars();
    let sharding = shard::Sharding::new(model);
    let per_epoch = steps_per_epoch(cfg, train.len());
    let total = total_steps(cfg, train.len());
    let mut st = match ckpt {
        Some(p) if p.tensors.is_file() => resume(model, &mut opt, p)?,
        _ => State::default(),
    };
    let resumed_from = st.step;
    let rec = Recorder {
        model,
        val,
        val_batches: eval::first_batches(val, t.val_subset),
        seed,
        ckpt,
        stop,
    };
    let eval_due = |s: usize| s.is_multiple_of(t.eval_every) || s == total;
    let point_due = |s: usize| s.is_multiple_of(t.log_every) || eval_due(s);
    // Epoch and learning rate of the step that ends at `s` (> 0).
    let schedule = |s: usize| {
        let epoch = (s - 1) / per_epoch;
        let lr = optim::learning_rate(t.lr, s - 1, epoch, t.warmup_steps, t.lr_decay);
        (epoch, lr)
    };
    let mut epoch_batches: Option<(usize, Vec<Vec<usize>>)> = None;
    // Seconds of optimizer steps in this process (the state's count all of them), and the
    // images per second they trained.
    let mut seconds_here = 0.0;
    let rate = |step: usize, seconds: f64| {
        ((step - resumed_from) * train.batch_size()) as f64 / seconds.max(1e-9)
    };
    let mut outcome = Outcome::Done;

    // A run stopped while validating after its step left that step without its point.
    let step = st.step;
    let pending = step > 0 && point_due(step) && st.curves.last().map(|c| c.step) != Some(step);
    if pending && !rec.point(&opt, schedule(step), eval_due(step), &mut st)? {
        outcome = Outcome::Stopped { step };
    }
    while st.step < total && outcome == Outcome::Done {
        let step = st.step;
        let (epoch, lr) = schedule(step + 1);
        if epoch_batches.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut rng = crate::rng::Rng::new(derive_seed(seed, streams::SHUFFLE, epoch as u64));
            epoch_batches = Some((epoch, train.shuffled_epoch(&mut rng)));
        }
        let batches = &epoch_batches.as_ref().expect("set above").1;
        let idx = &batches[(step % per_epoch) % batches.len()];

        let started = Instant::now();
        let (x, y) = train.batch(idx)?;
        let step_seed = derive_seed(seed, streams::DEQUANT, step as u64);
        let loss = sharding.forward(model, &x, y.as_ref(), step_seed)?;
        let loss_v = loss.value;
        if !loss_v.is_finite() {
            outcome = Outcome::Diverged {
                step,
                reason: format!("loss is {loss_v}"),
            };
            break;
        }
        let grads = sharding.backward(loss, &vars)?;
        let norm = opt.grad_norm(&grads)?;
        if !norm.is_finite() {
            outcome = Outcome::Diverged {
                step,
                reason: format!("gradient norm is {norm}"),
            };
            break;
        }
        opt.step(&grads, lr, optim::clip_scale(norm, t.grad_clip))?;
        let took = started.elapsed().as_secs_f64();
        seconds_here += took;
        st.seconds += took;
        st.step += 1;
        st.acc = (st.acc.0 + loss_v, st.acc.1 + 1, st.acc.2 + norm);
        let step = st.step;

        progress(step, total, loss_v, rate(step, seconds_here));
        let eval_now = eval_due(step);
        if point_due(step) && !rec.point(&opt, (epoch, lr), eval_now, &mut st)? {
            outcome = Outcome::Stopped { step };
        } else if stop() && step < total {
            if let Some(p) = ckpt.filter(|_| !eval_now) {
                save_checkpoint(model, &opt, &st, p)?;
            }
            outcome = Outcome::Stopped { step };
        }
    }
    let imgs_per_s = rate(st.step, seconds_here);
    Ok(TrainReport {
        outcome,
        steps: st.step,
        curves: st.curves,
        train_seconds: st.seconds,
        imgs_per_s,
        resumed_from,
    })
}
