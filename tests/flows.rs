//! Whole-model tests: parameter counts, the chained Jacobian, gradients, sampling.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use flowlab::flow::actnorm::ActNorm;
use flowlab::flow::coupling::{CouplingKind, Partition, ScaleBound};
use flowlab::flow::dequant::Dequantization;
use flowlab::flow::invconv::{InvConv1x1, InvConvKind};
use flowlab::flow::split::{Split, SplitPrior};
use flowlab::flow::squeeze::Squeeze;
use flowlab::flow::{FlowCtx, FlowModel, Sequential};
use flowlab::nets::NetConfig;
use flowlab::params::Params;
use flowlab::rng::Rng;
use flowlab::testing::{check_built, perturb_params, FlowCheck};

#[test]
fn tutorial_models_have_the_published_parameter_counts() {
    assert_eq!(
        tutorial_simple(&f32_store(0), false).unwrap().num_params(),
        556_312
    );
    assert_eq!(
        tutorial_simple(&f32_store(0), true).unwrap().num_params(),
        628_388
    );
    let ms = tutorial_multiscale(&f32_store(0)).unwrap();
    assert_eq!(ms.num_params(), 1_711_818);
    assert_eq!(ms.latent_shape(), &[8, 7, 7]);
}

/// Every layer family chained: checkerboard coupling, actnorm, invconv (LU and plain),
/// squeeze, channel coupling, learned-prior split, Glow split coupling, additive coupling.
fn chain(p: &Params) -> flowlab::Result<Box<dyn flowlab::flow::Flow>> {
    let small = NetConfig::gated(4, 1);
    let mut s = Sequential::new();
    s.push(
        "c0",
        Box::new(coupling(
            &p.pp("c0"),
            Partition::Checkerboard,
            false,
            small,
            2,
            0,
        )?),
    );
    s.push("an0", Box::new(ActNorm::new(&p.pp("an0"), 2)?));
    s.push(
        "inv0",
        Box::new(InvConv1x1::new(&p.pp("inv0"), 2, InvConvKind::Lu)?),
    );
    s.push("sq", Box::new(Squeeze));
    s.push(
        "c1",
        Box::new(coupling(
            &p.pp("c1"),
            Partition::Channel,
            true,
            small,
            8,
            0,
        )?),
    );
    s.push(
        "split",
        Box::new(Split::new(&p.pp("split"), 8, SplitPrior::Learned)?),
    );
    s.push(
        "inv1",
        Box::new(InvConv1x1::new(&p.pp("inv1"), 4, InvConvKind::Plain)?),
    );
    let mut glow = flowlab::flow::coupling::CouplingConfig::new(Partition::Split, false);
    glow.net = NetConfig::glow(5);
    glow.scale = ScaleBound::Sigmoid;
    s.push(
        "c2",
        Box::new(flowlab::flow::coupling::Coupling::new(
            &p.pp("c2"),
            glow,
            4,
        )?),
    );
    let mut add = flowlab::flow::coupling::CouplingConfig::new(Partition::Checkerboard, true);
    add.kind = CouplingKind::Additive;
    add.net = small;
    s.push(
        "c3",
        Box::new(flowlab::flow::coupling::Coupling::new(&p.pp("c3"), add, 4)?),
    );
    Ok(Box::new(s))
}

#[test]
fn chained_model_without_dequantization_matches_bruteforce_jacobian() {
    let r = check_built(&FlowCheck::new(&[2, 4, 4]).perturb(0.2), chain);
    assert!(r.max_abs_logdet > 0.1, "{r:?}");
}

fn pixels(n: usize, seed: u64) -> Tensor {
    let v: Vec<f32> = Rng::new(seed)
        .uniform_vec(n * 784, 0.0, 256.0)
        .iter()
        .map(|x| x.floor() as f32)
        .collect();
    Tensor::from_vec(v, (n, 1, 28, 28), &Device::Cpu).unwrap()
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    // Parameters are perturbed first: at init the zero output convs block all gradient
    // to the layers before them, which would make this test vacuous.
    let store = f32_store(0);
    let p = store.root();
    let small = NetConfig::gated(8, 2);
    let mut s = Sequential::new();
    s.push(
        "c0",
        Box::new(coupling(&p.pp("c0"), Partition::Checkerboard, false, small, 1, 0).unwrap()),
    );
    s.push("sq", Box::new(Squeeze));
    s.push("an", Box::new(ActNorm::new(&p.pp("an"), 4).unwrap()));
    s.push(
        "inv",
        Box::new(InvConv1x1::new(&p.pp("inv"), 4, InvConvKind::Lu).unwrap()),
    );
    s.push(
        "invp",
        Box::new(InvConv1x1::new(&p.pp("invp"), 4, InvConvKind::Plain).unwrap()),
    );
    s.push(
        "c1",
        Box::new(
            coupling(
                &p.pp("c1"),
                Partition::Channel,
                false,
                NetConfig::glow(8),
                4,
                0,
            )
            .unwrap(),
        ),
    );
    s.push(
        "split",
        Box::new(Split::new(&p.pp("split"), 4, SplitPrior::Learned).unwrap()),
    );
    let mut vd = Sequential::new();
    vd.push(
        "v0",
        Box::new(coupling(&p.pp("v0"), Partition::Checkerboard, false, small, 1, 1).unwrap()),
    );
    let deq = Dequantization::variational(1e-5, Dequantization::noise_flow(1e-5, vd));
    let model = FlowModel::new(store.clone(), deq, s, &[1, 28, 28]).unwrap();
    perturb_params(&store, 0.05, 3).unwrap();
    let x = pixels(4, 1);
    let loss = model
        .bpd(&x, &mut FlowCtx::new(0))
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in store.named_vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} got no gradient"));
        let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name} has a non-finite gradient"
        );
        assert!(
            v.iter().any(|x| *x != 0.0),
            "{name} has an all-zero gradient"
        );
    }
}

#[test]
fn untrained_simple_flow_bpd_and_importance_sampling() {
    let model = tutorial_simple(&f32_store(0), false).unwrap();
    let x = pixels(3, 2);
    let bpd = model
        .bpd(&x, &mut FlowCtx::new(1))
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    // At init the couplings are the identity: bpd is that of the logit-uniform model,
    // finite and positive, far above a trained model's ~1.
    assert!(bpd.iter().all(|b| b.is_finite() && *b > 1.0), "{bpd:?}");
    let is = model
        .bpd_importance(&x, 4, &mut FlowCtx::new(1))
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for (a, b) in bpd.iter().zip(&is) {
        // logsumexp ≥ mean of logs (Jensen) ⇒ the IS estimate is at most a few draws' spread away.
        assert!(b.is_finite() && (*a as f64 - b).abs() < 0.5, "{a} vs {b}");
    }
    assert!(model.bpd_importance(&x, 0, &mut FlowCtx::new(1)).is_err());
}

#[test]
fn bpd_matches_hand_computation_for_the_identity_flow() {
    // Empty layer stack: bpd = −[ldj_dequant + log N(z)]·log2 e / D with everything explicit.
    let store = f32_store(0);
    let model = FlowModel::new(
        store,
        Dequantization::uniform(1e-5),
        Sequential::new(),
        &[1, 2, 2],
    )
    .unwrap();
    let x = Tensor::new(&[[[[0f32, 255.], [128., 7.]]]], &Device::Cpu).unwrap();
    let mut ctx = FlowCtx::new(5);
    let bpd = model.bpd(&x, &mut ctx).unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    let u = Rng::new(5).uniform_vec(4, 0.0, 1.0);
    let a = 1e-5;
    let mut lp = 0.0;
    for (xi, ui) in [0.0, 255.0, 128.0, 7.0].iter().zip(&u) {
        let y = (xi + ui) / 256.0;
        let yp = a / 2.0 + (1.0 - a) * y;
        let z = (yp / (1.0 - yp)).ln();
        lp += -(256f64).ln() + (1.0 - a).ln() - yp.ln() - (1.0 - yp).ln();
        lp += -0.5 * (2.0 * std::f64::consts::PI).ln() - 0.5 * z * z;
    }
    let expect = -lp * std::f64::consts::LOG2_E / 4.0;
    assert!((bpd - expect).abs() < 1e-4, "{bpd} vs {expect}");
}

#[test]
fn sampling_and_exact_reconstruction() {
    let store = f32_store(0);
    let model = tutorial_multiscale(&store).unwrap();
    perturb_params(&store, 0.02, 1).unwrap();
    let x = pixels(2, 3);
    let mut ctx = FlowCtx::new(0);
    let enc = model.encode(&x, &mut ctx).unwrap();
    assert_eq!(enc.z.dims(), &[2, 8, 7, 7]);
    assert_eq!(enc.factored.len(), 1);
    let xr = model.reconstruct(&enc, &mut ctx).unwrap();
    assert_eq!(
        (xr - &x)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );

    let s = model.sample(3, 0.7, &mut FlowCtx::new(1)).unwrap();
    assert_eq!(s.dims(), &[3, 1, 28, 28]);
    let v = s.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v
        .iter()
        .all(|p| (0.0..=255.0).contains(p) && p.fract() == 0.0));
    // Temperature 0 ignores the noise: two different seeds give the same image.
    let a = model.sample(1, 0.0, &mut FlowCtx::new(1)).unwrap();
    let b = model.sample(1, 0.0, &mut FlowCtx::new(2)).unwrap();
    assert_eq!(
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

#[test]
fn empty_batches_are_errors_not_panics() {
    let store = f32_store(0);
    let model = tutorial_multiscale(&store).unwrap();
    let empty = Tensor::zeros((0, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
    let e = model.bpd(&empty, &mut FlowCtx::new(0)).unwrap_err();
    assert!(e.to_string().contains("B ≥ 1"), "{e}");
    let e = model.sample(0, 0.7, &mut FlowCtx::new(0)).unwrap_err();
    assert!(e.to_string().contains("n ≥ 1"), "{e}");
    let z = Tensor::zeros((0, 8, 7, 7), DType::F32, &Device::Cpu).unwrap();
    let e = model.decode(&z, &mut FlowCtx::new(0)).unwrap_err();
    assert!(e.to_string().contains("B ≥ 1"), "{e}");
}

#[test]
fn same_seed_same_model_and_bpd() {
    let x = pixels(2, 4);
    let run = |seed| {
        let store = f32_store(seed);
        let m = tutorial_simple(&store, true).unwrap();
        perturb_params(&store, 0.01, seed).unwrap();
        m.bpd(&x, &mut FlowCtx::new(7))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));
}

#[test]
fn learned_and_class_conditional_top_priors() {
    let text = "
data: {dataset: mnist, downscale: 2}
train: {steps: 1}
models:
  c:
    classes: 3
    prior: learned
    coupling: {net: {hidden: 4, layers: 1}}
    layers:
      - {type: squeeze}
      - {type: coupling, mask: channel}
      - {type: split, prior: learned}
      - {type: coupling, mask: checkerboard, kind: spline, bins: 4}
";
    let exp = flowlab::spec::Experiment::from_text(text, "t", "t", &[]).unwrap();
    let runs = exp.runs(&[], &flowlab::data::builtin_shape).unwrap();
    let model = flowlab::build::build_model(&runs[0].plan, 0, DType::F64, &Device::Cpu).unwrap();
    assert_eq!(model.classes(), 3);
    perturb_params(model.store(), 0.3, 1).unwrap();
    let x = Rng::new(3)
        .uniform(&[2, 1, 14, 14], 0.0, 256.0, DType::F64, &Device::Cpu)
        .unwrap()
        .floor()
        .unwrap();
    let labels = |l: &[u32]| Tensor::new(l, &Device::Cpu).unwrap();
    let log_prob = |l: &[u32]| {
        let mut ctx = FlowCtx::new(5);
        model.set_labels(&mut ctx, Some(&labels(l))).unwrap();
        model
            .log_prob(&x, &mut ctx)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let (a, b) = (log_prob(&[0, 1]), log_prob(&[2, 2]));
    assert!((a[0] - b[0]).abs() > 1e-6 && (a[1] - b[1]).abs() > 1e-6);

    // log p(x | y) = ldj + Σ log N(z; μ_y, e^{2 s_y}), with the tables read back by hand.
    let mut ctx = FlowCtx::new(5);
    model.set_labels(&mut ctx, Some(&labels(&[0, 1]))).unwrap();
    let e = model.encode(&x, &mut ctx).unwrap();
    let vars = model.store().named_vars();
    let table = |n: &str| {
        vars.iter()
            .find(|(k, _)| k == n)
            .unwrap()
            .1
            .as_tensor()
            .to_vec2::<f64>()
            .unwrap()
    };
    let (mu, ls) = (table("prior.mean"), table("prior.log_scale"));
    let z = e.z.flatten_from(1).unwrap().to_vec2::<f64>().unwrap();
    let ldj = e.ldj.to_vec1::<f64>().unwrap();
    for (i, y) in [0usize, 1].iter().enumerate() {
        let lp: f64 = (0..z[i].len())
            .map(|j| {
                let u = (z[i][j] - mu[*y][j]) / ls[*y][j].exp();
                -0.5 * u * u - 0.5 * (2.0 * std::f64::consts::PI).ln() - ls[*y][j]
            })
            .sum();
        assert!(
            (ldj[i] + lp - a[i]).abs() < 1e-8,
            "{} vs {}",
            ldj[i] + lp,
            a[i]
        );
    }

    // Labels are required, sampling is per class, out-of-range labels are refused.
    let err = model
        .log_prob(&x, &mut FlowCtx::new(5))
        .unwrap_err()
        .to_string();
    assert!(err.contains("labels"), "{err}");
    let s = |l: usize| {
        model
            .sample(2, 0.0, &mut model.sample_ctx(0, 2, Some(l)).unwrap())
            .unwrap()
    };
    let d = (s(0) - s(2)).unwrap().abs().unwrap().sum_all().unwrap();
    assert!(d.to_scalar::<f64>().unwrap() > 0.0);
    assert!(model
        .sample_ctx(0, 2, Some(3))
        .unwrap_err()
        .to_string()
        .contains("out of range"));
}
