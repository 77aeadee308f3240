//! The one builder: a [`ModelPlan`] becomes a [`FlowModel`], one exhaustive match per layer.

use candle_core::{DType, Device};

use crate::flow::actnorm::ActNorm;
use crate::flow::coupling::Coupling;
use crate::flow::dequant::Dequantization;
use crate::flow::invconv::InvConv1x1;
use crate::flow::permute::Permute;
use crate::flow::split::Split;
use crate::flow::squeeze::Squeeze;
use crate::flow::{Flow, FlowModel, Sequential};
use crate::params::{ParamStore, Params};
use crate::spec::{ModelPlan, PlannedLayer, PlannedOp, TopPrior};
use crate::Result;

/// Builds one layer; `classes` > 0 makes learned split priors class-conditional (the
/// couplings carry their label classes in their config).
fn build_layer(p: &Params, l: &PlannedLayer, classes: usize) -> Result<Box<dyn Flow>> {
    let p = p.pp(&l.name);
    let c = l.in_shape[0];
    Ok(match l.op {
        PlannedOp::Coupling(cfg) => Box::new(Coupling::new(&p, cfg, c)?),
        PlannedOp::ActNorm => Box::new(ActNorm::new(&p, c)?),
        PlannedOp::InvConv(kind) => Box::new(InvConv1x1::new(&p, c, kind)?),
        PlannedOp::Permute(kind) => Box::new(Permute::new(&p, c, kind)?),
        PlannedOp::Squeeze => Box::new(Squeeze),
        PlannedOp::Split(prior) => Box::new(Split::conditional(&p, c, prior, classes)?),
    })
}

fn build_list(p: &Params, layers: &[PlannedLayer], classes: usize) -> Result<Sequential> {
    let mut s = Sequential::new();
    for l in layers {
        s.push(l.name.clone(), build_layer(p, l, classes)?);
    }
    Ok(s)
}

/// Builds the model of `plan` with parameters drawn from `seed`.
pub fn build_model(
    plan: &ModelPlan,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<FlowModel> {
    let store = ParamStore::new(seed, dtype, device);
    let root = store.root();
    let dequant = match &plan.dequant_noise {
        None => Dequantization::uniform(plan.alpha),
        Some(noise) => Dequantization::variational(
            plan.alpha,
            Dequantization::noise_flow(plan.alpha, build_list(&root, noise, 0)?),
        ),
    };
    let flows = build_list(&root, &plan.layers, plan.classes)?;
    FlowModel::new(store, dequant, flows, &plan.data_shape)?
        .with_prior(plan.prior == TopPrior::Learned, plan.classes)
}

/// Trainable parameters whose names start with `prefix.` (a layer's count in `flowlab check`).
pub fn params_under(store: &ParamStore, prefix: &str) -> usize {
    let dotted = format!("{prefix}.");
    store
        .named_vars()
        .iter()
        .filter(|(n, _)| n.starts_with(&dotted))
        .map(|(_, v)| v.elem_count())
        .sum()
}
