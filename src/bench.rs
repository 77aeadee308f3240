//! `flowlab bench`: per-variant timing of the training step and of inference/sampling,
//! FLOPs from the layer plan, and memory.

use std::time::Instant;

use candle_core::{DType, Device};
use serde::Serialize;

use crate::build::build_model;
use crate::flow::coupling::{CouplingKind, Partition};
use crate::nets::{NetArch, NetConfig};
use crate::rng::Rng;
use crate::spec::{ModelPlan, PlannedLayer, PlannedOp, Run};
use crate::train::shard::Sharding;
use crate::train::{optim, Adam};
use crate::{Error, Result};

mod peak;
pub use peak::fma_peak_gflops;

/// One line of `flowlab bench --json`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub variant: String,
    pub batch: usize,
    /// `fast` (flowlab's CPU kernels) or `candle` (stock ops); see [`crate::kernels`].
    pub kernels: String,
    /// The convolution microkernels' vector extension: `avx512`, `avx2` or `none` (see
    /// [`crate::kernels::simd`]).
    pub simd: String,
    /// Worker threads (rayon's pool: `RAYON_NUM_THREADS`, default = logical cores).
    pub threads: usize,
    /// Shards a training step's batch is cut into ([`crate::train::shard`]): `⌈batch/32⌉`
    /// on a CPU (run `min(threads, shards)` at a time), 1 on a GPU.
    pub shards: usize,
    pub fwd_ms: f64,
    pub bwd_ms: f64,
    pub opt_ms: f64,
    pub step_ms: f64,
    pub imgs_per_s: f64,
    pub infer_ms: f64,
    pub sample_ms: f64,
    pub params: usize,
    pub gflop_per_step: f64,
    pub gflops: f64,
    /// The cores' f32 FMA peak: the best of [`fma_peak_gflops`] on the `threads` workers
    /// measured after each timed step (`null` on a GPU or a CPU without AVX2 + FMA).
    pub peak_gflops: Option<f64>,
    /// `gflops` as a percentage of `peak_gflops`.
    pub pct_peak: Option<f64>,
    pub peak_rss_mb: f64,
    /// RSS after the last timed step minus after the first (MB); ~0 means no growth.
    pub rss_growth_mb: f64,
}

/// Multiply-accumulates of a k×k "same" convolution at h×w.
fn conv_macs(c_in: usize, c_out: usize, k: usize, hw: usize) -> f64 {
    (c_in * c_out * k * k * hw) as f64
}

fn net_macs(net: &NetConfig, c_in: usize, c_out: usize, hw: usize) -> f64 {
    let h = net.hidden;
    match net.arch {
        NetArch::Gated => {
            conv_macs(c_in, h, 3, hw)
                + net.layers as f64 * (conv_macs(2 * h, h, 3, hw) + conv_macs(2 * h, 2 * h, 1, hw))
                + conv_macs(2 * h, c_out, 3, hw)
        }
        NetArch::Glow => {
            conv_macs(c_in, h, 3, hw) + conv_macs(h, h, 1, hw) + conv_macs(h, c_out, 3, hw)
        }
    }
}

/// Multiply-accumulates of one layer's forward pass; `classes`: the one-hot label planes a
/// class-conditional model's learned split priors also read.
fn layer_macs(l: &PlannedLayer, classes: usize) -> f64 {
    let [c, h, w] = l.in_shape;
    let hw = h * w;
    match &l.op {
        PlannedOp::Coupling(cfg) => {
            let (net_in, c_t) = match cfg.partition {
                Partition::Checkerboard | Partition::Channel => (c, c),
                Partition::Split => {
                    let first = c / 2;
                    if cfg.invert {
                        (c - first, first)
                    } else {
                        (first, c - first)
                    }
                }
            };
            let out = match cfg.kind {
                CouplingKind::Affine => 2 * c_t,
                CouplingKind::Additive => c_t,
                CouplingKind::Spline => crate::flow::spline::params_per_element(cfg.bins) * c_t,
            };
            // The network also reads the conditioning and label planes.
            let extra = cfg.cond_channels + cfg.label_classes;
            net_macs(&cfg.net, net_in + extra, out, hw)
        }
        PlannedOp::InvConv(_) => (c * c * hw) as f64,
        PlannedOp::Split(crate::flow::split::SplitPrior::Learned) => {
            conv_macs(c / 2 + classes, c, 3, hw)
        }
        _ => 0.0,
    }
}

/// Forward FLOPs per image (2 per multiply-accumulate; convolutions and 1×1 mixes only).
pub fn flops_per_image(plan: &ModelPlan) -> f64 {
    let noise = plan.dequant_noise.iter().flatten();
    let macs = |l| layer_macs(l, plan.classes);
    2.0 * noise.chain(&plan.layers).map(macs).sum::<f64>()
}

/// Resident set size (current, peak) in MB from /proc (0 where unavailable).
pub fn rss_mb() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn ms_since(t: Instant, dev: &Device) -> Result<f64> {
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// Times `steps` training steps (after `warmup` untimed ones) of a run's model on random
/// pixel batches of size `batch`, plus inference and sampling of one batch.
pub fn bench_run(
    run: &Run,
    batch: usize,
    warmup: usize,
    steps: usize,
    dev: &Device,
) -> Result<BenchRow> {
    if batch == 0 || steps == 0 {
        return Err(Error::Usage(format!(
            "bench needs a batch and timed steps of at least 1 (got batch {batch}, steps {steps})"
        )));
    }
    let model = build_model(&run.plan, 0, DType::F32, dev)?;
    let mut opt = Adam::new(
        model.store().named_vars(),
        run.config.train.optimizer,
        run.config.train.weight_decay,
    )?;
    let mut rng = Rng::new(0);
    let mut shape = vec![batch];
    shape.extend(run.plan.data_shape);
    let x = rng.uniform(&shape, 0.0, 256.0, DType::F32, dev)?.floor()?;
    let (mut fwd, mut bwd, mut upd, mut rss) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut peaks = Vec::new();
    let (vars, sharding) = (model.store().trainable_vars(), Sharding::new(&model));
    // A class-conditional model's labels cycle through 0, 1, …, K − 1.
    let labels = model.labels(batch, None)?;
    for i in 0..warmup + steps {
        let t = Instant::now();
        let loss = sharding.forward(&model, &x, labels.as_ref(), i as u64)?;
        let f = ms_since(t, dev)?;
        let t = Instant::now();
        let grads = sharding.backward(loss, &vars)?;
        let b = ms_since(t, dev)?;
        let t = Instant::now();
        let norm = opt.grad_norm(&grads)?;
        opt.step(
            &grads,
            1e-4,
            optim::clip_scale(norm, run.config.train.grad_clip),
        )?;
        let o = ms_since(t, dev)?;
        if i >= warmup {
            fwd.push(f);
            bwd.push(b);
            upd.push(o);
            rss.push(rss_mb().0);
            // The cores' FMA peak between timed steps, the best of them: on a shared VM what
            // the cores deliver drifts for minutes, and a vCPU is sometimes away for a
            // fraction of a second (the best sample is the slow hour's peak, not the
            // moment's). 2 GFLOP per thread: ~20 ms on an AVX2 core.
            if dev.is_cpu() {
                peaks.extend(fma_peak_gflops(2.0, 1));
            }
        }
    }
    let step: Vec<f64> = (0..fwd.len()).map(|i| fwd[i] + bwd[i] + upd[i]).collect();
    let step_ms = median(step);
    let peak = peaks.into_iter().reduce(f64::max);
    let mut infer = Vec::new();
    let mut sample = Vec::new();
    for i in 0..3 {
        let t = Instant::now();
        sharding.map(&model, &x, labels.as_ref(), i, |ctx, xs| {
            Ok(model.bpd(xs, ctx)?.detach())
        })?;
        infer.push(ms_since(t, dev)?);
        let t = Instant::now();
        model.sample(batch, 1.0, &mut model.sample_ctx(i, batch, None)?)?;
        sample.push(ms_since(t, dev)?);
    }
    let gflop = 3.0 * flops_per_image(&run.plan) * batch as f64 / 1e9;
    let gflops = gflop / (step_ms / 1e3);
    Ok(BenchRow {
        variant: run.config.variant.clone(),
        batch,
        kernels: match crate::kernels::kernels() {
            crate::kernels::Kernels::Fast => "fast",
            crate::kernels::Kernels::Direct => "direct",
            crate::kernels::Kernels::Candle => "candle",
        }
        .into(),
        simd: crate::kernels::simd().into(),
        threads: rayon::current_num_threads(),
        shards: sharding.shards_of(batch).len(),
        fwd_ms: median(fwd),
        bwd_ms: median(bwd),
        opt_ms: median(upd),
        step_ms,
        imgs_per_s: batch as f64 / (step_ms / 1e3),
        infer_ms: median(infer),
        sample_ms: median(sample),
        params: model.num_params(),
        gflop_per_step: gflop,
        gflops,
        peak_gflops: peak,
        pct_peak: peak.map(|p| 100.0 * gflops / p),
        peak_rss_mb: rss_mb().1,
        rss_growth_mb: rss.last().copied().unwrap_or(0.0) - rss.first().copied().unwrap_or(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tutorial_coupling_flops_by_hand() {
        // One checkerboard coupling, GatedConvNet(1→32→2, 3 blocks) at 28×28:
        // MACs = hw·(1·32·9 + 3·(64·32·9 + 64·64) + 64·2·9).
        let text = "data: {dataset: mnist}\ntrain: {steps: 1}\nmodels:\n  a:\n    layers: [{type: coupling, mask: checkerboard}]\n";
        let exp = crate::spec::Experiment::from_text(text, "t", "t", &[]).unwrap();
        let runs = exp.runs(&[], &crate::data::builtin_shape).unwrap();
        let macs = 784.0 * (288.0 + 3.0 * (18432.0 + 4096.0) + 1152.0);
        assert_eq!(flops_per_image(&runs[0].plan), 2.0 * macs);
    }

    #[test]
    fn class_conditional_flops_count_the_label_planes() {
        // A checkerboard coupling at 14×14 whose GatedConvNet(1 + 10 → 8 → 2, 1 block)
        // also reads 10 label planes, then squeeze and a split with a learned prior that
        // reads the 2 kept channels and the 10 label planes (→ 4 channels) at 7×7.
        let text = "data: {dataset: mnist, downscale: 2}\ntrain: {steps: 1}\nmodels:\n  a:\n    classes: 10\n    coupling: {net: {hidden: 8, layers: 1}}\n    layers: [{type: coupling, mask: checkerboard}, {type: squeeze}, {type: split, prior: learned}]\n";
        let exp = crate::spec::Experiment::from_text(text, "t", "t", &[]).unwrap();
        let runs = exp.runs(&[], &crate::data::builtin_shape).unwrap();
        let coupling =
            196.0 * (11.0 * 8.0 * 9.0 + 16.0 * 8.0 * 9.0 + 16.0 * 16.0 + 16.0 * 2.0 * 9.0);
        let split = 49.0 * (12.0 * 4.0 * 9.0);
        assert_eq!(flops_per_image(&runs[0].plan), 2.0 * (coupling + split));
    }
}
