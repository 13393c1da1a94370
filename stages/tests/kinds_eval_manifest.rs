//! A whole evaluation pipeline from a manifest: evalset → generate (tiny Llama, two
//! variants) → grade → report, run by the engine into a temporary cache; a second run takes
//! everything from the cache.

mod kinds_eval_support;

use std::path::PathBuf;

use miette::IntoDiagnostic;
use pipeline_engine::fingerprint::Fingerprint;
use pipeline_engine::{
    load_manifest, InputSlot, ManifestOptions, OutputSlot, RunOptions, Stage, StageContext,
    StageOutcome, Store,
};
use pipeline_stages::report::ReportData;
use serde::{Deserialize, Serialize};

/// Test-only producer of a `model` artifact: copies a local directory.
struct LocalModel;

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct LocalModelParams {
    dir: PathBuf,
    #[serde(default)]
    tag: String,
}

impl Stage for LocalModel {
    type Params = LocalModelParams;
    const KIND: &'static str = "local-model";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str = "test: a model directory as a model artifact";
    fn inputs() -> &'static [InputSlot] {
        &[]
    }
    fn outputs() -> &'static [OutputSlot] {
        &[OutputSlot {
            name: "model",
            artifact: "model",
            doc: "model dir",
        }]
    }
    fn fingerprint(p: &LocalModelParams, fp: &mut Fingerprint) -> miette::Result<()> {
        fp.file("dir", &p.dir)
    }
    fn run(p: &LocalModelParams, ctx: &mut StageContext) -> miette::Result<()> {
        let src = ctx.resolve(&p.dir);
        let out = ctx.output_dir("model")?.to_path_buf();
        for entry in std::fs::read_dir(&src).into_diagnostic()? {
            let entry = entry.into_diagnostic()?;
            std::fs::copy(entry.path(), out.join(entry.file_name())).into_diagnostic()?;
        }
        Ok(())
    }
}

/// Test-only producer of an `adapter` artifact holding only a loss curve.
struct LocalMetrics;

#[derive(Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct LocalMetricsParams {
    final_loss: String,
}

impl Stage for LocalMetrics {
    type Params = LocalMetricsParams;
    const KIND: &'static str = "local-metrics";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str = "test: a metrics.jsonl as an adapter artifact";
    fn inputs() -> &'static [InputSlot] {
        &[]
    }
    fn outputs() -> &'static [OutputSlot] {
        &[OutputSlot {
            name: "adapter",
            artifact: "adapter",
            doc: "metrics only",
        }]
    }
    fn run(p: &LocalMetricsParams, ctx: &mut StageContext) -> miette::Result<()> {
        // A variant-dependent final loss: a tenth of the tag's length.
        let last = p.final_loss.len() as f64 / 10.0;
        let text = format!("{{\"step\": 0, \"loss\": 3.0}}\n{{\"step\": 10, \"loss\": {last}}}\n");
        std::fs::write(ctx.output_dir("adapter")?.join("metrics.jsonl"), text).into_diagnostic()
    }
}

/// Loads `manifest` with every stage kind plus this file's test kinds.
fn load_with_test_kinds(manifest: &std::path::Path) -> pipeline_engine::Manifest {
    let mut registry = pipeline_stages::registry();
    registry.register::<LocalModel>().register::<LocalMetrics>();
    load_manifest(manifest, &registry, &ManifestOptions::default())
        .map_err(|e| format!("{e:?}"))
        .unwrap()
}

#[test]
fn manifest_pipeline_runs_then_is_fully_cached() {
    let python = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !python {
        eprintln!("SKIP: python3 not found (the grade stage needs it)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    kinds_eval_support::write_tiny_model(&tmp.path().join("tiny-model"));
    let manifest = tmp.path().join("eval.toml");
    std::fs::write(
        &manifest,
        r#"
[experiment]
name = "evalkinds"
seed = 11

[model]
kind = "local-model"
matrix.variant = ["base", "tuned"]
dir = "tiny-model"
tag = "${variant}"

[train]
kind = "local-metrics"
matrix.variant = ["base", "tuned"]
final_loss = "${variant}"

[problems]
kind = "evalset"
set = "replication"
limit = 2

[generate]
kind = "generate"
inputs = { model = "model", problems = "problems" }
max_new_tokens = 8
temperature = 0.7
num_samples = 2

[grade]
kind = "grade"
inputs = { samples = "generate", problems = "problems" }
ks = [1, 2]

[report]
kind = "report"
inputs = { grades = ["grade"], losses = ["train"], problems = "problems" }
title = "Tiny evaluation"
baseline = "base"
"#,
    )
    .unwrap();
    let m = load_with_test_kinds(&manifest);
    let store = Store::open(&tmp.path().join("cache")).unwrap();
    let options = RunOptions {
        jobs: 2,
        ..Default::default()
    };

    let first = pipeline_engine::run(&m, &store, &options).unwrap();
    assert!(first.success(), "{:#?}", first.stages);
    let names: Vec<&str> = first.stages.iter().map(|s| s.stage.as_str()).collect();
    for want in [
        "generate@base",
        "generate@tuned",
        "grade@base",
        "grade@tuned",
        "report",
    ] {
        assert!(names.contains(&want), "{names:?}");
    }
    // Both variants' models have the same content, so the second generate/grade of the pair
    // shares the first one's key and may be served from the cache within this run.
    assert!(first.ran() >= first.stages.len() - 2, "{:#?}", first.stages);

    let report = first.stages.iter().find(|s| s.stage == "report").unwrap();
    let record = store.action(report.key.as_ref().unwrap()).unwrap();
    let dir = store.view(&record.outputs["report"].tree).unwrap();
    let data: ReportData =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    let variants: Vec<&str> = data.variants.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(variants, ["base", "tuned"]);
    assert_eq!(data.variants[0].samples, 4);
    // Loss curves are matched to variants by their matrix value (`train@tuned` → `tuned`).
    assert_eq!(data.variants[0].loss.last().unwrap().loss, 0.4);
    assert_eq!(data.variants[1].loss.last().unwrap().loss, 0.5);
    assert_eq!(data.comparisons.len(), 1);
    assert_eq!(
        (
            data.comparisons[0].a.as_str(),
            data.comparisons[0].b.as_str()
        ),
        ("base", "tuned")
    );
    assert!(data.manifest.contains("grade@tuned"));
    assert!(std::fs::read_to_string(dir.join("report.md"))
        .unwrap()
        .contains("Tiny evaluation"));
    // Identical model content and seed: both variants sampled the same completions.
    assert_eq!(data.completions.len(), 2);
    assert_eq!(
        data.completions[0].completions[0].completion,
        data.completions[0].completions[1].completion
    );

    let second = pipeline_engine::run(&m, &store, &options).unwrap();
    assert!(second.success());
    assert_eq!(second.ran(), 0, "{:#?}", second.stages);
    assert!(second
        .stages
        .iter()
        .all(|s| s.outcome == StageOutcome::Cached));
}

#[test]
fn a_downloaded_peft_adapter_feeds_generate_and_a_wrong_download_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    kinds_eval_support::write_tiny_model(&tmp.path().join("tiny-model"));
    kinds_eval_support::write_tiny_adapter(&tmp.path().join("their-adapter"));
    std::fs::create_dir_all(tmp.path().join("not-an-adapter")).unwrap();
    std::fs::write(
        tmp.path().join("not-an-adapter/README.md"),
        "weights elsewhere",
    )
    .unwrap();
    let manifest = tmp.path().join("import.toml");
    std::fs::write(
        &manifest,
        r#"
[experiment]
name = "import"
seed = 5

[model]
kind = "local-model"
dir = "tiny-model"

[peft]
kind = "download"
source = "path:their-adapter"

[wrong]
kind = "download"
source = "path:not-an-adapter"

[problems]
kind = "evalset"
set = "replication"
limit = 2

[plain]
kind = "generate"
inputs = { model = "model", problems = "problems" }
max_new_tokens = 16

[imported]
kind = "generate"
inputs = { model = "model", problems = "problems", adapter = "peft" }
max_new_tokens = 16

[broken]
kind = "generate"
inputs = { model = "model", problems = "problems", adapter = "wrong" }
max_new_tokens = 16
"#,
    )
    .unwrap();
    let m = load_with_test_kinds(&manifest);
    let store = Store::open(&tmp.path().join("cache")).unwrap();
    let report = pipeline_engine::run(&m, &store, &RunOptions::default()).unwrap();
    let stage = |name: &str| report.stages.iter().find(|s| s.stage == name).unwrap();
    let samples = |name: &str| {
        let record = store.action(stage(name).key.as_ref().unwrap()).unwrap();
        let dir = store.view(&record.outputs["samples"].tree).unwrap();
        let gen: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("generation.json")).unwrap())
                .unwrap();
        (
            std::fs::read_to_string(dir.join("samples.jsonl")).unwrap(),
            gen["adapter"].clone(),
        )
    };
    let (plain, plain_adapter) = samples("plain");
    let (imported, imported_adapter) = samples("imported");
    assert_eq!(
        (plain_adapter, imported_adapter),
        (false.into(), true.into())
    );
    assert_ne!(
        plain, imported,
        "the imported adapter must change greedy output"
    );

    match &stage("broken").outcome {
        StageOutcome::Failed(failure) => {
            let message = &failure.message;
            assert!(message.contains("adapter_config.json"), "{message}")
        }
        other => panic!("a download without adapter_config.json must fail generate: {other:?}"),
    }
    assert!(!report.success());
}
