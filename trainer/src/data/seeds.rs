//! Seeded random streams: one seed, independent numbers for each use.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// ChaCha stream ids, so that the different uses of one seed draw independent numbers.
/// (Augmentation uses the sample index as its stream, see `augment::image_rng`; these sit
/// at the top of the range, away from any realistic index.)
pub(super) const STREAM_SPLIT: u64 = u64::MAX;
pub(super) const STREAM_SUBSAMPLE_EFFUSION: u64 = u64::MAX - 1;
pub(super) const STREAM_SUBSAMPLE_NOFINDING: u64 = u64::MAX - 2;
pub(super) const STREAM_EPOCH_ORDER: u64 = u64::MAX - 3;
pub(super) const STREAM_FOLDS: u64 = u64::MAX - 4;

/// The ChaCha stream `stream` of `seed`.
pub(super) fn seeded(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Fisher–Yates, written out so the order depends only on the ChaCha stream.
pub(super) fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        let j = rng.random_range(0..=i);
        items.swap(i, j);
    }
}
