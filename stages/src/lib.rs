//! The stage kinds of `pipeline`.
//!
//! Each kind is one module implementing [`pipeline_engine::Stage`]; [`registry`] is the one
//! place they are registered. Kinds hold stage plumbing only (parameters, inputs, outputs,
//! artifact layout); the model code they drive lives in `pipeline-models`, and the data logic
//! they drive lives in the library modules below.

pub mod download;
pub mod evalsets;
pub mod filter;
pub mod grade;
pub mod kinds;
pub mod readers;
pub mod records;
pub mod report;
pub mod templates;
pub mod tokenize;

use pipeline_engine::Registry;

/// Every stage kind of the `pipeline` binary.
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    registry.register::<kinds::download::Download>();
    registry.register::<kinds::read::Read>();
    registry.register::<kinds::filter::Filter>();
    registry.register::<kinds::tokenize::Tokenize>();
    registry
}
