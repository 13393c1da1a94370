//! Training records cut from the Python standard library's own source, the one corpus of
//! Python every machine with `python3` has (the `python-stdlib` stage kind drives this).
//!
//! - [`StdlibLocation`]: the directory, given or asked of an interpreter.
//! - [`StdlibFiles`]: the `.py` files to read, in a fixed order, and a hash of their listing.
//! - [`FunctionExtractor`] ("textbook" data): top-level functions and methods (decorators
//!   included, methods dedented) that have a docstring, span `min_lines..=max_lines` lines,
//!   are self-contained ([`super::functions`]), have no syntax error (any error tree-sitter
//!   reports, inside strings too) and score at least `min_score` with the heuristic scorer
//!   ([`crate::filter::heuristic`]). A docstring of implicitly concatenated literals counts as
//!   none, since the instruction is made from one literal's first sentence.
//! - [`chunk_records`] ("messy" data): consecutive raw chunks of the same files, unfiltered
//!   except that whitespace-only chunks are dropped.
//!
//! Records that are not kept are counted by reason in [`SkipCounts`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use miette::{miette, IntoDiagnostic};
use serde::Serialize;

use super::functions::{functions_and_methods, FunctionDef, ModuleBindings};
use super::{
    dedented_text, docstring, docstring_summary, has_syntax_error, node_text, ErrorScope,
    PythonParser,
};
use crate::filter::heuristic::{HeuristicOptions, HeuristicScorer};
use crate::records::{Fields, Provenance, Record};

/// Counts of things left out, by reason (serialised as a JSON object).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct SkipCounts(pub BTreeMap<String, usize>);

impl SkipCounts {
    /// Counts one more `reason`.
    pub fn add(&mut self, reason: &str) {
        *self.0.entry(reason.to_string()).or_default() += 1;
    }

    /// The count of `reason` (0 if never counted).
    pub fn get(&self, reason: &str) -> usize {
        self.0.get(reason).copied().unwrap_or(0)
    }
}

/// The standard library to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StdlibLocation {
    /// The directory holding the standard library's `.py` files.
    pub dir: PathBuf,
    /// The interpreter's `sys.version`, or `stdlib_dir` for a directory given directly.
    pub version: String,
}

impl StdlibLocation {
    /// A directory given directly (tests, pinned trees); its version reads `stdlib_dir`.
    pub fn pinned(dir: PathBuf) -> miette::Result<Self> {
        if !dir.is_dir() {
            return Err(miette!(
                help = "point `stdlib_dir` at a directory of Python files, or remove it to use `python`",
                "`stdlib_dir` {} is not a directory",
                dir.display()
            ));
        }
        Ok(Self {
            dir,
            version: "stdlib_dir".into(),
        })
    }

    /// The `stdlib` path and `sys.version` that the interpreter `python` reports.
    pub fn of_interpreter(python: &str) -> miette::Result<Self> {
        let output = Command::new(python)
            .args([
                "-c",
                "import sysconfig,sys; print(sysconfig.get_paths()['stdlib']); print(sys.version)",
            ])
            .output()
            .map_err(|e| {
                miette!(
                    help = "install Python 3 (e.g. `apt-get install python3`) or set `python` to an interpreter's path",
                    "cannot run `{python}`: {e}"
                )
            })?;
        if !output.status.success() {
            return Err(miette!(
                help = "set `python` to a working Python 3 interpreter",
                "`{python}` failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let mut lines = stdout.lines();
        let dir = lines.next().map(str::trim).unwrap_or_default();
        let version = lines.next().map(str::trim).unwrap_or_default();
        if dir.is_empty() || !Path::new(dir).is_dir() {
            return Err(miette!(
                help = "set `stdlib_dir` to the directory holding the standard library's .py files",
                "`{python}` reported no usable stdlib directory (got {dir:?})"
            ));
        }
        Ok(Self {
            dir: PathBuf::from(dir),
            version: version.to_string(),
        })
    }
}

/// Directory names never descended into: tests, GUI and bundled third-party code.
const SKIP_DIRS: &[&str] = &[
    "__pycache__",
    "dist-packages",
    "ensurepip",
    "idlelib",
    "lib2to3",
    "site-packages",
    "test",
    "tests",
    "tkinter",
    "turtledemo",
];

/// The `.py` files of a standard library worth reading.
///
/// Every `.py` under the directory, skipping the directories `test`, `tests`, `idlelib`,
/// `lib2to3`, `site-packages`, `dist-packages`, `tkinter`, `turtledemo`, `ensurepip`,
/// `__pycache__`, and any file or directory whose name contains `_test` or starts with
/// `test_`. Symlinks are not followed.
#[derive(Debug, Clone, Default)]
pub struct StdlibFiles {
    /// Paths relative to the directory, sorted by their `/`-joined form.
    pub selected: Vec<PathBuf>,
    /// Files and directories left out, by rule (`excluded_dir`, `test_name`).
    pub skipped: SkipCounts,
}

impl StdlibFiles {
    /// Walks `root` and selects its files.
    pub fn select(root: &Path) -> miette::Result<Self> {
        let mut files = Self::default();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let dir = root.join(&rel);
            let entries = std::fs::read_dir(&dir).map_err(|e| {
                miette!(
                    help = "check that the stdlib directory is readable",
                    "cannot list {}: {e}",
                    dir.display()
                )
            })?;
            for entry in entries {
                let entry = entry.map_err(|e| miette!("cannot list {}: {e}", dir.display()))?;
                let Ok(ty) = entry.file_type() else { continue };
                let name = entry.file_name().to_string_lossy().into_owned();
                if ty.is_symlink() {
                    continue;
                }
                if ty.is_dir() {
                    match skip_reason(&name, true) {
                        Some(reason) => files.skipped.add(reason),
                        None => stack.push(rel.join(&name)),
                    }
                } else if ty.is_file() && name.ends_with(".py") {
                    match skip_reason(&name, false) {
                        Some(reason) => files.skipped.add(reason),
                        None => files.selected.push(rel.join(&name)),
                    }
                }
            }
        }
        // Sort on the '/'-joined string so the order is the same on every platform.
        files.selected.sort_by_key(|p| slash_path(p));
        Ok(files)
    }

    /// blake3 of "path\tsize\tmtime_ns\n" for every selected file under `root`, in order:
    /// what decides the records, for one `stat` per file (hashing the whole directory would
    /// also walk `site-packages`).
    pub fn listing_hash(root: &Path) -> miette::Result<String> {
        let files = Self::select(root)?;
        let mut h = blake3::Hasher::new();
        for rel in &files.selected {
            let path = root.join(rel);
            let meta = std::fs::metadata(&path)
                .map_err(|e| miette!("cannot stat {}: {e}", path.display()))?;
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            h.update(format!("{}\t{}\t{mtime}\n", slash_path(rel), meta.len()).as_bytes());
        }
        Ok(h.finalize().to_hex().to_string())
    }
}

fn skip_reason(name: &str, is_dir: bool) -> Option<&'static str> {
    if is_dir && SKIP_DIRS.contains(&name) {
        Some("excluded_dir")
    } else if name.contains("_test") || name.starts_with("test_") {
        Some("test_name")
    } else {
        None
    }
}

/// A relative path with `/` separators on every platform.
fn slash_path(p: &Path) -> String {
    p.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// The text of `root/rel` with `\r\n` line ends made `\n`; `None` when it is not UTF-8 (a few
/// stdlib files deliberately use legacy encodings; they are not worth teaching from).
pub fn read_source(root: &Path, rel: &Path) -> Option<String> {
    let text = std::fs::read_to_string(root.join(rel)).ok()?;
    Some(text.replace("\r\n", "\n"))
}

/// Consecutive `lines`-line pieces of `text` (of file `rel`) as records with fields `content`
/// and `path`, whitespace-only ones counted as `blank_chunk` instead. Provenance: the path and
/// the piece's 1-based first line.
pub fn chunk_records(
    rel: &Path,
    text: &str,
    lines: usize,
    out: &mut Vec<Record>,
    skipped: &mut SkipCounts,
) {
    let path = slash_path(rel);
    let all: Vec<&str> = text.split_inclusive('\n').collect();
    for (i, piece) in all.chunks(lines.max(1)).enumerate() {
        let content: String = piece.concat();
        if content.trim().is_empty() {
            skipped.add("blank_chunk");
            continue;
        }
        let fields: Fields = [("content", content), ("path", path.clone())]
            .into_iter()
            .collect();
        out.push(record_at(fields, &path, i * lines));
    }
}

/// A record of file `path` whose text starts on the 0-based line `row`.
fn record_at(fields: Fields, path: &str, row: usize) -> Record {
    let provenance = Provenance {
        source: path.to_string(),
        line: Some(row as u64 + 1),
        row: None,
    };
    Record::new(fields, provenance)
}

/// What to cut the files into.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cut {
    /// Documented, self-contained functions and methods ([`FunctionExtractor::extract`]
    /// names the fields).
    Functions(FunctionRules),
    /// Raw consecutive chunks of `lines` lines ([`chunk_records`] names the fields).
    Chunks {
        /// Lines per chunk.
        lines: usize,
    },
}

/// Cuts the files `files` (relative to `dir`, read in order) into records, counting what is
/// left out in `skipped` (files that are not UTF-8 as `file_not_utf8`). `progress` is called
/// with the number of files done before each file and once at the end; an error from it
/// (cancellation) stops the cut.
pub fn cut_records(
    dir: &Path,
    files: &[PathBuf],
    cut: Cut,
    skipped: &mut SkipCounts,
    mut progress: impl FnMut(usize) -> miette::Result<()>,
) -> miette::Result<Vec<Record>> {
    enum Cutter {
        Functions(FunctionExtractor),
        Chunks(usize),
    }
    let mut cutter = match cut {
        Cut::Functions(rules) => Cutter::Functions(FunctionExtractor::new(rules)?),
        Cut::Chunks { lines } => Cutter::Chunks(lines),
    };
    let mut records = Vec::new();
    for (done, rel) in files.iter().enumerate() {
        progress(done)?;
        let Some(text) = read_source(dir, rel) else {
            skipped.add("file_not_utf8");
            continue;
        };
        match &mut cutter {
            Cutter::Functions(extractor) => extractor.extract(rel, &text, &mut records, skipped),
            Cutter::Chunks(lines) => chunk_records(rel, &text, *lines, &mut records, skipped),
        }
    }
    progress(files.len())?;
    Ok(records)
}

/// The bounds a function must meet to become a record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FunctionRules {
    /// Smallest heuristic score kept.
    pub min_score: f64,
    /// Fewest lines (decorators included).
    pub min_lines: usize,
    /// Most lines (decorators included).
    pub max_lines: usize,
}

/// Cuts documented, self-contained functions out of module sources (see the module docs).
pub struct FunctionExtractor {
    parser: PythonParser,
    scorer: HeuristicScorer,
    rules: FunctionRules,
}

/// A function that passed every check.
struct Accepted {
    name: String,
    source: String,
    instruction: String,
}

impl FunctionExtractor {
    /// An extractor applying `rules`.
    pub fn new(rules: FunctionRules) -> miette::Result<Self> {
        Ok(Self {
            parser: PythonParser::new()?,
            scorer: HeuristicScorer::new(HeuristicOptions::default()).into_diagnostic()?,
            rules,
        })
    }

    /// Appends a record per accepted function of `text` (file `rel`) to `out` and counts the
    /// others by reason. Fields: `instruction` ("Write a Python function `name(args)` that
    /// <first sentence of the docstring, first letter lowercased unless it starts an
    /// acronym>"), `output` and `content` (both the dedented function source), `path` and
    /// `name` (`Class.method` for methods). Provenance: the path and the 1-based first line.
    pub fn extract(
        &mut self,
        rel: &Path,
        text: &str,
        out: &mut Vec<Record>,
        skipped: &mut SkipCounts,
    ) {
        let Some(tree) = self.parser.parse(text) else {
            skipped.add("file_does_not_parse");
            return;
        };
        let root = tree.root_node();
        let module = ModuleBindings::of_module(root, text);
        let path = slash_path(rel);
        for function in functions_and_methods(root) {
            match self.check(&function, text, &module) {
                Ok(accepted) => {
                    let qualified = match function.class_name(text) {
                        Some(class) => format!("{class}.{}", accepted.name),
                        None => accepted.name,
                    };
                    let fields: Fields = [
                        ("instruction", accepted.instruction),
                        ("output", accepted.source.clone()),
                        ("content", accepted.source),
                        ("path", path.clone()),
                        ("name", qualified),
                    ]
                    .into_iter()
                    .collect();
                    out.push(record_at(
                        fields,
                        &path,
                        function.outer.start_position().row,
                    ));
                }
                Err(reason) => skipped.add(reason),
            }
        }
    }

    /// The accepted function, or the reason for rejecting it.
    fn check(
        &mut self,
        function: &FunctionDef,
        text: &str,
        module: &ModuleBindings,
    ) -> Result<Accepted, &'static str> {
        let name = function.name(text).ok_or("no_name")?.to_string();
        let lines = function.lines();
        if lines < self.rules.min_lines {
            return Err("too_short");
        }
        if lines > self.rules.max_lines {
            return Err("too_long");
        }
        let doc = docstring(function.definition)
            .filter(|d| d.kind() == "string")
            .ok_or("no_docstring")?;
        let summary = docstring_summary(node_text(doc, text)).ok_or("empty_docstring")?;
        if has_syntax_error(function.definition, ErrorScope::Anywhere) {
            return Err("syntax_error");
        }
        if !function.is_self_contained(text, module) {
            return Err("not_self_contained");
        }
        let source = dedented_text(text, function.outer);
        // Re-parse the extracted text: dedenting must not have broken it.
        match self.parser.parse(&source) {
            Some(t) if !has_syntax_error(t.root_node(), ErrorScope::Anywhere) => {}
            _ => return Err("extracted_does_not_parse"),
        }
        if self.scorer.score(&source).score < self.rules.min_score {
            return Err("low_score");
        }
        let params = function
            .definition
            .child_by_field_name("parameters")
            .map_or("()", |n| node_text(n, text));
        let instruction = format!(
            "Write a Python function `{name}{}` that {}",
            collapse_ws(params),
            lower_first(&summary)
        );
        Ok(Accepted {
            name,
            source,
            instruction,
        })
    }
}

fn lower_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        // Keep acronyms and names ("HTTP ...", "URL ...") as written.
        Some(_) if chars.clone().next().is_some_and(|d| d.is_uppercase()) => s.to_string(),
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// A parameter list on one line: `(\n    a,\n    b=1,\n)` becomes `(a, b=1)`.
fn collapse_ws(s: &str) -> String {
    let joined = s.split_whitespace().collect::<Vec<_>>().join(" ");
    joined
        .replace("( ", "(")
        .replace(" )", ")")
        .replace(",)", ")")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instruction_helpers() {
        assert_eq!(lower_first("Return x"), "return x");
        assert_eq!(lower_first("HTTP status"), "HTTP status");
        assert_eq!(collapse_ws("(\n    a,\n    b=1,\n)"), "(a, b=1)");
    }

    #[test]
    fn missing_python_is_a_clear_error() {
        let err = StdlibLocation::of_interpreter("/nonexistent/python3-for-test")
            .err()
            .unwrap();
        assert!(format!("{err:?}").contains("cannot run"), "{err:?}");
        let err = StdlibLocation::pinned(PathBuf::from("/nonexistent/stdlib"))
            .err()
            .unwrap();
        assert!(format!("{err:?}").contains("not a directory"), "{err:?}");
    }

    #[test]
    fn concatenated_docstrings_and_errors_in_strings_are_rejected() {
        let text = "def joined(a, b):\n    'Join' ' two.'\n    c = a + b\n    return c\n\n\
            def banner(title):\n    \"\"\"Center a title.\"\"\"\n    line = f\"{title:=^30}\"\n    \
            return line\n";
        let mut extractor = FunctionExtractor::new(FunctionRules {
            min_score: 0.0,
            min_lines: 1,
            max_lines: 100,
        })
        .unwrap();
        let (mut out, mut skipped) = (Vec::new(), SkipCounts::default());
        extractor.extract(Path::new("m.py"), text, &mut out, &mut skipped);
        assert!(out.is_empty());
        assert_eq!(skipped.get("no_docstring"), 1, "{skipped:?}");
        assert_eq!(skipped.get("syntax_error"), 1, "{skipped:?}");
    }
}
