//! The `read` kind: turns a dataset file or directory into a `records` artifact.
//!
//! Where from:
//! - with the optional `files` input connected (e.g. a `download` stage), `path` is a file or
//!   directory inside that artifact; left out, it is the artifact's only data file
//!   (`download.json` aside);
//! - with no input, `path` is an external file or directory (relative to the manifest),
//!   hashed into the cache key by content.
//!
//! Because the key is computed before inputs are known, an existing external `path` is
//! always hashed; with an input connected, give a path that only exists inside the artifact
//! (or none), not `.`.
//!
//! The other parameters are [`crate::readers::ReadOptions`]: `format`, `fields` (output <-
//! source field mapping), `limit`, `on_error = "fail" | "skip"`, and for directories
//! `include`, `extensions`, `text_field`, `path_field`.
//!
//! Artifact layout (`records`): `records.jsonl` (the [`crate::records`] format; provenance
//! `source` is the path as written, or the path inside the input artifact, never a cache
//! location) and `stats.json` ([`crate::readers::ReadStats`] plus `path`). Skipped records
//! (with `on_error = "skip"`) are counted with example reasons in `stats.json` and in the
//! stage metadata.

use std::path::{Path, PathBuf};

use miette::miette;
use pipeline_engine::fingerprint::Fingerprint;
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use serde::{Deserialize, Serialize};

use crate::artifacts::files::inside;
use crate::artifacts::{FilesArtifact, RecordsArtifact};
use crate::readers::{read_source, ErrorPolicy, Format, ReadOptions, ReadStats};
use crate::records::Fields;

fn default_text_field() -> String {
    ReadOptions::default().text_field
}

fn default_path_field() -> String {
    ReadOptions::default().path_field
}

/// Parameters of the `read` kind: [`ReadOptions`] plus `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadParams {
    /// A file or directory inside the `files` input, or an external one when no input is
    /// connected.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Which reader to use (default: detect).
    #[serde(default)]
    pub format: Format,
    /// Output field <- source field; empty keeps every field.
    #[serde(default)]
    pub fields: Fields,
    /// Keep only the first N records.
    #[serde(default)]
    pub limit: Option<u64>,
    /// `fail` (default) or `skip` bad records.
    #[serde(default)]
    pub on_error: ErrorPolicy,
    /// Directory sources: glob patterns to include.
    #[serde(default)]
    pub include: Vec<String>,
    /// Directory sources: file extensions to keep.
    #[serde(default)]
    pub extensions: Vec<String>,
    /// Directory sources: the field holding each file's text.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// Directory sources: the field holding each file's relative path.
    #[serde(default = "default_path_field")]
    pub path_field: String,
}

impl ReadParams {
    /// The reader options these parameters stand for.
    pub fn read_options(&self) -> ReadOptions {
        ReadOptions {
            format: self.format,
            fields: self.fields.clone(),
            limit: self.limit,
            on_error: self.on_error,
            include: self.include.clone(),
            extensions: self.extensions.clone(),
            text_field: self.text_field.clone(),
            path_field: self.path_field.clone(),
        }
    }
}

/// `stats.json` of a `records` artifact written by `read`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadArtifactStats {
    /// The path read, as written in the manifest or inside the input artifact.
    pub path: String,
    /// The reader's counts.
    #[serde(flatten)]
    pub stats: ReadStats,
}

/// The `read` stage kind.
pub struct Read;

const INPUTS: &[InputSlot] = &[InputSlot {
    name: "files",
    accepts: &[FilesArtifact::TYPE],
    required: false,
    many: false,
    doc: "a downloaded artifact to read `path` from",
}];

const OUTPUTS: &[OutputSlot] = &[OutputSlot {
    name: "records",
    artifact: RecordsArtifact::TYPE,
    doc: "records.jsonl + stats.json",
}];

impl Stage for Read {
    type Params = ReadParams;
    const KIND: &'static str = "read";
    // 2: `stats.json` ends in a newline (one JSON writer for every kind).
    const VERSION: &'static str = "2";
    const SUMMARY: &'static str =
        "read JSON / JSON Lines / Parquet / a source directory into records";

    fn inputs() -> &'static [InputSlot] {
        INPUTS
    }

    fn outputs() -> &'static [OutputSlot] {
        OUTPUTS
    }

    fn validate(p: &ReadParams) -> Result<(), String> {
        if p.limit == Some(0) {
            return Err("`limit = 0` would read nothing; leave it out to read everything".into());
        }
        Ok(())
    }

    fn fingerprint(p: &ReadParams, fp: &mut Fingerprint) -> miette::Result<()> {
        // Whether an input is connected is unknown here; an external path exists, a path
        // inside an artifact (normally) does not.
        if let Some(path) = &p.path {
            if fp.resolve(path).exists() {
                fp.file("path", path)?;
            }
        }
        Ok(())
    }

    fn run(p: &ReadParams, ctx: &mut StageContext) -> miette::Result<()> {
        let (full, label) = match (ctx.optional_input("files"), &p.path) {
            (Some(root), Some(rel)) => (inside(root, rel)?, rel.display().to_string()),
            (Some(root), None) => {
                let only = only_data_file(root)?;
                (root.join(&only), only)
            }
            (None, Some(path)) => (ctx.resolve(path), path.display().to_string()),
            (None, None) => {
                return Err(miette!(
                    help = "connect a `files` input (inputs = { files = \"download-stage\" }) or set `path`",
                    "stage `{}` has nothing to read",
                    ctx.stage_name()
                ))
            }
        };
        if !full.exists() {
            let help = match ctx.optional_input("files") {
                Some(root) => format!("the input artifact holds: {}", list_files(root).join(", ")),
                None => "relative paths start at the manifest's directory".to_string(),
            };
            return Err(miette!(
                help = help,
                "`{label}` does not exist ({})",
                full.display()
            ));
        }
        ctx.progress().set_message(format!("reading {label}"));
        let (mut records, stats) = read_source(&full, &p.read_options())?;
        ctx.check_cancelled()?;
        let prefix = full.display().to_string();
        for r in &mut records {
            r.provenance.source = relabel(&r.provenance.source, &prefix, &label);
        }
        ctx.set_metadata("records", stats.records);
        ctx.set_metadata("skipped", stats.skipped);
        ctx.set_metadata("files", stats.files);
        if !stats.skipped_examples.is_empty() {
            ctx.set_metadata(
                "skipped_examples",
                serde_json::Value::from(stats.skipped_examples.clone()),
            );
        }
        RecordsArtifact::write(
            ctx.output_dir("records")?,
            &records,
            &ReadArtifactStats { path: label, stats },
        )?;
        Ok(())
    }
}

/// Replaces the on-disk location in a provenance string by the user-facing label, so that
/// artifacts do not depend on where the cache lives.
fn relabel(source: &str, prefix: &str, label: &str) -> String {
    if source == prefix {
        label.to_string()
    } else if let Some(rest) = source.strip_prefix(prefix) {
        if rest.starts_with('/') {
            format!("{label}{rest}")
        } else {
            source.to_string()
        }
    } else {
        source.to_string()
    }
}

fn list_files(root: &Path) -> Vec<String> {
    crate::readers::walk_files(root)
        .map(|v| v.into_iter().map(|(rel, _)| rel).collect())
        .unwrap_or_default()
}

fn only_data_file(root: &Path) -> miette::Result<String> {
    let files: Vec<String> = list_files(root)
        .into_iter()
        .filter(|f| f != FilesArtifact::DOWNLOAD_JSON)
        .collect();
    match files.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(miette!(
            "the input artifact {} holds no data file",
            root.display()
        )),
        many => Err(miette!(
            help = "set `path` to one of them (or to a directory inside the artifact)",
            "the input artifact holds {} files, so `path` is needed: {}",
            many.len(),
            many.iter().take(20).cloned().collect::<Vec<_>>().join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relabel_hides_the_cache_location() {
        assert_eq!(
            relabel("/c/x/a.jsonl", "/c/x/a.jsonl", "a.jsonl"),
            "a.jsonl"
        );
        assert_eq!(relabel("/c/x/d/f.py", "/c/x/d", "d"), "d/f.py");
        assert_eq!(relabel("/c/x/dd/f.py", "/c/x/d", "d"), "/c/x/dd/f.py");
    }
}
