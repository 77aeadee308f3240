//! An ordered chain of named flows.

use candle_core::Tensor;

use super::{Flow, FlowCtx};
use crate::{Error, Result};

/// Layers applied in order on `forward`, in reverse order on `inverse`;
/// log-determinants add up.
#[derive(Default)]
pub struct Sequential {
    layers: Vec<(String, Box<dyn Flow>)>,
}

impl Sequential {
    /// An empty chain (the identity).
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a named layer.
    pub fn push(&mut self, name: impl Into<String>, layer: Box<dyn Flow>) {
        self.layers.push((name.into(), layer));
    }

    /// Appends a named layer (builder style).
    pub fn with(mut self, name: impl Into<String>, layer: impl Flow + 'static) -> Self {
        self.push(name, Box::new(layer));
        self
    }

    /// The layers with their names.
    pub fn layers(&self) -> &[(String, Box<dyn Flow>)] {
        &self.layers
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether the chain is empty.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

impl Flow for Sequential {
    fn kind(&self) -> &'static str {
        "sequential"
    }

    fn out_shape(&self, in_shape: &[usize]) -> Result<Vec<usize>> {
        let mut s = in_shape.to_vec();
        for (name, l) in &self.layers {
            s = l.out_shape(&s).map_err(|e| match e {
                Error::Shape { msg, .. } => Error::shape(name.clone(), msg),
                other => other,
            })?;
        }
        Ok(s)
    }

    fn forward_ctx(&self, x: &Tensor, ldj: &Tensor, ctx: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        let (mut z, mut ldj) = (x.clone(), ldj.clone());
        for (_, l) in &self.layers {
            (z, ldj) = l.forward_ctx(&z, &ldj, ctx)?;
        }
        Ok((z, ldj))
    }

    fn inverse_ctx(&self, z: &Tensor, ldj: &Tensor, ctx: &mut FlowCtx) -> Result<(Tensor, Tensor)> {
        let (mut x, mut ldj) = (z.clone(), ldj.clone());
        for (_, l) in self.layers.iter().rev() {
            (x, ldj) = l.inverse_ctx(&x, &ldj, ctx)?;
        }
        Ok((x, ldj))
    }
}
