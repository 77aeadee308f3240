//! `flowlab bench`: the training step, inference and sampling of each variant, timed.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use flowlab::runner;

use super::{at_least_one, load_runs, Shapes, SpecArgs};

/// The environment variables that change what `bench` (and training) runs on.
pub const BENCH_ENV: &str = "\
Environment:
  RAYON_NUM_THREADS=N      worker threads (default: one per logical core)
  FLOWLAB_SIMD=SET         CPU microkernels: avx512, avx2 or none (default: AVX-512 only
                           where its FMAs outrun AVX2's, else AVX2; `simd` in the output)
  FLOWLAB_HUGE_PAGES=0     tensors in 4 KiB pages instead of transparent huge pages
  FLOWLAB_MALLOC_TUNING=0  glibc's default malloc thresholds (and no huge pages)";

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    spec: SpecArgs,
    /// Batch size (default: the spec's).
    #[arg(long, value_parser = at_least_one)]
    batch: Option<usize>,
    /// Timed steps (after 2 warm-up steps).
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    steps: usize,
    /// One JSON object per variant per line.
    #[arg(long)]
    json: bool,
    /// Kernels for the conv/elementwise hot ops: flowlab's fused CPU kernels, the same
    /// without Winograd convolutions (direct), or candle's stock ops (to measure the
    /// difference).
    #[arg(long, value_enum, default_value_t = KernelChoice::Fast)]
    kernels: KernelChoice,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    Fast,
    Direct,
    Candle,
}

pub fn cmd_bench(a: BenchArgs) -> Result<ExitCode> {
    let (_, runs) = load_runs(&a.spec, &Shapes::default())?;
    flowlab::kernels::set_kernels(match a.kernels {
        KernelChoice::Fast => flowlab::kernels::Kernels::Fast,
        KernelChoice::Direct => flowlab::kernels::Kernels::Direct,
        KernelChoice::Candle => flowlab::kernels::Kernels::Candle,
    });
    let mut seen = std::collections::HashSet::new();
    let runs: Vec<_> = runs
        .iter()
        .filter(|r| seen.insert(r.config.variant.clone()))
        .collect();
    // Rows print as each variant finishes, so the columns get fixed widths up front: the
    // longest variant name, and each header's width for the numbers (right-aligned).
    const HEAD: [&str; 15] = [
        "variant",
        "batch",
        "fwd ms",
        "bwd ms",
        "opt ms",
        "step ms",
        "img/s",
        "infer ms",
        "sample ms",
        "params",
        "GFLOP/step",
        "GFLOP/s",
        "% FMA peak",
        "peak RSS MB",
        "RSS growth MB",
    ];
    let name_w = runs
        .iter()
        .map(|r| r.config.variant.chars().count())
        .chain([HEAD[0].len()])
        .max()
        .unwrap_or(0);
    let row = |cells: &[String]| -> String {
        cells
            .iter()
            .zip(HEAD)
            .enumerate()
            .map(|(j, (c, h))| match j {
                0 => format!("{c:<name_w$}"),
                _ => format!("{c:>w$}", w = h.len().max(7)),
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    if !a.json {
        say!("{}", row(&HEAD.map(String::from)));
    }
    for run in runs {
        let dev = runner::device(&run.config.device)?;
        let batch = a.batch.unwrap_or(run.config.data.batch_size);
        let r = flowlab::bench::bench_run(run, batch, 2, a.steps.max(1), &dev)?;
        if a.json {
            say!("{}", serde_json::to_string(&r)?);
        } else {
            say!(
                "{}",
                row(&[
                    r.variant.clone(),
                    r.batch.to_string(),
                    format!("{:.1}", r.fwd_ms),
                    format!("{:.1}", r.bwd_ms),
                    format!("{:.1}", r.opt_ms),
                    format!("{:.1}", r.step_ms),
                    format!("{:.1}", r.imgs_per_s),
                    format!("{:.1}", r.infer_ms),
                    format!("{:.1}", r.sample_ms),
                    r.params.to_string(),
                    format!("{:.3}", r.gflop_per_step),
                    format!("{:.2}", r.gflops),
                    r.pct_peak.map_or("-".into(), |p| format!("{p:.0}")),
                    format!("{:.0}", r.peak_rss_mb),
                    format!("{:.1}", r.rss_growth_mb),
                ])
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
