//! Our side of the data-stage benchmarks; `bench/data_bench.py` runs it alternately with the
//! Python peers and writes `bench/results/*.json`. Build and run through that driver:
//!
//! ```text
//! cargo bench -p pipeline-stages --bench data_bench --no-run
//! python3 bench/data_bench.py
//! ```
//!
//! Direct use: `data_bench TASK [--reps N] [--warmup N] [--limit N] [--batch-size N] [--out DIR]` with TASK one
//! of `tokenize`, `dedup`, `heuristic`, `embed`, `ast_similarity`, `embed_similarity`. Each run loads its inputs (untimed), runs
//! `--warmup` untimed passes and `--reps` timed ones over the whole input, and prints one JSON
//! object: `{"task", "seconds": [...], "records", ...}`; the outputs that the driver compares
//! with the peer's (token ids, removed records, scores, embeddings) go under `--out`.
//!
//! Inputs: the shared data (`$PIPELINE_SHARED_DATA`, else `../shared/data` beside the repo),
//! `$PIPELINE_SMOLLM2_GGUF` for `tokenize`, `$PIPELINE_MINILM_DIR` for `embed` and `embed_similarity`.
//! Threads: rayon's pool, so `RAYON_NUM_THREADS` sets them (candle's CPU kernels read it too).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use pipeline_stages::filter::dedup::{
    exact_dedup, near_dedup, ExactDedupOptions, NearDedupOptions,
};
use pipeline_stages::filter::embed::{EmbedOptions, MiniLmEmbedder};
use pipeline_stages::filter::heuristic::{score_records, HeuristicOptions};
use pipeline_stages::filter::shared_data_dir;
use pipeline_stages::readers::{read_source, ReadOptions};
use pipeline_stages::records::{Fields, Record};
use pipeline_stages::templates::{Template, TemplateSpec};
use pipeline_stages::tokenize::{tokenize_all, TextTokenizer, TokenizeOptions};
use serde_json::{json, Value};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    task: String,
    reps: usize,
    warmup: usize,
    limit: Option<usize>,
    batch_size: Option<usize>,
    out: PathBuf,
}

fn parse_args() -> Res<Args> {
    let mut it = std::env::args().skip(1);
    let mut args = Args {
        task: String::new(),
        reps: 3,
        warmup: 1,
        limit: None,
        batch_size: None,
        out: std::env::temp_dir().join("pipeline-data-bench"),
    };
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--reps" => args.reps = value("--reps")?.parse()?,
            "--warmup" => args.warmup = value("--warmup")?.parse()?,
            "--limit" => args.limit = Some(value("--limit")?.parse()?),
            "--batch-size" => args.batch_size = Some(value("--batch-size")?.parse()?),
            "--out" => args.out = PathBuf::from(value("--out")?),
            // `cargo bench` passes `--bench`; nothing to do with it.
            "--bench" => {}
            t if !t.starts_with('-') && args.task.is_empty() => args.task = t.to_string(),
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    if args.task.is_empty() {
        return Err("usage: data_bench tokenize|dedup|heuristic|embed [--reps N] [--warmup N] [--limit N] [--batch-size N] [--out DIR]".into());
    }
    std::fs::create_dir_all(&args.out)?;
    Ok(args)
}

fn data_dir() -> Res<PathBuf> {
    shared_data_dir().ok_or_else(|| "shared data not found; set PIPELINE_SHARED_DATA".into())
}

fn env_path(var: &str) -> Res<PathBuf> {
    let p = PathBuf::from(std::env::var_os(var).ok_or(format!("set {var}"))?);
    // Relative paths (as in .cargo/config.toml) are relative to the workspace root.
    Ok(if p.is_relative() {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
    } else {
        p
    })
}

/// The messy set as the `read` stage produces it (one `content` field per record).
fn messy_records(limit: Option<usize>) -> Res<Vec<Record>> {
    let mut fields = Fields::new();
    fields.insert("content", "content");
    let opts = ReadOptions {
        fields,
        limit: limit.map(|l| l as u64),
        ..Default::default()
    };
    Ok(read_source(&data_dir()?.join("messy/python_files_5000.jsonl"), &opts)?.0)
}

fn messy_texts(limit: Option<usize>) -> Res<Vec<(String, String)>> {
    Ok(messy_records(limit)?
        .into_iter()
        .enumerate()
        .map(|(i, r)| (i.to_string(), r.get("content").unwrap_or("").to_string()))
        .collect())
}

/// Runs `f` `warmup` times, then `reps` times; `f` times its own measured part (so setup
/// such as loading a fresh tokenizer stays out). Returns the seconds of the timed runs and
/// the last result.
fn repeat<T>(
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> Res<(f64, T)>,
) -> Res<(Vec<f64>, T)> {
    for _ in 0..warmup {
        f()?;
    }
    let mut seconds = Vec::new();
    let mut last = None;
    for _ in 0..reps.max(1) {
        let (s, r) = f()?;
        seconds.push(s);
        last = Some(r);
    }
    let last = last.ok_or("no repetition ran")?;
    Ok((seconds, last))
}

/// Times `f` as a whole.
fn timed<T>(f: impl FnOnce() -> Res<T>) -> Res<(f64, T)> {
    let t = Instant::now();
    let r = f()?;
    Ok((t.elapsed().as_secs_f64(), r))
}

fn write_u32s(path: &Path, seqs: &[Vec<u32>]) -> Res<()> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    for s in seqs {
        w.write_all(&(s.len() as u32).to_le_bytes())?;
        for x in s {
            w.write_all(&x.to_le_bytes())?;
        }
    }
    w.flush()?;
    Ok(())
}

/// Tokenization as the `tokenize` stage does it: the `model` stage rebuilds the tokenizer
/// from the GGUF metadata and saves it as tokenizer.json; the `tokenize` stage loads that
/// file and runs [`tokenize_all`] (render + encode with offsets + loss mask, parallel over
/// records). The messy files use the `code_snippet` template, CodeAlpaca `instruction`, as
/// the replication manifests do. Each timed pass loads a fresh tokenizer (untimed), so the
/// BPE cache starts empty as it does in a stage run.
fn bench_tokenize(args: &Args) -> Res<Value> {
    let gguf = env_path("PIPELINE_SMOLLM2_GGUF")?;
    let json_path = args.out.join("tokenizer.json");
    TextTokenizer::from_gguf(&gguf)?
        .tokenizer
        .save(&json_path, false)
        .map_err(|e| format!("cannot save tokenizer.json: {e}"))?;
    let messy = messy_records(args.limit)?;
    let (alpaca, _) = read_source(
        &data_dir()?.join("codealpaca/code_alpaca_first1000.json"),
        &ReadOptions::default(),
    )?;
    let spec = |name: &str| TemplateSpec {
        name: name.into(),
        ..Default::default()
    };
    // No truncation and no EOS, so the ids are comparable with the peer's plain encoding;
    // both are O(1) per record, so the timing is the stage's.
    let opts = |name: &str| TokenizeOptions {
        template: spec(name),
        max_length: usize::MAX,
        add_eos: false,
        ..Default::default()
    };
    let (messy_opts, alpaca_opts) = (opts("code_snippet"), opts("instruction"));

    // The texts the peer encodes: exactly what the templates render.
    let mut texts = std::io::BufWriter::new(std::fs::File::create(args.out.join("texts.jsonl"))?);
    for (records, name) in [(&messy, "code_snippet"), (&alpaca, "instruction")] {
        let t = Template::from_spec(&spec(name))?;
        for r in records.iter() {
            serde_json::to_writer(&mut texts, &t.render(r)?.text())?;
            texts.write_all(b"\n")?;
        }
    }
    texts.flush()?;

    let (seconds, ids) = repeat(args.warmup, args.reps, || {
        let tok = TextTokenizer::load(&json_path, None, None)?;
        timed(|| {
            let mut ids: Vec<Vec<u32>> = tokenize_all(&messy, &tok, &messy_opts)?
                .into_iter()
                .map(|e| e.ids)
                .collect();
            ids.extend(
                tokenize_all(&alpaca, &tok, &alpaca_opts)?
                    .into_iter()
                    .map(|e| e.ids),
            );
            Ok(ids)
        })
    })?;
    write_u32s(&args.out.join("ids.bin"), &ids)?;
    Ok(json!({
        "seconds": seconds,
        "records": messy.len() + alpaca.len(),
        "tokens": ids.iter().map(Vec::len).sum::<usize>(),
        "tokenizer_json": json_path,
        "texts": args.out.join("texts.jsonl"),
    }))
}

/// Exact then near-duplicate removal, as the filter stage's `exact_dedup` and `near_dedup`
/// steps run them (near dedup sees only what exact dedup kept), with default options.
fn bench_dedup(args: &Args) -> Res<Value> {
    let recs = messy_texts(args.limit)?;
    let (seconds, (exact_kept, near_kept, candidates, verified)) =
        repeat(args.warmup, args.reps, || {
            timed(|| {
                let (kept, _) = exact_dedup(&recs, &ExactDedupOptions::default());
                let view: Vec<&(String, String)> = kept.iter().map(|&i| &recs[i]).collect();
                let (near, rep) = near_dedup(&view, &NearDedupOptions::default())?;
                let near: Vec<usize> = near.into_iter().map(|j| kept[j]).collect();
                Ok((
                    kept,
                    near,
                    rep.extra["candidate_pairs"],
                    rep.extra["verified_pairs"],
                ))
            })
        })?;
    let o = NearDedupOptions::default();
    Ok(json!({
        "seconds": seconds,
        "records": recs.len(),
        "exact_kept": exact_kept.len(),
        "near_kept": near_kept.len(),
        "exact_removed": recs.len() - exact_kept.len(),
        "near_removed": exact_kept.len() - near_kept.len(),
        "candidate_pairs": candidates,
        "verified_pairs": verified,
        "kept": near_kept,
        "options": {"shingle_size": o.shingle_size, "num_perm": o.num_perm, "bands": o.bands,
                    "rows": o.rows, "jaccard_threshold": o.jaccard_threshold},
    }))
}

/// The heuristic scorer over every messy file (parallel, one parser per rayon worker).
fn bench_heuristic(args: &Args) -> Res<Value> {
    let recs = messy_texts(args.limit)?;
    let opts = HeuristicOptions::default();
    let (seconds, scores) = repeat(args.warmup, args.reps, || {
        timed(|| Ok(score_records(&recs, &opts)?))
    })?;
    let scores: Vec<f64> = scores.iter().map(|s| s.score).collect();
    std::fs::write(
        args.out.join("heuristic_scores.json"),
        serde_json::to_vec(&scores)?,
    )?;
    Ok(json!({
        "seconds": seconds,
        "records": recs.len(),
        "mean_score": scores.iter().sum::<f64>() / scores.len().max(1) as f64,
    }))
}

/// MiniLM sentence embeddings (the learned scorer's cost; the logistic regression on top is
/// a dot product) of the first `--limit` messy files, default options (max_len 256, batch 32).
/// Warm-up embeds the first 64 texts only: the model is the same, the full set is slow.
fn bench_embed(args: &Args) -> Res<Value> {
    let recs = messy_texts(args.limit)?;
    let texts: Vec<&str> = recs.iter().map(|(_, t)| t.as_str()).collect();
    let mut opts = EmbedOptions::default();
    if let Some(b) = args.batch_size {
        opts.batch_size = b;
    }
    let embedder = MiniLmEmbedder::load(&opts, &candle_core::Device::Cpu)?;
    for _ in 0..args.warmup {
        embedder.embed(&texts[..texts.len().min(64)])?;
    }
    let (seconds, emb) = repeat(0, args.reps, || timed(|| Ok(embedder.embed(&texts)?)))?;
    let mut w = std::io::BufWriter::new(std::fs::File::create(args.out.join("embeddings.f32"))?);
    for v in &emb {
        for x in v {
            w.write_all(&x.to_le_bytes())?;
        }
    }
    w.flush()?;
    Ok(json!({
        "seconds": seconds,
        "records": texts.len(),
        "dim": embedder.dim(),
        "max_len": opts.max_len,
        "batch_size": opts.batch_size,
    }))
}

/// The AST match rate search of the `eval-similarity` kind: index the reference code of all
/// 164 HumanEval and 427 sanitized-MBPP tasks, score every messy file against every task,
/// keep each task's 3 nearest files. Writes each task's best score (`ast_best.json`).
fn bench_ast_similarity(args: &Args) -> Res<Value> {
    use pipeline_stages::similarity::ast::{AstIndex, AstOptions};
    use pipeline_stages::similarity::nearest;

    let recs = messy_texts(args.limit)?;
    let codes = eval_reference_codes()?;
    // The peer scores the same code (it cannot load the eval sets the way we pose them).
    std::fs::write(args.out.join("ast_codes.json"), serde_json::to_vec(&codes)?)?;
    let opts = AstOptions::default();
    let (seconds, best) = repeat(args.warmup, args.reps, || {
        timed(|| {
            let refs: Vec<&str> = codes.iter().map(String::as_str).collect();
            let index = AstIndex::new(&refs, &opts)?;
            let texts: Vec<&str> = recs.iter().map(|(_, t)| t.as_str()).collect();
            let scores = index.match_rates_all(&texts);
            Ok(nearest(codes.len(), &recs, &scores, 3))
        })
    })?;
    let best: Vec<f64> = best.iter().map(|n| n.best).collect();
    std::fs::write(args.out.join("ast_best.json"), serde_json::to_vec(&best)?)?;
    Ok(json!({
        "seconds": seconds,
        "records": recs.len(),
        "tasks": codes.len(),
        "min_nodes": opts.min_nodes,
        "tasks_at_0.5": best.iter().filter(|&&b| b >= 0.5).count(),
    }))
}

/// The embedding search of the `eval-similarity` kind at its full size: MiniLM embeddings of
/// the reference code of all 164 HumanEval and 427 sanitized-MBPP tasks and of every messy file
/// (default options: max_len 256, batch 32), cosine scores of every file against every task,
/// each task's 3 nearest files kept. Writes each task's best score (`embed_best.json`) and the
/// codes the peer must embed (`embed_codes.json`). Warm-up embeds the first 64 files only.
fn bench_embed_similarity(args: &Args) -> Res<Value> {
    use pipeline_stages::similarity::{cosine_scores, nearest};

    let recs = messy_texts(args.limit)?;
    let codes = eval_reference_codes()?;
    std::fs::write(
        args.out.join("embed_codes.json"),
        serde_json::to_vec(&codes)?,
    )?;
    let opts = EmbedOptions::default();
    let embedder = MiniLmEmbedder::load(&opts, &candle_core::Device::Cpu)?;
    let texts: Vec<&str> = recs.iter().map(|(_, t)| t.as_str()).collect();
    for _ in 0..args.warmup {
        embedder.embed(&texts[..texts.len().min(64)])?;
    }
    let (seconds, best) = repeat(0, args.reps, || {
        timed(|| {
            let code_refs: Vec<&str> = codes.iter().map(String::as_str).collect();
            let task_emb = embedder.embed(&code_refs)?;
            let record_emb = embedder.embed(&texts)?;
            Ok(nearest(
                codes.len(),
                &recs,
                &cosine_scores(&record_emb, &task_emb),
                3,
            ))
        })
    })?;
    let best: Vec<f64> = best.iter().map(|n| n.best).collect();
    std::fs::write(args.out.join("embed_best.json"), serde_json::to_vec(&best)?)?;
    Ok(json!({
        "seconds": seconds,
        "records": recs.len(),
        "tasks": codes.len(),
        "max_len": opts.max_len,
        "batch_size": opts.batch_size,
        "tasks_at_0.8": best.iter().filter(|&&b| b >= 0.8).count(),
    }))
}

/// The reference code of every HumanEval and sanitized-MBPP task, as the similarity kind
/// compares it.
fn eval_reference_codes() -> Res<Vec<String>> {
    use pipeline_stages::evalsets::{load_eval_set, EvalKind};

    let data = shared_data_dir().ok_or("no shared data folder")?;
    let mut codes: Vec<String> = Vec::new();
    for kind in [EvalKind::HumanEval, EvalKind::MbppSanitized] {
        codes.extend(
            load_eval_set(kind, &data, "")?
                .iter()
                .map(|p| p.reference_code()),
        );
    }
    Ok(codes)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("data_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let args = parse_args()?;
    let threads = rayon::current_num_threads();
    let mut out = match args.task.as_str() {
        "tokenize" => bench_tokenize(&args)?,
        "dedup" => bench_dedup(&args)?,
        "heuristic" => bench_heuristic(&args)?,
        "embed" => bench_embed(&args)?,
        "ast_similarity" => bench_ast_similarity(&args)?,
        "embed_similarity" => bench_embed_similarity(&args)?,
        other => return Err(format!("unknown task `{other}`").into()),
    };
    out["task"] = json!(args.task);
    out["threads"] = json!(threads);
    println!("{out}");
    Ok(())
}
