//! The `data-stats` artifact: `stats.json`, the [`CorpusStats`] of one data variant's records
//! as its training template renders them.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::corpus_stats::{CorpusStats, FieldCoverage};
use crate::json::{read_json, write_json, JsonError};

/// What `stats.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataStats {
    /// How each record became text (`instruction template`, `field content`).
    pub rendered_as: String,
    /// The measurements.
    #[serde(flatten)]
    pub stats: CorpusStats,
    /// Coverage of the descriptive fields the records carry (a synthetic set's `topic`,
    /// `audience`, `style`), by field; empty when they carry none.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub coverage: std::collections::BTreeMap<String, FieldCoverage>,
}

/// The `data-stats` artifact.
pub struct DataStatsArtifact;

impl DataStatsArtifact {
    /// Its type name.
    pub const TYPE: &'static str = "data-stats";
    /// The statistics file.
    pub const FILE: &'static str = "stats.json";

    /// Writes `stats` into `dir`.
    pub fn write(dir: &Path, stats: &DataStats) -> Result<(), JsonError> {
        write_json(&dir.join(Self::FILE), stats)
    }

    /// The statistics in `dir`.
    pub fn read(dir: &Path) -> Result<DataStats, JsonError> {
        read_json(&dir.join(Self::FILE))
    }
}
