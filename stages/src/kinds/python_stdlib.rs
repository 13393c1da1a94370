//! Stage kind `python-stdlib`: offline training data cut from the Python standard library.
//!
//! The demo experiment must run with no hub access and no shared data, so its training data
//! comes from the standard library's own source ([`crate::python::stdlib_corpus`], which
//! holds the file selection and the extraction rules). The same files give both variants, so
//! only the filtering differs:
//!
//! - `mode = "functions"` ("textbook"): documented, self-contained top-level functions and
//!   methods of `min_lines..=max_lines` lines (default 4..=60) that score at least
//!   `min_score` (default 0.5) with the heuristic scorer.
//! - `mode = "chunks"` ("messy"): consecutive raw chunks of `chunk_lines` lines (default 40).
//!
//! The directory is the `stdlib` path reported by `python` (param, default `python3`), or
//! `stdlib_dir` when given (for tests and for pinning another tree).
//!
//! `limit` caps the number of records: when more are found, `limit` of them are drawn
//! uniformly with the experiment seed ([`crate::filter::select::sample`]); only then does the
//! seed enter the cache key.
//!
//! Output `records` (artifact type `records`):
//! - `records.jsonl` ([`crate::records`] format; fields as [`Cut`] describes them).
//! - `stats.json`: mode, python version, stdlib directory, file counts, records found before
//!   sampling, records written, and skipped counts by reason; the same counts go into the
//!   stage metadata.
//!
//! Fingerprint: the python version string plus [`StdlibFiles::listing_hash`] (relative path,
//! size and mtime of the selected files): only the selected files determine the output.

use std::path::{Path, PathBuf};

use miette::{miette, IntoDiagnostic};
use pipeline_engine::fingerprint::Fingerprint;
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use serde::{Deserialize, Serialize};

use crate::artifacts::RecordsArtifact;
use crate::filter::select::{sample, SampleOptions};
use crate::python::stdlib_corpus::{
    cut_records, Cut, FunctionRules, SkipCounts, StdlibFiles, StdlibLocation,
};
use crate::records::Record;

/// The `python-stdlib` stage kind (see the module docs).
pub struct PythonStdlib;

/// What to cut the standard library into.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum StdlibMode {
    /// Documented, self-contained functions and methods ("textbook" data).
    #[default]
    Functions,
    /// Raw consecutive line chunks ("messy" data).
    Chunks,
}

/// Parameters of `python-stdlib`; a field left out takes its [`Default`] value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PythonStdlibParams {
    /// The Python interpreter whose standard library is read (`python3`).
    pub python: String,
    /// Read this directory instead of asking `python` (tests, pinned trees).
    pub stdlib_dir: Option<PathBuf>,
    /// `functions` or `chunks`.
    pub mode: StdlibMode,
    /// Functions mode: smallest heuristic score kept (0.5).
    pub min_score: f64,
    /// Functions mode: fewest lines of a function, decorators included (4).
    pub min_lines: usize,
    /// Functions mode: most lines of a function, decorators included (60).
    pub max_lines: usize,
    /// Chunks mode: lines per chunk (40).
    pub chunk_lines: usize,
    /// Most records written; a seeded uniform sample is drawn when more are found.
    pub limit: Option<usize>,
}

impl Default for PythonStdlibParams {
    fn default() -> Self {
        Self {
            python: "python3".into(),
            stdlib_dir: None,
            mode: StdlibMode::default(),
            min_score: 0.5,
            min_lines: 4,
            max_lines: 60,
            chunk_lines: 40,
            limit: None,
        }
    }
}

const OUTPUTS: &[OutputSlot] = &[OutputSlot {
    name: "records",
    artifact: RecordsArtifact::TYPE,
    doc: "records.jsonl of stdlib functions or chunks, plus stats.json",
}];

impl Stage for PythonStdlib {
    type Params = PythonStdlibParams;
    const KIND: &'static str = "python-stdlib";
    const VERSION: &'static str = "1";
    const SUMMARY: &'static str =
        "records from the Python standard library: documented functions or raw chunks";

    fn inputs() -> &'static [InputSlot] {
        &[]
    }

    fn outputs() -> &'static [OutputSlot] {
        OUTPUTS
    }

    fn validate(p: &PythonStdlibParams) -> Result<(), String> {
        if p.python.trim().is_empty() && p.stdlib_dir.is_none() {
            return Err("`python` must name an interpreter (e.g. \"python3\")".into());
        }
        if !(0.0..=1.0).contains(&p.min_score) {
            return Err(format!(
                "`min_score` must be in [0, 1], got {}",
                p.min_score
            ));
        }
        if p.min_lines == 0 || p.min_lines > p.max_lines {
            return Err(format!(
                "need 1 <= `min_lines` <= `max_lines`, got {}..={}",
                p.min_lines, p.max_lines
            ));
        }
        if p.chunk_lines == 0 {
            return Err("`chunk_lines` must be at least 1".into());
        }
        if p.limit == Some(0) {
            return Err("`limit` must be at least 1 (leave it out for no limit)".into());
        }
        Ok(())
    }

    fn uses_seed(p: &PythonStdlibParams) -> bool {
        p.limit.is_some()
    }

    fn fingerprint(p: &PythonStdlibParams, fp: &mut Fingerprint) -> miette::Result<()> {
        let stdlib = locate(p, |path| fp.resolve(path))?;
        fp.value("python_version", &stdlib.version);
        fp.value("stdlib_listing", StdlibFiles::listing_hash(&stdlib.dir)?);
        Ok(())
    }

    fn run(p: &PythonStdlibParams, ctx: &mut StageContext) -> miette::Result<()> {
        let stdlib = locate(p, |path| ctx.resolve(path))?;
        let files = StdlibFiles::select(&stdlib.dir)?;
        let mut stats = Stats {
            mode: p.mode,
            python_version: stdlib.version.clone(),
            stdlib_dir: stdlib.dir.display().to_string(),
            files_selected: files.selected.len(),
            files_skipped: files.skipped,
            ..Default::default()
        };

        let cut = match p.mode {
            StdlibMode::Functions => Cut::Functions(FunctionRules {
                min_score: p.min_score,
                min_lines: p.min_lines,
                max_lines: p.max_lines,
            }),
            StdlibMode::Chunks => Cut::Chunks {
                lines: p.chunk_lines,
            },
        };
        ctx.progress().start(files.selected.len() as u64, "files");
        let mut records = cut_records(
            &stdlib.dir,
            &files.selected,
            cut,
            &mut stats.skipped,
            |done| {
                ctx.check_cancelled()?;
                ctx.progress().set_position(done as u64);
                Ok(())
            },
        )?;

        stats.found = records.len();
        if let Some(limit) = p.limit {
            if records.len() > limit {
                let texts: Vec<(&str, &str)> = records
                    .iter()
                    .map(|r| (r.provenance.source.as_str(), content_of(r)))
                    .collect();
                let (keep, _) = sample(
                    &texts,
                    &SampleOptions {
                        n: limit,
                        seed: ctx.seed(),
                    },
                );
                let mut all: Vec<Option<Record>> = records.into_iter().map(Some).collect();
                records = keep.into_iter().filter_map(|i| all[i].take()).collect();
                stats.seed = Some(ctx.seed());
            }
        }
        stats.limit = p.limit;
        stats.records = records.len();
        if records.is_empty() {
            return Err(miette!(
                help =
                    "check `stdlib_dir`/`python`, or lower `min_score` and widen the line bounds",
                "no records were extracted from {} ({} files read)",
                stdlib.dir.display(),
                stats.files_selected
            ));
        }

        RecordsArtifact::write(ctx.output_dir("records")?, &records, &stats)?;

        ctx.set_metadata("python_version", stats.python_version.clone());
        ctx.set_metadata("files", stats.files_selected as u64);
        ctx.set_metadata("found", stats.found as u64);
        ctx.set_metadata("records", stats.records as u64);
        ctx.set_metadata(
            "skipped",
            serde_json::to_value(&stats.skipped).into_diagnostic()?,
        );
        Ok(())
    }
}

fn content_of(r: &Record) -> &str {
    r.fields.get("content").unwrap_or("")
}

/// Finds the stdlib directory: `stdlib_dir` (resolved with `resolve`) or the interpreter's.
fn locate(
    p: &PythonStdlibParams,
    resolve: impl FnOnce(&Path) -> PathBuf,
) -> miette::Result<StdlibLocation> {
    match &p.stdlib_dir {
        Some(dir) => StdlibLocation::pinned(resolve(dir)),
        None => StdlibLocation::of_interpreter(&p.python),
    }
}

/// Contents of `stats.json`.
#[derive(Debug, Default, Serialize)]
struct Stats {
    mode: StdlibMode,
    python_version: String,
    stdlib_dir: String,
    files_selected: usize,
    /// Files and directories left out by the path rules, by rule.
    files_skipped: SkipCounts,
    /// Candidates (functions) or chunks dropped, by reason.
    skipped: SkipCounts,
    /// Records found before sampling.
    found: usize,
    /// Records written.
    records: usize,
    limit: Option<usize>,
    /// The seed of the sample, when one was drawn.
    seed: Option<u64>,
}
