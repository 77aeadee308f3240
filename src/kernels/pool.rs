//! Candle's CPU worker pool, tuned for flowlab's mix of ops.
//!
//! candle 0.11 runs its own elementwise ops and reductions on a persistent pool of
//! workers (`candle-bp-N`) that, after each op, spin `CANDLE_BARRIER_POOL_SPIN_LIMIT` times
//! (default 25,000 `pause` instructions, about a millisecond on a recent Xeon) before
//! parking. flowlab's kernels run on rayon's threads between candle's ops, so a spinning
//! candle worker takes a core away from them. Measured on 2 cores (tutorial simple flow,
//! batch 64, three interleaved pairs): 1,555–1,774 ms per training step with a limit of 1
//! against 1,674–2,172 ms with candle's default.

/// The environment variable candle reads when it creates its pool.
const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// Makes candle's pool workers park as soon as an op is done, unless
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` is already set (then the user's value stays). It sets
/// an environment variable, so call it first thing in `main`, before any other thread
/// starts and before the first tensor op (candle reads the limit once, when it creates
/// its pool).
pub fn tune_candle_pool() {
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "1");
    }
}
