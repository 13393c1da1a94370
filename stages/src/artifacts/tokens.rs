//! The `tokens` artifact: token shards (`index.json` + `shard-NNNNN.bin`, format in
//! [`crate::tokenize::TokenShards`]) and `stats.json` ([`TokenizeStats`]).

use std::path::{Path, PathBuf};

use miette::{miette, IntoDiagnostic};

use crate::json::{write_json, JsonError};
use crate::tokenize::{Example, TokenShards, TokenizeStats};

/// The `tokens` artifact.
pub struct TokensArtifact;

impl TokensArtifact {
    /// Its type name.
    pub const TYPE: &'static str = "tokens";
    /// The shard index, beside the shards.
    pub const INDEX_FILE: &'static str = "index.json";
    /// What the tokenize run did.
    pub const STATS_FILE: &'static str = "stats.json";

    /// Opens the shards of the artifact in `dir`: the directory itself, or its only
    /// subdirectory holding an `index.json`.
    pub fn open(dir: &Path) -> miette::Result<TokenShards> {
        if dir.join(Self::INDEX_FILE).is_file() {
            return Ok(TokenShards::open(dir)?);
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_diagnostic()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join(Self::INDEX_FILE).is_file())
            .collect();
        match found.len() {
            1 => Ok(TokenShards::open(&found.remove(0))?),
            _ => Err(miette!(
                help = "connect the output of a `tokenize` stage",
                "`{}` is not a token-shard artifact (no index.json)",
                dir.display()
            )),
        }
    }

    /// Every example of the artifact in `dir`, in order.
    pub fn read_examples(dir: &Path) -> miette::Result<Vec<Example>> {
        let shards = Self::open(dir)?;
        let examples: Result<Vec<Example>, _> = shards.iter().collect();
        Ok(examples?)
    }

    /// Writes the run's `stats` into `dir` (the shards are written as they are made).
    pub fn write_stats(dir: &Path, stats: &TokenizeStats) -> Result<(), JsonError> {
        write_json(&dir.join(Self::STATS_FILE), stats)
    }
}
