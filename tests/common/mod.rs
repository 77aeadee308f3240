//! Model constructors shared by the integration tests (the UvA tutorial-11 models, built by code).
#![allow(dead_code)]

use candle_core::{DType, Device};
use flowlab::flow::coupling::{Coupling, CouplingConfig, Partition};
use flowlab::flow::dequant::Dequantization;
use flowlab::flow::split::{Split, SplitPrior};
use flowlab::flow::squeeze::Squeeze;
use flowlab::flow::{FlowModel, Sequential};
use flowlab::nets::NetConfig;
use flowlab::params::{ParamStore, Params};
use flowlab::Result;

pub fn gated(hidden: usize) -> NetConfig {
    NetConfig::gated(hidden, 3)
}

pub fn coupling(
    p: &Params,
    partition: Partition,
    invert: bool,
    net: NetConfig,
    c: usize,
    cond: usize,
) -> Result<Coupling> {
    let mut cfg = CouplingConfig::new(partition, invert);
    cfg.net = net;
    cfg.cond_channels = cond;
    Coupling::new(p, cfg, c)
}

fn vardeq(p: &Params) -> Result<Dequantization> {
    let mut s = Sequential::new();
    for i in 0..4 {
        let name = format!("vardeq{i}");
        s.push(
            name.clone(),
            Box::new(coupling(
                &p.pp(&name),
                Partition::Checkerboard,
                i % 2 == 1,
                gated(16),
                1,
                1,
            )?),
        );
    }
    Ok(Dequantization::variational(
        1e-5,
        Dequantization::noise_flow(1e-5, s),
    ))
}

/// The tutorial's "simple" flow: uniform dequantization + 8 checkerboard couplings.
pub fn tutorial_simple(store: &ParamStore, variational: bool) -> Result<FlowModel> {
    let p = store.root();
    let deq = if variational {
        vardeq(&p.pp("dequant"))?
    } else {
        Dequantization::uniform(1e-5)
    };
    let mut s = Sequential::new();
    for i in 0..8 {
        let name = format!("coupling{i}");
        s.push(
            name.clone(),
            Box::new(coupling(
                &p.pp(&name),
                Partition::Checkerboard,
                i % 2 == 1,
                gated(32),
                1,
                0,
            )?),
        );
    }
    FlowModel::new(store.clone(), deq, s, &[1, 28, 28])
}

/// The tutorial's multi-scale flow.
pub fn tutorial_multiscale(store: &ParamStore) -> Result<FlowModel> {
    let p = store.root();
    let deq = vardeq(&p.pp("dequant"))?;
    let mut s = Sequential::new();
    for i in 0..2 {
        let n = format!("s0_coupling{i}");
        s.push(
            n.clone(),
            Box::new(coupling(
                &p.pp(&n),
                Partition::Checkerboard,
                i % 2 == 1,
                gated(32),
                1,
                0,
            )?),
        );
    }
    s.push("squeeze0", Box::new(Squeeze));
    for i in 0..2 {
        let n = format!("s1_coupling{i}");
        s.push(
            n.clone(),
            Box::new(coupling(
                &p.pp(&n),
                Partition::Channel,
                i % 2 == 1,
                gated(48),
                4,
                0,
            )?),
        );
    }
    s.push(
        "split1",
        Box::new(Split::new(&p.pp("split1"), 4, SplitPrior::Standard)?),
    );
    s.push("squeeze1", Box::new(Squeeze));
    for i in 0..4 {
        let n = format!("s2_coupling{i}");
        s.push(
            n.clone(),
            Box::new(coupling(
                &p.pp(&n),
                Partition::Channel,
                i % 2 == 1,
                gated(64),
                8,
                0,
            )?),
        );
    }
    FlowModel::new(store.clone(), deq, s, &[1, 28, 28])
}

pub fn f32_store(seed: u64) -> ParamStore {
    ParamStore::new(seed, DType::F32, &Device::Cpu)
}
