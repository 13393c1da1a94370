//! Tests of the batched generation loop on small real `CausalLm`s.

mod common;
mod generate_support;

use common::max_abs_diff;

use candle_core::{Device, Tensor};
use generate_support::{piece_decoder, TableLm, TinyLm};
use pipeline_models::generate::{
    generate_batch, generate_batch_streaming, generate_batch_with_progress, FinishReason,
    GenerateConfig, GenerateError, GenerateRequest, NewToken, SamplingParams,
};
use pipeline_models::CausalLm;

// Table vocabulary: a short "program" whose stop sequence "\ndef" spans tokens 3 and 4.
const PIECES: &[&str] = &[
    "<pad>",
    "<eos>",
    "def f():",
    "\n    return 1",
    "\nd",
    "ef g():",
    "!",
    "\n#x",
];
// 2 -> 3 -> 4 -> 5 -> 6 -> 6 ...; 7 -> 1 (eos).
const NEXT: [u32; 8] = [0, 1, 3, 4, 5, 6, 6, 1];

fn req(prompt: Vec<u32>, stop: &[&str], seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: prompt,
        stop: stop.iter().map(|s| s.to_string()).collect(),
        seed,
    }
}

#[test]
fn generate_stop_sequence_spanning_two_tokens_cuts_exactly() {
    let model = TableLm::new(NEXT.to_vec());
    let config = GenerateConfig {
        max_new_tokens: 10,
        ..Default::default()
    };
    let out = generate_batch(
        &model,
        &[req(
            vec![2],
            &["\nclass", "\ndef", "\n#", "\nif", "\nprint"],
            0,
        )],
        &config,
        piece_decoder(PIECES),
    )
    .unwrap();
    let c = &out.completions[0][0];
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!(c.text, "\n    return 1");
    // Tokens up to the one that completed the stop string.
    assert_eq!(c.token_ids, vec![3, 4, 5]);
}

#[test]
fn generate_earliest_stop_wins_and_rows_finish_independently() {
    let model = TableLm::new(NEXT.to_vec());
    let config = GenerateConfig {
        max_new_tokens: 6,
        eos_token_ids: vec![1],
        ..Default::default()
    };
    let requests = [
        // "\n    return" comes before "\nd": stop "\n" cuts at the very start.
        req(vec![2], &["ef g", "\n"], 0),
        req(vec![2], &["ef g"], 0),
        // No stop strings: runs to the length limit.
        req(vec![5, 2, 2], &[], 0),
        // 7 -> eos immediately after the prompt; EOS is not part of the output.
        req(vec![6, 7], &["zzz"], 0),
    ];
    let out = generate_batch(&model, &requests, &config, piece_decoder(PIECES)).unwrap();
    let c: Vec<_> = out.completions.iter().map(|v| &v[0]).collect();
    assert_eq!(
        (c[0].text.as_str(), c[0].finish_reason),
        ("", FinishReason::Stop)
    );
    assert_eq!(
        (c[1].text.as_str(), c[1].finish_reason),
        ("\n    return 1\nd", FinishReason::Stop)
    );
    assert_eq!(c[2].finish_reason, FinishReason::Length);
    assert_eq!(c[2].token_ids, vec![3, 4, 5, 6, 6, 6]);
    assert_eq!(c[2].text, "\n    return 1\ndef g():!!!");
    assert_eq!(
        (c[3].text.as_str(), c[3].finish_reason),
        ("", FinishReason::Eos)
    );
    assert!(c[3].token_ids.is_empty());
    // Finished rows leave the batch: 4 rows in prefill, then fewer in later steps.
    let calls = model.calls.lock().unwrap().clone();
    assert_eq!(calls[0], (4, 3));
    assert!(
        calls.last().unwrap().0 < 4,
        "finished rows were not dropped: {calls:?}"
    );
    assert_eq!(
        calls.last().unwrap().0,
        1,
        "only the length-limited row should remain"
    );
}

#[test]
fn generate_samples_reproduce_and_differ() {
    let model = TinyLm::new(32, 16, 2, 64, 5);
    let config = GenerateConfig {
        max_new_tokens: 12,
        num_samples: 4,
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: Some(20),
            top_p: Some(0.95),
        },
        ..Default::default()
    };
    let requests = [req(vec![3, 4, 5], &[], 1), req(vec![7], &[], 2)];
    let dec = |ids: &[u32]| format!("{ids:?}");
    let a = generate_batch(&model, &requests, &config, dec).unwrap();
    let b = generate_batch(&model, &requests, &config, dec).unwrap();
    for (ra, rb) in a.completions.iter().zip(&b.completions) {
        assert_eq!(ra.len(), 4);
        for (x, y) in ra.iter().zip(rb) {
            assert_eq!(x.token_ids, y.token_ids);
            assert_eq!(x.seed, y.seed);
        }
        let distinct: std::collections::HashSet<_> =
            ra.iter().map(|c| c.token_ids.clone()).collect();
        assert!(
            distinct.len() >= 3,
            "samples should differ under sampling: {distinct:?}"
        );
    }
    // Each distinct prompt is prefilled once: the first call has 2 rows, not 8.
    assert_eq!(model.calls.lock().unwrap()[0].0, 2);
    // A different request seed gives different samples.
    let c = generate_batch(&model, &[req(vec![3, 4, 5], &[], 99)], &config, dec).unwrap();
    assert_ne!(c.completions[0][0].token_ids, a.completions[0][0].token_ids);
    assert!(a.stats.generated_tokens > 0 && a.stats.decode_tokens_per_second() > 0.0);
}

#[test]
fn generate_results_do_not_depend_on_batch_composition() {
    let model = TinyLm::new(40, 16, 2, 64, 9);
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 2, 3, 4, 5, 6],
        vec![7],
        vec![8, 9, 10],
        vec![11, 12],
    ];
    let dec = |ids: &[u32]| format!("{ids:?}");
    for sampling in [
        SamplingParams::greedy(),
        SamplingParams::with_temperature(0.7),
    ] {
        let mk = |rows: usize| GenerateConfig {
            max_new_tokens: 10,
            num_samples: 2,
            max_batch_rows: rows,
            sampling,
            ..Default::default()
        };
        let requests: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| req(p.clone(), &[], i as u64))
            .collect();
        let batched = generate_batch(&model, &requests, &mk(8), dec).unwrap();
        for (i, r) in requests.iter().enumerate() {
            let alone = generate_batch(&model, std::slice::from_ref(r), &mk(1), dec).unwrap();
            for s in 0..2 {
                assert_eq!(
                    batched.completions[i][s].token_ids, alone.completions[0][s].token_ids,
                    "request {i} sample {s} ({sampling:?})"
                );
            }
        }
    }
}

#[test]
fn generate_cached_equals_uncached() {
    let model = TinyLm::new(48, 16, 3, 64, 13);
    let requests = [
        req(vec![5, 6, 7, 8, 9], &[], 0),
        req(vec![1], &[], 1),
        req(vec![2, 3], &[], 2),
    ];
    let dec = |ids: &[u32]| format!("{ids:?}");
    let base = GenerateConfig {
        max_new_tokens: 15,
        ..Default::default()
    };
    let cached = generate_batch(&model, &requests, &base, dec).unwrap();
    let uncached = generate_batch(
        &model,
        &requests,
        &GenerateConfig {
            use_kv_cache: false,
            ..base.clone()
        },
        dec,
    )
    .unwrap();
    let chunked = generate_batch(
        &model,
        &requests,
        &GenerateConfig {
            prefill_chunk: 2,
            ..base.clone()
        },
        dec,
    )
    .unwrap();
    for i in 0..3 {
        assert_eq!(cached.completions[i][0].token_ids.len(), 15);
        assert_eq!(
            cached.completions[i][0].token_ids,
            uncached.completions[i][0].token_ids
        );
        assert_eq!(
            cached.completions[i][0].token_ids,
            chunked.completions[i][0].token_ids
        );
    }
}

/// Logits of a left-padded batch fed one token at a time through the cache equal those of one
/// full forward pass.
#[test]
fn generate_cached_logits_equal_full_pass() {
    let model = TinyLm::new(30, 8, 2, 32, 21);
    let dev = Device::Cpu;
    // Row 0 has two padding positions.
    let ids = Tensor::new(&[[0u32, 0, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6]], &dev).unwrap();
    let pos = Tensor::new(&[[0u32, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]], &dev).unwrap();
    let mask = Tensor::new(&[[0u8, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], &dev).unwrap();
    let mut cache = model.new_cache();
    let full = model.forward_cached(&ids, &pos, &mask, &mut cache).unwrap();
    let mut cache = model.new_cache();
    let mut steps = Vec::new();
    for t in 0..6 {
        let out = model
            .forward_cached(
                &ids.narrow(1, t, 1).unwrap(),
                &pos.narrow(1, t, 1).unwrap(),
                &mask.narrow(1, 0, t + 1).unwrap(),
                &mut cache,
            )
            .unwrap();
        steps.push(out);
    }
    let stepped = Tensor::cat(&steps, 1).unwrap();
    // Only real positions matter; padding queries' outputs are never used.
    let diff = max_abs_diff(
        &full.narrow(1, 2, 4).unwrap(),
        &stepped.narrow(1, 2, 4).unwrap(),
    );
    assert!(diff < 1e-4, "cached and uncached logits differ by {diff}");
    // And the padded row's logits equal those of the unpadded sequence alone.
    let mut c = model.new_cache();
    let alone = model
        .forward_cached(
            &Tensor::new(&[[4u32, 5, 6, 7]], &dev).unwrap(),
            &Tensor::new(&[[0u32, 1, 2, 3]], &dev).unwrap(),
            &Tensor::new(&[[1u8, 1, 1, 1]], &dev).unwrap(),
            &mut c,
        )
        .unwrap();
    let diff = max_abs_diff(
        &full.narrow(0, 0, 1).unwrap().narrow(1, 2, 4).unwrap(),
        &alone,
    );
    assert!(diff < 1e-4, "left padding changed the logits by {diff}");
}

#[test]
fn generate_zero_tokens_and_errors() {
    let model = TableLm::new(NEXT.to_vec());
    let dec = piece_decoder(PIECES);
    let out = generate_batch(
        &model,
        &[req(vec![2], &[], 0)],
        &GenerateConfig {
            max_new_tokens: 0,
            ..Default::default()
        },
        &dec,
    )
    .unwrap();
    assert_eq!(out.completions[0][0].finish_reason, FinishReason::Length);
    assert!(out.completions[0][0].token_ids.is_empty());

    let cfg = GenerateConfig::default();
    let err = generate_batch(&model, &[req(vec![], &[], 0)], &cfg, &dec).unwrap_err();
    assert!(matches!(err, GenerateError::EmptyPrompt(0)));
    let err = generate_batch(&model, &[req(vec![2, 99], &[], 0)], &cfg, &dec).unwrap_err();
    assert!(matches!(
        err,
        GenerateError::TokenOutOfVocab { token: 99, .. }
    ));
    let err = generate_batch(&model, &[req(vec![2], &[""], 0)], &cfg, &dec).unwrap_err();
    assert!(matches!(err, GenerateError::EmptyStopSequence(0)));
    let err = generate_batch(
        &model,
        &[req(vec![2], &[], 0)],
        &GenerateConfig {
            num_samples: 0,
            ..Default::default()
        },
        &dec,
    )
    .unwrap_err();
    assert!(matches!(err, GenerateError::InvalidConfig(_)));
}

#[test]
fn generate_progress_reports_every_sample_once() {
    let model = TableLm::new(NEXT.to_vec());
    let config = GenerateConfig {
        max_new_tokens: 4,
        num_samples: 3,
        max_batch_rows: 2,
        ..Default::default()
    };
    let requests = [req(vec![2], &["\nd"], 0), req(vec![5, 6], &[], 1)];
    let mut seen = Vec::new();
    let out = generate_batch_with_progress(
        &model,
        &requests,
        &config,
        piece_decoder(PIECES),
        |r, s, c| seen.push((r, s, c.clone())),
    )
    .unwrap();
    assert_eq!(seen.len(), 6);
    for (r, s, c) in seen {
        assert_eq!(&out.completions[r][s], &c);
    }
    let json = serde_json::to_string(&out.completions[0][0]).unwrap();
    assert!(json.contains("\"finish_reason\":\"stop\""), "{json}");
}

#[test]
fn generate_streaming_reports_every_sample_token_in_order_and_can_stop() {
    let model = TinyLm::new(32, 16, 2, 64, 21);
    let config = GenerateConfig {
        max_new_tokens: 9,
        num_samples: 2,
        max_batch_rows: 3,
        sampling: SamplingParams::with_temperature(0.9),
        eos_token_ids: vec![0],
        ..Default::default()
    };
    let requests = [req(vec![3, 4, 5], &[], 1), req(vec![7], &[], 2)];
    let dec = |ids: &[u32]| format!("{ids:?}");
    let mut streamed: std::collections::BTreeMap<(usize, usize), Vec<u32>> = Default::default();
    let mut steps = 0;
    let out = generate_batch_streaming(
        &model,
        &requests,
        &config,
        dec,
        |_, _, _| {},
        |tokens: &[NewToken]| {
            steps += 1;
            for t in tokens {
                streamed
                    .entry((t.request, t.sample))
                    .or_default()
                    .push(t.token);
            }
            std::ops::ControlFlow::Continue(())
        },
    )
    .unwrap();
    assert!(steps > 0);
    // What was streamed is exactly each sample's tokens; and the same as without streaming.
    let plain = generate_batch(&model, &requests, &config, dec).unwrap();
    assert_eq!(out.completions, {
        let mut c = plain.completions.clone();
        for (a, b) in c.iter_mut().flatten().zip(out.completions.iter().flatten()) {
            a.elapsed_secs = b.elapsed_secs;
        }
        c
    });
    for (r, samples) in out.completions.iter().enumerate() {
        for (s, c) in samples.iter().enumerate() {
            let got = streamed.get(&(r, s)).cloned().unwrap_or_default();
            assert_eq!(got, c.token_ids, "request {r} sample {s}");
        }
    }
    // Breaking stops the generation.
    let mut calls = 0;
    let err = generate_batch_streaming(
        &model,
        &requests,
        &config,
        dec,
        |_, _, _| {},
        |_: &[NewToken]| {
            calls += 1;
            std::ops::ControlFlow::Break(())
        },
    )
    .unwrap_err();
    assert!(matches!(err, GenerateError::Stopped), "{err}");
    assert_eq!(calls, 1);
}
