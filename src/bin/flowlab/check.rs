//! `flowlab check`: a spec checked without training (layers, shapes, data, invertibility).

use std::process::ExitCode;

use anyhow::Result;
use flowlab::build::{build_model, params_under};
use flowlab::testing::{perturb_params, round_trip, FlowCheck};

use super::{load_runs, runs_text, Shapes, SpecArgs};

fn shape_text(s: &[usize]) -> String {
    s.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("×")
}

pub fn cmd_check(a: SpecArgs) -> Result<ExitCode> {
    let (exp, runs) = load_runs(&a, &Shapes::default())?;
    let mut ok = true;
    say!(
        "{}: {} variant(s), {} run(s) in the sweep",
        exp.file,
        exp.variants.len(),
        runs.len()
    );
    // The data of every run, loaded: its sizes, and what cannot be trained on (a class the
    // data lacks, more validation images than there are, fewer training images than a
    // batch), refused here rather than in the middle of a sweep.
    for (spec, n) in flowlab::data::distinct(runs.iter().map(|r| &r.config.data)) {
        match flowlab::data::load(spec) {
            Ok(s) => say!(
                "data: {} {}, {} training, {} validation and {} test images",
                s.train.name,
                shape_text(&s.train.shape),
                s.train.len(),
                s.val.len(),
                s.test.len()
            ),
            Err(e) => {
                eprintln!("error: {e}\n  (the data of {} of the sweep)", runs_text(n));
                ok = false;
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    for run in &runs {
        let v = &run.config.variant;
        if !seen.insert(v.clone()) {
            continue;
        }
        let n_runs = runs.iter().filter(|r| &r.config.variant == v).count();
        let model = build_model(
            &run.plan,
            0,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )?;
        say!(
            "\n== {v} ({n_runs} run{}) ==",
            if n_runs == 1 { "" } else { "s" }
        );
        let plan = &run.plan;
        let mut rows: Vec<[String; 5]> = vec![[
            "layer".into(),
            "type".into(),
            "in".into(),
            "out".into(),
            "params".into(),
        ]];
        if let Some(noise) = &plan.dequant_noise {
            for l in noise {
                rows.push([
                    l.name.clone(),
                    format!("{} (dequant)", l.op.kind()),
                    shape_text(&l.in_shape),
                    shape_text(&l.out_shape),
                    params_under(model.store(), &l.name).to_string(),
                ]);
            }
        }
        for l in &plan.layers {
            rows.push([
                l.name.clone(),
                l.op.kind().into(),
                shape_text(&l.in_shape),
                shape_text(&l.out_shape),
                params_under(model.store(), &l.name).to_string(),
            ]);
        }
        let w: Vec<usize> = (0..5)
            .map(|j| rows.iter().map(|r| r[j].chars().count()).max().unwrap_or(0))
            .collect();
        for r in &rows {
            say!(
                "  {:<a$}  {:<b$}  {:>c$}  {:>d$}  {:>e$}",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                a = w[0],
                b = w[1],
                c = w[2],
                d = w[3],
                e = w[4]
            );
        }
        say!(
            "  total parameters: {}   data {} → latent {}",
            model.num_params(),
            shape_text(&plan.data_shape),
            shape_text(&plan.latent_shape)
        );
        // Numerical invertibility with lightly perturbed parameters (at init the zero-initialised
        // couplings are the identity, which would make the check vacuous).
        perturb_params(model.store(), 0.01, 1)?;
        let mut check = FlowCheck::new(&plan.data_shape);
        check.batch = 4;
        if plan.classes > 0 {
            check = check.labels(plan.classes);
        }
        let rt = round_trip(model.flows(), &check)?;
        let tol_ldj = 1e-3 * rt.max_abs_ldj.max(1.0);
        let pass = rt.max_inverse_err <= 1e-3 && rt.max_ldj_sum <= tol_ldj;
        ok &= pass;
        say!(
            "  invertibility: max|x − f⁻¹(f(x))| = {:.2e}, max|ldj_f + ldj_f⁻¹| = {:.2e}  {}",
            rt.max_inverse_err,
            rt.max_ldj_sum,
            if pass { "ok" } else { "FAILED" }
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
