//! One file of a hub repository into the shared Hugging Face cache, laid out and locked exactly
//! as Python's `huggingface_hub` does, so that both tools can fill and read one cache at once:
//!
//! - the content lives in `blobs/<etag>`, written through `blobs/<etag>.incomplete` (resumed
//!   with an HTTP range after an interruption) and renamed into place;
//! - `snapshots/<commit>/<path>` is a relative symlink to the blob;
//! - writers of a blob hold an exclusive `flock` on `<cache>/.locks/<repo folder>/<etag>.lock`
//!   (the lock `huggingface_hub`'s `FileLock` takes), so a Python download of the same file
//!   and ours exclude each other rather than interleave;
//! - only branches and tags get a `refs/<name>` file; a commit sha is its own name (a
//!   `refs/<sha>` file would show up as a ref in `huggingface_hub.scan_cache_dir`).
//!
//! hf-hub (0.4) names the hub's URLs and reads repository info; its own download writes
//! `blobs/<etag>.lock`, a `refs/<sha>` for pinned commits and panics on some server replies,
//! which is why the transfer itself is here.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::Digest;

use super::hf::ProgressEvent;

/// Attempts per request when the hub answers 429/5xx or the connection fails.
const ATTEMPTS: u32 = 4;

/// What the hub says about one file at one commit (its `HEAD` reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMetadata {
    /// The commit the file was served from (`X-Repo-Commit`).
    pub commit: String,
    /// The blob's name in the cache: `X-Linked-Etag` (LFS files: their sha256), else `ETag`
    /// (git files: their blob sha1), without quotes or a weak prefix.
    pub etag: String,
    /// Size in bytes, when the hub says (`X-Linked-Size`, else `Content-Length`).
    pub size: Option<u64>,
    /// Where the content is fetched from (a CDN for LFS files).
    pub location: String,
    /// Whether `location` is on the hub itself: the token goes only there, never to a CDN
    /// (as `huggingface_hub` drops it for another host).
    pub location_is_hub: bool,
}

/// Why one file could not be fetched. The caller adds the repository and revision.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The hub refused or failed the request.
    #[error("{file}: {message}")]
    Hub {
        /// Path within the repository.
        file: String,
        /// What happened, in words that say what to do.
        message: String,
    },
    /// A cache file could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The HTTP side of a fetch: endpoint-qualified URLs, the token and a shared agent.
pub struct HubClient {
    agent: ureq::Agent,
    token: Option<String>,
}

impl HubClient {
    /// A client that sends `token` (if any) as a bearer token, as the Python tools send HF_TOKEN.
    pub fn new(token: Option<String>) -> HubClient {
        let agent = ureq::AgentBuilder::new()
            // Redirects are followed by hand: relative ones (renamed repos) keep the token,
            // absolute ones (a CDN) are where the content is, and are fetched without it.
            .redirects(0)
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(60))
            .try_proxy_from_env(true)
            .build();
        HubClient { agent, token }
    }

    fn request(&self, method: &str, url: &str, with_token: bool) -> ureq::Request {
        let mut r = self
            .agent
            .request(method, url)
            .set(
                "User-Agent",
                concat!("pipeline/", env!("CARGO_PKG_VERSION")),
            )
            // The size the hub reports is of the raw bytes; a compressed reply would not match.
            .set("Accept-Encoding", "identity");
        if let (true, Some(t)) = (with_token, &self.token) {
            r = r.set("Authorization", &format!("Bearer {t}"));
        }
        r
    }

    /// Sends `make()` up to [`ATTEMPTS`] times while the hub is overloaded or unreachable,
    /// with exponential backoff; other statuses come back as they are.
    fn call(
        &self,
        file: &str,
        make: impl Fn() -> ureq::Request,
    ) -> Result<ureq::Response, FetchError> {
        let mut delay = Duration::from_millis(500);
        let mut attempt = 1;
        loop {
            let outcome = make().call();
            let retry = match &outcome {
                Err(ureq::Error::Status(code, _)) => *code == 429 || *code >= 500,
                Err(ureq::Error::Transport(_)) => true,
                Ok(_) => false,
            };
            if !retry || attempt == ATTEMPTS {
                // With redirects off, a 3xx reply is an `Ok`; errors are 4xx/5xx only.
                return match outcome {
                    Ok(r) => Ok(r),
                    Err(ureq::Error::Status(code, r)) => Err(status_error(file, code, r)),
                    Err(ureq::Error::Transport(t)) => Err(FetchError::Hub {
                        file: file.to_string(),
                        message: format!("connection failed after {attempt} attempt(s): {t}"),
                    }),
                };
            }
            tracing::info!("{file}: hub busy or unreachable, retrying in {delay:?}");
            std::thread::sleep(delay);
            delay *= 2;
            attempt += 1;
        }
    }

    /// The file's metadata at `url` (a `resolve/<commit>/<path>` URL), following relative
    /// redirects as `huggingface_hub` does.
    pub fn metadata(&self, url: &str, file: &str) -> Result<FileMetadata, FetchError> {
        let mut current = url.to_string();
        for _ in 0..10 {
            let reply = self.call(file, || self.request("HEAD", &current, true))?;
            let location = reply.header("Location").map(str::to_string);
            let is_redirect = (300..400).contains(&reply.status());
            if let (true, Some(loc)) = (is_redirect, &location) {
                if loc.starts_with('/') {
                    current = join_origin(&current, loc);
                    continue;
                }
            }
            let header = |name: &str| reply.header(name).map(str::to_string);
            let hub_error = |message: String| FetchError::Hub {
                file: file.to_string(),
                message,
            };
            let commit = header("X-Repo-Commit").ok_or_else(|| {
                hub_error("the hub's reply has no X-Repo-Commit header: is the endpoint a Hugging Face hub?".into())
            })?;
            let etag = header("X-Linked-Etag")
                .or_else(|| header("ETag"))
                .map(|e: String| normalize_etag(&e))
                .filter(|e| is_safe_etag(e))
                .ok_or_else(|| hub_error("the hub's reply has no usable ETag".into()))?;
            let size = header("X-Linked-Size")
                .or_else(|| (!is_redirect).then(|| header("Content-Length")).flatten())
                .and_then(|s| s.trim().parse().ok());
            let location = match (is_redirect, location) {
                (true, Some(loc)) => loc,
                _ => current.clone(),
            };
            let location_is_hub = origin_of(&location) == origin_of(url);
            return Ok(FileMetadata {
                commit,
                etag,
                size,
                location,
                location_is_hub,
            });
        }
        Err(FetchError::Hub {
            file: file.to_string(),
            message: "more than 10 redirects".into(),
        })
    }
}

fn status_error(file: &str, code: u16, reply: ureq::Response) -> FetchError {
    let body: String = reply
        .into_string()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    let message = match code {
        401 | 403 => format!(
            "access denied (HTTP {code}): a gated or private repo needs a token with access; set HF_TOKEN or run `huggingface-cli login`"
        ),
        404 => format!("not found (HTTP 404): check the file name and the revision ({body})"),
        _ => format!("HTTP {code}: {body}"),
    };
    FetchError::Hub {
        file: file.to_string(),
        message,
    }
}

/// `scheme://host[:port]` of `url` followed by `path`.
fn join_origin(url: &str, path: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let origin_end = url[after_scheme..]
        .find('/')
        .map_or(url.len(), |i| after_scheme + i);
    format!("{}{path}", &url[..origin_end])
}

/// `W/"abc"` and `"abc"` -> `abc`, as `huggingface_hub._normalize_etag`.
pub fn normalize_etag(etag: &str) -> String {
    etag.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// An etag becomes a file name: refuse anything that could leave `blobs/`.
fn is_safe_etag(etag: &str) -> bool {
    !etag.is_empty()
        && etag != "."
        && etag != ".."
        && etag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Refuses repository paths that would escape the snapshot (absolute, `..`, empty parts),
/// as `huggingface_hub` does.
pub fn check_repo_path(name: &str) -> Result<(), String> {
    let bad = name.is_empty()
        || name.starts_with('/')
        || name.contains('\\')
        || name
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..");
    if bad {
        Err(format!(
            "`{name}` is not a file path inside a repository (relative, `/`-separated, no `..`)"
        ))
    } else {
        Ok(())
    }
}

/// An exclusive `flock` held until dropped (the kernel releases it if the process dies).
struct BlobLock {
    _file: File,
}

impl BlobLock {
    /// Waits for the lock at `path`, saying every 10 s who it is waiting for.
    fn acquire(path: &Path) -> Result<BlobLock, FetchError> {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        // Group-writable, as huggingface_hub creates them, so users sharing a cache can wait.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o664)
            .open(path)
            .map_err(io(path))?;
        let started = std::time::Instant::now();
        let mut last_said = started;
        loop {
            // SAFETY: flock on a descriptor this function owns; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(BlobLock { _file: file });
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(FetchError::Io {
                    path: path.to_path_buf(),
                    source: err,
                });
            }
            if last_said.elapsed() >= Duration::from_secs(10) {
                tracing::info!(
                    "waiting for {} ({:.0?}): another process is downloading this file",
                    path.display(),
                    started.elapsed()
                );
                last_said = std::time::Instant::now();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Where one file of one repository lives in the cache.
pub struct CachePaths {
    /// `<cache>/<repo folder>`.
    pub repo_dir: PathBuf,
    /// `<cache>/.locks/<repo folder>`.
    pub locks_dir: PathBuf,
}

impl CachePaths {
    /// The paths for `repo_folder` (e.g. `models--org--name`) in `cache`.
    pub fn new(cache: &Path, repo_folder: &str) -> CachePaths {
        CachePaths {
            repo_dir: cache.join(repo_folder),
            locks_dir: cache.join(".locks").join(repo_folder),
        }
    }

    /// `snapshots/<commit>/<name>`.
    pub fn pointer(&self, commit: &str, name: &str) -> PathBuf {
        self.repo_dir.join("snapshots").join(commit).join(name)
    }
}

/// Makes `name` of `commit` present as `snapshots/<commit>/<name>` and returns that path.
/// `meta` is the hub's reply for it; `progress` hears of bytes actually transferred.
pub fn fetch_into_cache(
    client: &HubClient,
    paths: &CachePaths,
    name: &str,
    meta: &FileMetadata,
    progress: &mut dyn FnMut(ProgressEvent),
) -> Result<PathBuf, FetchError> {
    let blobs = paths.repo_dir.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
    let blob = blobs.join(&meta.etag);
    let pointer = paths.pointer(&meta.commit, name);
    let _lock = BlobLock::acquire(&paths.locks_dir.join(format!("{}.lock", meta.etag)))?;
    if !blob.is_file() {
        let incomplete = blobs.join(format!("{}.incomplete", meta.etag));
        transfer(client, name, meta, &incomplete, progress)?;
        std::fs::rename(&incomplete, &blob).map_err(io(&blob))?;
    }
    link_pointer(&blob, &pointer, name)?;
    Ok(pointer)
}

/// Downloads into `incomplete`, resuming from what an interrupted attempt left there, and
/// checks the size and (for LFS files, whose etag is their sha256) the content.
fn transfer(
    client: &HubClient,
    name: &str,
    meta: &FileMetadata,
    incomplete: &Path,
    progress: &mut dyn FnMut(ProgressEvent),
) -> Result<(), FetchError> {
    let total = meta.size.unwrap_or(0);
    let mut have = std::fs::metadata(incomplete).map_or(0, |m| m.len());
    if meta.size.is_some_and(|s| have > s) {
        have = 0;
    }
    let reply = client.call(name, || {
        let r = client.request("GET", &meta.location, meta.location_is_hub);
        if have > 0 {
            r.set("Range", &format!("bytes={have}-"))
        } else {
            r
        }
    })?;
    if (300..400).contains(&reply.status()) {
        return Err(FetchError::Hub {
            file: name.to_string(),
            message: format!(
                "the content URL redirected again (HTTP {}): not supported",
                reply.status()
            ),
        });
    }
    // A server that ignores the range sends everything: start over.
    let resumed = have > 0 && reply.status() == 206;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(incomplete)
        .map_err(io(incomplete))?;
    let mut done = if resumed { have } else { 0 };
    progress(ProgressEvent {
        file: name.to_string(),
        downloaded: 0,
        total,
    });
    let mut reader = reply.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).map_err(|e| FetchError::Hub {
            file: name.to_string(),
            message: format!(
                "the transfer broke off after {done} bytes ({e}); run again to resume it"
            ),
        })?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).map_err(io(incomplete))?;
        done += n as u64;
        progress(ProgressEvent {
            file: name.to_string(),
            downloaded: done,
            total,
        });
    }
    file.sync_all().map_err(io(incomplete))?;
    drop(file);
    if let Some(size) = meta.size {
        if done != size {
            return Err(FetchError::Hub {
                file: name.to_string(),
                message: format!(
                    "received {done} bytes, the hub announced {size}; run again to resume"
                ),
            });
        }
    }
    if is_sha256(&meta.etag) {
        let digest = sha256_file(incomplete)?;
        if digest != meta.etag.to_ascii_lowercase() {
            std::fs::remove_file(incomplete).map_err(io(incomplete))?;
            return Err(FetchError::Hub {
                file: name.to_string(),
                message: format!(
                    "content sha256 {digest} does not match the hub's {}: the download was corrupted and is discarded; run again",
                    meta.etag
                ),
            });
        }
    }
    Ok(())
}

fn origin_of(url: &str) -> String {
    join_origin(url, "")
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit())
}

fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut f, &mut hasher).map_err(io(path))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// `pointer` -> the blob, as a relative symlink (`../../blobs/<etag>` for a top-level file),
/// replacing whatever was there.
fn link_pointer(blob: &Path, pointer: &Path, name: &str) -> Result<(), FetchError> {
    if let Some(dir) = pointer.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let depth = name.split('/').count() + 1;
    let mut target = PathBuf::new();
    for _ in 0..depth {
        target.push("..");
    }
    target.push("blobs");
    if let Some(etag) = blob.file_name() {
        target.push(etag);
    }
    match std::fs::remove_file(pointer) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(pointer)(e)),
    }
    match std::os::unix::fs::symlink(&target, pointer) {
        Ok(()) => Ok(()),
        // Another process linked it between the remove and here: fine if it is the same blob.
        Err(e)
            if e.kind() == std::io::ErrorKind::AlreadyExists
                && std::fs::canonicalize(pointer).ok() == std::fs::canonicalize(blob).ok() =>
        {
            Ok(())
        }
        Err(e) => Err(io(pointer)(e)),
    }
}

/// Records `revision -> commit` in `refs/` (atomically, and only when it changed), as the
/// Python tools do for branches and tags. A commit sha gets no ref.
pub fn write_ref(repo_dir: &Path, revision: &str, commit: &str) -> Result<(), FetchError> {
    if revision == commit {
        return Ok(());
    }
    let path = repo_dir.join("refs").join(revision);
    if std::fs::read_to_string(&path).is_ok_and(|old| old == commit) {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(repo_dir);
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
    tmp.write_all(commit.as_bytes()).map_err(io(&path))?;
    tmp.persist(&path).map_err(|e| FetchError::Io {
        path: path.clone(),
        source: e.error,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_normalized_and_must_be_file_names() {
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"abc\""), "abc");
        assert!(is_safe_etag("0123abcd"));
        assert!(!is_safe_etag("../x"));
        assert!(!is_safe_etag(".."));
        assert!(!is_safe_etag(""));
    }

    #[test]
    fn repo_paths_stay_inside_the_snapshot() {
        assert!(check_repo_path("config.json").is_ok());
        assert!(check_repo_path("a/b.txt").is_ok());
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a\\b",
            "./a",
        ] {
            assert!(check_repo_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_redirects_keep_the_origin() {
        assert_eq!(
            join_origin("http://127.0.0.1:8/a/resolve/x/f", "/b/resolve/x/f"),
            "http://127.0.0.1:8/b/resolve/x/f"
        );
        assert_eq!(origin_of("https://h.example/x/y"), "https://h.example");
    }
}
