//! Sampler and stop-sequence tests.

use std::collections::HashSet;

use pipeline_models::generate::{
    argmax, derive_seed, find_stop, seed_for_key, Sampler, SamplerError, SamplingParams,
    HUMANEVAL_STOP_SEQUENCES,
};

/// Deterministic pseudo-random logits in [-4, 4).
fn logits(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_add(0x1234_5678);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        })
        .collect()
}

fn draw(params: SamplingParams, seed: u64, row: &[f32], n: usize) -> Vec<u32> {
    let mut s = Sampler::new(params, seed).unwrap();
    (0..n).map(|_| s.sample(row).unwrap()).collect()
}

/// Indices of the `k` largest logits.
fn top_k_set(row: &[f32], k: usize) -> HashSet<u32> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
    idx.into_iter().take(k).collect()
}

#[test]
fn generate_greedy_picks_argmax() {
    for seed in 0..50 {
        let row = logits(1000, seed);
        let best = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap() as u32;
        assert_eq!(argmax(&row), Some(best));
        let mut s = Sampler::new(SamplingParams::greedy(), seed).unwrap();
        assert_eq!(s.sample(&row).unwrap(), best);
    }
    // Ties go to the lowest index.
    assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), Some(1));
    assert_eq!(argmax(&[]), None);
}

#[test]
fn generate_temperature_to_zero_equals_greedy() {
    for seed in 0..20 {
        let mut row = logits(500, seed);
        let best = argmax(&row).unwrap();
        // A clear margin, so that at t = 1e-3 the runner-up's weight is exp(-100).
        row[best as usize] += 0.1;
        for t in [0.0, 1e-7, 1e-4, 1e-3] {
            let got = draw(SamplingParams::with_temperature(t), seed, &row, 20);
            assert!(
                got.iter().all(|&x| x == best),
                "t={t}: {got:?} vs argmax {best}"
            );
        }
    }
}

#[test]
fn generate_top_k_stays_in_top_k() {
    let row = logits(300, 7);
    for k in [1, 2, 5, 20] {
        let allowed = top_k_set(&row, k);
        let params = SamplingParams {
            temperature: 2.0,
            top_k: Some(k),
            top_p: None,
        };
        let got = draw(params, 11, &row, 2000);
        assert!(
            got.iter().all(|t| allowed.contains(t)),
            "k={k} sampled outside the top-k"
        );
        let distinct: HashSet<u32> = got.into_iter().collect();
        // At temperature 2 over logits in [-4, 4) every allowed token should show up.
        assert_eq!(distinct.len(), k, "k={k}: only {distinct:?} sampled");
    }
}

#[test]
fn generate_top_p_stays_in_nucleus() {
    // Probabilities 0.5, 0.3, 0.15, 0.05.
    let probs = [0.5f32, 0.3, 0.15, 0.05];
    let row: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    for (p, expect) in [
        (0.4, vec![0u32]),
        (0.7, vec![0, 1]),
        (0.9, vec![0, 1, 2]),
        (1.0, vec![0, 1, 2, 3]),
    ] {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: Some(p),
        };
        let got: HashSet<u32> = draw(params, 3, &row, 3000).into_iter().collect();
        let expect: HashSet<u32> = expect.into_iter().collect();
        assert_eq!(got, expect, "top_p={p}");
    }
    // top-k applies first, then top-p within it.
    let params = SamplingParams {
        temperature: 1.0,
        top_k: Some(3),
        top_p: Some(0.99),
    };
    let got: HashSet<u32> = draw(params, 3, &row, 3000).into_iter().collect();
    assert_eq!(got, HashSet::from([0, 1, 2]));
}

#[test]
fn generate_temperature_one_matches_softmax() {
    let row = [0.0f32, 1.0, 2.0, -1.0, f32::NEG_INFINITY];
    let z: f64 = row.iter().map(|&l| f64::from(l).exp()).sum();
    let n = 40_000;
    let got = draw(SamplingParams::with_temperature(1.0), 99, &row, n);
    let mut counts = [0usize; 5];
    for t in got {
        counts[t as usize] += 1;
    }
    assert_eq!(counts[4], 0, "a -inf logit must never be sampled");
    for i in 0..4 {
        let p = f64::from(row[i]).exp() / z;
        let freq = counts[i] as f64 / n as f64;
        // 5 standard deviations of a binomial proportion.
        let tol = 5.0 * (p * (1.0 - p) / n as f64).sqrt();
        assert!((freq - p).abs() < tol, "token {i}: freq {freq} vs p {p}");
    }
}

#[test]
fn generate_same_seed_same_tokens_different_seed_differs() {
    let row = vec![0.0f32; 1000];
    let params = SamplingParams {
        temperature: 0.8,
        top_k: Some(500),
        top_p: Some(0.95),
    };
    let a = draw(params, 42, &row, 64);
    let b = draw(params, 42, &row, 64);
    let c = draw(params, 43, &row, 64);
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(derive_seed(42, 0), derive_seed(42, 1));
    assert_ne!(derive_seed(42, 0), derive_seed(43, 0));
    assert_eq!(
        seed_for_key(1, "HumanEval/0"),
        seed_for_key(1, "HumanEval/0")
    );
    assert_ne!(
        seed_for_key(1, "HumanEval/0"),
        seed_for_key(1, "HumanEval/1")
    );
    assert_ne!(
        seed_for_key(1, "HumanEval/0"),
        seed_for_key(2, "HumanEval/0")
    );
}

#[test]
fn generate_sampler_rejects_bad_input() {
    let bad = |p: SamplingParams| Sampler::new(p, 0).unwrap_err();
    assert!(matches!(
        bad(SamplingParams::with_temperature(-1.0)),
        SamplerError::InvalidTemperature(_)
    ));
    assert!(matches!(
        bad(SamplingParams::with_temperature(f32::NAN)),
        SamplerError::InvalidTemperature(_)
    ));
    assert!(matches!(
        bad(SamplingParams {
            temperature: 1.0,
            top_k: Some(0),
            top_p: None
        }),
        SamplerError::InvalidTopK
    ));
    assert!(matches!(
        bad(SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.0)
        }),
        SamplerError::InvalidTopP(_)
    ));
    let mut s = Sampler::new(SamplingParams::with_temperature(1.0), 0).unwrap();
    assert_eq!(s.sample(&[]), Err(SamplerError::EmptyLogits));
    assert_eq!(s.sample(&[0.0, f32::NAN]), Err(SamplerError::NanLogits(1)));
    assert_eq!(
        s.sample(&[f32::NEG_INFINITY; 3]),
        Err(SamplerError::NoAllowedToken)
    );
}

#[test]
fn generate_find_stop_takes_earliest() {
    let stops: Vec<String> = HUMANEVAL_STOP_SEQUENCES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let text = "    return x\n\nprint(f(1))\ndef g():";
    assert_eq!(find_stop(text, &stops), Some(text.find("\nprint").unwrap()));
    assert_eq!(find_stop("    return x\n", &stops), None);
    // Indented `if` inside the body is not a stop; a top-level one is.
    assert_eq!(find_stop("    if x:\n        y\nif z", &stops), Some(19));
}

/// Top-p over a large, flat distribution: the nucleus is bigger than the head the sampler
/// orders first, so the search must grow; compare with a brute-force nucleus.
#[test]
fn generate_top_p_large_nucleus_matches_brute_force() {
    let row = logits(3000, 5);
    let (t, p) = (4.0f32, 0.9f32);
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    let max = row[order[0]];
    let w: Vec<f64> = row
        .iter()
        .map(|&l| (f64::from(l - max) / f64::from(t)).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let mut acc = 0.0;
    let mut nucleus = HashSet::new();
    for &i in &order {
        acc += w[i];
        nucleus.insert(i as u32);
        if acc >= f64::from(p) * total {
            break;
        }
    }
    assert!(
        nucleus.len() > 1000,
        "test needs a big nucleus, got {}",
        nucleus.len()
    );
    let params = SamplingParams {
        temperature: t,
        top_k: None,
        top_p: Some(p),
    };
    let got = draw(params, 8, &row, 5000);
    assert!(
        got.iter().all(|t| nucleus.contains(t)),
        "sampled outside the nucleus"
    );
    // The least likely members of the nucleus are reachable too (not just the first head).
    let tail: HashSet<u32> = order[nucleus.len() / 2..nucleus.len()]
        .iter()
        .map(|&i| i as u32)
        .collect();
    assert!(got.iter().any(|t| tail.contains(t)));
}
