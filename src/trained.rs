//! A trained run loaded back from its folder (`results/<experiment>/runs/<run>`): its
//! config, its model with the last checkpoint, and evaluations of it on its data, such as
//! a test bpd with more importance samples than the sweep used, without training again.

use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::build::build_model;
use crate::data::{self, Loader};
use crate::flow::FlowModel;
use crate::results::{self, Status};
use crate::runner;
use crate::spec::RunConfig;
use crate::train::eval::{self, Poll};
use crate::train::{self, streams, CheckpointPaths};
use crate::{Error, Result};

/// Which of a run's images an evaluation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The test images (`data.test_subset` of them, or a number given).
    Test,
    /// The validation images held out of the training part (`data.val_size`).
    Val,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Test => "test",
            Split::Val => "val",
        }
    }
}

/// How many of a split's images an evaluation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Images {
    /// Those the run's own evaluation used: its `data.test_subset` test images, or all its
    /// validation images.
    Run,
    /// All of the split (for test: `data.test_subset` ignored).
    All,
    /// `n` of them: the test subset `data.test_subset: n` would select, or the first `n`
    /// validation images (as `train.val_subset` does).
    Count(usize),
}

/// A run's images chosen for an evaluation, in batches of its `data.eval_batch_size`.
pub struct EvalSet {
    pub split: Split,
    pub loader: Loader,
    pub batches: Vec<Vec<usize>>,
}

impl EvalSet {
    /// Images evaluated.
    pub fn len(&self) -> usize {
        self.batches.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A run's config and its model at the last checkpoint.
pub struct TrainedRun {
    pub dir: PathBuf,
    pub config: RunConfig,
    pub model: FlowModel,
    /// Training steps the checkpoint holds.
    pub step: usize,
}

impl TrainedRun {
    /// Loads the run in `dir` onto `device` (default: the run's own). A run without a
    /// checkpoint is an error saying why, where its record knows (failed or diverged before
    /// its first one).
    pub fn load(dir: &Path, device: Option<&str>) -> Result<Self> {
        let cfg_path = dir.join("config.yaml");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let config: RunConfig = serde_yaml::from_str(&text)
            .map_err(|e| Error::Usage(format!("parsing {}: {e}", cfg_path.display())))?;
        let shape = data::shape_of(&config.data).map_err(Error::Data)?;
        let plan = crate::spec::plan::plan(&config.model, shape, "model").map_err(|issues| {
            let msgs: Vec<String> = issues.iter().map(|(at, m)| format!("{at}: {m}")).collect();
            Error::Usage(format!(
                "{}: the model does not plan: {}",
                cfg_path.display(),
                msgs.join("; ")
            ))
        })?;
        let dev = runner::device(device.unwrap_or(&config.device))?;
        let model = build_model(&plan, 0, DType::F32, &dev)?;
        let ckpt = CheckpointPaths::in_dir(dir);
        if !ckpt.tensors.is_file() {
            let why = match results::read_record(dir).ok().flatten() {
                Some(r) if r.row.status != Status::Done => format!(
                    "the run is recorded as {}{}{} before its first checkpoint",
                    r.row.status.as_str(),
                    r.row
                        .status_step
                        .map(|s| format!(" at step {s}"))
                        .unwrap_or_default(),
                    r.row
                        .status_reason
                        .map(|s| format!(" ({s})"))
                        .unwrap_or_default(),
                ),
                _ => "has the run trained yet?".to_string(),
            };
            return Err(Error::Checkpoint {
                path: ckpt.tensors,
                msg: format!("no checkpoint: {why}"),
            });
        }
        let (step, _) = train::load_checkpoint(&model, None, &ckpt)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            model,
            step,
        })
    }

    /// The run's name: its folder's.
    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.dir.display().to_string())
    }

    /// Loads the run's data and chooses `images` of `split`.
    pub fn eval_set(&self, split: Split, images: Images) -> Result<EvalSet> {
        let mut spec = self.config.data.clone();
        if split == Split::Test {
            match images {
                Images::Run => {}
                Images::All => spec.test_subset = None,
                Images::Count(n) => spec.test_subset = Some(n),
            }
        }
        let splits = data::load(&spec)?;
        let part = match split {
            Split::Test => &splits.test,
            Split::Val => &splits.val,
        };
        let loader = Loader::new(part, spec.eval_batch_size, DType::F32, self.model.device())?;
        let batches = match (split, images) {
            (Split::Val, Images::Count(n)) => eval::first_batches(&loader, Some(n)),
            _ => loader.ordered(),
        };
        Ok(EvalSet {
            split,
            loader,
            batches,
        })
    }

    /// The importance samples K of the run's own evaluation of `split`: its
    /// `eval.importance_samples` for the test images, 1 for validation (as in training).
    pub fn own_k(&self, split: Split) -> usize {
        match split {
            Split::Test => self.config.eval.importance_samples,
            Split::Val => 1,
        }
    }

    /// Mean bpd on `set` with `k` importance samples per image, and per class for labelled
    /// data. The dequantization draws come from `seed` (default: the run's), as in the
    /// run's own evaluation: with its K and images this is its recorded test or val bpd.
    pub fn evaluate(
        &self,
        set: &EvalSet,
        k: usize,
        seed: Option<u64>,
        poll: Poll<'_>,
    ) -> Result<(f64, Vec<(u64, f64)>)> {
        let seed = seed.unwrap_or(self.config.train.seed);
        let seed = match set.split {
            Split::Test => streams::test_seed(seed, 0),
            Split::Val => streams::val_seed(seed),
        };
        eval::bpd_by_class(&self.model, &set.loader, &set.batches, k, seed, poll)
    }
}
