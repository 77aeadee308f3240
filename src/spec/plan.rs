//! Static checking: expands a model spec into a flat, named, shape-annotated layer plan
//! before any weight exists. Every problem carries the key path it comes from.

use serde::Serialize;

use super::types::{CouplingDefaults, DequantSpec, LayerSpec, ModelSpec, TopPrior};
use crate::flow::coupling::{CouplingConfig, CouplingKind, Partition, DEFAULT_BINS, DEFAULT_BOUND};
use crate::flow::invconv::InvConvKind;
use crate::flow::permute::PermuteKind;
use crate::flow::split::SplitPrior;

/// What a planned layer is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum PlannedOp {
    Coupling(CouplingConfig),
    ActNorm,
    InvConv(InvConvKind),
    Permute(PermuteKind),
    Squeeze,
    Split(SplitPrior),
}

impl PlannedOp {
    pub fn kind(&self) -> &'static str {
        match self {
            PlannedOp::Coupling(_) => "coupling",
            PlannedOp::ActNorm => "actnorm",
            PlannedOp::InvConv(_) => "invconv",
            PlannedOp::Permute(_) => "permute",
            PlannedOp::Squeeze => "squeeze",
            PlannedOp::Split(_) => "split",
        }
    }
}

/// One layer of the expanded graph.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedLayer {
    /// Unique dotted name (the parameter prefix).
    pub name: String,
    /// Key path in the spec the layer comes from (`model.layers[2].step[1]`).
    pub path: String,
    pub op: PlannedOp,
    pub in_shape: [usize; 3],
    pub out_shape: [usize; 3],
}

/// The expanded model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelPlan {
    pub data_shape: [usize; 3],
    pub alpha: f64,
    /// The couplings of variational dequantization (conditioned on the image), if any.
    pub dequant_noise: Option<Vec<PlannedLayer>>,
    pub layers: Vec<PlannedLayer>,
    pub latent_shape: [usize; 3],
    /// Classes of a class-conditional model (0: unconditional).
    pub classes: usize,
    pub prior: TopPrior,
}

/// A problem found while planning: (key path, message).
pub type PlanIssue = (String, String);

struct Planner<'a> {
    defaults: &'a CouplingDefaults,
    issues: Vec<PlanIssue>,
    /// Conditioning channels given to every coupling (variational dequantization).
    cond: usize,
    /// Classes of the label planes given to every coupling (class-conditional models).
    classes: usize,
}

fn layer_name(l: &LayerSpec) -> Option<&str> {
    match l {
        LayerSpec::Coupling { name, .. }
        | LayerSpec::Actnorm { name }
        | LayerSpec::Invconv { name, .. }
        | LayerSpec::Permute { name, .. }
        | LayerSpec::Squeeze { name }
        | LayerSpec::Split { name, .. }
        | LayerSpec::Repeat { name, .. }
        | LayerSpec::Levels { name, .. } => name.as_deref(),
    }
}

fn type_name(l: &LayerSpec) -> &'static str {
    match l {
        LayerSpec::Coupling { .. } => "coupling",
        LayerSpec::Actnorm { .. } => "actnorm",
        LayerSpec::Invconv { .. } => "invconv",
        LayerSpec::Permute { .. } => "permute",
        LayerSpec::Squeeze { .. } => "squeeze",
        LayerSpec::Split { .. } => "split",
        LayerSpec::Repeat { .. } => "repeat",
        LayerSpec::Levels { .. } => "levels",
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

impl Planner<'_> {
    /// Plans `layers` from `shape`; returns the output shape, or `None` after an error
    /// that makes later shapes meaningless.
    fn plan_list(
        &mut self,
        layers: &[LayerSpec],
        path: &str,
        prefix: &str,
        flip: bool,
        mut shape: [usize; 3],
        out: &mut Vec<PlannedLayer>,
    ) -> Option<[usize; 3]> {
        for (i, l) in layers.iter().enumerate() {
            let lp = format!("{path}[{i}]");
            let name = join(
                prefix,
                &layer_name(l)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{}{i}", type_name(l))),
            );
            shape = self.plan_one(l, &lp, &name, flip, shape, out)?;
        }
        Some(shape)
    }

    fn issue(&mut self, path: &str, msg: impl Into<String>) {
        self.issues.push((path.to_string(), msg.into()));
    }

    fn plan_one(
        &mut self,
        l: &LayerSpec,
        path: &str,
        name: &str,
        flip: bool,
        shape: [usize; 3],
        out: &mut Vec<PlannedLayer>,
    ) -> Option<[usize; 3]> {
        let [c, h, w] = shape;
        let push = |op: PlannedOp, out_shape: [usize; 3], out: &mut Vec<PlannedLayer>| {
            out.push(PlannedLayer {
                name: name.to_string(),
                path: path.to_string(),
                op,
                in_shape: shape,
                out_shape,
            });
            Some(out_shape)
        };
        match l {
            LayerSpec::Coupling {
                mask,
                invert,
                kind,
                scale,
                net,
                bins,
                bound,
                ..
            } => {
                let net = net.or(self.defaults.net).unwrap_or_default();
                let kind = kind.or(self.defaults.kind).unwrap_or_default();
                let bins_set = bins.or(self.defaults.bins);
                let bound_set = bound.or(self.defaults.bound);
                if kind == CouplingKind::Spline {
                    if bins_set.is_some_and(|k| k < 2) {
                        self.issue(&format!("{path}.bins"), "a spline needs at least 2 bins");
                    }
                    if bound_set.is_some_and(|b| !(b.is_finite() && b > 0.0)) {
                        self.issue(&format!("{path}.bound"), "must be a positive number");
                    }
                } else if bins.is_some() || bound.is_some() {
                    let key = if bins.is_some() { "bins" } else { "bound" };
                    self.issue(
                        &format!("{path}.{key}"),
                        format!("`{key}` only applies to `kind: spline` couplings"),
                    );
                }
                if net.hidden == 0 {
                    self.issue(&format!("{path}.net.hidden"), "must be at least 1");
                }
                if matches!(mask, Partition::Channel | Partition::Split) && c < 2 {
                    self.issue(
                        &format!("{path}.mask"),
                        format!(
                            "a {} mask needs at least 2 channels, the input here is {c}×{h}×{w}",
                            serde_yaml::to_string(mask).unwrap_or_default().trim()
                        ),
                    );
                    return None;
                }
                let cfg = CouplingConfig {
                    partition: *mask,
                    invert: *invert != flip,
                    kind,
                    scale: scale.or(self.defaults.scale).unwrap_or_default(),
                    net,
                    cond_channels: self.cond,
                    bins: bins_set.unwrap_or(DEFAULT_BINS),
                    bound: bound_set.unwrap_or(DEFAULT_BOUND),
                    label_classes: self.classes,
                };
                push(PlannedOp::Coupling(cfg), shape, out)
            }
            LayerSpec::Actnorm { .. } => push(PlannedOp::ActNorm, shape, out),
            LayerSpec::Invconv { param, .. } => push(PlannedOp::InvConv(*param), shape, out),
            LayerSpec::Permute { order, .. } => push(PlannedOp::Permute(*order), shape, out),
            LayerSpec::Squeeze { .. } => {
                if h % 2 != 0 || w % 2 != 0 {
                    self.issue(
                        path,
                        format!(
                            "squeeze needs even height and width, the input here is {c}×{h}×{w}"
                        ),
                    );
                    return None;
                }
                push(PlannedOp::Squeeze, [4 * c, h / 2, w / 2], out)
            }
            LayerSpec::Split { prior, .. } => {
                if self.cond > 0 {
                    self.issue(
                        path,
                        "split cannot be used inside variational dequantization",
                    );
                    return None;
                }
                if c < 2 || c % 2 != 0 {
                    self.issue(path, format!("split needs an even number of channels ≥ 2, the input here is {c}×{h}×{w}"));
                    return None;
                }
                push(PlannedOp::Split(*prior), [c / 2, h, w], out)
            }
            LayerSpec::Repeat {
                times,
                alternate,
                layers,
                ..
            } => {
                if *times == 0 {
                    self.issue(&format!("{path}.times"), "must be at least 1");
                }
                if layers.is_empty() {
                    self.issue(
                        &format!("{path}.layers"),
                        "is empty: a repeat block needs at least one layer",
                    );
                }
                let mut s = shape;
                for t in 0..*times {
                    let f = flip != (*alternate && t % 2 == 1);
                    s = self.plan_list(
                        layers,
                        &format!("{path}.layers"),
                        &join(name, &t.to_string()),
                        f,
                        s,
                        out,
                    )?;
                }
                Some(s)
            }
            LayerSpec::Levels {
                levels,
                depth,
                alternate,
                step,
                split,
                ..
            } => {
                if *levels == 0 {
                    self.issue(&format!("{path}.levels"), "must be at least 1");
                }
                if *depth == 0 {
                    self.issue(&format!("{path}.depth"), "must be at least 1");
                }
                if step.is_empty() {
                    self.issue(
                        &format!("{path}.step"),
                        "is empty: a level needs at least one layer per step",
                    );
                }
                let mut s = shape;
                for lv in 0..*levels {
                    let lname = join(name, &format!("level{lv}"));
                    s = self.plan_one(
                        &LayerSpec::Squeeze { name: None },
                        path,
                        &join(&lname, "squeeze"),
                        flip,
                        s,
                        out,
                    )?;
                    for k in 0..*depth {
                        let f = flip != (*alternate && k % 2 == 1);
                        s = self.plan_list(
                            step,
                            &format!("{path}.step"),
                            &join(&lname, &format!("step{k}")),
                            f,
                            s,
                            out,
                        )?;
                    }
                    if lv + 1 < *levels {
                        s = self.plan_one(
                            &LayerSpec::Split {
                                name: None,
                                prior: *split,
                            },
                            path,
                            &join(&lname, "split"),
                            flip,
                            s,
                            out,
                        )?;
                    }
                }
                Some(s)
            }
        }
    }
}

/// Expands and shape-checks a model for data of shape `data_shape`. `path` is the key
/// path of the model in the spec (for messages).
pub fn plan(
    model: &ModelSpec,
    data_shape: [usize; 3],
    path: &str,
) -> Result<ModelPlan, Vec<PlanIssue>> {
    let mut p = Planner {
        defaults: &model.coupling,
        issues: Vec::new(),
        cond: 0,
        classes: model.classes.unwrap_or(0),
    };
    if model.classes.is_some_and(|k| k < 2) {
        p.issue(
            &format!("{path}.classes"),
            "a class-conditional model needs at least 2 classes",
        );
    }
    if model.layers.is_empty() {
        p.issue(
            &format!("{path}.layers"),
            "is empty: a model needs at least one layer",
        );
    }
    let mut layers = Vec::new();
    let latent = p.plan_list(
        &model.layers,
        &format!("{path}.layers"),
        "",
        false,
        data_shape,
        &mut layers,
    );
    let (alpha, dequant_noise) = match &model.dequant {
        DequantSpec::Uniform { alpha } => (*alpha, None),
        DequantSpec::Variational { alpha, layers: dl } => {
            p.cond = data_shape[0];
            p.classes = 0;
            if dl.is_empty() {
                p.issue(
                    &format!("{path}.dequant.layers"),
                    "is empty: variational dequantization needs at least one coupling",
                );
            }
            let mut noise = Vec::new();
            p.plan_list(
                dl,
                &format!("{path}.dequant.layers"),
                "dequant",
                false,
                data_shape,
                &mut noise,
            );
            for l in &noise {
                if !matches!(
                    l.op,
                    PlannedOp::Coupling(_)
                        | PlannedOp::ActNorm
                        | PlannedOp::InvConv(_)
                        | PlannedOp::Permute(_)
                ) || l.in_shape != l.out_shape
                {
                    p.issue(&l.path, format!("only shape-preserving layers can be used in variational dequantization, not {}", l.op.kind()));
                }
            }
            (*alpha, Some(noise))
        }
    };
    if !(alpha > 0.0 && alpha < 1.0) {
        p.issue(
            &format!("{path}.dequant.alpha"),
            format!("must be in (0, 1), got {alpha}"),
        );
    }
    match (latent, p.issues.is_empty()) {
        (Some(latent_shape), true) => Ok(ModelPlan {
            data_shape,
            alpha,
            dequant_noise,
            layers,
            latent_shape,
            classes: model.classes.unwrap_or(0),
            prior: model.prior,
        }),
        _ => Err(p.issues),
    }
}
