//! The stage kinds of `pipeline`.
//!
//! Each kind is one module of [`kinds`] implementing [`pipeline_engine::Stage`]; [`registry`] is
//! the one place they are registered. Kinds are thin: every artifact type (its name, files,
//! reader and writer) lives in [`artifacts`]; the model code they drive lives in
//! `pipeline-models`, and the data logic in the library modules below.

#![warn(missing_docs)]

pub mod artifacts;
pub mod chat;
pub mod cli;
pub mod corpus_stats;
pub mod download;
pub mod evalsets;
pub mod filter;
pub mod grade;
pub mod json;
pub mod kinds;
pub mod python;
pub mod readers;
pub mod records;
pub mod report;
pub mod serve;
pub mod similarity;
pub mod snippet;
pub mod stats;
pub mod synth;
pub mod templates;
pub mod tokenize;

use pipeline_engine::Registry;

/// Every stage kind (and kind-specific subcommand) of the `pipeline` binary.
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    registry
        .register::<kinds::download::Download>()
        .register::<kinds::read::Read>()
        .register::<kinds::python_stdlib::PythonStdlib>()
        .register::<kinds::synthesize::Synthesize>()
        .register::<kinds::filter::Filter>()
        .register::<kinds::data_stats::DataStatsKind>()
        .register::<kinds::eval_similarity::EvalSimilarityKind>()
        .register::<kinds::tokenize::Tokenize>()
        .register::<kinds::model::ModelKind>()
        .register::<kinds::quantize::QuantizeKind>()
        .register::<kinds::lora_train::LoraTrainKind>()
        .register::<kinds::evalset::EvalSet>()
        .register::<kinds::generate::Generate>()
        .register::<kinds::likelihood::Likelihood>()
        .register::<kinds::grade::Grade>()
        .register::<kinds::report::Report>()
        .register_command(cli::GradeCommand)
        .register_stage_command(serve::ServeCommand);
    registry
}
