//! Small helpers shared by the data-side kinds (download, read, filter, tokenize).

use std::path::{Path, PathBuf};

use miette::{miette, IntoDiagnostic, WrapErr};
use serde::Serialize;

/// Writes `value` as pretty JSON to `path`.
pub(crate) fn write_json(path: &Path, value: &impl Serialize) -> miette::Result<()> {
    let text = serde_json::to_string_pretty(value).into_diagnostic()?;
    std::fs::write(path, text)
        .into_diagnostic()
        .wrap_err_with(|| format!("cannot write {}", path.display()))
}

/// Reads and parses the JSON file at `path`, naming the file in errors.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> miette::Result<T> {
    let text = std::fs::read_to_string(path)
        .into_diagnostic()
        .wrap_err_with(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        miette!(
            help = "the artifact is corrupt or from an incompatible version; re-run the stage that produced it",
            "{} is not valid: {e}",
            path.display()
        )
    })
}

/// Joins a relative path written in a manifest onto an artifact directory, refusing
/// absolute paths and `..` so that a parameter cannot reach outside the artifact.
pub(crate) fn inside(root: &Path, rel: &Path) -> miette::Result<PathBuf> {
    use std::path::Component;
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(miette!(
            help = "give a path relative to the input artifact, e.g. `data/train.jsonl`",
            "`{}` must be a relative path inside the input artifact",
            rel.display()
        ));
    }
    Ok(root.join(rel))
}

/// `/`-separated relative path of `path` under `root` (empty if equal or not under it).
pub(crate) fn rel_string(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .map(|p| {
            p.components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/")
        })
        .unwrap_or_default()
}
