//! The `data-stats` kind: what a data variant is made of ([`crate::corpus_stats`]), measured
//! on the text it trains on: each record rendered through the variant's template (as
//! `tokenize` renders it), token lengths with the model's tokenizer when a `model` is
//! connected. A report takes these as `data` and shows the variants side by side.
//!
//! ```toml
//! [data-stats]
//! kind = "data-stats"
//! inputs = { records = "${data.records}", model = "model" }
//! template = { name = "${data.template}" }
//! ```

use miette::{miette, IntoDiagnostic};
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use pipeline_models::artifact::TOKENIZER_JSON;
use serde::{Deserialize, Serialize};

use crate::artifacts::data_stats::{DataStats, DataStatsArtifact};
use crate::artifacts::{ModelArtifact, RecordsArtifact};
use crate::corpus_stats::corpus_stats;
use crate::templates::{Template, TemplateSpec};
use crate::tokenize::TextTokenizer;

/// The `data-stats` stage kind.
pub struct DataStatsKind;

/// Parameters of [`DataStatsKind`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataStatsParams {
    /// How a record becomes text: the variant's training template (as in `tokenize`).
    #[serde(default)]
    pub template: TemplateSpec,
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
];

const OUTPUTS: &[OutputSlot] = &[OutputSlot {
    name: "stats",
    artifact: DataStatsArtifact::TYPE,
    doc: "stats.json: size, lengths, distinct-n, compression ratio, duplicate rates",
}];

impl Stage for DataStatsKind {
    type Params = DataStatsParams;
    const KIND: &'static str = "data-stats";
    const VERSION: &'static str = "1";
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

    fn validate(p: &DataStatsParams) -> Result<(), String> {
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
        let stats = corpus_stats(&texts, tokenizer.as_ref().map(|_| &count as _))
            .map_err(|e| miette!("{e}"))?;
        ctx.progress().set_position(records.len() as u64);
        for (n, d) in stats.distinct_n.iter().enumerate() {
            ctx.set_metadata(&format!("distinct_{}", n + 1), *d);
        }
        ctx.set_metadata("near_duplicate_rate", stats.near_duplicate_rate);
        ctx.set_metadata("records", stats.records as u64);
        let out = DataStats {
            rendered_as: p.template.label(),
            stats,
        };
        DataStatsArtifact::write(ctx.output_dir("stats")?, &out).into_diagnostic()?;
        Ok(())
    }
}
