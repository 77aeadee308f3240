//! Adam / AdamW with global-norm gradient clipping and a checkpointable state.
//!
//! candle-nn's optimizers keep their moments private, so a resumed run could not restore
//! them; this one stores m, v and the step count under `optim.*` names.
//!
//! Update (t = step, g = gradient, after clipping):
//!   Adam:  g ← g + λθ;                 AdamW: θ ← θ − lr·λ·θ
//!   m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,
//!   θ ← θ − lr · m̂ / (√v̂ + ε),  m̂ = m/(1−β₁ᵗ),  v̂ = v/(1−β₂ᵗ).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::spec::OptimizerKind;
use crate::Result;

/// Adam(W) over named variables.
pub struct Adam {
    vars: Vec<(String, Var)>,
    pub(crate) m: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
    step: usize,
    kind: OptimizerKind,
    weight_decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl Adam {
    /// PyTorch defaults: β = (0.9, 0.999), ε = 1e-8.
    pub fn new(vars: Vec<(String, Var)>, kind: OptimizerKind, weight_decay: f64) -> Result<Self> {
        // m and v are updated in place: each needs storage of its own.
        let zeros = || {
            vars.iter()
                .map(|(_, v)| v.as_tensor().zeros_like())
                .collect::<candle_core::Result<Vec<_>>>()
        };
        let (m, v) = (zeros()?, zeros()?);
        Ok(Self {
            vars,
            m,
            v,
            step: 0,
            kind,
            weight_decay,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        })
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// Global L2 norm of the gradients of all variables (missing gradients count as 0).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut total = 0.0;
        for (_, var) in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                total += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(total.sqrt())
    }

    /// One update with learning rate `lr`; gradients are scaled by `clip_scale` (≤ 1) first.
    pub fn step(&mut self, grads: &GradStore, lr: f64, clip_scale: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let fused = crate::kernels::AdamStep {
            clip: (clip_scale < 1.0).then_some(clip_scale),
            l2: (self.weight_decay > 0.0 && self.kind == OptimizerKind::Adam)
                .then_some(self.weight_decay),
            decoupled: (self.weight_decay > 0.0 && self.kind == OptimizerKind::Adamw)
                .then_some(self.weight_decay),
            beta1: b1,
            beta2: b2,
            bc1,
            bc2,
            eps: self.eps,
            lr,
        };
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let theta = var.as_tensor();
            // On the CPU: three in-place passes with the same arithmetic as the ops below.
            if crate::kernels::adam_step(theta, &self.m[i], &self.v[i], g, fused)? {
                continue;
            }
            let mut g = if clip_scale < 1.0 {
                (g * clip_scale)?
            } else {
                g.clone()
            };
            if self.weight_decay > 0.0 && self.kind == OptimizerKind::Adam {
                g = (g + (theta * self.weight_decay)?)?;
            }
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.eps)?)?;
            let mut new = (theta - (update * lr)?)?;
            if self.weight_decay > 0.0 && self.kind == OptimizerKind::Adamw {
                new = (new - (theta * (lr * self.weight_decay))?)?;
            }
            var.set(&new.detach())?;
            self.m[i] = m.detach();
            self.v[i] = v.detach();
        }
        Ok(())
    }

    /// The state as named tensors (`optim.m.<var>`, `optim.v.<var>`, `optim.step`).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            // Copies: the moments are updated in place by later steps.
            out.insert(format!("optim.m.{name}"), self.m[i].copy()?);
            out.insert(format!("optim.v.{name}"), self.v[i].copy()?);
        }
        out.insert(
            "optim.step".into(),
            Tensor::new(&[self.step as f64], &candle_core::Device::Cpu)?,
        );
        Ok(out)
    }

    /// Restores a state written by [`Adam::state`]; missing entries are an error.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |k: &str| {
            state.get(k).ok_or_else(|| {
                crate::Error::Usage(format!("checkpoint lacks optimizer state '{k}'"))
            })
        };
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let dev = var.device();
            let dt = var.dtype();
            // Copies with storage of their own: the moments are updated in place.
            self.m[i] = get(&format!("optim.m.{name}"))?
                .to_dtype(dt)?
                .to_device(dev)?
                .copy()?;
            self.v[i] = get(&format!("optim.v.{name}"))?
                .to_dtype(dt)?
                .to_device(dev)?
                .copy()?;
        }
        self.step = get("optim.step")?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?[0] as usize;
        Ok(())
    }
}

/// Clip factor for global-norm clipping (PyTorch's `clip_grad_norm_`): min(1, max/(norm + 1e-6)).
pub fn clip_scale(norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(m) => (m / (norm + 1e-6)).min(1.0),
        None => 1.0,
    }
}

/// Learning rate at `step` in `epoch`: linear warm-up over `warmup` steps, ×`decay` per epoch.
pub fn learning_rate(base: f64, step: usize, epoch: usize, warmup: usize, decay: f64) -> f64 {
    let w = if warmup > 0 {
        ((step + 1) as f64 / warmup as f64).min(1.0)
    } else {
        1.0
    };
    base * w * decay.powi(epoch as i32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adam_minimises_a_quadratic_and_matches_a_hand_step() {
        let x = Var::new(&[3.0f64, -2.0], &Device::Cpu).unwrap();
        let mut opt = Adam::new(vec![("x".into(), x.clone())], OptimizerKind::Adam, 0.0).unwrap();
        // First step: m̂ = g, v̂ = g² ⇒ update = lr·sign(g) (up to ε).
        let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        opt.step(&g, 0.1, 1.0).unwrap();
        let v = x.as_tensor().to_vec1::<f64>().unwrap();
        assert!(
            (v[0] - 2.9).abs() < 1e-6 && (v[1] + 1.9).abs() < 1e-6,
            "{v:?}"
        );
        for _ in 0..500 {
            let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            opt.step(&g, 0.05, 1.0).unwrap();
        }
        let v = x.as_tensor().to_vec1::<f64>().unwrap();
        assert!(v.iter().all(|a| a.abs() < 1e-2), "{v:?}");
    }

    #[test]
    fn clipping_norm_schedule_and_state_round_trip() {
        let x = Var::new(&[3.0f64, 4.0], &Device::Cpu).unwrap();
        let mut opt = Adam::new(vec![("x".into(), x.clone())], OptimizerKind::Adamw, 0.1).unwrap();
        let g = (x.as_tensor() * 1.0)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!((opt.grad_norm(&g).unwrap() - 2f64.sqrt()).abs() < 1e-12);
        assert!((clip_scale(10.0, Some(1.0)) - 0.1).abs() < 1e-6);
        assert_eq!(clip_scale(0.5, Some(1.0)), 1.0);
        assert_eq!(clip_scale(5.0, None), 1.0);
        opt.step(&g, 0.01, 1.0).unwrap();
        let st = opt.state().unwrap();
        let mut other =
            Adam::new(vec![("x".into(), x.clone())], OptimizerKind::Adamw, 0.1).unwrap();
        other.load_state(&st).unwrap();
        assert_eq!(other.steps(), 1);
        assert_eq!(
            other.m[0].to_vec1::<f64>().unwrap(),
            opt.m[0].to_vec1::<f64>().unwrap()
        );
        assert!((learning_rate(1.0, 0, 0, 10, 0.9) - 0.1).abs() < 1e-12);
        assert!((learning_rate(1.0, 50, 2, 10, 0.9) - 0.81).abs() < 1e-12);
    }
}
