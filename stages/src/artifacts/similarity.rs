//! The `similarity` artifact: `similarity.json`, how much one data variant's training records
//! resemble each task of an eval set ([`crate::similarity`]), under each measure: the best
//! score and the nearest records.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::json::{read_json, write_json, JsonError};
use crate::similarity::{Measure, TaskNeighbors};

/// What `similarity.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalSimilarity {
    /// How each record became text (`instruction template`, `field content`).
    pub rendered_as: String,
    /// Training records compared.
    pub records: usize,
    /// The measures computed, in report order.
    pub measures: Vec<Measure>,
    /// Smallest syntax subtree counted by the AST measure.
    pub ast_min_nodes: usize,
    /// One entry per eval task, in the eval set's order.
    pub tasks: Vec<TaskSimilarity>,
}

/// One eval task's nearest training records under each measure computed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSimilarity {
    /// The eval task.
    pub task_id: String,
    /// Under embedding cosine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<TaskNeighbors>,
    /// Under the AST match rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ast: Option<TaskNeighbors>,
}

impl TaskSimilarity {
    /// The nearest records under `measure`, if it was computed.
    pub fn under(&self, measure: Measure) -> Option<&TaskNeighbors> {
        match measure {
            Measure::Embedding => self.embedding.as_ref(),
            Measure::Ast => self.ast.as_ref(),
        }
    }
}

/// The `similarity` artifact.
pub struct SimilarityArtifact;

impl SimilarityArtifact {
    /// Its type name.
    pub const TYPE: &'static str = "similarity";
    /// The similarity file.
    pub const FILE: &'static str = "similarity.json";

    /// Writes `similarity` into `dir`.
    pub fn write(dir: &Path, similarity: &EvalSimilarity) -> Result<(), JsonError> {
        write_json(&dir.join(Self::FILE), similarity)
    }

    /// The similarity in `dir`.
    pub fn read(dir: &Path) -> Result<EvalSimilarity, JsonError> {
        read_json(&dir.join(Self::FILE))
    }
}
