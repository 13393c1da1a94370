//! Every artifact type, in one place: its type name (what `inputs` connect and the manifest
//! type-checks), its files, and how to read and write it.
//!
//! A stage kind reads its inputs and writes its outputs only through these types, so a kind
//! never needs another kind's module to learn a file name, and two kinds writing the same value
//! write the same bytes ([`crate::json`] is the one JSON writer).
//!
//! | artifact | type | files | written by |
//! |---|---|---|---|
//! | [`FilesArtifact`] | `files` | anything fetched + `download.json` | `download` |
//! | [`RecordsArtifact`] | `records` | `records.jsonl` + `stats.json` | `read`, `python-stdlib`, `filter` |
//! | [`FilterReportArtifact`] | `filter-report` | `report.json` (+ `classifier.json`) | `filter` |
//! | [`TokensArtifact`] | `tokens` | token shards (`index.json` + shards) + `stats.json` | `tokenize` |
//! | [`ModelArtifact`] | `model` | weights + `tokenizer.json` + `model.json` ([`pipeline_models::artifact`]) | `model`, `quantize` |
//! | [`AdapterArtifact`] | `adapter` | PEFT adapter + `metrics.jsonl` + `loss_curve.svg` + `train.json` | `lora-train` |
//! | [`ProblemsArtifact`] | `problems` | `problems.jsonl` | `evalset` |
//! | [`SamplesArtifact`] | `samples` | `samples.jsonl` + `generation.json` | `generate` |
//! | [`GradesArtifact`] | `grades` | `results.jsonl` + `summary.json` | `grade` |
//! | [`LikelihoodArtifact`] | `likelihood` | `likelihood.jsonl` + `summary.json` | `likelihood` |
//! | [`DataStatsArtifact`] | `data-stats` | `stats.json` | `data-stats` |
//! | [`SimilarityArtifact`] | `similarity` | `similarity.json` | `eval-similarity` |
//! | [`ReportArtifact`] | `report` | `report.md` + `report.html` + `report.json` | `report` |

pub mod adapter;
pub mod data_stats;
pub mod files;
pub mod filter_report;
pub mod grades;
pub mod likelihood;
pub mod model;
pub mod problems;
pub mod records;
pub mod report;
pub mod samples;
pub mod similarity;
pub mod tokens;

pub use crate::json::{read_json, read_jsonl, write_json, write_jsonl, JsonError};
pub use adapter::{AdapterArtifact, TrainSummary};
pub use data_stats::{DataStats, DataStatsArtifact};
pub use files::{ArtifactFile, DownloadMeta, FilesArtifact};
pub use filter_report::FilterReportArtifact;
pub use grades::GradesArtifact;
pub use likelihood::{LikelihoodArtifact, LikelihoodSummary, TaskLikelihood};
pub use model::ModelArtifact;
pub use problems::ProblemsArtifact;
pub use records::RecordsArtifact;
pub use report::ReportArtifact;
pub use samples::{SampleLine, SamplesArtifact};
pub use similarity::{EvalSimilarity, SimilarityArtifact, TaskSimilarity};
pub use tokens::TokensArtifact;
