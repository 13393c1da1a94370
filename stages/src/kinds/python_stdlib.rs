//! Stage kind `python-stdlib`: offline training data cut from the Python standard library.
//!
//! The demo experiment must run with no hub access and no shared data, so its training data
//! comes from the one corpus of Python every machine with `python3` has: the standard
//! library's own source. The same files give both variants, so only the filtering differs:
//!
//! - `mode = "functions"` ("textbook"): top-level functions and methods (decorators included,
//!   methods dedented) that have a docstring, span `min_lines..=max_lines` lines (default
//!   4..=60), are self-contained and score at least `min_score` with the heuristic scorer
//!   ([`crate::filter::heuristic`]). Self-contained is approximated syntactically: no
//!   identifier in the function (attribute names and keyword-argument names excepted) may
//!   name something the file binds at module level (functions, classes, assignments, names
//!   imported from non-stdlib or relative modules), unless that binding is an import from the
//!   standard library; a top-level function may name itself (recursion). Local variables
//!   that shadow module-level names are rejected too: conservative, never wrong in the
//!   permissive direction.
//! - `mode = "chunks"` ("messy"): consecutive raw chunks of `chunk_lines` lines (default 40)
//!   of the same files, unfiltered except that whitespace-only chunks are dropped.
//!
//! Files: every `.py` under the stdlib directory in sorted relative-path order, skipping the
//! directories `test`, `tests`, `idlelib`, `lib2to3`, `site-packages`, `dist-packages`,
//! `tkinter`, `turtledemo`, `ensurepip`, `__pycache__`, and any file or directory whose name
//! contains `_test` or starts with `test_`. Symlinks are not followed. The directory is the
//! `stdlib` path reported by `python` (param, default `python3`), or `stdlib_dir` when given
//! (for tests and for pinning another tree).
//!
//! `limit` caps the number of records: when more are found, `limit` of them are drawn
//! uniformly with the experiment seed ([`crate::filter::select::sample`]); only then does the
//! seed enter the cache key.
//!
//! Output `records` (artifact type `records`):
//! - `records.jsonl` ([`crate::records`] format). Functions mode fields: `instruction`
//!   ("Write a Python function `name(args)` that <first sentence of the docstring, first
//!   letter lowercased unless it starts an acronym>"), `output` and `content` (both the
//!   function source), `path` (relative to the stdlib directory) and `name` (`Class.method`
//!   for methods). Chunks mode fields: `content`, `path`. Provenance: the relative path and
//!   the 1-based first line.
//! - `stats.json`: mode, python version, stdlib directory, file counts, records found before
//!   sampling, records written, and skipped counts by reason; the same counts go into the
//!   stage metadata.
//!
//! Fingerprint: the python version string plus a blake3 hash of the sorted listing of
//! (relative path, size, mtime) of the selected `.py` files. Hashing the whole directory
//! through the engine's stat cache would also walk `site-packages` (460 MB and 46,000 files
//! on the development machine), and only the selected files determine the output; a listing
//! costs one `stat` per selected file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use miette::{miette, IntoDiagnostic};
use pipeline_engine::fingerprint::Fingerprint;
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use serde::{Deserialize, Serialize};
use tree_sitter::{Node, Parser};

use crate::filter::heuristic::{HeuristicOptions, HeuristicScorer};
use crate::filter::select::{sample, SampleOptions};
use crate::filter::stdlib::is_stdlib_module;
use crate::records::{write_records, Fields, Provenance, Record};

/// The `python-stdlib` stage kind (see the module docs).
pub struct PythonStdlib;

/// What to cut the standard library into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StdlibMode {
    /// Documented, self-contained functions and methods ("textbook" data).
    #[default]
    Functions,
    /// Raw consecutive line chunks ("messy" data).
    Chunks,
}

/// Parameters of `python-stdlib`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PythonStdlibParams {
    /// The Python interpreter whose standard library is read.
    #[serde(default = "default_python")]
    pub python: String,
    /// Read this directory instead of asking `python` (tests, pinned trees).
    #[serde(default)]
    pub stdlib_dir: Option<PathBuf>,
    /// `functions` or `chunks`.
    #[serde(default)]
    pub mode: StdlibMode,
    /// Functions mode: smallest heuristic score kept.
    #[serde(default = "default_min_score")]
    pub min_score: f64,
    /// Functions mode: fewest lines of a function (decorators included).
    #[serde(default = "default_min_lines")]
    pub min_lines: usize,
    /// Functions mode: most lines of a function (decorators included).
    #[serde(default = "default_max_lines")]
    pub max_lines: usize,
    /// Chunks mode: lines per chunk.
    #[serde(default = "default_chunk_lines")]
    pub chunk_lines: usize,
    /// Most records written; a seeded uniform sample is drawn when more are found.
    #[serde(default)]
    pub limit: Option<usize>,
}

fn default_python() -> String {
    "python3".into()
}
fn default_min_score() -> f64 {
    0.5
}
fn default_min_lines() -> usize {
    4
}
fn default_max_lines() -> usize {
    60
}
fn default_chunk_lines() -> usize {
    40
}

impl Default for PythonStdlibParams {
    fn default() -> Self {
        Self {
            python: default_python(),
            stdlib_dir: None,
            mode: StdlibMode::default(),
            min_score: default_min_score(),
            min_lines: default_min_lines(),
            max_lines: default_max_lines(),
            chunk_lines: default_chunk_lines(),
            limit: None,
        }
    }
}

/// File name of the records in the output directory.
pub const RECORDS_FILE: &str = "records.jsonl";
/// File name of the statistics in the output directory.
pub const STATS_FILE: &str = "stats.json";

const OUTPUTS: &[OutputSlot] = &[OutputSlot {
    name: "records",
    artifact: "records",
    doc: "records.jsonl of stdlib functions or chunks, plus stats.json",
}];

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
        fp.value("stdlib_listing", listing_hash(&stdlib.dir)?);
        Ok(())
    }

    fn run(p: &PythonStdlibParams, ctx: &mut StageContext) -> miette::Result<()> {
        let stdlib = locate(p, |path| ctx.resolve(path))?;
        let files = select_files(&stdlib.dir)?;
        let mut stats = Stats {
            mode: p.mode,
            python_version: stdlib.version.clone(),
            stdlib_dir: stdlib.dir.display().to_string(),
            files_selected: files.selected.len(),
            files_skipped: files.skipped,
            ..Default::default()
        };

        let mut extractor = match p.mode {
            StdlibMode::Functions => Some(Extractor::new(p)?),
            StdlibMode::Chunks => None,
        };
        ctx.progress().start(files.selected.len() as u64, "files");
        let mut records = Vec::new();
        for (i, rel) in files.selected.iter().enumerate() {
            ctx.check_cancelled()?;
            let Ok(text) = std::fs::read_to_string(stdlib.dir.join(rel)) else {
                // A few stdlib files are deliberately in legacy encodings; they are not
                // worth teaching from.
                stats.skip("file_not_utf8");
                continue;
            };
            let text = text.replace("\r\n", "\n");
            match &mut extractor {
                Some(ex) => ex.functions(rel, &text, &mut records, &mut stats),
                None => chunks(rel, &text, p.chunk_lines, &mut records, &mut stats),
            }
            ctx.progress().set_position(i as u64 + 1);
        }

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

        let out = ctx.output_dir("records")?.to_path_buf();
        write_records(&out.join(RECORDS_FILE), &records).into_diagnostic()?;
        let json = serde_json::to_string_pretty(&stats).into_diagnostic()?;
        std::fs::write(out.join(STATS_FILE), json + "\n")
            .map_err(|e| miette!("cannot write {}: {e}", out.join(STATS_FILE).display()))?;

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

/// Contents of `stats.json`.
#[derive(Debug, Default, Serialize)]
struct Stats {
    mode: StdlibMode,
    python_version: String,
    stdlib_dir: String,
    files_selected: usize,
    /// Files and directories left out by the path rules, by rule.
    files_skipped: BTreeMap<String, usize>,
    /// Candidates (functions) or chunks dropped, by reason.
    skipped: BTreeMap<String, usize>,
    /// Records found before sampling.
    found: usize,
    /// Records written.
    records: usize,
    limit: Option<usize>,
    /// The seed of the sample, when one was drawn.
    seed: Option<u64>,
}

impl Stats {
    fn skip(&mut self, reason: &str) {
        *self.skipped.entry(reason.to_string()).or_default() += 1;
    }
}

/// The standard library to read.
struct StdlibLocation {
    dir: PathBuf,
    version: String,
}

/// Finds the stdlib directory: `stdlib_dir` (resolved with `resolve`) or the interpreter's.
fn locate(
    p: &PythonStdlibParams,
    resolve: impl FnOnce(&Path) -> PathBuf,
) -> miette::Result<StdlibLocation> {
    if let Some(dir) = &p.stdlib_dir {
        let dir = resolve(dir);
        if !dir.is_dir() {
            return Err(miette!(
                help = "point `stdlib_dir` at a directory of Python files, or remove it to use `python`",
                "`stdlib_dir` {} is not a directory",
                dir.display()
            ));
        }
        return Ok(StdlibLocation {
            dir,
            version: "stdlib_dir".into(),
        });
    }
    let output = Command::new(&p.python)
        .args([
            "-c",
            "import sysconfig,sys; print(sysconfig.get_paths()['stdlib']); print(sys.version)",
        ])
        .output()
        .map_err(|e| {
            miette!(
                help = "install Python 3 (e.g. `apt-get install python3`) or set `python` to an interpreter's path",
                "cannot run `{}`: {e}",
                p.python
            )
        })?;
    if !output.status.success() {
        return Err(miette!(
            help = "set `python` to a working Python 3 interpreter",
            "`{}` failed ({}): {}",
            p.python,
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
            "`{}` reported no usable stdlib directory (got {dir:?})",
            p.python
        ));
    }
    Ok(StdlibLocation {
        dir: PathBuf::from(dir),
        version: version.to_string(),
    })
}

/// The `.py` files to read, relative to the stdlib directory, sorted.
struct FileSelection {
    selected: Vec<PathBuf>,
    skipped: BTreeMap<String, usize>,
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

fn select_files(root: &Path) -> miette::Result<FileSelection> {
    let mut selected = Vec::new();
    let mut skipped = BTreeMap::new();
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
                    Some(reason) => *skipped.entry(reason.to_string()).or_default() += 1,
                    None => stack.push(rel.join(&name)),
                }
            } else if ty.is_file() && name.ends_with(".py") {
                match skip_reason(&name, false) {
                    Some(reason) => *skipped.entry(reason.to_string()).or_default() += 1,
                    None => selected.push(rel.join(&name)),
                }
            }
        }
    }
    // Sort on the '/'-joined string so the order is the same on every platform.
    selected.sort_by_key(|p| slash_path(p));
    Ok(FileSelection { selected, skipped })
}

fn slash_path(p: &Path) -> String {
    p.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// blake3 of "path\tsize\tmtime_ns\n" for every selected file, in order.
fn listing_hash(root: &Path) -> miette::Result<String> {
    let files = select_files(root)?;
    let mut h = blake3::Hasher::new();
    for rel in &files.selected {
        let path = root.join(rel);
        let meta =
            std::fs::metadata(&path).map_err(|e| miette!("cannot stat {}: {e}", path.display()))?;
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

/// Chunks mode: consecutive `n`-line pieces, whitespace-only ones dropped.
fn chunks(rel: &Path, text: &str, n: usize, out: &mut Vec<Record>, stats: &mut Stats) {
    let path = slash_path(rel);
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    for (i, piece) in lines.chunks(n).enumerate() {
        let content: String = piece.concat();
        if content.trim().is_empty() {
            stats.skip("blank_chunk");
            continue;
        }
        let fields: Fields = [("content", content), ("path", path.clone())]
            .into_iter()
            .collect();
        out.push(Record::new(
            fields,
            Provenance {
                source: path.clone(),
                line: Some((i * n) as u64 + 1),
                row: None,
            },
        ));
    }
}

/// Functions mode: a parser, a scorer and the bounds.
struct Extractor {
    parser: Parser,
    scorer: HeuristicScorer,
    min_score: f64,
    min_lines: usize,
    max_lines: usize,
}

/// A function or method found in a file, before the checks.
struct Candidate<'t> {
    /// The `function_definition` node.
    def: Node<'t>,
    /// The node whose text is the record (the decorated definition when decorated).
    outer: Node<'t>,
    /// Enclosing class name, for methods.
    class: Option<String>,
}

impl Extractor {
    fn new(p: &PythonStdlibParams) -> miette::Result<Self> {
        let mut parser = Parser::new();
        parser
            .set_language(&tree_sitter_python::LANGUAGE.into())
            .map_err(|e| {
                miette!(
                    help = "align the tree-sitter and tree-sitter-python versions in Cargo.toml",
                    "tree-sitter-python grammar does not match the runtime: {e}"
                )
            })?;
        let scorer = HeuristicScorer::new(HeuristicOptions::default()).into_diagnostic()?;
        Ok(Self {
            parser,
            scorer,
            min_score: p.min_score,
            min_lines: p.min_lines,
            max_lines: p.max_lines,
        })
    }

    fn functions(&mut self, rel: &Path, text: &str, out: &mut Vec<Record>, stats: &mut Stats) {
        let Some(tree) = self.parser.parse(text, None) else {
            stats.skip("file_does_not_parse");
            return;
        };
        let src = text.as_bytes();
        let root = tree.root_node();
        let module = module_bindings(root, src);
        let path = slash_path(rel);
        for cand in candidates(root, src) {
            match self.check(&cand, src, text, &module) {
                Ok((name, fields_src, instruction)) => {
                    let qualified = match &cand.class {
                        Some(c) => format!("{c}.{name}"),
                        None => name,
                    };
                    let fields: Fields = [
                        ("instruction", instruction),
                        ("output", fields_src.clone()),
                        ("content", fields_src),
                        ("path", path.clone()),
                        ("name", qualified),
                    ]
                    .into_iter()
                    .collect();
                    out.push(Record::new(
                        fields,
                        Provenance {
                            source: path.clone(),
                            line: Some(cand.outer.start_position().row as u64 + 1),
                            row: None,
                        },
                    ));
                }
                Err(reason) => stats.skip(reason),
            }
        }
    }

    /// Returns (name, dedented source, instruction) or the reason for rejecting.
    fn check(
        &mut self,
        cand: &Candidate,
        src: &[u8],
        text: &str,
        module: &ModuleBindings,
    ) -> Result<(String, String, String), &'static str> {
        let def = cand.def;
        let name = def
            .child_by_field_name("name")
            .and_then(|n| n.utf8_text(src).ok())
            .ok_or("no_name")?
            .to_string();
        let lines = cand.outer.end_position().row - cand.outer.start_position().row + 1;
        if lines < self.min_lines {
            return Err("too_short");
        }
        if lines > self.max_lines {
            return Err("too_long");
        }
        let doc = docstring(def, src).ok_or("no_docstring")?;
        let first = docstring_first_line(doc).ok_or("empty_docstring")?;
        if def.has_error() {
            return Err("syntax_error");
        }
        let own_name = cand.class.is_none().then_some(name.as_str());
        if !self_contained(cand.outer, def, src, module, own_name) {
            return Err("not_self_contained");
        }
        let source = dedent(text, cand.outer);
        // Re-parse the extracted text: dedenting must not have broken it.
        match self.parser.parse(&source, None) {
            Some(t) if !t.root_node().has_error() => {}
            _ => return Err("extracted_does_not_parse"),
        }
        if self.scorer.score(&source).score < self.min_score {
            return Err("low_score");
        }
        let params = def
            .child_by_field_name("parameters")
            .and_then(|n| n.utf8_text(src).ok())
            .unwrap_or("()");
        let params = collapse_ws(params);
        let instruction = format!(
            "Write a Python function `{name}{params}` that {}",
            lower_first(&first)
        );
        Ok((name, source, instruction))
    }
}

/// Top-level functions and methods of top-level classes, in source order.
fn candidates<'t>(root: Node<'t>, src: &[u8]) -> Vec<Candidate<'t>> {
    let mut out = Vec::new();
    let mut cursor = root.walk();
    for child in root.named_children(&mut cursor) {
        let (outer, inner) = unwrap_decorated(child);
        match inner.kind() {
            "function_definition" => out.push(Candidate {
                def: inner,
                outer,
                class: None,
            }),
            "class_definition" => {
                let class = inner
                    .child_by_field_name("name")
                    .and_then(|n| n.utf8_text(src).ok())
                    .unwrap_or("")
                    .to_string();
                let Some(body) = inner.child_by_field_name("body") else {
                    continue;
                };
                let mut bc = body.walk();
                for member in body.named_children(&mut bc) {
                    let (mouter, minner) = unwrap_decorated(member);
                    if minner.kind() == "function_definition" {
                        out.push(Candidate {
                            def: minner,
                            outer: mouter,
                            class: Some(class.clone()),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// (outer node, definition) for a possibly decorated definition.
fn unwrap_decorated(node: Node) -> (Node, Node) {
    if node.kind() == "decorated_definition" {
        if let Some(def) = node.child_by_field_name("definition") {
            return (node, def);
        }
    }
    (node, node)
}

/// Names a file binds at module level, split by whether the binding is a stdlib import.
#[derive(Default)]
struct ModuleBindings {
    /// Functions, classes, assignment targets, non-stdlib and relative imports.
    local: BTreeSet<String>,
    /// Names bound only by imports from the standard library.
    stdlib_imports: BTreeSet<String>,
}

impl ModuleBindings {
    /// Whether using `name` ties a function to its file.
    fn is_file_local(&self, name: &str) -> bool {
        self.local.contains(name)
    }
}

/// Collects module-level bindings, descending into module-level compound statements
/// (`if`, `try`, `with`, `for`, `while`) but not into function or class bodies.
fn module_bindings(root: Node, src: &[u8]) -> ModuleBindings {
    let mut b = ModuleBindings::default();
    let mut stack = vec![root];
    while let Some(node) = stack.pop() {
        let mut cursor = node.walk();
        for child in node.named_children(&mut cursor) {
            let (_, inner) = unwrap_decorated(child);
            match inner.kind() {
                "function_definition" | "class_definition" => {
                    if let Some(n) = inner.child_by_field_name("name") {
                        if let Ok(t) = n.utf8_text(src) {
                            b.local.insert(t.to_string());
                        }
                    }
                }
                "import_statement" => import_names(inner, src, None, &mut b),
                "import_from_statement" => {
                    let module = inner
                        .child_by_field_name("module_name")
                        .and_then(|m| m.utf8_text(src).ok())
                        .unwrap_or(".");
                    import_names(inner, src, Some(module), &mut b);
                }
                "expression_statement" => {
                    let mut c2 = inner.walk();
                    for e in inner.named_children(&mut c2) {
                        if matches!(e.kind(), "assignment" | "augmented_assignment") {
                            assignment_targets(e, src, &mut b.local);
                        }
                    }
                }
                // Module-level loops and `with ... as x` bind names too: treat every identifier
                // in their headers as bound (over-approximation keeps the check conservative).
                "for_statement" | "with_statement" => {
                    if let Some(left) = inner.child_by_field_name("left") {
                        identifiers(left, src, &mut b.local);
                    }
                    let mut c2 = inner.walk();
                    for part in inner.named_children(&mut c2) {
                        if part.kind() == "with_clause" {
                            identifiers(part, src, &mut b.local);
                        }
                    }
                    stack.push(inner);
                }
                "if_statement" | "try_statement" | "while_statement" | "block" | "else_clause"
                | "elif_clause" | "except_clause" | "finally_clause" => stack.push(inner),
                _ => {}
            }
        }
    }
    // A name rebound by both a stdlib import and something else is file-local.
    let local = b.local.clone();
    b.stdlib_imports.retain(|n| !local.contains(n));
    b
}

/// Records the names an import binds: stdlib imports as such, anything else as file-local.
fn import_names(node: Node, src: &[u8], from: Option<&str>, b: &mut ModuleBindings) {
    let mut cursor = node.walk();
    for name in node.children_by_field_name("name", &mut cursor) {
        let (module, bound) = match name.kind() {
            "aliased_import" => {
                let target = name
                    .child_by_field_name("name")
                    .and_then(|n| n.utf8_text(src).ok())
                    .unwrap_or("");
                let alias = name
                    .child_by_field_name("alias")
                    .and_then(|n| n.utf8_text(src).ok())
                    .unwrap_or("");
                (from.unwrap_or(target).to_string(), alias.to_string())
            }
            _ => {
                let target = name.utf8_text(src).unwrap_or("");
                // `import a.b` binds `a`; `from m import x` binds `x`.
                let bound = match from {
                    Some(_) => target.to_string(),
                    None => target.split('.').next().unwrap_or("").to_string(),
                };
                (from.unwrap_or(target).to_string(), bound)
            }
        };
        if bound.is_empty() {
            continue;
        }
        if !module.starts_with('.') && is_stdlib_module(&module) {
            b.stdlib_imports.insert(bound);
        } else {
            b.local.insert(bound);
        }
    }
    // `from m import *` binds unknown names: nothing to record, and the stdlib's own star
    // imports are all of stdlib modules.
}

fn assignment_targets(node: Node, src: &[u8], out: &mut BTreeSet<String>) {
    if let Some(left) = node.child_by_field_name("left") {
        // Only plain names bind; `a.b = ...` and `a[i] = ...` do not.
        match left.kind() {
            "identifier" | "pattern_list" | "tuple_pattern" | "list_pattern" => {
                identifiers(left, src, out)
            }
            _ => {}
        }
    }
    // Chained assignment `a = b = 1`: the right side is another assignment.
    if let Some(right) = node.child_by_field_name("right") {
        if right.kind() == "assignment" {
            assignment_targets(right, src, out);
        }
    }
}

/// Every `identifier` under `node` (inclusive).
fn identifiers(node: Node, src: &[u8], out: &mut BTreeSet<String>) {
    let mut stack = vec![node];
    while let Some(n) = stack.pop() {
        if n.kind() == "identifier" {
            if let Ok(t) = n.utf8_text(src) {
                out.insert(t.to_string());
            }
            continue;
        }
        let mut c = n.walk();
        stack.extend(n.named_children(&mut c));
    }
}

/// Whether no identifier used in `outer` names a file-local module-level binding.
fn self_contained(
    outer: Node,
    def: Node,
    src: &[u8],
    module: &ModuleBindings,
    own_name: Option<&str>,
) -> bool {
    let def_name = def.child_by_field_name("name").map(|n| n.id());
    let mut stack = vec![outer];
    while let Some(n) = stack.pop() {
        if n.kind() == "identifier" {
            if Some(n.id()) == def_name {
                continue;
            }
            let Ok(t) = n.utf8_text(src) else { continue };
            if Some(t) != own_name && module.is_file_local(t) {
                return false;
            }
            continue;
        }
        let mut c = n.walk();
        for (i, child) in n.children(&mut c).enumerate() {
            // `obj.attr` and `f(key=...)`: `attr` and `key` are not variable references.
            let field = n.field_name_for_child(i as u32);
            let skip = matches!(
                (n.kind(), field),
                ("attribute", Some("attribute")) | ("keyword_argument", Some("name"))
            );
            if !skip {
                stack.push(child);
            }
        }
    }
    true
}

/// The docstring literal of a function, if its body starts with a string.
fn docstring<'s>(def: Node, src: &'s [u8]) -> Option<&'s str> {
    let body = def.child_by_field_name("body")?;
    let mut cursor = body.walk();
    let first = body
        .named_children(&mut cursor)
        .find(|c| c.kind() != "comment")?;
    if first.kind() != "expression_statement" {
        return None;
    }
    let expr = first.named_child(0)?;
    if expr.kind() != "string" {
        return None;
    }
    expr.utf8_text(src).ok()
}

/// The summary of a docstring literal: its first sentence, without prefix and quotes.
///
/// The first line alone is often a sentence cut in half ("Return true if 'target' is
/// out-of-date with respect to any file"), so the first paragraph is joined and cut after its
/// first sentence; a paragraph with no sentence end within 300 characters gives its first line.
fn docstring_first_line(literal: &str) -> Option<String> {
    let body = literal.trim_start_matches(|c: char| c.is_ascii_alphabetic());
    let body = ["\"\"\"", "'''", "\"", "'"]
        .iter()
        .find_map(|q| body.strip_prefix(q).map(|b| b.strip_suffix(q).unwrap_or(b)))?;
    let paragraph: Vec<&str> = body
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect();
    let first = *paragraph.first()?;
    let joined = paragraph.join(" ");
    let mut end = None;
    for (i, _) in joined.match_indices(". ") {
        let word = joined[..i].rsplit(' ').next().unwrap_or("");
        // "e.g. x" and "i.e. y" do not end a sentence.
        if !matches!(word, "e.g" | "i.e" | "etc" | "vs") {
            end = Some(i + 1);
            break;
        }
    }
    let sentence = match end {
        Some(i) => &joined[..i],
        None if joined.ends_with('.') => joined.as_str(),
        None => first,
    };
    let sentence = if sentence.len() > 300 {
        first
    } else {
        sentence
    };
    Some(sentence.to_string())
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

fn collapse_ws(s: &str) -> String {
    let joined = s.split_whitespace().collect::<Vec<_>>().join(" ");
    joined
        .replace("( ", "(")
        .replace(" )", ")")
        .replace(",)", ")")
}

/// The text of `node` from the start of its first line, with the first line's indentation
/// removed from every line that has it (continuation lines of multi-line strings may not).
fn dedent(text: &str, node: Node) -> String {
    let start = node.start_byte();
    let line_start = text[..start].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let indent = start - line_start;
    let body = &text[line_start..node.end_byte()];
    let mut out = String::with_capacity(body.len() + 1);
    for line in body.split_inclusive('\n') {
        let ws = line.len() - line.trim_start_matches([' ', '\t']).len();
        out.push_str(&line[ws.min(indent)..]);
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::read_records;
    use std::collections::BTreeMap;

    /// Runs the kind standalone; returns (records, stats.json, records.jsonl bytes).
    fn run_kind(
        params: &PythonStdlibParams,
        seed: u64,
    ) -> (Vec<Record>, serde_json::Value, Vec<u8>) {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let mut ctx = StageContext::standalone(
            "stdlib",
            seed,
            BTreeMap::new(),
            BTreeMap::from([("records".to_string(), out.clone())]),
            tmp.path().join("ckpt"),
        );
        PythonStdlib::validate(params).unwrap();
        PythonStdlib::run(params, &mut ctx).unwrap();
        let records = read_records(&out.join(RECORDS_FILE)).unwrap();
        let stats: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(STATS_FILE)).unwrap()).unwrap();
        let bytes = std::fs::read(out.join(RECORDS_FILE)).unwrap();
        (records, stats, bytes)
    }

    fn python_available() -> bool {
        let ok = Command::new("python3")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("skipping: `python3` is not installed");
        }
        ok
    }

    /// Asserts with Python's own parser that every `output` is valid Python.
    fn assert_python_parses(records: &[Record]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sources.json");
        let sources: Vec<&str> = records.iter().map(|r| r.get("output").unwrap()).collect();
        std::fs::write(&path, serde_json::to_string(&sources).unwrap()).unwrap();
        let script = "import ast,json,sys\n\
            bad=[]\n\
            for s in json.load(open(sys.argv[1])):\n\
            \x20   try: ast.parse(s)\n\
            \x20   except SyntaxError as e: bad.append((str(e), s[:200]))\n\
            print(len(bad)); print(bad[:3])\n";
        let out = Command::new("python3")
            .args(["-c", script, path.to_str().unwrap()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout.lines().next(),
            Some("0"),
            "unparsable outputs: {stdout}"
        );
    }

    const PLANTED: &str = r#""""A module with planted functions."""
import os
import functools
import numpy as np
from json import dumps
from .sibling import helper

SCALE = 3


def keep_me(path, depth=0):
    """Join a path with its own depth, recursively.

    Uses only builtins and stdlib imports.
    """
    if depth > 2:
        return dumps(os.path.join(path, str(depth)))
    return keep_me(path, depth + 1)


def uses_constant(x):
    """Scale a number by the module constant."""
    y = x * SCALE
    return y + 1


def uses_relative(x):
    """Call a helper from a sibling module."""
    z = helper(x)
    return z


def uses_third_party(x):
    """Sum with numpy."""
    total = np.sum(x)
    return total


def undocumented(a, b):
    c = a + b
    d = c * 2
    return d


@functools.lru_cache(maxsize=None)
def cached(n):
    """Return the n-th triangular number."""
    total = 0
    for i in range(n + 1):
        total += i
    return total


class Shape:
    """A shape."""

    def area(self, width, height):
        """Compute the area of a rectangle."""
        result = width * height
        # keyword names and attributes are not references
        return max(result, 0)

    def clone(self):
        """Make a copy of the shape."""
        other = Shape()
        other.__dict__.update(self.__dict__)
        return other


def lookup(i):
    """Look a value up in a table."""
    table = [0, 7, 14, 21, 28, 35, 42, 49, 56, 63, 70, 77, 84, 91, 98, 4, 11, 18, 25, 32, 39, 46, 53, 60, 67, 74, 81, 88, 95, 1, 8, 15, 22, 29, 36, 43, 50, 57, 64, 71, 78, 85, 92, 99, 5, 12, 19, 26, 33, 40, 47, 54, 61, 68, 75, 82, 89, 96, 2, 9, 16, 23, 30, 37, 44, 51, 58, 65, 72, 79, 86, 93, 100, 6, 13, 20, 27, 34, 41, 48, 55, 62, 69, 76, 83, 90, 97, 3, 10, 17, 24, 31, 38, 45, 52, 59, 66, 73, 80, 87, 94, 0, 7, 14, 21, 28, 35, 42, 49, 56, 63, 70, 77, 84, 91, 98, 4, 11, 18, 25]
    value = table[i]
    return value
"#;

    fn fake_stdlib() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::write(root.join("planted.py"), PLANTED).unwrap();
        // Same self-contained function in places that must be skipped.
        let good = "def good(x):\n    \"\"\"Return x.\"\"\"\n    y = x\n    z = y\n    return z\n";
        for dir in ["test", "__pycache__", "site-packages", "pkg/tests"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
            std::fs::write(root.join(dir).join("mod.py"), good).unwrap();
        }
        std::fs::write(root.join("pkg/foo_test.py"), good).unwrap();
        std::fs::write(root.join("pkg/test_bar.py"), good).unwrap();
        std::fs::write(root.join("pkg/notes.txt"), good).unwrap();
        tmp
    }

    fn fake_params(dir: &Path) -> PythonStdlibParams {
        PythonStdlibParams {
            stdlib_dir: Some(dir.to_path_buf()),
            ..Default::default()
        }
    }

    #[test]
    fn fake_stdlib_keeps_only_self_contained_documented_functions() {
        let tmp = fake_stdlib();
        let (records, stats, _) = run_kind(&fake_params(tmp.path()), 0);
        let names: Vec<&str> = records.iter().map(|r| r.get("name").unwrap()).collect();
        assert_eq!(
            names,
            ["keep_me", "cached", "Shape.area", "lookup"],
            "{stats:#}"
        );
        assert_eq!(stats["files_selected"], 1, "{stats:#}");
        assert_eq!(stats["skipped"]["not_self_contained"], 4, "{stats:#}");
        assert_eq!(stats["skipped"]["no_docstring"], 1, "{stats:#}");
        assert!(stats["skipped"].get("too_short").is_none(), "{stats:#}");

        let keep = &records[0];
        assert_eq!(
            keep.get("instruction").unwrap(),
            "Write a Python function `keep_me(path, depth=0)` that join a path with its own \
             depth, recursively."
        );
        assert!(keep
            .get("output")
            .unwrap()
            .starts_with("def keep_me(path, depth=0):\n"));
        assert_eq!(keep.get("output"), keep.get("content"));
        assert_eq!(keep.get("path"), Some("planted.py"));
        assert_eq!(keep.provenance.line, Some(11));
        let cached = records[1].get("output").unwrap();
        assert!(cached.starts_with("@functools.lru_cache(maxsize=None)\ndef cached(n):\n"));
        let area = records[2].get("output").unwrap();
        assert!(
            area.starts_with("def area(self, width, height):\n    \"\"\"Compute"),
            "{area}"
        );
        assert!(area.contains("\n    return max(result, 0)\n"), "{area}");
        assert!(records[2]
            .get("instruction")
            .unwrap()
            .ends_with("that compute the area of a rectangle."));
        if python_available() {
            assert_python_parses(&records);
        }

        // The heuristic scorer is applied: the data-dump function falls below a higher bar.
        let picky = PythonStdlibParams {
            min_score: 0.9,
            ..fake_params(tmp.path())
        };
        let (picked, stats, _) = run_kind(&picky, 0);
        let names: Vec<&str> = picked.iter().map(|r| r.get("name").unwrap()).collect();
        assert_eq!(names, ["keep_me", "cached", "Shape.area"], "{stats:#}");
        assert_eq!(stats["skipped"]["low_score"], 1, "{stats:#}");

        // A strict score threshold rejects everything, which is an error, not empty output.
        let strict = PythonStdlibParams {
            min_score: 1.0,
            min_lines: 50,
            ..fake_params(tmp.path())
        };
        let out = tempfile::tempdir().unwrap();
        let mut ctx = StageContext::standalone(
            "s",
            0,
            BTreeMap::new(),
            BTreeMap::from([("records".to_string(), out.path().to_path_buf())]),
            out.path().join("ckpt"),
        );
        assert!(PythonStdlib::run(&strict, &mut ctx).is_err());
    }

    #[test]
    fn chunks_of_fake_stdlib_cover_the_file() {
        let tmp = fake_stdlib();
        let params = PythonStdlibParams {
            mode: StdlibMode::Chunks,
            chunk_lines: 10,
            ..fake_params(tmp.path())
        };
        let (records, stats, _) = run_kind(&params, 0);
        let joined: String = records.iter().map(|r| r.get("content").unwrap()).collect();
        assert_eq!(joined, PLANTED);
        assert_eq!(records.len(), PLANTED.lines().count().div_ceil(10));
        assert_eq!(records[1].provenance.line, Some(11));
        assert_eq!(stats["records"], records.len());
    }

    #[test]
    fn docstring_and_instruction_helpers() {
        assert_eq!(
            docstring_first_line("r'''\n  Frobnicate the thing.\n  more'''").as_deref(),
            Some("Frobnicate the thing.")
        );
        assert_eq!(
            docstring_first_line("\"Short.\"").as_deref(),
            Some("Short.")
        );
        assert_eq!(
            docstring_first_line("\"\"\"Return true if the target is\n    older, e.g. stale. More.\n\n    Rest.\"\"\"").as_deref(),
            Some("Return true if the target is older, e.g. stale.")
        );
        assert_eq!(
            docstring_first_line("\"\"\"List files\n    in a dir\n\n    Rest.\"\"\"").as_deref(),
            Some("List files")
        );
        assert_eq!(docstring_first_line("\"\"\"   \"\"\""), None);
        assert_eq!(lower_first("Return x"), "return x");
        assert_eq!(lower_first("HTTP status"), "HTTP status");
        assert_eq!(collapse_ws("(\n    a,\n    b=1,\n)"), "(a, b=1)");
    }

    #[test]
    fn missing_python_is_a_clear_error() {
        let params = PythonStdlibParams {
            python: "/nonexistent/python3-for-test".into(),
            ..Default::default()
        };
        let err = locate(&params, |p| p.to_path_buf()).err().unwrap();
        assert!(format!("{err:?}").contains("cannot run"), "{err:?}");
    }

    #[test]
    fn real_stdlib_functions_are_documented_and_parse() {
        if !python_available() {
            return;
        }
        let (functions, stats, _) = run_kind(&PythonStdlibParams::default(), 0);
        if std::env::var_os("PYTHON_STDLIB_DUMP").is_some() {
            eprintln!("{stats:#}");
            for r in functions.iter().step_by(97) {
                eprintln!(
                    "--- {}\n{}\n{}",
                    r.provenance,
                    r.get("instruction").unwrap(),
                    r.get("output").unwrap()
                );
            }
        }
        assert!(
            functions.len() >= 200,
            "{} functions: {stats:#}",
            functions.len()
        );
        for r in &functions {
            let instruction = r.get("instruction").unwrap();
            assert!(
                instruction.starts_with("Write a Python function `"),
                "{instruction}"
            );
            assert!(instruction.len() > "Write a Python function `f()` that ".len() + 3);
            assert!(r.get("output").unwrap().contains("def "));
            let path = r.get("path").unwrap();
            assert!(!path.starts_with("test/") && !path.starts_with("site-packages/"));
        }
        assert_python_parses(&functions);
    }

    #[test]
    fn real_stdlib_chunks_outnumber_functions_and_sample_deterministically() {
        if !python_available() {
            return;
        }
        // The demo's shape: N textbook functions against 5N messy chunks of the same files.
        let n = 400;
        let textbook = PythonStdlibParams {
            limit: Some(n),
            ..Default::default()
        };
        let (sampled, stats, _) = run_kind(&textbook, 1);
        assert_eq!(sampled.len(), n);
        assert!(stats["found"].as_u64().unwrap() > n as u64, "{stats:#}");
        assert_eq!(stats["seed"], 1);

        let chunks = PythonStdlibParams {
            mode: StdlibMode::Chunks,
            ..Default::default()
        };
        let (all, _, _) = run_kind(&chunks, 0);
        assert!(all.len() >= 5 * n, "{} chunks", all.len());
        assert!(all
            .iter()
            .all(|r| !r.get("content").unwrap().trim().is_empty()));

        let limited = PythonStdlibParams {
            limit: Some(5 * n),
            ..chunks
        };
        let (a, stats, a_bytes) = run_kind(&limited, 1);
        assert_eq!(a.len(), 5 * n);
        assert_eq!(stats["found"], all.len());
        let (_, _, b_bytes) = run_kind(&limited, 1);
        assert_eq!(a_bytes, b_bytes, "same seed must give the same bytes");
        let (c, _, c_bytes) = run_kind(&limited, 2);
        assert_eq!(c.len(), 5 * n);
        assert_ne!(a_bytes, c_bytes, "another seed must draw another sample");
    }

    #[test]
    fn manifest_chains_both_modes_and_caches() {
        let stdlib = fake_stdlib();
        let tmp = tempfile::tempdir().unwrap();
        let manifest = tmp.path().join("m.toml");
        let dir = stdlib.path().display().to_string();
        std::fs::write(
            &manifest,
            format!(
                "[experiment]\nname = \"t\"\nseed = 3\n\n\
                 [textbook]\nkind = \"python-stdlib\"\nstdlib_dir = {dir:?}\n\n\
                 [messy]\nkind = \"python-stdlib\"\nstdlib_dir = {dir:?}\nmode = \"chunks\"\n\
                 chunk_lines = 5\nlimit = 4\n"
            ),
        )
        .unwrap();
        let registry = crate::registry();
        let m = pipeline_engine::load_manifest(&manifest, &registry, &Default::default()).unwrap();
        let store = pipeline_engine::Store::open(&tmp.path().join("store")).unwrap();
        let opts = pipeline_engine::RunOptions::default();
        let report = pipeline_engine::run(&m, &store, &opts).unwrap();
        assert!(report.success(), "{report:?}");
        assert_eq!(report.ran(), 2);
        let again = pipeline_engine::run(&m, &store, &opts).unwrap();
        assert!(again.success());
        assert_eq!(again.ran(), 0, "{again:?}");

        // Editing a selected file changes both keys; editing a skipped one changes none.
        std::fs::write(stdlib.path().join("test/mod.py"), "x = 1\n").unwrap();
        assert_eq!(pipeline_engine::run(&m, &store, &opts).unwrap().ran(), 0);
        std::fs::write(
            stdlib.path().join("planted.py"),
            format!("{PLANTED}\n# edited\n"),
        )
        .unwrap();
        let edited = pipeline_engine::run(&m, &store, &opts).unwrap();
        assert!(edited.success());
        assert_eq!(edited.ran(), 2, "{edited:?}");
    }
}
