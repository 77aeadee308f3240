//! The plain serde data of an experiment spec. Closed enums, `deny_unknown_fields`,
//! defaults that reproduce the UvA tutorial recipe.

use serde::{Deserialize, Serialize};

use crate::flow::coupling::{CouplingKind, Partition, ScaleBound};
use crate::flow::invconv::InvConvKind;
use crate::flow::permute::PermuteKind;
use crate::flow::split::SplitPrior;
use crate::nets::NetConfig;

/// One experiment file, as written (variants and sweep not yet expanded).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    /// Defaults to the file stem.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    pub data: DataSpec,
    #[serde(default)]
    pub train: TrainSpec,
    #[serde(default)]
    pub eval: EvalSpec,
    #[serde(default)]
    pub device: String,
    /// Named model variants.
    pub models: std::collections::BTreeMap<String, ModelSpec>,
    #[serde(default)]
    pub sweep: SweepSpec,
}

/// Where the data comes from and how it is batched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// `mnist` | `fashion_mnist` | `{name: …, source: hf://<repo> | <png dir> | <file.parquet> | <idx dir>}`.
    #[serde(deserialize_with = "dataset_shorthand::deserialize")]
    pub dataset: DatasetSpec,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_eval_batch")]
    pub eval_batch_size: usize,
    /// Training images held out for validation (MNIST: 60k → 50k/10k).
    #[serde(default = "d_val")]
    pub val_size: usize,
    /// Average-pool factor (2: 28×28 → 14×14).
    #[serde(default = "d_one")]
    pub downscale: usize,
    /// Use only this many training images (seeded choice), for quick runs.
    #[serde(default)]
    pub train_subset: Option<usize>,
    /// Evaluate test bpd on only this many test images.
    #[serde(default)]
    pub test_subset: Option<usize>,
    /// Keep only these labels.
    #[serde(default)]
    pub classes: Option<Vec<u32>>,
}

/// A dataset reference: a built-in name, or a name with a source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    pub name: String,
    #[serde(default)]
    pub source: Option<String>,
}

impl DatasetSpec {
    /// The built-in dataset names.
    pub const BUILTIN: [&'static str; 2] = ["mnist", "fashion_mnist"];
}

/// `dataset: mnist` is shorthand for `dataset: {name: mnist}`.
pub(crate) mod dataset_shorthand {
    use super::DatasetSpec;
    use serde::de::{self, MapAccess, Visitor};
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Full {
        name: String,
        #[serde(default)]
        source: Option<String>,
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DatasetSpec, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DatasetSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a dataset name (mnist, fashion_mnist) or {name, source}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DatasetSpec, E> {
                Ok(DatasetSpec {
                    name: v.to_string(),
                    source: None,
                })
            }
            fn visit_map<M: MapAccess<'de>>(self, m: M) -> Result<DatasetSpec, M::Error> {
                let f = Full::deserialize(de::value::MapAccessDeserializer::new(m))?;
                Ok(DatasetSpec {
                    name: f.name,
                    source: f.source,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// Optimizer family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// Adam (AdamW with weight decay 0 unless `weight_decay` is set).
    #[default]
    Adam,
    /// AdamW with decoupled weight decay.
    Adamw,
}

/// Training recipe (defaults: the UvA tutorial's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    #[serde(default)]
    pub optimizer: OptimizerKind,
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Linear warm-up from 0 over this many steps.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Multiply the learning rate by this after every epoch.
    #[serde(default = "d_decay")]
    pub lr_decay: f64,
    /// Clip the global gradient norm to this (none if null).
    #[serde(default = "d_clip")]
    pub grad_clip: Option<f64>,
    /// Training length in optimizer steps (takes precedence over `epochs`).
    #[serde(default)]
    pub steps: Option<usize>,
    /// Training length in epochs.
    #[serde(default)]
    pub epochs: Option<f64>,
    /// Validate (and checkpoint) every this many steps.
    #[serde(default = "d_eval_every")]
    pub eval_every: usize,
    /// Log train bpd every this many steps.
    #[serde(default = "d_log_every")]
    pub log_every: usize,
    /// Validation images used at intermediate evaluations (all at the end).
    #[serde(default)]
    pub val_subset: Option<usize>,
    /// Seed of every random source of the run.
    #[serde(default)]
    pub seed: u64,
}

/// Evaluation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// Dequantization draws per test image for the importance-sampled bpd.
    #[serde(default = "d_is")]
    pub importance_samples: usize,
    /// Sampling temperatures of the sample grids.
    #[serde(default = "d_temps")]
    pub temperatures: Vec<f64>,
    /// Images per sample grid.
    #[serde(default = "d_nsamples")]
    pub n_samples: usize,
    /// Also report test bpd with each of these numbers of importance samples (e.g.
    /// `[1, 4, 8, 16]`): columns `test_bpd_is<K>` in runs.parquet, and
    /// `flowlab compare` tabulates them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub importance_study: Vec<usize>,
}

/// Prior of a model's final latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TopPrior {
    #[default]
    Standard,
    Learned,
}

impl TopPrior {
    fn is_standard(&self) -> bool {
        *self == TopPrior::Standard
    }
}

/// A model variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    #[serde(default)]
    pub dequant: DequantSpec,
    /// Defaults for every coupling of this model (a layer's own fields win).
    #[serde(default)]
    pub coupling: CouplingDefaults,
    pub layers: Vec<LayerSpec>,
    /// Class-conditional model over this many classes: one-hot label planes join every
    /// coupling network and every learned split prior, the learned top prior gets one
    /// mean/scale table per class, and bpd is that of p(x | y).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<usize>,
    /// Prior of the final latent: `standard` N(0, I), or `learned` (Glow's learned top
    /// prior: a per-element mean and log-scale, per class if `classes` is set).
    #[serde(default, skip_serializing_if = "TopPrior::is_standard")]
    pub prior: TopPrior,
    /// Per-variant overrides of the top-level `data` section (merged key by key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_yaml::Value>,
    /// Per-variant overrides of the top-level `train` section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<serde_yaml::Value>,
}

/// Model-wide coupling defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CouplingDefaults {
    #[serde(default)]
    pub kind: Option<CouplingKind>,
    #[serde(default)]
    pub scale: Option<ScaleBound>,
    #[serde(default)]
    pub net: Option<NetConfig>,
    /// Spline bins K (`kind: spline`; default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bins: Option<usize>,
    /// Spline domain half-width B (`kind: spline`; default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound: Option<f64>,
}

/// Dequantization.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DequantSpec {
    /// x + U[0,1) noise.
    Uniform {
        #[serde(default = "d_alpha")]
        alpha: f64,
    },
    /// Learned noise (Flow++): couplings conditioned on the image.
    Variational {
        #[serde(default = "d_alpha")]
        alpha: f64,
        layers: Vec<LayerSpec>,
    },
}

impl Default for DequantSpec {
    fn default() -> Self {
        DequantSpec::Uniform { alpha: d_alpha() }
    }
}

/// One entry of a layer graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerSpec {
    /// Affine/additive coupling.
    Coupling {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        mask: Partition,
        #[serde(default)]
        invert: bool,
        #[serde(default)]
        kind: Option<CouplingKind>,
        #[serde(default)]
        scale: Option<ScaleBound>,
        #[serde(default)]
        net: Option<NetConfig>,
        /// Spline bins K (`kind: spline`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bins: Option<usize>,
        /// Spline domain half-width B (`kind: spline`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bound: Option<f64>,
    },
    /// Glow's ActNorm.
    Actnorm {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Invertible 1×1 convolution.
    Invconv {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default)]
        param: InvConvKind,
    },
    /// Fixed channel permutation.
    Permute {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        order: PermuteKind,
    },
    /// 2×2 space-to-depth.
    Squeeze {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// Factor out half the channels.
    Split {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default)]
        prior: SplitPrior,
    },
    /// `times` copies of `layers`; with `alternate`, couplings of odd copies flip their mask.
    Repeat {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        times: usize,
        #[serde(default = "d_true")]
        alternate: bool,
        layers: Vec<LayerSpec>,
    },
    /// Glow's multi-scale architecture: `levels` × [squeeze, `depth` × step, split], no
    /// split after the last level.
    Levels {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        levels: usize,
        depth: usize,
        #[serde(default = "d_true")]
        alternate: bool,
        step: Vec<LayerSpec>,
        #[serde(default)]
        split: SplitPrior,
    },
}

/// Sweep: a grid (cartesian product) and zipped groups (lockstep) over dotted paths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    #[serde(default)]
    pub grid: serde_yaml::Mapping,
    #[serde(default)]
    pub zip: Vec<serde_yaml::Mapping>,
}

/// One fully resolved run: what is trained, hashed into the run id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub experiment: String,
    pub variant: String,
    pub data: DataSpec,
    pub train: TrainSpec,
    pub eval: EvalSpec,
    pub device: String,
    pub model: ModelSpec,
}

fn d_batch() -> usize {
    128
}
fn d_eval_batch() -> usize {
    256
}
fn d_val() -> usize {
    10_000
}
fn d_one() -> usize {
    1
}
fn d_lr() -> f64 {
    1e-3
}
fn d_decay() -> f64 {
    0.99
}
fn d_clip() -> Option<f64> {
    Some(1.0)
}
fn d_eval_every() -> usize {
    500
}
fn d_log_every() -> usize {
    50
}
fn d_is() -> usize {
    8
}
fn d_temps() -> Vec<f64> {
    vec![1.0, 0.7]
}
fn d_nsamples() -> usize {
    64
}
fn d_alpha() -> f64 {
    crate::flow::logit::DEFAULT_ALPHA
}
fn d_true() -> bool {
    true
}

macro_rules! default_from_serde {
    ($t:ty) => {
        impl Default for $t {
            fn default() -> Self {
                serde_yaml::from_str("{}").expect("all fields have defaults")
            }
        }
    };
}
default_from_serde!(TrainSpec);
default_from_serde!(EvalSpec);
