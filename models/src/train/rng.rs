//! A small, seedable random generator whose whole state is one `u64`, so checkpoints can store
//! it exactly and a resumed run draws the same numbers (dropout masks, shuffles) as an
//! uninterrupted one.

use rand::RngCore;

/// SplitMix64: fast, statistically fine for dropout and shuffling, trivially serializable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainRng {
    state: u64,
}

impl TrainRng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The full state (store it to resume).
    pub fn state(&self) -> u64 {
        self.state
    }

    /// Restores a state saved with [`TrainRng::state`].
    pub fn from_state(state: u64) -> Self {
        Self { state }
    }

    /// Next 64 random bits.
    pub fn next_u64_raw(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 24 bits of precision.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64_raw() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform integer in `[0, n)` (`n > 0`), by multiply-shift.
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64_raw() >> 32) * n as u64) >> 32) as usize
    }

    /// A uniformly random permutation of `0..n` (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i + 1);
            p.swap(i, j);
        }
        p
    }

    /// `n` Bernoulli keep-masks for inverted dropout with drop probability `p`: each value is
    /// `0` or `1 / (1 - p)`.
    pub fn dropout_mask(&mut self, n: usize, p: f32) -> Vec<f32> {
        let keep = 1.0 / (1.0 - p);
        (0..n)
            .map(|_| if self.next_f32() < p { 0.0 } else { keep })
            .collect()
    }
}

impl RngCore for TrainRng {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64_raw() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        self.next_u64_raw()
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            let v = self.next_u64_raw().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}
