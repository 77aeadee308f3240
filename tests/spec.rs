//! Spec loading, sweeps and the experiment files.

use flowlab::build::build_model;
use flowlab::data::builtin_shape;
use flowlab::spec::{Experiment, Run};

fn runs_of(text: &str, overrides: &[&str]) -> Result<Vec<Run>, String> {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let exp = Experiment::from_text(text, "t.yaml", "t", &o).map_err(|e| e.to_string())?;
    exp.runs(&[], &builtin_shape).map_err(|e| e.to_string())
}

fn params(run: &Run) -> usize {
    build_model(
        &run.plan,
        0,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .num_params()
}

#[test]
fn tutorial_specs_build_the_published_parameter_counts() {
    let exp = Experiment::load("experiments/uva_tutorial11.yaml".as_ref(), &[]).unwrap();
    assert_eq!(exp.variants, vec!["simple", "vardeq", "multiscale"]);
    let runs = exp.runs(&[], &builtin_shape).unwrap();
    let counts: Vec<(String, usize)> = runs
        .iter()
        .map(|r| (r.config.variant.clone(), params(r)))
        .collect();
    assert_eq!(
        counts,
        vec![
            ("simple".into(), 556_312),
            ("vardeq".into(), 628_388),
            ("multiscale".into(), 1_711_818)
        ]
    );
    assert_eq!(runs[2].plan.latent_shape, [8, 7, 7]);
}

const BASE: &str = "
data: {dataset: mnist, downscale: 2}
train: {steps: 10, lr: 1.0e-3}
models:
  a:
    layers:
      - {type: repeat, times: 2, layers: [{type: coupling, mask: checkerboard, net: {hidden: 4, layers: 1}}]}
  b:
    coupling: {kind: affine}
    layers:
      - {type: squeeze}
      - {type: coupling, mask: channel, net: {hidden: 4, layers: 1}}
";

#[test]
fn sweep_counts_names_and_variant_specific_paths() {
    let text = format!("{BASE}sweep:\n  grid:\n    models.b.coupling.kind: [affine, additive]\n    seed: [0, 1, 2]\n");
    let runs = runs_of(&text, &[]).unwrap();
    // a: 3 seeds (the b-only path does not apply); b: 2 kinds × 3 seeds.
    assert_eq!(runs.len(), 9);
    let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    assert!(names.contains(&"a-seed=0"), "{names:?}");
    assert!(names.contains(&"b-kind=additive-seed=2"), "{names:?}");
    let ids: std::collections::HashSet<&str> = runs.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), 9);
}

#[test]
fn zip_runs_in_lockstep_and_unequal_lengths_are_refused() {
    let text = format!(
        "{BASE}sweep:\n  zip:\n    - {{train.lr: [1.0e-3, 5.0e-4], data.batch_size: [64, 32]}}\n"
    );
    let runs = runs_of(&text, &[]).unwrap();
    assert_eq!(runs.len(), 4);
    assert!(runs
        .iter()
        .any(|r| r.config.train.lr == 5e-4 && r.config.data.batch_size == 32));
    assert!(!runs
        .iter()
        .any(|r| r.config.train.lr == 5e-4 && r.config.data.batch_size == 64));
    let bad = format!(
        "{BASE}sweep:\n  zip:\n    - {{train.lr: [1.0e-3, 5.0e-4], data.batch_size: [64]}}\n"
    );
    let e = runs_of(&bad, &[]).unwrap_err();
    assert!(e.contains("equal lengths"), "{e}");
}

#[test]
fn run_ids_are_stable_and_ignore_key_order() {
    let a = runs_of(BASE, &[]).unwrap();
    let b = runs_of(BASE, &[]).unwrap();
    assert_eq!(
        a.iter().map(|r| &r.id).collect::<Vec<_>>(),
        b.iter().map(|r| &r.id).collect::<Vec<_>>()
    );
    let reordered = BASE.replace(
        "data: {dataset: mnist, downscale: 2}\ntrain: {steps: 10, lr: 1.0e-3}",
        "train: {lr: 1.0e-3, steps: 10}\ndata: {downscale: 2, dataset: mnist}",
    );
    assert_ne!(reordered, BASE);
    let c = runs_of(&reordered, &[]).unwrap();
    assert_eq!(a[0].id, c[0].id);
    // Defaults written out explicitly do not change the id either.
    let explicit = BASE.replace(
        "train: {steps: 10, lr: 1.0e-3}",
        "train: {steps: 10, lr: 1.0e-3, lr_decay: 0.99}",
    );
    assert_eq!(a[0].id, runs_of(&explicit, &[]).unwrap()[0].id);
    // A different config has a different id; so does a --set override.
    let other = runs_of(BASE, &["train.steps=11"]).unwrap();
    assert_ne!(a[0].id, other[0].id);
    assert_eq!(other[0].config.train.steps, Some(11));
}

#[test]
fn per_variant_overrides_merge_into_shared_sections() {
    let text = BASE.replace(
        "  b:\n    coupling",
        "  b:\n    train: {lr: 5.0e-4}\n    data: {batch_size: 16}\n    coupling",
    );
    let runs = runs_of(&text, &[]).unwrap();
    let b = runs.iter().find(|r| r.config.variant == "b").unwrap();
    let a = runs.iter().find(|r| r.config.variant == "a").unwrap();
    assert_eq!(
        (
            b.config.train.lr,
            b.config.data.batch_size,
            b.config.train.steps
        ),
        (5e-4, 16, Some(10))
    );
    assert_eq!((a.config.train.lr, a.config.data.batch_size), (1e-3, 128));
}

#[test]
fn repeat_alternates_parity_and_levels_expand_like_glow() {
    let text = "
data: {dataset: mnist}
train: {steps: 1}
models:
  glow:
    layers:
      - type: levels
        levels: 2
        depth: 2
        step: [{type: actnorm}, {type: invconv}, {type: coupling, mask: split, net: {arch: glow, hidden: 8}}]
        split: learned
";
    let runs = runs_of(text, &[]).unwrap();
    let plan = &runs[0].plan;
    let kinds: Vec<&str> = plan.layers.iter().map(|l| l.op.kind()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "squeeze").count(), 2);
    assert_eq!(kinds.iter().filter(|k| **k == "split").count(), 1);
    assert_eq!(kinds.iter().filter(|k| **k == "coupling").count(), 4);
    assert_eq!(plan.latent_shape, [8, 7, 7]);
    // A third level would squeeze 7×7: refused with the location of the block.
    let e = runs_of(&text.replace("levels: 2", "levels: 3"), &[]).unwrap_err();
    assert!(e.starts_with("t.yaml:7:") && e.contains("models.glow.layers[0]: squeeze needs even height and width, the input here is 4×7×7"), "{e}");
    assert_eq!(plan.layers[0].name, "levels0.level0.squeeze");
    let r = runs_of(BASE, &[]).unwrap();
    let inverts: Vec<bool> = r[0]
        .plan
        .layers
        .iter()
        .map(|l| match &l.op {
            flowlab::spec::PlannedOp::Coupling(c) => c.invert,
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(inverts, vec![false, true]);
}
