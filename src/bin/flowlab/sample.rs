//! `flowlab sample`: images from a trained run, at one or several temperatures.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Args;
use flowlab::runner;

use super::{at_least_one, load_trained};

#[derive(Args)]
pub struct SampleArgs {
    /// A run's folder (results/<experiment>/runs/<name>-<id>).
    run_dir: PathBuf,
    /// Number of images.
    #[arg(long, short, default_value_t = 64, value_parser = at_least_one)]
    n: usize,
    /// Sampling temperature(s) (0 = the mode of every latent). Several
    /// (`-t 0,0.5,0.7,0.85,1`) write a temperature study: one labelled row of `n` images
    /// per temperature, all decoded from the same noise.
    #[arg(
        long = "temperature",
        short,
        value_delimiter = ',',
        default_value = "0.7"
    )]
    temperatures: Vec<f64>,
    /// Random seed of the latents.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Class of every sample (class-conditional models; without it they cycle through
    /// the classes).
    #[arg(long)]
    label: Option<usize>,
    /// Output PNG.
    #[arg(long, short, default_value = "samples.png")]
    output: PathBuf,
}

pub fn cmd_sample(a: SampleArgs) -> Result<ExitCode> {
    if a.output
        .extension()
        .is_some_and(|e| !e.eq_ignore_ascii_case("png"))
    {
        bail!(
            "{}: samples are written as PNG; name the output *.png",
            a.output.display()
        );
    }
    let run = load_trained(&a.run_dir, None)?;
    let (model, step) = (&run.model, run.step);
    if let Some(bad) = a
        .temperatures
        .iter()
        .find(|t| !(t.is_finite() && **t >= 0.0))
    {
        bail!("temperature must be a finite number ≥ 0, got {bad}");
    }
    if let [t] = a.temperatures[..] {
        runner::save_samples(model, a.n, t, a.seed, a.label, &a.output)?;
        say!(
            "{} samples at temperature {t} from step {step} → {}",
            a.n,
            a.output.display()
        );
    } else {
        runner::save_temperature_grid(model, a.n, &a.temperatures, a.seed, a.label, &a.output)?;
        say!(
            "{} samples per temperature at {:?} from step {step} → {}",
            a.n,
            a.temperatures,
            a.output.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
