//! Data-parallel training steps on the CPU: a batch cut into fixed shards, each shard's
//! forward and backward pass run on cores of its own, and the shards' gradients summed.
//!
//! Every image's loss is independent of the others' (no layer uses batch statistics once
//! ActNorm has initialised itself), so the batch loss `L = (1/B) Σᵢ bpdᵢ` is the sum over
//! shards `s` of `Lₛ = (1/B) Σ_{i ∈ s} bpdᵢ`, and `∂L/∂θ = Σₛ ∂Lₛ/∂θ`.
//!
//! **Why.** The convolution kernels split each op's images over the rayon threads, and
//! every op ends in a join. On the small maps of the 14×14 models the two cores then spend
//! ~11 % of a step waiting (batch 64: 52.6 ms on one thread, 29.5 on two, 1.78×). Two
//! shards of 32 on one thread each avoid those joins: two such processes side by side ran
//! 26.3 ms per step each.
//!
//! **Which shards.** A CPU batch of `B` images becomes `⌈B / SHARD_IMAGES⌉` contiguous shards
//! of near-equal size. That depends on `B` alone, never on the thread count: with `T`
//! threads, `min(T, S)` shards run at once, each on a rayon pool of `T / min(T, S)` threads,
//! and the gradients are summed in shard order, so a step's result is bit-identical for
//! any thread count (the kernels' own reductions are, too). Shard `s` draws its
//! dequantization noise from `derive_seed(seed, SHARDS, s)`.
//!
//! **Not sharded:** a batch of at most [`SHARD_IMAGES`] (the step runs on the whole batch
//! with noise from `seed`, as before sharding existed), a GPU, and any step while a layer
//! still waits for its data-dependent initialisation ([`ParamStore::awaits_data_init`]):
//! ActNorm must see the whole first batch.
//!
//! [`ParamStore::awaits_data_init`]: crate::params::ParamStore::awaits_data_init

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::derive_seed;
use crate::flow::{FlowCtx, FlowModel};
use crate::{Error, Result};

/// Images per shard: a CPU batch of `B > SHARD_IMAGES` images is cut into
/// `⌈B / SHARD_IMAGES⌉` shards. At 32 a shard still gives each convolution enough images to
/// amortise its weight packing; a batch of 64 becomes two shards, one per core of a
/// 2-core machine.
pub const SHARD_IMAGES: usize = 32;

/// The random stream of the shards' dequantization noise (under the step's seed).
const SHARDS_STREAM: u64 = 0x5348_4152_4453;

/// The shards of a batch of `b` images on the CPU: contiguous ranges of near-equal size
/// (the first `b mod S` one image longer). One range, the whole batch, for `b ≤`
/// [`SHARD_IMAGES`].
pub fn shards(b: usize) -> Vec<Range<usize>> {
    let s = b.div_ceil(SHARD_IMAGES).max(1);
    let (base, extra) = (b / s, b % s);
    let mut start = 0;
    (0..s)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// The seed of shard `i` of a sharded step whose seed is `seed`.
pub fn shard_seed(seed: u64, i: usize) -> u64 {
    derive_seed(seed, SHARDS_STREAM, i as u64)
}

/// A step's loss, split by shard: what [`Sharding::backward`] differentiates.
pub struct ShardedLoss {
    /// `Lₛ = (1/B) Σ_{i ∈ s} bpdᵢ` per shard, with their graphs.
    parts: Vec<Tensor>,
    /// `L = Σₛ Lₛ`, the batch's mean bpd.
    pub value: f64,
}

/// One rayon pool per concurrent shard, with the (pool count, threads per pool) they were
/// made for.
type Pools = ((usize, usize), Vec<rayon::ThreadPool>);

/// Runs training steps on shards of the batch ([module docs](self)). Holds the rayon pools
/// the shards run on, made on first use.
pub struct Sharding {
    /// Whether to shard at all (a CPU model).
    cpu: bool,
    /// Pools for concurrent shards, made on first use.
    pools: Mutex<Option<Pools>>,
    /// Set once no layer awaits data-dependent initialisation (it never unsets).
    initialised: AtomicBool,
}

impl Sharding {
    /// Sharding for `model`: on its CPU, shards of batches larger than [`SHARD_IMAGES`];
    /// on a GPU, none.
    pub fn new(model: &FlowModel) -> Self {
        Self {
            cpu: model.store().device().is_cpu(),
            pools: Mutex::new(None),
            initialised: AtomicBool::new(false),
        }
    }

    /// The shards of a batch of `b` images once no layer awaits its data-dependent
    /// initialisation: [`shards`] on a CPU, the whole batch on a GPU.
    pub fn shards_of(&self, b: usize) -> Vec<Range<usize>> {
        match self.cpu {
            true => shards(b),
            false => std::iter::once(0..b).collect(),
        }
    }

    /// The shards this step of a batch of `b` images runs on: [`Sharding::shards_of`], or
    /// the whole batch while a layer awaits its data-dependent initialisation.
    fn plan(&self, model: &FlowModel, b: usize) -> Result<Vec<Range<usize>>> {
        let planned = self.shards_of(b);
        if planned.len() > 1 && !self.initialised.load(Ordering::Relaxed) {
            if model.store().awaits_data_init()? {
                return Ok(std::iter::once(0..b).collect());
            }
            self.initialised.store(true, Ordering::Relaxed);
        }
        Ok(planned)
    }

    /// `f(s)` for every shard `s < n`, up to `min(T, n)` at once on pools of their own (`T`:
    /// the calling pool's threads); the results in shard order.
    fn each<R: Send>(&self, n: usize, f: impl Fn(usize) -> Result<R> + Sync) -> Result<Vec<R>> {
        let threads = rayon::current_num_threads();
        let workers = threads.min(n);
        if workers <= 1 {
            return (0..n).map(f).collect();
        }
        let mut guard = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let per = threads / workers;
        if guard.as_ref().is_none_or(|(k, _)| *k != (workers, per)) {
            let pools = (0..workers)
                .map(|w| {
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(per)
                        .thread_name(move |i| format!("flowlab-shard{w}-{i}"))
                        .build()
                        .map_err(|e| Error::Usage(format!("cannot start shard threads: {e}")))
                })
                .collect::<Result<Vec<_>>>()?;
            *guard = Some(((workers, per), pools));
        }
        let pools = &guard.as_ref().expect("set above").1;
        // Worker w runs shards w, w + workers, … in order on its pool.
        let out: Vec<Mutex<Option<Result<R>>>> = (0..n).map(|_| Mutex::new(None)).collect();
        let work = |w: usize| {
            for s in (w..n).step_by(workers) {
                let r = f(s);
                *out[s].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            }
        };
        on_each_pool(pools, &work);
        out.into_iter()
            .map(|r| {
                let r = r.into_inner().unwrap_or_else(|e| e.into_inner());
                r.expect("every shard ran")
            })
            .collect()
    }

    /// `f(ctx, xs)` on each shard `xs` of the batch `x` (`[B, C, H, W]`, with class
    /// `labels` `[B]` for a class-conditional model), `ctx` a context with the shard's
    /// labels set and dequantization noise from `seed` (unsharded) or
    /// [`shard_seed`]`(seed, s)`. The results in shard order.
    pub fn map<R: Send>(
        &self,
        model: &FlowModel,
        x: &Tensor,
        labels: Option<&Tensor>,
        seed: u64,
        f: impl Fn(&mut FlowCtx, &Tensor) -> Result<R> + Sync,
    ) -> Result<Vec<R>> {
        let plan = self.plan(model, x.dim(0)?)?;
        let sharded = plan.len() > 1;
        self.each(plan.len(), |s| {
            let r = &plan[s];
            let (xs, ys) = if sharded {
                let ys = labels.map(|y| y.narrow(0, r.start, r.len())).transpose()?;
                (x.narrow(0, r.start, r.len())?, ys)
            } else {
                (x.clone(), labels.cloned())
            };
            let mut ctx = FlowCtx::new(if sharded { shard_seed(seed, s) } else { seed });
            model.set_labels(&mut ctx, ys.as_ref())?;
            f(&mut ctx, &xs)
        })
    }

    /// The forward pass of a training step on `x` with `labels` ([`Sharding::map`]):
    /// `Lₛ = (1/B) Σ_{i ∈ s} bpdᵢ` per shard.
    pub fn forward(
        &self,
        model: &FlowModel,
        x: &Tensor,
        labels: Option<&Tensor>,
        seed: u64,
    ) -> Result<ShardedLoss> {
        let b = x.dim(0)? as f64;
        let parts = self.map(model, x, labels, seed, |ctx, xs| {
            Ok((model.bpd(xs, ctx)?.sum_all()? / b)?)
        })?;
        let mut value = 0.0;
        for p in &parts {
            value += p.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        }
        Ok(ShardedLoss { parts, value })
    }

    /// `∂L/∂θ` for the trainable `vars`: each shard's backward pass where its forward pass
    /// ran, then the shards' gradients of `vars` summed in shard order into the first
    /// shard's store (its other entries are that shard's alone).
    pub fn backward(&self, loss: ShardedLoss, vars: &[Var]) -> Result<GradStore> {
        let n = loss.parts.len();
        let parts: Vec<Mutex<Option<Tensor>>> = loss
            .parts
            .into_iter()
            .map(|p| Mutex::new(Some(p)))
            .collect();
        // Each shard's graph is dropped on its own thread once differentiated; the other
        // shards keep only their gradients of `vars`.
        let mut stores = self.each(n, |s| {
            let part = parts[s]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .expect("one backward pass per shard");
            let store = part.backward()?;
            drop(part);
            if s == 0 {
                return Ok((Some(store), Vec::new()));
            }
            let grads = vars
                .iter()
                .map(|v| store.get(v.as_tensor()).cloned())
                .collect();
            Ok((None, grads))
        })?;
        let (first, _) = &mut stores[0];
        let mut total = first.take().expect("shard 0 keeps its store");
        if n == 1 {
            return Ok(total);
        }
        for (i, v) in vars.iter().enumerate() {
            let mut sum = total.get(v.as_tensor()).cloned();
            for (_, grads) in &stores[1..] {
                sum = match (sum, &grads[i]) {
                    (Some(a), Some(g)) => Some((a + g)?),
                    (a, g) => a.or_else(|| g.clone()),
                };
            }
            if let Some(g) = sum {
                total.insert(v.as_tensor(), g);
            }
        }
        Ok(total)
    }
}

/// `work(w)` on pool `w`, for every pool at once; returns when all are done (a panic in
/// one is resumed here). The calling thread only waits: each pool's scope spawns one job
/// into that pool, without starting an OS thread.
fn on_each_pool(pools: &[rayon::ThreadPool], work: &(impl Fn(usize) + Sync)) {
    fn from(pools: &[rayon::ThreadPool], w: usize, work: &(impl Fn(usize) + Sync)) {
        if let Some(pool) = pools.get(w) {
            pool.in_place_scope(|scope| {
                scope.spawn(move |_| work(w));
                from(pools, w + 1, work);
            });
        }
    }
    from(pools, 0, work)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::build_model;
    use crate::rng::Rng;
    use candle_core::{DType, Device};

    /// A small class-conditional model with ActNorm, a split and a learned prior, at 14×14.
    fn model() -> FlowModel {
        let text = "data: {dataset: mnist, downscale: 2}\ntrain: {steps: 1}\nmodels:\n  a:\n    classes: 10\n    prior: learned\n    coupling: {net: {hidden: 8, layers: 1}}\n    layers: [{type: actnorm}, {type: coupling, mask: checkerboard}, {type: squeeze}, {type: coupling, mask: channel}, {type: split, prior: learned}, {type: coupling, mask: checkerboard}]\n";
        let exp = crate::spec::Experiment::from_text(text, "t", "t", &[]).unwrap();
        let runs = exp.runs(&[], &crate::data::builtin_shape).unwrap();
        let m = build_model(&runs[0].plan, 3, DType::F32, &Device::Cpu).unwrap();
        crate::testing::perturb_params(m.store(), 0.05, 9).unwrap();
        m
    }

    /// `b` integer images `[b, 1, 14, 14]` and their labels `[b]`.
    fn batch(b: usize, seed: u64) -> (Tensor, Tensor) {
        let mut rng = Rng::new(seed);
        let x = rng.uniform(&[b, 1, 14, 14], 0.0, 256.0, DType::F32, &Device::Cpu);
        let y: Vec<u32> = (0..b as u32).map(|i| (i * 7 + 3) % 10).collect();
        (
            x.unwrap().floor().unwrap(),
            Tensor::new(y, &Device::Cpu).unwrap(),
        )
    }

    /// Loss and gradients of one step through [`Sharding`].
    fn sharded(m: &FlowModel, x: &Tensor, y: &Tensor, seed: u64) -> (f64, Vec<Vec<f32>>) {
        let sharding = Sharding::new(m);
        let vars = m.store().trainable_vars();
        let loss = sharding.forward(m, x, Some(y), seed).unwrap();
        let value = loss.value;
        let g = sharding.backward(loss, &vars).unwrap();
        (value, flat_grads(&g, &vars))
    }

    fn flat_grads(g: &GradStore, vars: &[Var]) -> Vec<Vec<f32>> {
        vars.iter()
            .map(|v| {
                let t = g.get(v.as_tensor()).expect("every variable has a gradient");
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect()
    }

    /// The step by hand: `(1/B) Σ bpd` of `x[r]` with noise from `seed` per range, each
    /// differentiated alone, the gradients summed in range order.
    fn by_hand(
        m: &FlowModel,
        x: &Tensor,
        y: &Tensor,
        ranges: &[(Range<usize>, u64)],
    ) -> (f64, Vec<Vec<f32>>) {
        let (b, vars) = (x.dim(0).unwrap(), m.store().trainable_vars());
        let (mut value, mut sum): (f64, Option<Vec<Tensor>>) = (0.0, None);
        for (r, seed) in ranges {
            let mut ctx = FlowCtx::new(*seed);
            let ys = y.narrow(0, r.start, r.len()).unwrap();
            m.set_labels(&mut ctx, Some(&ys)).unwrap();
            let xs = x.narrow(0, r.start, r.len()).unwrap();
            let l = (m.bpd(&xs, &mut ctx).unwrap().sum_all().unwrap() / b as f64).unwrap();
            value += l.to_scalar::<f32>().unwrap() as f64;
            let g = l.backward().unwrap();
            let gs: Vec<Tensor> = vars.iter().map(|v| g.get(v).unwrap().clone()).collect();
            sum = Some(match sum {
                None => gs,
                Some(s) => s.iter().zip(&gs).map(|(a, g)| (a + g).unwrap()).collect(),
            });
        }
        let flat = sum
            .unwrap()
            .iter()
            .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        (value, flat)
    }

    #[test]
    fn a_sharded_step_is_the_sum_of_its_shards_and_the_same_for_any_thread_count() {
        let m = model();
        let (x, y) = batch(70, 1);
        // The first step (ActNorm initialises itself) runs on the whole batch.
        assert!(m.store().awaits_data_init().unwrap());
        let first = sharded(&m, &x, &y, 11);
        assert!(!m.store().awaits_data_init().unwrap());
        let m2 = model();
        assert_eq!(first, by_hand(&m2, &x, &y, &[(0..70, 11)]));

        // Then three shards of 24, 23, 23 images with noise of their own.
        let seeds = |s: u64| [(0..24, shard_seed(s, 0)), (24..47, shard_seed(s, 1))];
        let want = by_hand(
            &m,
            &x,
            &y,
            &[
                seeds(12)[0].clone(),
                seeds(12)[1].clone(),
                (47..70, shard_seed(12, 2)),
            ],
        );
        for threads in [1, 2, 3, 4] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let got = pool.install(|| sharded(&m, &x, &y, 12));
            assert_eq!(got.1, want.1, "{threads} threads: gradients");
            assert!((got.0 - want.0).abs() < 1e-9, "{threads} threads: loss");
        }
        // The loss is the batch's mean bpd.
        let mean = (0..3)
            .map(|s| {
                let r = &shards(70)[s];
                let mut ctx = FlowCtx::new(shard_seed(12, s));
                m.set_labels(&mut ctx, Some(&y.narrow(0, r.start, r.len()).unwrap()))
                    .unwrap();
                let bpd = m
                    .bpd(&x.narrow(0, r.start, r.len()).unwrap(), &mut ctx)
                    .unwrap();
                bpd.to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|&v| v as f64)
                    .sum::<f64>()
            })
            .sum::<f64>()
            / 70.0;
        assert!(
            (want.0 - mean).abs() < 1e-4 * mean.abs(),
            "{} vs {mean}",
            want.0
        );
    }

    #[test]
    fn evaluation_by_shards_is_the_same_for_any_thread_count() {
        let m = model();
        let (x, y) = batch(70, 3);
        sharded(&m, &x, &y, 1); // ActNorm's initialisation
        let eval = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let sharding = Sharding::new(&m);
            let parts = pool.install(|| {
                sharding.map(&m, &x, Some(&y), 4, |ctx, xs| {
                    Ok(m.bpd_importance(xs, 3, ctx)?.to_vec1::<f64>()?)
                })
            });
            parts.unwrap().concat()
        };
        let want: Vec<f64> = shards(70)
            .into_iter()
            .enumerate()
            .flat_map(|(s, r)| {
                let mut ctx = FlowCtx::new(shard_seed(4, s));
                m.set_labels(&mut ctx, Some(&y.narrow(0, r.start, r.len()).unwrap()))
                    .unwrap();
                let xs = x.narrow(0, r.start, r.len()).unwrap();
                m.bpd_importance(&xs, 3, &mut ctx)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            })
            .collect();
        assert_eq!(want.len(), 70);
        for threads in [1, 2, 3] {
            assert_eq!(eval(threads), want, "{threads} threads");
        }
    }

    #[test]
    fn batches_of_up_to_one_shard_run_whole_with_the_steps_own_noise() {
        let m = model();
        let (x, y) = batch(SHARD_IMAGES, 2);
        sharded(&m, &x, &y, 5);
        assert_eq!(
            sharded(&m, &x, &y, 6),
            by_hand(&m, &x, &y, &[(0..SHARD_IMAGES, 6)])
        );
    }

    #[test]
    fn shards_cover_the_batch_in_near_equal_contiguous_ranges() {
        assert_eq!(shards(1), vec![0..1]);
        assert_eq!(shards(32), vec![0..32]);
        assert_eq!(shards(33), vec![0..17, 17..33]);
        assert_eq!(shards(64), vec![0..32, 32..64]);
        assert_eq!(shards(100), vec![0..25, 25..50, 50..75, 75..100]);
        assert_eq!(shards(128).len(), 4);
        for b in 1..300 {
            let s = shards(b);
            assert_eq!(s.len(), b.div_ceil(SHARD_IMAGES));
            assert_eq!(s[0].start, 0);
            assert_eq!(s.last().unwrap().end, b);
            assert!(s.windows(2).all(|w| w[0].end == w[1].start));
            let lens: Vec<usize> = s.iter().map(|r| r.len()).collect();
            assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1);
            assert!(lens.iter().all(|&l| l <= SHARD_IMAGES));
        }
    }
}
