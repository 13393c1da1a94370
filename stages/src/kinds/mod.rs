//! Stage kinds: one module per kind, thin by design: parse parameters, read input artifacts,
//! call library code (this crate's data modules and `pipeline-models`), write output artifacts,
//! report progress. A kind reads and writes artifacts only through [`crate::artifacts`], never
//! through another kind's module.
//!
//! Data side: [`download`] → [`read`] / [`python_stdlib`] → [`filter`] → [`tokenize`], and
//! [`data_stats`] measuring each variant for the report.
//!
//! Model side: [`model`] → [`quantize`] → [`lora_train`].
//!
//! Evaluation side: [`evalset`] → [`generate`] → [`grade`] → [`report`], and [`evalset`] →
//! [`likelihood`] → [`report`].

pub mod data_stats;
pub mod download;
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
pub mod tokenize;
