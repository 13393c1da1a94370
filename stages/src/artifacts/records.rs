//! The `records` artifact: `records.jsonl` ([`crate::records`] format) and `stats.json` (what
//! the producing kind counted: files, skips, filter steps).

use std::path::Path;

use serde::Serialize;

use crate::json::write_json;
use crate::records::{read_records, write_records, Record};

/// The `records` artifact.
pub struct RecordsArtifact;

impl RecordsArtifact {
    /// Its type name.
    pub const TYPE: &'static str = "records";
    /// The records, one JSON object a line.
    pub const RECORDS_FILE: &'static str = "records.jsonl";
    /// The producing kind's counts.
    pub const STATS_FILE: &'static str = "stats.json";

    /// Every record of the artifact in `dir`, in order.
    pub fn read(dir: &Path) -> miette::Result<Vec<Record>> {
        Ok(read_records(&dir.join(Self::RECORDS_FILE))?)
    }

    /// Writes `records` and `stats` into `dir`; returns the number of records.
    pub fn write<'a>(
        dir: &Path,
        records: impl IntoIterator<Item = &'a Record>,
        stats: &impl Serialize,
    ) -> miette::Result<u64> {
        let count = write_records(&dir.join(Self::RECORDS_FILE), records)?;
        write_json(&dir.join(Self::STATS_FILE), stats)?;
        Ok(count)
    }
}
