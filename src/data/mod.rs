//! Datasets: embedded MNIST, IDX directories, Fashion-MNIST, and batching.

pub mod dataset;
pub mod idx;
pub mod loader;
pub mod mnist;

pub use dataset::Dataset;
pub use loader::Loader;
