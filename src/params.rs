//! A seeded parameter store with readable names, in the spirit of candle-nn's `VarBuilder`.
//!
//! Every layer receives a [`Params`] handle scoped to its name (`params.pp("coupling0")`)
//! and creates its trainable variables through it; initial values come from the store's
//! own seeded [`Rng`], so a model built twice with the same seed is bit-identical
//! (candle's CPU RNG cannot be seeded). Non-trainable state — ActNorm's "initialised"
//! flag, a fixed permutation — lives in *buffers*: saved and loaded with the
//! parameters, never handed to the optimizer, not counted as parameters.
//!
//! Checkpoints are one safetensors file: trainable variables under their names,
//! buffers under `buffers.<name>`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor, Var};

use crate::linalg;
use crate::rng::{host_tensor, Rng};
use crate::{Error, Result};

/// How a new variable is initialised.
#[derive(Debug, Clone)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// U[lo, hi).
    Uniform { lo: f64, hi: f64 },
    /// PyTorch's default for conv/linear weights and biases: U(−1/√fan_in, 1/√fan_in).
    TorchDefault { fan_in: usize },
    /// N(0, std²).
    Normal { std: f64 },
    /// A uniformly random orthogonal matrix (shape must be `[n, n]`).
    Orthogonal,
    /// Explicit row-major values.
    Values(Vec<f64>),
}

#[derive(Debug)]
struct Inner {
    vars: BTreeMap<String, Var>,
    buffers: BTreeMap<String, Var>,
    /// The buffers that are data-dependent initialisation flags ([`Params::init_flag`]).
    init_flags: Vec<String>,
    /// Creation order of trainable variables (for a stable optimizer order).
    order: Vec<String>,
    rng: Rng,
}

/// The shared store behind all [`Params`] handles of one model.
#[derive(Debug, Clone)]
pub struct ParamStore {
    inner: Arc<Mutex<Inner>>,
    dtype: DType,
    device: Device,
}

const BUFFER_PREFIX: &str = "buffers.";

impl ParamStore {
    /// An empty store whose initial values derive from `seed`.
    pub fn new(seed: u64, dtype: DType, device: &Device) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                vars: BTreeMap::new(),
                buffers: BTreeMap::new(),
                init_flags: Vec::new(),
                order: Vec::new(),
                rng: Rng::new(seed),
            })),
            dtype,
            device: device.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked while holding it; the
        // map itself is still consistent (all mutations are single inserts).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The root handle (empty prefix).
    pub fn root(&self) -> Params {
        Params {
            store: self.clone(),
            prefix: String::new(),
        }
    }

    /// Data type of the variables.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device of the variables.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Trainable variables in creation order (what the optimizer gets).
    pub fn trainable_vars(&self) -> Vec<Var> {
        let inner = self.lock();
        inner.order.iter().map(|k| inner.vars[k].clone()).collect()
    }

    /// Trainable variables with their names, in creation order.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let inner = self.lock();
        inner
            .order
            .iter()
            .map(|k| (k.clone(), inner.vars[k].clone()))
            .collect()
    }

    /// Number of trainable scalars.
    pub fn num_params(&self) -> usize {
        self.lock().vars.values().map(|v| v.elem_count()).sum()
    }

    /// Whether a layer still waits for its data-dependent initialisation: some flag made by
    /// [`Params::init_flag`] is still 0. Such a layer initialises itself from the first
    /// batch it sees, so that batch must be seen whole (see `train::shard`).
    pub fn awaits_data_init(&self) -> Result<bool> {
        let flags: Vec<Tensor> = {
            let inner = self.lock();
            let flags = inner.init_flags.iter();
            flags
                .map(|k| inner.buffers[k].as_tensor().clone())
                .collect()
        };
        for f in flags {
            let v = f.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            if v.contains(&0.0) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Every tensor of the store (variables and `buffers.`-prefixed buffers), by name.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let inner = self.lock();
        let mut out: HashMap<String, Tensor> = inner
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        for (k, v) in &inner.buffers {
            out.insert(format!("{BUFFER_PREFIX}{k}"), v.as_tensor().clone());
        }
        out
    }

    /// Writes all variables and buffers to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.tensors(), path)?;
        Ok(())
    }

    /// Overwrites variables and buffers from `tensors` (as produced by [`ParamStore::tensors`]).
    /// Every variable and buffer of the model must be present with the same shape;
    /// extra entries are an error too, since they mean a different architecture.
    pub fn load_tensors(&self, tensors: &HashMap<String, Tensor>, origin: &Path) -> Result<()> {
        let err = |msg: String| Error::Checkpoint {
            path: origin.to_path_buf(),
            msg,
        };
        let inner = self.lock();
        let expected = inner.vars.len() + inner.buffers.len();
        let all = inner.vars.iter().map(|(k, v)| (k.clone(), v)).chain(
            inner
                .buffers
                .iter()
                .map(|(k, v)| (format!("{BUFFER_PREFIX}{k}"), v)),
        );
        for (name, var) in all {
            let t = tensors
                .get(&name)
                .ok_or_else(|| err(format!("missing tensor '{name}'")))?;
            if t.dims() != var.dims() {
                return Err(err(format!(
                    "tensor '{name}' has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        let known = |k: &String| match k.strip_prefix(BUFFER_PREFIX) {
            Some(b) => inner.buffers.contains_key(b),
            None => inner.vars.contains_key(k),
        };
        if tensors.len() != expected {
            let extra: Vec<&String> = tensors.keys().filter(|k| !known(k)).collect();
            return Err(err(format!(
                "checkpoint has tensors the model lacks: {extra:?}"
            )));
        }
        Ok(())
    }

    /// Loads a safetensors file written by [`ParamStore::save`] (or a checkpoint).
    pub fn load(&self, path: &Path) -> Result<()> {
        self.load_tensors(&read_safetensors(path, &self.device)?, path)
    }

    /// Draws a fresh tensor from the store's RNG (used for initialisation).
    fn init_tensor(&self, init: &Init, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let values = {
            let mut inner = self.lock();
            match init {
                Init::Zeros => vec![0.0; n],
                Init::Ones => vec![1.0; n],
                Init::Uniform { lo, hi } => inner.rng.uniform_vec(n, *lo, *hi),
                Init::TorchDefault { fan_in } => {
                    let b = 1.0 / (*fan_in as f64).sqrt();
                    inner.rng.uniform_vec(n, -b, b)
                }
                Init::Normal { std } => inner.rng.normal_vec(n, *std),
                Init::Orthogonal => match shape {
                    [a, b] if a == b => linalg::random_orthogonal(*a, &mut inner.rng),
                    _ => {
                        return Err(Error::Usage(format!(
                            "orthogonal init needs a square shape, got {shape:?}"
                        )))
                    }
                },
                Init::Values(v) => {
                    if v.len() != n {
                        return Err(Error::Usage(format!(
                            "init values: {} given for shape {shape:?}",
                            v.len()
                        )));
                    }
                    v.clone()
                }
            }
        };
        host_tensor(values, shape, self.dtype, &self.device)
    }

    /// Draws from the store's RNG for layers that need random structure at build time
    /// (e.g. a fixed shuffle permutation).
    pub fn with_rng<T>(&self, f: impl FnOnce(&mut Rng) -> T) -> T {
        f(&mut self.lock().rng)
    }
}

/// A handle into a [`ParamStore`] scoped to a dotted name prefix.
#[derive(Debug, Clone)]
pub struct Params {
    store: ParamStore,
    prefix: String,
}

impl Params {
    /// A handle for a sub-module: names become `prefix.name`.
    pub fn pp(&self, name: impl AsRef<str>) -> Params {
        Params {
            store: self.store.clone(),
            prefix: self.path(name.as_ref()),
        }
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The store behind this handle.
    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// Dotted prefix of this handle.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Data type of the variables.
    pub fn dtype(&self) -> DType {
        self.store.dtype
    }

    /// Device of the variables.
    pub fn device(&self) -> &Device {
        &self.store.device
    }

    /// Creates a trainable variable `prefix.name`. Names are unique: creating the same
    /// name twice is an error (two layers would silently share weights otherwise).
    pub fn var(&self, name: &str, shape: &[usize], init: Init) -> Result<Var> {
        let full = self.path(name);
        let t = self.store.init_tensor(&init, shape)?;
        let var = Var::from_tensor(&t)?;
        let mut inner = self.store.lock();
        if inner.vars.contains_key(&full) {
            return Err(Error::Usage(format!("parameter '{full}' created twice")));
        }
        inner.vars.insert(full.clone(), var.clone());
        inner.order.push(full);
        Ok(var)
    }

    /// Creates a non-trainable buffer `prefix.name` (saved, loaded, never optimised).
    pub fn buffer(&self, name: &str, shape: &[usize], init: Init) -> Result<Var> {
        let full = self.path(name);
        let t = self.store.init_tensor(&init, shape)?;
        let var = Var::from_tensor(&t)?;
        let mut inner = self.store.lock();
        if inner.buffers.contains_key(&full) {
            return Err(Error::Usage(format!("buffer '{full}' created twice")));
        }
        inner.buffers.insert(full, var.clone());
        Ok(var)
    }

    /// Creates a data-dependent initialisation flag `prefix.name`: a buffer `[1]` that is 0
    /// until its layer has initialised itself from data and sets it to 1
    /// ([`ParamStore::awaits_data_init`]).
    pub fn init_flag(&self, name: &str) -> Result<Var> {
        let var = self.buffer(name, &[1], Init::Zeros)?;
        self.store.lock().init_flags.push(self.path(name));
        Ok(var)
    }
}

/// The tensors of a safetensors file (a checkpoint), on `device`. A file that cannot be
/// read or is not safetensors (truncated, overwritten) is an error naming it.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("cannot be read: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_counts_and_seeded_init() {
        let s = ParamStore::new(5, DType::F32, &Device::Cpu);
        let p = s.root().pp("net");
        let w = p
            .pp("conv")
            .var("weight", &[4, 3], Init::Normal { std: 1.0 })
            .unwrap();
        p.buffer("flag", &[], Init::Zeros).unwrap();
        assert_eq!(s.num_params(), 12);
        assert_eq!(s.named_vars()[0].0, "net.conv.weight");
        assert!(s.tensors().contains_key("buffers.net.flag"));
        assert!(p.pp("conv").var("weight", &[1], Init::Zeros).is_err());

        let s2 = ParamStore::new(5, DType::F32, &Device::Cpu);
        let w2 = s2
            .root()
            .pp("net.conv")
            .var("weight", &[4, 3], Init::Normal { std: 1.0 })
            .unwrap();
        let d: f32 = (w.as_tensor() - w2.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(d, 0.0);
    }

    #[test]
    fn save_load_round_trip_and_mismatch_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ck.safetensors");
        let s = ParamStore::new(1, DType::F32, &Device::Cpu);
        s.root().var("a", &[3], Init::Normal { std: 1.0 }).unwrap();
        s.root().buffer("b", &[1], Init::Ones).unwrap();
        s.save(&path).unwrap();

        let t = ParamStore::new(2, DType::F32, &Device::Cpu);
        let a = t.root().var("a", &[3], Init::Zeros).unwrap();
        let b = t.root().buffer("b", &[1], Init::Zeros).unwrap();
        t.load(&path).unwrap();
        assert_eq!(
            a.as_tensor().to_vec1::<f32>().unwrap(),
            s.tensors()["a"].to_vec1::<f32>().unwrap()
        );
        assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0]);

        let wrong = ParamStore::new(2, DType::F32, &Device::Cpu);
        wrong.root().var("a", &[4], Init::Zeros).unwrap();
        let e = wrong.load(&path).unwrap_err().to_string();
        assert!(e.contains("shape"), "{e}");
        let missing = ParamStore::new(2, DType::F32, &Device::Cpu);
        missing.root().var("c", &[3], Init::Zeros).unwrap();
        let e = missing.load(&path).unwrap_err().to_string();
        assert!(e.contains("missing tensor 'c'"), "{e}");
    }
}
