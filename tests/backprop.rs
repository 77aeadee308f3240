//! The vendored candle-core's backward pass (see `vendor/README.md`): it stores the first
//! gradient reaching a node instead of adding it into fresh zeros. These tests pin the
//! cases that change touches: fan-in (several gradients summed), the subtracting rules whose
//! first gradient is stored negated, a node on both sides of one op, one gradient tensor
//! shared by two nodes and later summed into only one of them, and parameters used twice.

use candle_core::{DType, Device, Tensor, Var};

fn vals(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

fn var(v: &[f64]) -> Var {
    Var::from_tensor(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap()
}

fn assert_close(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "got {got:?}, want {want:?}");
    }
}

#[test]
fn fan_in_sums_every_gradient() {
    // loss = Σ (x² + x − 3x + exp(x)): ∂x = 2x + 1 − 3 + eˣ.
    let x = var(&[0.5, -1.0, 2.0]);
    let t = x.as_tensor();
    let loss = ((t.sqr().unwrap() + t).unwrap() - (t * 3.0).unwrap())
        .unwrap()
        .add(&t.exp().unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    let want: Vec<f64> = [0.5f64, -1.0, 2.0]
        .iter()
        .map(|x| 2.0 * x - 2.0 + x.exp())
        .collect();
    assert_close(&vals(g.get(t).unwrap()), &want);
}

#[test]
fn subtracting_rules_store_the_negated_first_gradient() {
    // b only as the right-hand side of a subtraction, then once more through a square:
    // loss = Σ (a − b) + Σ b² → ∂b = −1 + 2b, ∂a = 1. Division, tanh and recip also
    // subtract in their rules.
    let a = var(&[1.0, 2.0]);
    let b = var(&[3.0, -4.0]);
    let (ta, tb) = (a.as_tensor(), b.as_tensor());
    let loss =
        ((ta - tb).unwrap().sum_all().unwrap() + tb.sqr().unwrap().sum_all().unwrap()).unwrap();
    let g = loss.backward().unwrap();
    assert_close(&vals(g.get(ta).unwrap()), &[1.0, 1.0]);
    assert_close(&vals(g.get(tb).unwrap()), &[-1.0 + 6.0, -1.0 - 8.0]);

    // loss = Σ a / b + tanh(b) + 1/b: ∂b = −a/b² + (1 − tanh²b) − 1/b².
    let loss = ((ta / tb).unwrap() + tb.tanh().unwrap() + tb.recip().unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    let want: Vec<f64> = [(1.0f64, 3.0f64), (2.0, -4.0)]
        .iter()
        .map(|(a, b)| -a / (b * b) + (1.0 - b.tanh().powi(2)) - 1.0 / (b * b))
        .collect();
    assert_close(&vals(g.get(tb).unwrap()), &want);
}

#[test]
fn a_node_on_both_sides_of_one_op() {
    let x = var(&[1.5, -2.0]);
    let t = x.as_tensor();
    let g = (t + t).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close(&vals(g.get(t).unwrap()), &[2.0, 2.0]);
    let g = (t - t).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close(&vals(g.get(t).unwrap()), &[0.0, 0.0]);
    let g = (t * t).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close(&vals(g.get(t).unwrap()), &[3.0, -4.0]);
}

#[test]
fn a_shared_gradient_summed_into_one_node_leaves_the_other_alone() {
    // z = p + q hands the same gradient tensor to p and q; p then receives a second
    // gradient (from 5p). q's gradient must stay 1 and p's become 1 + 5 = 6.
    let (p, q) = (var(&[1.0, 2.0, 3.0]), var(&[4.0, 5.0, 6.0]));
    let (tp, tq) = (p.as_tensor(), q.as_tensor());
    let loss =
        ((tp + tq).unwrap().sum_all().unwrap() + (tp * 5.0).unwrap().sum_all().unwrap()).unwrap();
    let g = loss.backward().unwrap();
    assert_close(&vals(g.get(tq).unwrap()), &[1.0; 3]);
    assert_close(&vals(g.get(tp).unwrap()), &[6.0; 3]);
    // The same through intermediate nodes: ∂x = 2·6 + 7·1.
    let x = var(&[1.0, 2.0, 3.0]);
    let t = x.as_tensor();
    let (p, q) = ((t * 2.0).unwrap(), (t * 7.0).unwrap());
    let loss =
        ((&p + &q).unwrap().sum_all().unwrap() + (&p * 5.0).unwrap().sum_all().unwrap()).unwrap();
    let g = loss.backward().unwrap();
    assert_close(&vals(g.get(t).unwrap()), &[19.0; 3]);
}

#[test]
fn a_parameter_used_twice_gets_the_sum_and_broadcasts_reduce() {
    // y = w·x + w·x² with w [1, 3] broadcast over a batch of 2: ∂w = Σ_batch (x + x²).
    let w = var(&[0.5, -1.0, 2.0]);
    let tw = w.as_tensor().reshape((1, 3)).unwrap();
    let x = Tensor::new(&[[1.0f64, 2.0, 3.0], [-1.0, 0.5, 4.0]], &Device::Cpu).unwrap();
    let y = (x.broadcast_mul(&tw).unwrap() + x.sqr().unwrap().broadcast_mul(&tw).unwrap()).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let want = [
        1.0 + 1.0 - 1.0 + 1.0,
        2.0 + 4.0 + 0.5 + 0.25,
        3.0 + 9.0 + 4.0 + 16.0,
    ];
    assert_close(&vals(g.get(w.as_tensor()).unwrap()), &want);
    assert_eq!(g.get(w.as_tensor()).unwrap().dtype(), DType::F64);
}

#[test]
fn narrowed_and_concatenated_paths_reassemble() {
    // cat([x[0..2], x[1..3]]) then weights 1..4: ∂x = [1, 2 + 3, 4].
    let x = var(&[1.0, 2.0, 3.0]);
    let t = x.as_tensor();
    let c = Tensor::cat(&[t.narrow(0, 0, 2).unwrap(), t.narrow(0, 1, 2).unwrap()], 0).unwrap();
    let wts = Tensor::new(&[1.0f64, 2.0, 3.0, 4.0], &Device::Cpu).unwrap();
    let g = (c * wts).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close(&vals(g.get(t).unwrap()), &[1.0, 5.0, 4.0]);
}
