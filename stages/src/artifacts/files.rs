//! The `files` artifact: whatever a download fetched, at its path inside the source (a wheel
//! member, a hub repo file, a local file or directory), plus `download.json` ([`DownloadMeta`]:
//! where it came from and every file with its size and blake3).

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::json::{read_json, write_json, JsonError};

/// The `files` artifact.
pub struct FilesArtifact;

/// One file of the artifact, as listed in `download.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactFile {
    /// `/`-separated path inside the artifact.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// blake3 of the content, hex.
    pub blake3: String,
}

/// The content of `download.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadMeta {
    /// The `source` parameter as written.
    pub source: String,
    /// `pip`, `hf` or `path`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The pinned version (pip), the commit (hf) or the content hash (path).
    pub resolved_revision: String,
    /// pip: the wheel's file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wheel_file: Option<String>,
    /// pip: sha256 of the wheel, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wheel_sha256: Option<String>,
    /// Every file of the artifact except `download.json`, sorted by path.
    pub files: Vec<ArtifactFile>,
}

impl FilesArtifact {
    /// Its type name.
    pub const TYPE: &'static str = "files";
    /// Where the files came from, and their list.
    pub const DOWNLOAD_JSON: &'static str = "download.json";

    /// Reads `download.json` of the artifact in `dir`.
    pub fn read_meta(dir: &Path) -> Result<DownloadMeta, JsonError> {
        read_json(&dir.join(Self::DOWNLOAD_JSON))
    }

    /// Writes `download.json` into `dir` (the files themselves are already there).
    pub fn write_meta(dir: &Path, meta: &DownloadMeta) -> Result<(), JsonError> {
        write_json(&dir.join(Self::DOWNLOAD_JSON), meta)
    }
}

/// Joins a relative path written in a manifest onto an artifact directory, refusing absolute
/// paths and `..` so that a parameter cannot reach outside the artifact.
pub fn inside(root: &Path, rel: &Path) -> miette::Result<PathBuf> {
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(miette::miette!(
            help = "give a path relative to the input artifact, e.g. `data/train.jsonl`",
            "`{}` must be a relative path inside the input artifact",
            rel.display()
        ));
    }
    Ok(root.join(rel))
}

/// `/`-separated relative path of `path` under `root` (empty if equal or not under it).
pub fn rel_string(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .map(|p| {
            p.components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/")
        })
        .unwrap_or_default()
}
