//! Hugging Face hub repositories through hf-hub's sync API, sharing the standard HF cache
//! (`<cache>/models--org--name/{refs,snapshots,blobs}`) with every other HF tool.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use serde::{Deserialize, Serialize};

use super::DownloadError;

/// What kind of hub repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RepoKind {
    /// A model repository.
    #[default]
    Model,
    /// A dataset repository.
    Dataset,
}

fn default_revision() -> String {
    "main".into()
}

/// Options for [`hf_resolve`] and [`hf_download`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HfOptions {
    /// `org/name`.
    pub repo: String,
    /// Model or dataset.
    #[serde(default)]
    pub kind: RepoKind,
    /// Branch, tag or full commit sha.
    #[serde(default = "default_revision")]
    pub revision: String,
    /// Files within the repository to fetch.
    #[serde(default)]
    pub files: Vec<String>,
    /// Use only the local cache; never touch the network.
    #[serde(default)]
    pub offline: bool,
    /// The cache directory; default from the environment, see [`default_cache_dir`].
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// The hub endpoint; default from `HF_ENDPOINT`, else hf-hub's default.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The access token sent to the hub; default [`hub_token`] (`HF_TOKEN`, else the token
    /// file `huggingface-cli login` writes). Never part of a key or a record.
    #[serde(skip)]
    pub token: Option<String>,
}

/// A file available in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HfFile {
    /// Path within the repository.
    pub name: String,
    /// Its path in the cache snapshot.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
}

/// What [`hf_download`] produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HfDownload {
    /// `org/name`.
    pub repo: String,
    /// Model or dataset.
    pub kind: RepoKind,
    /// The revision asked for.
    pub revision: String,
    /// The commit it resolved to.
    pub commit: String,
    /// The files, in the order asked for.
    pub files: Vec<HfFile>,
}

/// Download progress for one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressEvent {
    /// Path within the repository.
    pub file: String,
    /// Bytes received so far.
    pub downloaded: u64,
    /// Total size in bytes.
    pub total: u64,
}

/// The HF cache directory from the same variables the Python tools read:
/// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn default_cache_dir() -> PathBuf {
    cache_dir_from(
        std::env::var_os("HF_HUB_CACHE").map(PathBuf::from),
        std::env::var_os("HF_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

/// [`default_cache_dir`]'s rule on explicit values (testable without touching the
/// process environment).
pub fn cache_dir_from(
    hub_cache: Option<PathBuf>,
    hf_home: Option<PathBuf>,
    home: Option<PathBuf>,
) -> PathBuf {
    if let Some(p) = hub_cache.filter(|p| !p.as_os_str().is_empty()) {
        return p;
    }
    if let Some(p) = hf_home.filter(|p| !p.as_os_str().is_empty()) {
        return p.join("hub");
    }
    home.unwrap_or_else(|| PathBuf::from("."))
        .join(".cache/huggingface/hub")
}

fn repo_type(kind: RepoKind) -> RepoType {
    match kind {
        RepoKind::Model => RepoType::Model,
        RepoKind::Dataset => RepoType::Dataset,
    }
}

fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// The repository's folder in the cache, e.g. `models--org--name`.
pub fn repo_folder(opts: &HfOptions) -> PathBuf {
    let cache = opts.cache_dir.clone().unwrap_or_else(default_cache_dir);
    cache.join(Repo::new(opts.repo.clone(), repo_type(opts.kind)).folder_name())
}

fn cached_commit(opts: &HfOptions) -> Option<String> {
    let folder = repo_folder(opts);
    if is_commit(&opts.revision) {
        return folder
            .join("snapshots")
            .join(&opts.revision)
            .is_dir()
            .then(|| opts.revision.clone());
    }
    let sha = std::fs::read_to_string(folder.join("refs").join(&opts.revision)).ok()?;
    let sha = sha.trim();
    is_commit(sha).then(|| sha.to_string())
}

fn hub_err(opts: &HfOptions, message: impl std::fmt::Display) -> DownloadError {
    DownloadError::Hub {
        repo: opts.repo.clone(),
        revision: opts.revision.clone(),
        message: message.to_string(),
    }
}

/// The token the Python tools would send: `HF_TOKEN` if set and not empty, else the token file
/// under `HF_HOME` (`~/.cache/huggingface/token`), as `huggingface_hub` reads them.
pub fn hub_token() -> Option<String> {
    token_from(
        std::env::var("HF_TOKEN").ok(),
        hf_hub::Cache::from_env().token(),
    )
}

/// [`hub_token`]'s precedence: the variable, then the file (blank values count as unset).
pub fn token_from(variable: Option<String>, file: Option<String>) -> Option<String> {
    [variable, file]
        .into_iter()
        .flatten()
        .map(|t| t.trim().to_string())
        .find(|t| !t.is_empty())
}

/// Whether `HF_HUB_OFFLINE` asks for the cache only (`1`, `true`, `yes` or `on`), as the
/// Python tools read it.
pub fn hub_offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

fn api(opts: &HfOptions) -> Result<hf_hub::api::sync::Api, DownloadError> {
    let cache = opts.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let mut b = ApiBuilder::from_env()
        .with_cache_dir(cache)
        .with_token(opts.token.clone().or_else(hub_token))
        .with_progress(false);
    if let Some(e) = &opts.endpoint {
        b = b.with_endpoint(e.clone());
    }
    b.build().map_err(|e| hub_err(opts, e))
}

/// Resolves `opts.revision` to a commit sha, for metadata and the engine's cache key.
///
/// A full sha resolves to itself without the network; offline, branches and tags
/// resolve through the cache's `refs/`; online, through the hub's repo info.
pub fn hf_resolve(opts: &HfOptions) -> Result<String, DownloadError> {
    if is_commit(&opts.revision) && !opts.offline {
        return Ok(opts.revision.to_lowercase());
    }
    if opts.offline {
        return cached_commit(opts).ok_or_else(|| DownloadError::NotCached {
            repo: opts.repo.clone(),
            revision: opts.revision.clone(),
            cache: opts.cache_dir.clone().unwrap_or_else(default_cache_dir),
        });
    }
    let repo = Repo::with_revision(
        opts.repo.clone(),
        repo_type(opts.kind),
        opts.revision.clone(),
    );
    let info = api(opts)?.repo(repo).info().map_err(|e| hub_err(opts, e))?;
    if !is_commit(&info.sha) {
        return Err(hub_err(
            opts,
            format!("hub returned an invalid commit `{}`", info.sha),
        ));
    }
    Ok(info.sha)
}

struct ProgressAdapter<'a> {
    file: String,
    downloaded: u64,
    total: u64,
    callback: &'a mut dyn FnMut(ProgressEvent),
}

impl hf_hub::api::Progress for ProgressAdapter<'_> {
    fn init(&mut self, size: usize, _filename: &str) {
        self.total = size as u64;
        self.downloaded = 0;
        self.emit();
    }
    fn update(&mut self, size: usize) {
        self.downloaded += size as u64;
        self.emit();
    }
    fn finish(&mut self) {}
}

impl ProgressAdapter<'_> {
    fn emit(&mut self) {
        (self.callback)(ProgressEvent {
            file: self.file.clone(),
            downloaded: self.downloaded,
            total: self.total,
        });
    }
}

fn file_entry(name: &str, path: PathBuf) -> Result<HfFile, DownloadError> {
    // Snapshot entries are symlinks into blobs/; metadata follows them.
    let size = std::fs::metadata(&path)
        .map_err(super::io_err(&path))?
        .len();
    Ok(HfFile {
        name: name.to_string(),
        path,
        size,
    })
}

/// Makes `opts.files` of the resolved commit available in the HF cache and returns their
/// paths. Offline, only the cache is used and every missing file is listed in the error.
/// `progress` receives byte counts for files actually downloaded.
pub fn hf_download(
    opts: &HfOptions,
    mut progress: Option<&mut dyn FnMut(ProgressEvent)>,
) -> Result<HfDownload, DownloadError> {
    let commit = hf_resolve(opts)?;
    let snapshot = repo_folder(opts).join("snapshots").join(&commit);
    let mut files = Vec::new();
    let mut missing = Vec::new();
    let mut api_repo = None;
    for name in &opts.files {
        let cached = snapshot.join(name);
        if cached.is_file() {
            files.push(file_entry(name, cached)?);
            continue;
        }
        if opts.offline {
            missing.push(name.clone());
            continue;
        }
        if api_repo.is_none() {
            // Pin downloads to the resolved commit so that a branch moving mid-run
            // cannot mix files from two commits.
            let repo = Repo::with_revision(opts.repo.clone(), repo_type(opts.kind), commit.clone());
            api_repo = Some(api(opts)?.repo(repo));
        }
        let Some(r) = api_repo.as_ref() else { continue };
        let mut noop = |_: ProgressEvent| {};
        let callback: &mut dyn FnMut(ProgressEvent) = match progress.as_mut() {
            Some(cb) => &mut **cb,
            None => &mut noop,
        };
        let adapter = ProgressAdapter {
            file: name.clone(),
            downloaded: 0,
            total: 0,
            callback,
        };
        let path = r
            .download_with_progress(name, adapter)
            .map_err(|e| hub_err(opts, format!("{name}: {e}")))?;
        files.push(file_entry(name, path)?);
    }
    if !missing.is_empty() {
        return Err(DownloadError::MissingFiles {
            repo: opts.repo.clone(),
            commit,
            missing,
        });
    }
    if !opts.offline && !is_commit(&opts.revision) {
        // Record branch -> commit like the Python tools do, so a later offline run resolves it.
        let cache = Cache::new(opts.cache_dir.clone().unwrap_or_else(default_cache_dir));
        let repo = Repo::with_revision(
            opts.repo.clone(),
            repo_type(opts.kind),
            opts.revision.clone(),
        );
        cache
            .repo(repo)
            .create_ref(&commit)
            .map_err(super::io_err(repo_folder(opts).join("refs")))?;
    }
    Ok(HfDownload {
        repo: opts.repo.clone(),
        kind: opts.kind,
        revision: opts.revision.clone(),
        commit,
        files,
    })
}

/// Whether `path` lies inside the cache snapshot of this repo (used by tests and to
/// tell the engine that the artifact is a reference into a shared cache).
pub fn in_cache(opts: &HfOptions, path: &Path) -> bool {
    path.starts_with(repo_folder(opts))
}
