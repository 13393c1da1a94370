//! Hugging Face hub repositories, sharing the standard HF cache
//! (`<cache>/models--org--name/{refs,snapshots,blobs}`, locks in `<cache>/.locks/`) with every
//! other HF tool: hf-hub names the repositories and reads their info; [`super::hf_fetch`]
//! moves the bytes the way `huggingface_hub` does.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};
use serde::{Deserialize, Serialize};

use super::hf_fetch::{self, fetch_into_cache, write_ref, CachePaths, FetchError, HubClient};
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
    /// Files within the repository to fetch. Empty: the whole snapshot, narrowed by
    /// `allow_patterns` and `ignore_patterns`.
    #[serde(default)]
    pub files: Vec<String>,
    /// With `files` empty: fetch only repository paths matching one of these (fnmatch-style,
    /// `*` crosses `/`, a trailing `/` means everything below; as `snapshot_download`).
    #[serde(default)]
    pub allow_patterns: Vec<String>,
    /// With `files` empty: skip repository paths matching one of these.
    #[serde(default)]
    pub ignore_patterns: Vec<String>,
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

fn fetch_err(opts: &HfOptions, e: FetchError) -> DownloadError {
    match e {
        FetchError::Io { path, source } => DownloadError::Io { path, source },
        hub @ FetchError::Hub { .. } => hub_err(opts, hub),
    }
}

/// A pattern list as one matcher, with `huggingface_hub`'s conventions: `*` crosses `/` (as
/// fnmatch) and a pattern ending in `/` covers everything below that folder.
fn pattern_set(patterns: &[String]) -> Result<globset::GlobSet, String> {
    let mut set = globset::GlobSetBuilder::new();
    for p in patterns {
        let p = if p.ends_with('/') {
            format!("{p}*")
        } else {
            p.clone()
        };
        let glob = globset::GlobBuilder::new(&p)
            .literal_separator(false)
            .build()
            .map_err(|e| format!("`{p}` is not a valid pattern: {e}"))?;
        set.add(glob);
    }
    set.build().map_err(|e| e.to_string())
}

/// Checks the file selection of `opts` before anything is fetched.
pub fn check_selection(opts: &HfOptions) -> Result<(), String> {
    let has_patterns = !opts.allow_patterns.is_empty() || !opts.ignore_patterns.is_empty();
    if !opts.files.is_empty() && has_patterns {
        return Err(
            "give either `files` (exact paths) or `allow_patterns`/`ignore_patterns` (a filtered snapshot), not both".into(),
        );
    }
    for f in &opts.files {
        hf_fetch::check_repo_path(f)?;
    }
    pattern_set(&opts.allow_patterns)?;
    pattern_set(&opts.ignore_patterns)?;
    Ok(())
}

/// Every file path of the snapshot below `dir` (the offline listing of a snapshot).
fn list_snapshot(dir: &Path) -> Result<Vec<String>, DownloadError> {
    let mut names = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(super::io_err(&d)(e)),
        };
        for entry in entries {
            let path = entry.map_err(super::io_err(&d))?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                names.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// The repository paths to fetch: `files` as given, else the snapshot's listing (the hub's
/// at `commit`, or offline the cache's) filtered by the patterns.
fn selected_files(opts: &HfOptions, commit: &str) -> Result<Vec<String>, DownloadError> {
    if !opts.files.is_empty() {
        return Ok(opts.files.clone());
    }
    let listing = if opts.offline {
        list_snapshot(&repo_folder(opts).join("snapshots").join(commit))?
    } else {
        let repo = Repo::with_revision(opts.repo.clone(), repo_type(opts.kind), commit.to_string());
        let info = api(opts)?
            .repo(repo)
            .info()
            .map_err(|e| hub_err(opts, format!("listing the repository: {e}")))?;
        let mut names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        names.sort();
        names
    };
    let allow = pattern_set(&opts.allow_patterns).map_err(|e| hub_err(opts, e))?;
    let ignore = pattern_set(&opts.ignore_patterns).map_err(|e| hub_err(opts, e))?;
    let chosen: Vec<String> = listing
        .iter()
        .filter(|n| opts.allow_patterns.is_empty() || allow.is_match(n.as_str()))
        .filter(|n| !ignore.is_match(n.as_str()))
        .cloned()
        .collect();
    if chosen.is_empty() {
        let shown: Vec<&str> = listing.iter().take(20).map(String::as_str).collect();
        return Err(hub_err(
            opts,
            format!(
                "no file of commit {commit} matches allow_patterns {:?} / ignore_patterns {:?}; the snapshot{} holds: {}",
                opts.allow_patterns,
                opts.ignore_patterns,
                if opts.offline { " in the cache" } else { "" },
                if shown.is_empty() { "nothing".to_string() } else { shown.join(", ") }
            ),
        ));
    }
    Ok(chosen)
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

/// Makes the selected files of the resolved commit available in the HF cache and returns
/// their paths, writing the cache as `huggingface_hub` does (see [`hf_fetch`]). Offline, only
/// the cache is used and every missing file is listed in the error. `progress` receives byte
/// counts for files actually downloaded, starting with a zero count per file.
pub fn hf_download(
    opts: &HfOptions,
    mut progress: Option<&mut dyn FnMut(ProgressEvent)>,
) -> Result<HfDownload, DownloadError> {
    check_selection(opts).map_err(|e| hub_err(opts, e))?;
    let commit = hf_resolve(opts)?;
    let names = selected_files(opts, &commit)?;
    let cache = opts.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let repo_id = Repo::with_revision(opts.repo.clone(), repo_type(opts.kind), commit.clone());
    let paths = CachePaths::new(&cache, &repo_id.folder_name());
    let mut files = Vec::new();
    let mut missing = Vec::new();
    let mut online: Option<(HubClient, hf_hub::api::sync::ApiRepo)> = None;
    for name in &names {
        let cached = paths.pointer(&commit, name);
        if cached.is_file() {
            files.push(file_entry(name, cached)?);
            continue;
        }
        if opts.offline {
            missing.push(name.clone());
            continue;
        }
        if online.is_none() {
            // Downloads are pinned to the resolved commit so that a branch moving mid-run
            // cannot mix files from two commits.
            online = Some((
                HubClient::new(opts.token.clone().or_else(hub_token)),
                api(opts)?.repo(repo_id.clone()),
            ));
        }
        let Some((client, api_repo)) = online.as_ref() else {
            continue;
        };
        let meta = client
            .metadata(&api_repo.url(name), name)
            .map_err(|e| fetch_err(opts, e))?;
        if meta.commit != commit {
            return Err(hub_err(
                opts,
                format!(
                    "{name}: the hub served commit {} when asked for {commit}",
                    meta.commit
                ),
            ));
        }
        let mut noop = |_: ProgressEvent| {};
        let callback: &mut dyn FnMut(ProgressEvent) = match progress.as_mut() {
            Some(cb) => &mut **cb,
            None => &mut noop,
        };
        let path = fetch_into_cache(client, &paths, name, &meta, callback)
            .map_err(|e| fetch_err(opts, e))?;
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
        write_ref(&paths.repo_dir, &opts.revision, &commit).map_err(|e| fetch_err(opts, e))?;
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
