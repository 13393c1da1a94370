//! Turning one row of next-token logits into one token: greedy, temperature, top-k and top-p
//! (nucleus) sampling with a per-sequence seeded RNG.
//!
//! Each sequence owns its own [`Sampler`] (and so its own RNG stream), so the tokens a sequence
//! draws depend only on its seed and its own logits, never on which other sequences happen to
//! share its batch.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Temperatures at or below this are treated as greedy decoding.
///
/// Dividing logits by a temperature this small overflows the exponent range of f32 anyway, so
/// the distribution would collapse onto the argmax; handling it explicitly avoids `inf/inf`.
pub const GREEDY_TEMPERATURE: f32 = 1e-6;

/// How many top candidates top-p first tries to find its nucleus in (grown 8x until it fits).
const NUCLEUS_HEAD: usize = 256;

/// How to pick the next token from a row of logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0.0` (or anything `<=` [`GREEDY_TEMPERATURE`]) means greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens before sampling; `None` keeps all.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability mass reaches `p`
    /// (applied after `top_k`); `None` or `1.0` keeps all.
    pub top_p: Option<f32>,
}

impl SamplingParams {
    /// Greedy decoding: always the argmax.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
        }
    }

    /// Plain temperature sampling over the full vocabulary.
    pub fn with_temperature(temperature: f32) -> Self {
        Self {
            temperature,
            top_k: None,
            top_p: None,
        }
    }

    /// Whether these parameters reduce to taking the argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= GREEDY_TEMPERATURE || self.top_k == Some(1)
    }

    /// Checks the parameters are meaningful.
    pub fn validate(&self) -> Result<(), SamplerError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(SamplerError::InvalidTemperature(self.temperature));
        }
        if self.top_k == Some(0) {
            return Err(SamplerError::InvalidTopK);
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(SamplerError::InvalidTopP(p));
            }
        }
        Ok(())
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

/// Why a token could not be sampled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplerError {
    /// Temperature must be finite and non-negative.
    #[error("temperature must be a finite number >= 0 (0 means greedy), got {0}")]
    InvalidTemperature(f32),
    /// `top_k = 0` would leave nothing to sample.
    #[error("top_k must be at least 1 (or unset to keep every token)")]
    InvalidTopK,
    /// Nucleus mass must lie in (0, 1].
    #[error("top_p must be in (0, 1] (or unset to keep every token), got {0}")]
    InvalidTopP(f32),
    /// The model produced no logits.
    #[error("cannot sample from an empty logits row")]
    EmptyLogits,
    /// The model produced NaN logits, which usually means a numerical blow-up in the model.
    #[error(
        "logits contain NaN at token {0}: the model's forward pass is numerically broken (a \
         common cause is an attention row whose keys are all masked with -inf, e.g. a \
         left-padding position; fill masked scores with a large finite negative instead)"
    )]
    NanLogits(usize),
    /// Every logit is `-inf`, so no token is allowed.
    #[error("every logit is -inf, so no token can be sampled")]
    NoAllowedToken,
}

/// Index of the largest logit; ties go to the lowest index. `NaN`s are never chosen.
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i as u32)
}

/// Derives an independent seed for sample `index` of a prompt seeded with `seed`
/// (SplitMix64 finaliser), so that the n samples of one prompt draw unrelated streams.
pub fn derive_seed(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed for the prompt named `key` (e.g. a task id) under run seed `base`: stable across runs,
/// platforms and batch orders (FNV-1a of the key, mixed with `base`).
pub fn seed_for_key(base: u64, key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    derive_seed(base, h)
}

/// Samples tokens for one sequence. Holds that sequence's RNG.
///
/// The RNG is rand's `StdRng`: the same seed gives the same tokens for a given `rand` version
/// (rand does not promise `StdRng` streams stay identical across its releases).
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    // Reused across calls so sampling a 50k vocabulary does not allocate per token.
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler with its own RNG seeded from `seed`.
    pub fn new(params: SamplingParams, seed: u64) -> Result<Self, SamplerError> {
        params.validate()?;
        Ok(Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            scratch: Vec::new(),
        })
    }

    /// The parameters this sampler applies.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from one row of logits (`[vocab]`).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, SamplerError> {
        if logits.is_empty() {
            return Err(SamplerError::EmptyLogits);
        }
        if let Some(i) = logits.iter().position(|l| l.is_nan()) {
            return Err(SamplerError::NanLogits(i));
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return Err(SamplerError::NoAllowedToken);
        }
        if self.params.is_greedy() {
            return argmax(logits).ok_or(SamplerError::NoAllowedToken);
        }

        let cands = &mut self.scratch;
        cands.clear();
        cands.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| **l > f32::NEG_INFINITY)
                .map(|(i, &l)| (i as u32, l)),
        );
        // Descending logit, ties to the lower token id, so truncation is deterministic.
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if let Some(k) = self.params.top_k.filter(|&k| k < cands.len()) {
            cands.select_nth_unstable_by(k - 1, by_logit_desc);
            cands.truncate(k);
        }

        // Weights in f64, relative to the max logit, so no exponent overflows.
        let inv_t = 1.0 / f64::from(self.params.temperature);
        let max = f64::from(max);
        let weight = |l: f32| ((f64::from(l) - max) * inv_t).exp();
        let mut total: f64 = cands.iter().map(|c| weight(c.1)).sum();

        if let Some(p) = self.params.top_p.filter(|p| *p < 1.0) {
            let target = f64::from(p) * total;
            // The nucleus is a prefix of the descending order. A few hundred tokens usually
            // carry the mass, so order only a head of the candidates that provably contains it
            // instead of sorting the whole vocabulary every step.
            let mut head = NUCLEUS_HEAD.min(cands.len());
            loop {
                if head < cands.len() {
                    cands.select_nth_unstable_by(head - 1, by_logit_desc);
                }
                let head_mass: f64 = cands[..head].iter().map(|c| weight(c.1)).sum();
                if head_mass >= target || head == cands.len() {
                    break;
                }
                head = (head * 8).min(cands.len());
            }
            cands.truncate(head);
            cands.sort_unstable_by(by_logit_desc);
            let mut acc = 0.0;
            let mut keep = cands.len();
            for (i, c) in cands.iter().enumerate() {
                acc += weight(c.1);
                if acc >= target {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep);
            total = acc;
        }

        // total > 0: the max logit's own weight is exp(0) = 1 and it always survives truncation.
        let mut u = self.rng.random::<f64>() * total;
        for &(id, l) in cands.iter() {
            let w = weight(l);
            if u < w {
                return Ok(id);
            }
            u -= w;
        }
        // Rounding can leave `u` a hair above the last weight; the last kept token is then the
        // right answer.
        Ok(cands[cands.len() - 1].0)
    }
}
