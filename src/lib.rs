//! The `pipeline` command line, as a library so that other binaries (the toy-kind example used
//! by the engine tests) can run the same CLI over their own [`Registry`].
//!
//! The CLI knows no stage kind: kinds come from the registry, and so do kind-specific
//! subcommands ([`pipeline_engine::Command`], e.g. `pipeline grade`), which the CLI lists in
//! its help and hands their raw arguments, and subcommands that act on one cached stage
//! ([`pipeline_engine::StageCommand`], e.g. `pipeline serve M STAGE`), for which the CLI reads
//! the manifest, finds the stage's result in the cache and hands it over with the rest of the
//! arguments.

#![warn(missing_docs)]

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use indicatif::HumanBytes;
use miette::{Diagnostic, IntoDiagnostic, Report};
use pipeline_engine::executor::{plan, Action, PlanEntry, StageOutcome, WorkerTarget};
use pipeline_engine::graph::{render, DagFormat};
use pipeline_engine::manifest::{load_manifest, Manifest, ManifestLoadError, ManifestOptions};
use pipeline_engine::progress::ProgressMode;
use pipeline_engine::slurm::detach::{read_detached_run, submit_detached, DetachedJob};
use pipeline_engine::slurm::housekeeping::{jobs_in_flight, prune};
use pipeline_engine::slurm::{
    ExecutorKind, SlurmClient, SlurmLauncher, WorkerCommand, EXIT_KEY_BUSY, SLURM_DIR,
};
use pipeline_engine::{Registry, RunOptions, RunReport, StageCommand, Store};

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
    /// Options of every command.
    #[command(flatten)]
    pub global: GlobalOptions,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes, before or after its name.
#[derive(clap::Args, Debug, Clone)]
pub struct GlobalOptions {
    /// Cache root (default: the manifest's `experiment.cache`, else ./cache).
    #[arg(long, global = true, env = "PIPELINE_CACHE")]
    pub cache: Option<PathBuf>,
    /// How errors are printed: human-readable, or one JSON object per error (for scripts).
    #[arg(long, global = true, value_enum, default_value_t = ErrorFormat::Human)]
    pub error_format: ErrorFormat,
}

/// How diagnostics are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ErrorFormat {
    /// miette's graphical report.
    Human,
    /// One JSON object per error: message, code, help, causes, labels with file, line and column.
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

impl ManifestArgs {
    /// The manifest at `path`, without overrides.
    fn plain(path: &std::path::Path) -> Self {
        Self {
            manifest: path.to_path_buf(),
            set: Vec::new(),
        }
    }
}

/// Which stages a run (or plan) covers and recomputes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SelectionArgs {
    /// Only these stages and what they need. A base name selects all its variants.
    #[arg(long, value_name = "STAGE")]
    pub only: Vec<String>,
    /// Recompute these stages even if cached.
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<String>,
}

/// `pipeline run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The experiment manifest and its parameter overrides.
    #[command(flatten)]
    pub manifest: ManifestArgs,
    /// The stages to run and recompute.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Stages running at once (default: number of CPUs). GPU stages never overlap.
    #[arg(long, short)]
    pub jobs: Option<usize>,
    /// Print the closing table as JSON.
    #[arg(long)]
    pub json: bool,
    /// Where stages run: here, or as Slurm jobs (default: the manifest's
    /// `experiment.executor`, else local).
    #[arg(long, value_enum)]
    pub executor: Option<ExecutorArg>,
    /// Worker mode (Slurm jobs run this): compute the one `--only` stage, whose key must be
    /// KEY, from producers already in the cache.
    #[arg(long, value_name = "KEY", requires = "only")]
    pub expect_key: Option<String>,
    /// Worker mode without a known key (jobs of a detached run): compute the one `--only`
    /// stage from producers already in the cache.
    #[arg(long, requires = "only")]
    pub worker: bool,
    /// With `--executor slurm`: submit every stage as a job that waits for its producers'
    /// jobs (`afterok`), and exit; `pipeline status M` shows how they are doing.
    #[arg(long)]
    pub detach: bool,
}

/// `--executor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExecutorArg {
    /// Threads of this process.
    Local,
    /// Slurm jobs (`sbatch`), this process coordinating.
    Slurm,
}

impl From<ExecutorArg> for ExecutorKind {
    fn from(arg: ExecutorArg) -> Self {
        match arg {
            ExecutorArg::Local => ExecutorKind::Local,
            ExecutorArg::Slurm => ExecutorKind::Slurm,
        }
    }
}

/// `pipeline plan`.
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// The experiment manifest and its parameter overrides.
    #[command(flatten)]
    pub manifest: ManifestArgs,
    /// The stages to plan, and those to treat as forced.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// JSON array of {"stage", "action", "reason"}.
    #[arg(long)]
    pub json: bool,
    /// Show how stages would be launched (with `slurm`: each job's `sbatch` line).
    #[arg(long, value_enum)]
    pub executor: Option<ExecutorArg>,
}

/// `pipeline status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// A manifest to report on.
    pub manifest: Option<PathBuf>,
}

/// `pipeline dag`.
#[derive(clap::Args, Debug)]
pub struct DagArgs {
    /// The experiment manifest and its parameter overrides.
    #[command(flatten)]
    pub manifest: ManifestArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = DagFormatArg::Text)]
    pub format: DagFormatArg,
}

/// `pipeline show`.
#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// The experiment manifest and its parameter overrides.
    #[command(flatten)]
    pub manifest: ManifestArgs,
    /// Stage instance name (e.g. `train@messy`).
    pub stage: String,
}

/// `pipeline gc`.
#[derive(clap::Args, Debug)]
pub struct GcArgs {
    /// Manifests whose current results are kept.
    pub manifests: Vec<PathBuf>,
    /// Keep anything written more recently than this (e.g. 30s, 12h, 7d, 1h 30m).
    #[arg(long, default_value = "7d")]
    pub keep_younger_than: String,
    /// Say what would be removed, and remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation (asked only when stdin is a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// `pipeline runs`.
#[derive(clap::Args, Debug)]
pub struct RunsArgs {
    /// The experiment manifest (TOML) whose runs to compare.
    pub manifest: PathBuf,
    /// Only the last N runs.
    #[arg(long)]
    pub last: Option<usize>,
    /// Print the run records as JSON.
    #[arg(long, conflicts_with = "markdown")]
    pub json: bool,
    /// Print the table as Markdown.
    #[arg(long)]
    pub markdown: bool,
}

/// `pipeline kinds`.
#[derive(clap::Args, Debug)]
pub struct KindsArgs {
    /// A kind to describe in full (inputs, outputs, every parameter).
    pub kind: Option<String>,
    /// Print JSON (with each kind's parameter schema) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `pipeline hash`.
#[derive(clap::Args, Debug)]
pub struct HashArgs {
    /// Files to hash.
    pub files: Vec<PathBuf>,
}

/// Subcommands (besides those the registry adds).
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run what is not cached, in dependency order.
    Run(RunArgs),
    /// Say what a run would do and why (dry run).
    Plan(PlanArgs),
    /// Cache contents, or per-stage state of a manifest.
    Status(StatusArgs),
    /// Print the expanded stage graph.
    Dag(DagArgs),
    /// Key, artifacts, metadata and timings of one stage.
    Show(ShowArgs),
    /// Remove cache entries not used by the given manifests and older than --keep-younger-than.
    Gc(GcArgs),
    /// Every recorded run of a manifest side by side: when, commit, what changed, headline
    /// metrics.
    Runs(RunsArgs),
    /// Rehash every object; quarantine corrupt ones so the next run recomputes them.
    Verify,
    /// List the stage kinds this binary knows; with a kind, its inputs, outputs and every
    /// parameter (type, default, documentation).
    Kinds(KindsArgs),
    /// Print the blake3 hash of a file (as the cache computes it; `b3sum`-compatible).
    Hash(HashArgs),
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

/// What the command line asks for: a built-in command or a registered one.
enum Invocation<'r> {
    BuiltIn(Command),
    Registered(&'r dyn pipeline_engine::Command, Vec<OsString>),
    OnStage(&'r dyn StageCommand, StageCommandArgs),
}

/// The arguments of a registered [`StageCommand`] (`pipeline serve M STAGE [ARGS]`).
#[derive(Debug)]
struct StageCommandArgs {
    /// The manifest and its overrides.
    manifest: ManifestArgs,
    /// The stage instance it acts on.
    stage: String,
    /// The command's own arguments (after the stage name), unparsed.
    rest: Vec<OsString>,
}

/// The argument that collects a registered command's arguments.
const FORWARDED_ARGS: &str = "args";
/// The `help` subcommand, and its argument: the command to explain.
const HELP: &str = "help";
const HELP_TOPIC: &str = "command";

/// The registered commands the CLI offers: a built-in command of the same name wins.
fn registered_commands(registry: &Registry) -> impl Iterator<Item = &dyn pipeline_engine::Command> {
    let built_in = Cli::command();
    registry
        .commands()
        .filter(move |c| c.name() != HELP && built_in.find_subcommand(c.name()).is_none())
}

/// The registered stage commands the CLI offers: a built-in or registered command of the same
/// name wins.
fn registered_stage_commands(registry: &Registry) -> impl Iterator<Item = &dyn StageCommand> {
    let taken: BTreeSet<&str> = registered_commands(registry).map(|c| c.name()).collect();
    let built_in = Cli::command();
    registry.stage_commands().filter(move |c| {
        c.name() != HELP
            && built_in.find_subcommand(c.name()).is_none()
            && !taken.contains(c.name())
    })
}

/// The registered stage command called `name`.
fn registered_stage_command<'r>(
    registry: &'r Registry,
    name: &str,
) -> Option<&'r dyn StageCommand> {
    registered_stage_commands(registry).find(|c| c.name() == name)
}

/// The arguments of a stage command's clap subcommand.
const STAGE_MANIFEST: &str = "manifest";
const STAGE_NAME: &str = "stage";
const STAGE_SET: &str = "set";

/// The clap subcommand of a registered stage command: the manifest, its overrides and the
/// stage as `pipeline show` takes them, then the command's own arguments, which its help
/// ([`StageCommand::options_help`]) describes.
fn stage_subcommand(command: &dyn StageCommand) -> clap::Command {
    clap::Command::new(command.name())
        .about(command.about())
        .after_long_help(format!(
            "It acts on a cached stage of kind {}; `pipeline run MANIFEST --only STAGE` caches \
             it.\n\nOptions of `{}` (after STAGE):\n{}",
            command
                .kinds()
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", "),
            command.name(),
            command.options_help().trim_end()
        ))
        .arg(
            clap::Arg::new(STAGE_MANIFEST)
                .value_name("MANIFEST")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help("The experiment manifest (TOML)"),
        )
        .arg(
            clap::Arg::new(STAGE_NAME)
                .value_name("STAGE")
                .required(true)
                .help("Stage instance name (e.g. `train@messy`)"),
        )
        .arg(
            clap::Arg::new(STAGE_SET)
                .long("set")
                .value_name("STAGE.PARAM=VALUE")
                .action(clap::ArgAction::Append)
                .help("Override a parameter: STAGE.PARAM=VALUE (VALUE is TOML; bare words are strings)"),
        )
        .arg(
            clap::Arg::new(FORWARDED_ARGS)
                .value_name("ARGS")
                .num_args(0..)
                .trailing_var_arg(true)
                .allow_hyphen_values(true)
                .value_parser(clap::value_parser!(OsString))
                .help("The command's own options (see below)"),
        )
}

/// The registered command called `name`.
fn registered_command<'r>(
    registry: &'r Registry,
    name: &str,
) -> Option<&'r dyn pipeline_engine::Command> {
    registered_commands(registry).find(|c| c.name() == name)
}

/// The CLI's clap command: the built-in subcommands, every registered one, and `help`.
fn command_line(registry: &Registry) -> clap::Command {
    // clap's own `help` subcommand would explain a registered command by its placeholder
    // arguments; this one asks the command itself.
    let cli = Cli::command().disable_help_subcommand(true);
    let cli = registered_commands(registry).fold(cli, |cli, command| {
        cli.subcommand(
            clap::Command::new(command.name())
                .about(command.about())
                // `--help` and every other argument belong to the command itself.
                .disable_help_flag(true)
                .arg(
                    clap::Arg::new(FORWARDED_ARGS)
                        .num_args(0..)
                        .trailing_var_arg(true)
                        .allow_hyphen_values(true)
                        .value_parser(clap::value_parser!(OsString)),
                ),
        )
    });
    let cli = registered_stage_commands(registry).fold(cli, |cli, command| {
        cli.subcommand(stage_subcommand(command))
    });
    cli.subcommand(
        clap::Command::new(HELP)
            .about("Print this message or the help of the given subcommand(s)")
            .arg(
                clap::Arg::new(HELP_TOPIC)
                    .value_name("COMMAND")
                    .num_args(0..)
                    .help("Print help for the subcommand(s)"),
            ),
    )
}

/// `pipeline help [COMMAND...]`: a registered command prints its own help; otherwise the
/// CLI's help (or a built-in command's) is printed here and the process exits.
fn help<'r>(mut cli: clap::Command, registry: &'r Registry, topic: &[String]) -> Invocation<'r> {
    if let Some(command) = topic
        .first()
        .and_then(|name| registered_command(registry, name))
    {
        return Invocation::Registered(command, vec![OsString::from("--help")]);
    }
    cli.build();
    let mut target = &mut cli;
    for name in topic {
        let Some(sub) = target.find_subcommand_mut(name) else {
            let message = format!("unrecognized subcommand '{name}'");
            cli.error(clap::error::ErrorKind::InvalidSubcommand, message)
                .exit();
        };
        target = sub;
    }
    let printed = target.print_long_help();
    std::process::exit(if printed.is_ok() { 0 } else { 1 });
}

/// Parses the process arguments (clap prints usage errors and help, and exits).
fn parse_command_line(registry: &Registry) -> (GlobalOptions, Invocation<'_>) {
    let mut cli = command_line(registry);
    // Parsing through `&mut` keeps the binary's name (from argv[0]) for help printed later.
    let matches = cli
        .try_get_matches_from_mut(std::env::args_os())
        .unwrap_or_else(|e| e.exit());
    let parsed = GlobalOptions::from_arg_matches(&matches).map_err(|e| e.format(&mut cli.clone()));
    let mut global = parsed.unwrap_or_else(|e| e.exit());
    if let Some((name, sub)) = matches.subcommand() {
        if name == HELP {
            let topic: Vec<String> = sub
                .get_many::<String>(HELP_TOPIC)
                .map(|t| t.cloned().collect())
                .unwrap_or_default();
            return (global, help(cli, registry, &topic));
        }
        if let Some(command) = registered_command(registry, name) {
            let args: Vec<OsString> = sub
                .get_many::<OsString>(FORWARDED_ARGS)
                .map(|args| args.cloned().collect())
                .unwrap_or_default();
            let args = take_global_options(args, &mut global, &cli);
            return (global, Invocation::Registered(command, args));
        }
        if let Some(command) = registered_stage_command(registry, name) {
            let rest: Vec<OsString> = sub
                .get_many::<OsString>(FORWARDED_ARGS)
                .map(|args| args.cloned().collect())
                .unwrap_or_default();
            let rest = take_global_options(rest, &mut global, &cli);
            let (mut set, rest) = take_set_options(rest, &cli);
            if rest
                .iter()
                .take_while(|a| *a != "--")
                .any(|a| a == "--help" || a == "-h")
            {
                if let Some(sub) = cli.find_subcommand_mut(name) {
                    let printed = sub.print_long_help();
                    std::process::exit(if printed.is_ok() { 0 } else { 1 });
                }
            }
            let mut manifest_set: Vec<String> = sub
                .get_many::<String>(STAGE_SET)
                .map(|v| v.cloned().collect())
                .unwrap_or_default();
            manifest_set.append(&mut set);
            let args = StageCommandArgs {
                manifest: ManifestArgs {
                    manifest: sub
                        .get_one::<PathBuf>(STAGE_MANIFEST)
                        .cloned()
                        .unwrap_or_default(),
                    set: manifest_set,
                },
                stage: sub
                    .get_one::<String>(STAGE_NAME)
                    .cloned()
                    .unwrap_or_default(),
                rest,
            };
            return (global, Invocation::OnStage(command, args));
        }
    }
    let command = Command::from_arg_matches(&matches)
        .map_err(|e| e.format(&mut cli.clone()))
        .unwrap_or_else(|e| e.exit());
    (global, Invocation::BuiltIn(command))
}

/// Takes the global options out of a registered command's arguments: clap stops parsing at its
/// first argument, but global options apply to every command wherever they are written.
fn take_global_options(
    args: Vec<OsString>,
    global: &mut GlobalOptions,
    cli: &clap::Command,
) -> Vec<OsString> {
    let mut rest = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            rest.push(arg);
            rest.extend(args);
            break;
        }
        let text = arg.to_string_lossy().into_owned();
        let (flag, inline) = match text.split_once('=') {
            Some((flag, value)) => (flag, Some(OsString::from(value))),
            None => (text.as_str(), None),
        };
        if flag != "--cache" && flag != "--error-format" {
            rest.push(arg);
            continue;
        }
        let Some(value) = inline.or_else(|| args.next()) else {
            let message = format!("a value is required for '{flag} <VALUE>' but none was supplied");
            cli.clone()
                .error(clap::error::ErrorKind::InvalidValue, message)
                .exit();
        };
        if flag == "--cache" {
            global.cache = Some(PathBuf::from(value));
            continue;
        }
        let value = value.to_string_lossy();
        global.error_format = ErrorFormat::from_str(&value, false).unwrap_or_else(|_| {
            let message =
                format!("invalid value '{value}' for '--error-format': use human or json");
            cli.clone()
                .error(clap::error::ErrorKind::InvalidValue, message)
                .exit()
        });
    }
    rest
}

/// Takes `--set` overrides out of a stage command's own arguments, wherever they are written
/// (before a `--`): they belong to the manifest.
fn take_set_options(args: Vec<OsString>, cli: &clap::Command) -> (Vec<String>, Vec<OsString>) {
    let mut set = Vec::new();
    let mut rest = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            rest.push(arg);
            rest.extend(args);
            break;
        }
        let text = arg.to_string_lossy().into_owned();
        if let Some(value) = text.strip_prefix("--set=") {
            set.push(value.to_string());
        } else if text == "--set" {
            let Some(value) = args.next() else {
                let message =
                    "a value is required for '--set <STAGE.PARAM=VALUE>' but none was supplied";
                cli.clone()
                    .error(clap::error::ErrorKind::InvalidValue, message)
                    .exit();
            };
            set.push(value.to_string_lossy().into_owned());
        } else {
            rest.push(arg);
        }
    }
    (set, rest)
}

/// Runs the CLI with `registry`'s stage kinds and commands; returns the process exit code.
pub fn main_with(registry: Registry) -> ExitCode {
    let (global, invocation) = parse_command_line(&registry);
    let color = stderr_wants_color();
    if global.error_format == ErrorFormat::Human {
        let _ = miette::set_hook(Box::new(move |_| {
            Box::new(
                miette::MietteHandlerOpts::new()
                    .terminal_links(false)
                    .color(color)
                    .context_lines(2)
                    .build(),
            )
        }));
    }
    init_tracing(color);
    let context = Context {
        cache: global.cache,
        registry: &registry,
        error_format: global.error_format,
    };
    let result = match invocation {
        Invocation::BuiltIn(command) => dispatch(command, &context),
        Invocation::Registered(command, args) => command.run(args).map_err(fail),
        Invocation::OnStage(command, args) => on_stage(command, args, &context),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Failure { report, code }) => {
            print_report(&report, global.error_format);
            ExitCode::from(code)
        }
    }
}

/// Colour only on a terminal, and never with `NO_COLOR` set (https://no-color.org): a log
/// file or a CI page gets plain text.
fn stderr_wants_color() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::IsTerminal::is_terminal(&std::io::stderr())
}

fn init_tracing(color: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PIPELINE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(color)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn print_report(report: &Report, format: ErrorFormat) {
    match format {
        ErrorFormat::Human => eprintln!("{report:?}"),
        ErrorFormat::Json => {
            let json = pipeline_engine::diagnostic::JsonDiagnostic::of(report.as_ref());
            eprintln!("{}", json.to_line());
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
        fail(Report::new(e))
    }
}

fn fail(report: Report) -> Failure {
    Failure {
        report,
        code: EXIT_FAILED,
    }
}

fn usage(report: Report) -> Failure {
    Failure {
        report,
        code: EXIT_USAGE,
    }
}

/// What every built-in command may use.
struct Context<'r> {
    /// `--cache` / `PIPELINE_CACHE`.
    cache: Option<PathBuf>,
    registry: &'r Registry,
    /// `--error-format`: stage failures during a run are reported in it too.
    error_format: ErrorFormat,
}

impl Context<'_> {
    fn load(&self, args: &ManifestArgs) -> Result<Manifest, Failure> {
        let options = ManifestOptions {
            overrides: args.set.clone(),
        };
        load_manifest(&args.manifest, self.registry, &options)
            .map_err(|e: ManifestLoadError| usage(Report::new(e)))
    }

    /// The cache: `--cache`, else the manifest's `experiment.cache`, else `./cache`.
    fn open_store(&self, manifest: Option<&Manifest>) -> Result<Store, Failure> {
        open_store(self.cache.clone(), manifest)
    }
}

fn open_store(cache: Option<PathBuf>, manifest: Option<&Manifest>) -> Result<Store, Failure> {
    let from_manifest = manifest.and_then(|m| {
        let cache = m.experiment.cache.as_ref()?;
        Some(pipeline_engine::executor::base_dir(m).join(cache))
    });
    let root = cache
        .or(from_manifest)
        .unwrap_or_else(|| PathBuf::from("cache"));
    Store::open(&root).map_err(|e| {
        fail(miette::miette!(
            help = "pass --cache DIR or set PIPELINE_CACHE",
            "cannot open cache {}: {e}",
            root.display()
        ))
    })
}

fn stage_names(manifest: &Manifest) -> String {
    manifest
        .stages
        .iter()
        .map(|s| s.name.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The help of an error about a stage name that names nothing: a likely intended name first.
fn unknown_stage_help(manifest: &Manifest, name: &str) -> String {
    match manifest.closest_name(name) {
        Some(close) => format!("did you mean `{close}`? stages: {}", stage_names(manifest)),
        None => format!("stages: {}", stage_names(manifest)),
    }
}

fn check_names(manifest: &Manifest, names: &[String], flag: &str) -> Result<(), Failure> {
    match names.iter().find(|name| manifest.select(name).is_empty()) {
        None => Ok(()),
        Some(name) => Err(usage(miette::miette!(
            help = unknown_stage_help(manifest, name),
            "{flag} {name}: no such stage"
        ))),
    }
}

fn check_selection(manifest: &Manifest, selection: &SelectionArgs) -> Result<(), Failure> {
    check_names(manifest, &selection.only, "--only")?;
    check_names(manifest, &selection.force, "--force")
}

fn print_json(value: &impl serde::Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value)
        .into_diagnostic()
        .map_err(fail)?;
    println!("{text}");
    Ok(())
}

/// Width of the stage column of a plan-like table.
fn stage_width(entries: &[PlanEntry]) -> usize {
    entries
        .iter()
        .map(|e| e.stage.len())
        .max()
        .unwrap_or(5)
        .max(5)
}

fn reason_text(entry: &PlanEntry) -> String {
    entry
        .decision
        .reason()
        .map(ToString::to_string)
        .unwrap_or_default()
}

/// A registered [`StageCommand`] on the one cached instance its arguments name: the manifest
/// is read as `show` reads it; an unknown name, a name of several instances, a stage of
/// another kind and a stage whose result is not cached are errors that say what to do.
fn on_stage(
    command: &dyn StageCommand,
    args: StageCommandArgs,
    context: &Context<'_>,
) -> Result<u8, Failure> {
    let manifest = context.load(&args.manifest)?;
    let stage = &args.stage;
    let instance = match manifest.select(stage).as_slice() {
        [] => {
            return Err(usage(miette::miette!(
                help = unknown_stage_help(&manifest, stage),
                "no stage `{stage}`"
            )))
        }
        [one] => *one,
        several => {
            let names: Vec<String> = several.iter().map(|s| s.name.to_string()).collect();
            return Err(usage(miette::miette!(
                help = format!("name one of them: {}", names.join(", ")),
                "`{stage}` names {} stage instances; `pipeline {}` acts on one",
                names.len(),
                command.name()
            )));
        }
    };
    if !command.kinds().contains(&instance.kind) {
        return Err(usage(miette::miette!(
            help = format!(
                "name a stage of kind {}",
                command
                    .kinds()
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "stage `{}` is of kind `{}`, which `pipeline {}` does not act on",
            instance.name,
            instance.kind,
            command.name()
        )));
    }
    let store = context.open_store(Some(&manifest))?;
    let cached =
        pipeline_engine::executor::cached_stage(&manifest, &store, &instance.name).map_err(fail)?;
    let cached = cached.map_err(|reason| {
        fail(miette::miette!(
            help = format!(
                "run it first: `{}`",
                rerun_line(&args.manifest, &instance.name.to_string(), context)
            ),
            "stage `{}` is not in the cache ({reason})",
            instance.name
        ))
    })?;
    command.run(&cached, args.rest).map_err(fail)
}

/// The `pipeline run` command line that caches `stage` of the manifest read with `args`.
fn rerun_line(args: &ManifestArgs, stage: &str, context: &Context<'_>) -> String {
    let mut line = format!(
        "pipeline run {}",
        shell_word(&args.manifest.to_string_lossy())
    );
    if let Some(cache) = &context.cache {
        line.push_str(&format!(
            " --cache {}",
            shell_word(&cache.to_string_lossy())
        ));
    }
    for set in &args.set {
        line.push_str(&format!(" --set {}", shell_word(set)));
    }
    line.push_str(&format!(" --only {}", shell_word(stage)));
    line
}

/// `text` as one word of a POSIX shell command line (single-quoted unless plainly safe).
fn shell_word(text: &str) -> String {
    let safe = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./@,=:+%".contains(c));
    if safe {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

fn dispatch(command: Command, context: &Context<'_>) -> Result<u8, Failure> {
    match command {
        Command::Run(args) => run(&args, context),
        Command::Plan(args) => plan_command(&args, context),
        Command::Status(args) => status(&args, context),
        Command::Dag(args) => dag(&args, context),
        Command::Show(args) => show(&args, context),
        Command::Gc(args) => gc(&args, context),
        Command::Verify => verify(context),
        Command::Runs(args) => runs(&args, context),
        Command::Kinds(args) => kinds(&args, context.registry),
        Command::Hash(args) => hash(&args),
    }
}

fn run(args: &RunArgs, context: &Context<'_>) -> Result<u8, Failure> {
    let manifest = context.load(&args.manifest)?;
    check_selection(&manifest, &args.selection)?;
    let worker = if args.worker || args.expect_key.is_some() {
        Some(worker_target(
            &manifest,
            &args.selection,
            args.expect_key.clone(),
            context,
        )?)
    } else {
        None
    };
    let store = context.open_store(Some(&manifest))?;
    let cancel = Arc::new(AtomicBool::new(false));
    install_interrupt_handler(cancel.clone());
    // A worker told that its time limit is near (SIGUSR1) stops at a safe point like on
    // Ctrl-C, then requeues its own job, which resumes from the checkpoint.
    let time_up = Arc::new(AtomicBool::new(false));
    if worker.is_some() {
        for flag in [&cancel, &time_up] {
            if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGUSR1, flag.clone())
            {
                tracing::warn!("cannot handle SIGUSR1 (the time-limit warning): {e}");
            }
        }
    }
    let executor = executor_of(args.executor, &manifest);
    let mut options = RunOptions {
        only: args.selection.only.clone(),
        force: args.selection.force.clone(),
        cancel,
        progress: if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            ProgressMode::Bars
        } else {
            ProgressMode::Lines
        },
        // A worker computes its stage here, whatever the manifest's executor.
        executor: if worker.is_some() {
            ExecutorKind::Local
        } else {
            executor
        },
        worker,
        json_errors: context.error_format == ErrorFormat::Json,
        ..RunOptions::default()
    };
    if options.executor == ExecutorKind::Slurm {
        options.worker_command = Some(Arc::new(CliWorker::new(&manifest, &store, args)?));
    }
    if args.detach {
        return detach(&manifest, &store, &options, args);
    }
    if options.worker.is_none() {
        check_keys_up_front(&manifest, &store, &options)?;
    }
    if let Some(jobs) = args.jobs {
        options.jobs = jobs;
    }
    let started = unix_now();
    let report = pipeline_engine::run(&manifest, &store, &options).map_err(fail)?;
    if options.worker.is_none() {
        record_run(&manifest, &store, &report, args, started);
    }
    if args.json {
        print_json(&report)?;
    } else {
        print_run_table(&report);
        print_headline_files(&manifest, &store, &report);
    }
    if report.key_busy {
        return Ok(EXIT_KEY_BUSY);
    }
    if report.cancelled && time_up.load(Ordering::SeqCst) {
        requeue_own_job();
        return Ok(EXIT_INTERRUPTED);
    }
    if report.cancelled {
        eprintln!("interrupted: finished stages are cached; rerun the same command to resume");
        return Ok(EXIT_INTERRUPTED);
    }
    Ok(if report.success() { 0 } else { EXIT_FAILED })
}

fn runs(args: &RunsArgs, context: &Context<'_>) -> Result<u8, Failure> {
    let manifest = context.load(&ManifestArgs::plain(&args.manifest))?;
    let store = context.open_store(Some(&manifest))?;
    let (mut records, unreadable) =
        pipeline_engine::runs::load(store.root(), &manifest.experiment.name);
    for path in unreadable {
        eprintln!("warning: skipping unreadable run record {}", path.display());
    }
    if let Some(n) = args.last {
        let skip = records.len().saturating_sub(n);
        records.drain(..skip);
    }
    if args.json {
        return print_json(&records).map(|()| 0);
    }
    if records.is_empty() {
        eprintln!(
            "no runs of `{}` recorded in {} yet: `pipeline run {}` records one",
            manifest.experiment.name,
            store.root().display(),
            args.manifest.display()
        );
        return Ok(0);
    }
    let table = pipeline_engine::runs::RunsTable::new(&records);
    print!(
        "{}",
        if args.markdown {
            table.markdown()
        } else {
            table.text()
        }
    );
    Ok(0)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Leaves this run's record in the cache for `pipeline runs` (a failure to write it is a
/// warning: the run itself is done).
fn record_run(
    manifest: &Manifest,
    store: &Store,
    report: &RunReport,
    args: &RunArgs,
    started: f64,
) {
    use pipeline_engine::runs::{is_headline, save, RunRecord, RunStage};
    let stages = report
        .stages
        .iter()
        .filter_map(|s| {
            let instance = manifest.stage(&s.stage)?;
            let status = serde_json::to_value(&s.outcome)
                .ok()
                .and_then(|o| o["status"].as_str().map(str::to_string))
                .unwrap_or_default();
            let patterns = instance.headline_metrics();
            let metrics = s
                .key
                .as_ref()
                .filter(|_| !patterns.is_empty())
                .and_then(|k| store.action(k))
                .map(|record| {
                    record
                        .metadata
                        .iter()
                        .filter(|(k, _)| is_headline(k, patterns))
                        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                        .collect()
                })
                .unwrap_or_default();
            Some(RunStage {
                stage: s.stage.clone(),
                kind: instance.kind.to_string(),
                key: s.key.clone(),
                status,
                params: instance.params.canonical.clone(),
                metrics,
            })
        })
        .collect();
    let (commit, dirty) = git_state(&manifest.path);
    let record = RunRecord {
        experiment: manifest.experiment.name.clone(),
        manifest: manifest.path.clone(),
        started_unix: started,
        finished_unix: unix_now(),
        commit,
        dirty,
        overrides: args.manifest.set.clone(),
        only: args.selection.only.clone(),
        status: if report.cancelled {
            "interrupted"
        } else if report.success() {
            "ok"
        } else {
            "failed"
        }
        .into(),
        stages,
    };
    if let Err(e) = save(store.root(), &record) {
        tracing::warn!("cannot record this run for `pipeline runs`: {e}");
    }
}

/// The commit checked out where `manifest` lives, and whether the manifest differs from it
/// (both `None` outside a git repository or without git).
fn git_state(manifest: &std::path::Path) -> (Option<String>, Option<bool>) {
    let dir = manifest
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(commit) = git(&["rev-parse", "HEAD"]) else {
        return (None, None);
    };
    let name = manifest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let dirty =
        name.and_then(|n: String| git(&["status", "--porcelain", "--", &n]).map(|s| !s.is_empty()));
    (Some(commit), dirty)
}

/// Puts this Slurm job back in the queue (`scontrol requeue`): a worker does so after
/// checkpointing on the time-limit warning, so that the job resumes with a fresh allowance.
fn requeue_own_job() {
    let Ok(job) = std::env::var("SLURM_JOB_ID") else {
        eprintln!("time limit near, checkpointed; not a Slurm job, so nothing to requeue");
        return;
    };
    eprintln!("time limit near: checkpointed; requeueing job {job} to resume from the checkpoint");
    match std::process::Command::new("scontrol")
        .args(["requeue", &job])
        .status()
    {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!(
            "scontrol requeue {job} failed ({s}); the coordinator resubmits after the time limit"
        ),
        Err(e) => {
            eprintln!("cannot run scontrol ({e}); the coordinator resubmits after the time limit")
        }
    }
}

/// Stops a run before anything runs when a stage's key cannot be computed from what exists
/// now (a path that is missing, a device or a FIFO): every such stage is named at once, instead
/// of the run failing at that stage after the others ran.
fn check_keys_up_front(
    manifest: &Manifest,
    store: &Store,
    options: &RunOptions,
) -> Result<(), Failure> {
    let entries = plan(manifest, store, options).map_err(fail)?;
    let broken: Vec<String> = entries
        .iter()
        .filter_map(|e| match e.decision.reason() {
            Some(reason @ pipeline_engine::executor::RunReason::KeyNotComputable(_)) => {
                Some(format!("stage `{}`: {reason}", e.stage))
            }
            _ => None,
        })
        .collect();
    if broken.is_empty() {
        return Ok(());
    }
    Err(usage(miette::miette!(
        help = "fix these inputs; nothing has run",
        "{} stage{} cannot start:\n{}",
        broken.len(),
        if broken.len() == 1 { "" } else { "s" },
        broken.join("\n")
    )))
}

/// `--executor`, else the manifest's `experiment.executor`, else local.
fn executor_of(arg: Option<ExecutorArg>, manifest: &Manifest) -> ExecutorKind {
    arg.map(ExecutorKind::from)
        .or(manifest.experiment.executor)
        .unwrap_or_default()
}

/// The stage a worker (`--expect-key`) computes; the cache must be the coordinator's (its
/// `slurm/` directory exists), else this node does not see it.
fn worker_target(
    manifest: &Manifest,
    selection: &SelectionArgs,
    key: Option<String>,
    context: &Context<'_>,
) -> Result<WorkerTarget, Failure> {
    let [only] = selection.only.as_slice() else {
        return Err(usage(miette::miette!(
            "--expect-key computes exactly one stage: give one --only STAGE"
        )));
    };
    let selected = manifest.select(only);
    let [stage] = selected.as_slice() else {
        return Err(usage(miette::miette!(
            "--expect-key needs one stage instance, but `{only}` selects several"
        )));
    };
    let cache = context.cache.clone().ok_or_else(|| {
        usage(miette::miette!(
            "--expect-key needs --cache (the coordinator's cache)"
        ))
    })?;
    if !cache.join(SLURM_DIR).is_dir() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "this node".into());
        return Err(fail(miette::miette!(
            help = "put the cache on a filesystem every node mounts at the same path (not /tmp \
                    or a node-local disk), or pass --cache with such a path",
            "the cache {} is not visible on {host}: it has no {SLURM_DIR}/ directory, which the \
             coordinator creates",
            cache.display()
        )));
    }
    Ok(WorkerTarget {
        stage: stage.name.to_string(),
        key,
    })
}

/// `run --detach`: submits every stage that would run as a job after its producers' jobs, and
/// returns.
fn detach(
    manifest: &Manifest,
    store: &Store,
    options: &RunOptions,
    args: &RunArgs,
) -> Result<u8, Failure> {
    let Some(worker) = options.worker_command.clone() else {
        return Err(usage(miette::miette!(
            help = "add --executor slurm, or `executor = \"slurm\"` under [experiment]",
            "--detach submits the run to Slurm, but the executor is local"
        )));
    };
    let entries = plan(manifest, store, options).map_err(fail)?;
    let client = SlurmClient::new();
    let launcher = SlurmLauncher::new(
        store,
        &manifest.experiment.name,
        manifest.experiment.slurm.clone(),
        worker,
        &client,
    );
    launcher.prepare().map_err(|e| {
        fail(miette::miette!(
            "cannot create the Slurm directories of the cache {}: {e}",
            store.root().display()
        ))
    })?;
    let forced = |name: &str| {
        manifest
            .stage(name)
            .is_some_and(|s| args.selection.force.iter().any(|f| s.name.selected_by(f)))
    };
    let run = submit_detached(manifest, &entries, &launcher, forced)
        .map_err(|e| fail(miette::miette!("{e}")))?;
    if args.json {
        print_json(&run)?;
        return Ok(0);
    }
    if run.jobs.is_empty() {
        println!("every stage is cached: nothing to submit");
        return Ok(0);
    }
    let width = run
        .jobs
        .iter()
        .map(|j| j.stage.len())
        .max()
        .unwrap_or(5)
        .max(5);
    for j in &run.jobs {
        println!("{:<width$}  job {}", j.stage, j.job_id);
    }
    println!(
        "\nsubmitted {} jobs; `pipeline status {}` shows how they are doing",
        run.jobs.len(),
        args.manifest.manifest.display()
    );
    Ok(0)
}

/// How a Slurm job runs a stage: this binary, in worker mode, with the coordinator's cache,
/// manifest and overrides.
struct CliWorker {
    binary: PathBuf,
    manifest: PathBuf,
    cache: PathBuf,
    overrides: Vec<String>,
    workdir: PathBuf,
}

impl CliWorker {
    fn new(manifest: &Manifest, store: &Store, args: &RunArgs) -> Result<Self, Failure> {
        let io = |what: &str, e: std::io::Error| fail(miette::miette!("cannot find {what}: {e}"));
        Ok(Self {
            binary: std::env::current_exe().map_err(|e| io("this program's path", e))?,
            manifest: std::path::absolute(&manifest.path)
                .map_err(|e| io("the manifest's absolute path", e))?,
            cache: store.root().to_path_buf(),
            overrides: args.manifest.set.clone(),
            workdir: std::env::current_dir().map_err(|e| io("the current directory", e))?,
        })
    }
}

impl WorkerCommand for CliWorker {
    fn argv(&self, stage: &str, key: Option<&str>, forced: bool) -> Vec<String> {
        let mut argv = vec![
            self.binary.display().to_string(),
            "--cache".into(),
            self.cache.display().to_string(),
            "run".into(),
            self.manifest.display().to_string(),
            "--only".into(),
            stage.into(),
            "--jobs".into(),
            "1".into(),
        ];
        match key {
            Some(key) => argv.extend(["--expect-key".into(), key.into()]),
            None => argv.push("--worker".into()),
        }
        if forced {
            argv.extend(["--force".into(), stage.into()]);
        }
        for o in &self.overrides {
            argv.extend(["--set".into(), o.clone()]);
        }
        argv
    }

    fn workdir(&self) -> PathBuf {
        self.workdir.clone()
    }
}

fn plan_command(args: &PlanArgs, context: &Context<'_>) -> Result<u8, Failure> {
    let manifest = context.load(&args.manifest)?;
    check_selection(&manifest, &args.selection)?;
    let store = context.open_store(Some(&manifest))?;
    let options = RunOptions {
        only: args.selection.only.clone(),
        force: args.selection.force.clone(),
        ..RunOptions::default()
    };
    let entries = plan(&manifest, &store, &options).map_err(fail)?;
    if args.json {
        print_json(&entries)?;
        return Ok(0);
    }
    let executor = executor_of(args.executor, &manifest);
    let width = stage_width(&entries);
    let client = SlurmClient::new();
    let launcher = match executor {
        ExecutorKind::Slurm => {
            let run_args = RunArgs {
                manifest: args.manifest.clone(),
                selection: args.selection.clone(),
                jobs: None,
                json: false,
                executor: args.executor,
                expect_key: None,
                worker: false,
                detach: false,
            };
            let worker = CliWorker::new(&manifest, &store, &run_args)?;
            Some(SlurmLauncher::new(
                &store,
                &manifest.experiment.name,
                manifest.experiment.slurm.clone(),
                Arc::new(worker),
                &client,
            ))
        }
        ExecutorKind::Local => None,
    };
    for e in &entries {
        let action = e.decision.action().to_string();
        println!("{:<width$}  {action:<6}  {}", e.stage, reason_text(e));
        let (Some(launcher), Action::Run) = (&launcher, e.decision.action()) else {
            continue;
        };
        let Some(stage) = manifest.stage(&e.stage) else {
            continue;
        };
        if !stage.launches_on_cluster(executor) {
            println!("{:<width$}          runs on the coordinator", "");
            continue;
        }
        let forced = args
            .selection
            .force
            .iter()
            .any(|f| stage.name.selected_by(f));
        let key = e.key.as_deref().unwrap_or("KEY");
        let (_, sbatch) = launcher.job(stage, key, forced);
        println!("{:<width$}          sbatch {}", "", sbatch.join(" "));
    }
    let runs = entries
        .iter()
        .filter(|e| e.decision.action() == Action::Run)
        .count();
    println!("\n{runs} of {} stages would run", entries.len());
    Ok(0)
}

fn status(args: &StatusArgs, context: &Context<'_>) -> Result<u8, Failure> {
    let Some(path) = &args.manifest else {
        let store = context.open_store(None)?;
        let stats = store.stats().into_diagnostic().map_err(fail)?;
        println!("cache: {}", store.root().display());
        println!(
            "objects: {} ({})",
            stats.objects,
            HumanBytes(stats.object_bytes)
        );
        println!("cached stage results: {}", stats.actions);
        println!("resumable checkpoints: {}", stats.checkpoints);
        return Ok(0);
    };
    let manifest = context.load(&ManifestArgs::plain(path))?;
    let store = context.open_store(Some(&manifest))?;
    let entries = plan(&manifest, &store, &RunOptions::default()).map_err(fail)?;
    let width = stage_width(&entries);
    // A detached run's jobs, asked about in one `squeue` call.
    let detached = read_detached_run(store.root(), &manifest.experiment.name);
    let jobs: HashMap<&str, &DetachedJob> = detached
        .iter()
        .flat_map(|run| &run.jobs)
        .map(|j| (j.stage.as_str(), j))
        .collect();
    let pending_ids: Vec<String> = entries
        .iter()
        .filter(|e| e.decision.action() == Action::Run)
        .filter_map(|e| jobs.get(e.stage.as_str()).map(|j| j.job_id.clone()))
        .collect();
    let states = if pending_ids.is_empty() {
        HashMap::new()
    } else {
        SlurmClient::new().squeue(&pending_ids).unwrap_or_else(|e| {
            eprintln!("warning: cannot ask Slurm about the detached jobs: {e}");
            HashMap::new()
        })
    };
    for e in &entries {
        let record = e.key.as_ref().and_then(|k| store.action(k));
        let detail = match record {
            Some(r) => format!(
                "{:.1}s, {}",
                r.duration_s,
                HumanBytes(r.outputs.values().map(|o| o.bytes).sum())
            ),
            None => match jobs.get(e.stage.as_str()) {
                Some(job) => {
                    let state = states.get(&job.job_id).map_or_else(
                        || "no longer in Slurm's queue".to_string(),
                        |s| match s.reason.as_str() {
                            "" | "None" => s.state.clone(),
                            r => format!("{} ({r})", s.state),
                        },
                    );
                    format!("job {} {state}; log {}", job.job_id, job.log.display())
                }
                None => reason_text(e),
            },
        };
        let state = match e.decision.action() {
            Action::Cached => "cached",
            Action::Run => "pending",
        };
        println!("{:<width$}  {state:<7}  {detail}", e.stage);
    }
    if detached.is_some()
        && entries
            .iter()
            .all(|e| e.decision.action() == Action::Cached)
    {
        println!("\nthe detached run is done: every stage is cached");
        let report = RunReport {
            stages: entries
                .iter()
                .map(|e| pipeline_engine::executor::StageResult {
                    stage: e.stage.clone(),
                    outcome: StageOutcome::Cached,
                    key: e.key.clone(),
                    wall_s: 0.0,
                    bytes: 0,
                    reason: None,
                })
                .collect(),
            cancelled: false,
            key_busy: false,
            slurm_calls: None,
        };
        print_headline_files(&manifest, &store, &report);
    }
    Ok(0)
}

fn dag(args: &DagArgs, context: &Context<'_>) -> Result<u8, Failure> {
    let manifest = context.load(&args.manifest)?;
    let format = match args.format {
        DagFormatArg::Text => DagFormat::Text,
        DagFormatArg::Dot => DagFormat::Dot,
        DagFormatArg::Mermaid => DagFormat::Mermaid,
        DagFormatArg::Json => DagFormat::Json,
    };
    println!("{}", render(&manifest, format).trim_end());
    Ok(0)
}

fn show(args: &ShowArgs, context: &Context<'_>) -> Result<u8, Failure> {
    let manifest = context.load(&args.manifest)?;
    let stage = &args.stage;
    // A table name shows each of its instances, as `--only` selects them all.
    let instances = manifest.select(stage);
    if instances.is_empty() {
        return Err(usage(miette::miette!(
            help = unknown_stage_help(&manifest, stage),
            "no stage `{stage}`"
        )));
    }
    let store = context.open_store(Some(&manifest))?;
    let only = RunOptions {
        only: vec![stage.clone()],
        ..RunOptions::default()
    };
    let entries = plan(&manifest, &store, &only).map_err(fail)?;
    for (i, instance) in instances.into_iter().enumerate() {
        if i > 0 {
            println!();
        }
        show_instance(instance, &entries, &store);
    }
    Ok(0)
}

/// `show`'s account of one instance: kind, parameters, key, state, outputs, metadata.
fn show_instance(instance: &pipeline_engine::StageInstance, entries: &[PlanEntry], store: &Store) {
    let entry = entries
        .iter()
        .find(|e| e.stage == instance.name.to_string());
    let reason = entry.map(reason_text).unwrap_or_default();
    println!(
        "stage:   {} (kind `{}` v{})",
        instance.name, instance.kind, instance.kind_version
    );
    println!("params:  {}", instance.params.canonical);
    let Some(key) = entry.and_then(|e| e.key.clone()) else {
        println!("key:     not computable yet ({reason})");
        return;
    };
    println!("key:     {key}");
    let Some(record) = store.action(&key) else {
        println!("state:   not cached ({reason})");
        return;
    };
    println!("state:   cached (ran {:.2}s)", record.duration_s);
    for (name, out) in &record.outputs {
        println!(
            "output:  {name} -> {} ({} files, {})",
            store.view_path(&out.tree).display(),
            out.files,
            HumanBytes(out.bytes)
        );
    }
    if !record.metadata.is_empty() {
        println!(
            "metadata: {}",
            serde_json::to_string_pretty(&record.metadata).unwrap_or_default()
        );
    }
}

fn gc(args: &GcArgs, context: &Context<'_>) -> Result<u8, Failure> {
    let text = &args.keep_younger_than;
    let age = humantime::parse_duration(text).map_err(|e| {
        usage(miette::miette!(
            help = format!("use a duration such as 30s, 12h, 7d or 1h 30m ({e})"),
            "invalid age `{text}`"
        ))
    })?;
    let mut keep = BTreeSet::new();
    let mut store_root = context.cache.clone();
    for path in &args.manifests {
        let manifest = context.load(&ManifestArgs::plain(path))?;
        let store = context.open_store(Some(&manifest))?;
        store_root.get_or_insert(store.root().to_path_buf());
        let entries = plan(&manifest, &store, &RunOptions::default()).map_err(fail)?;
        keep.extend(entries.into_iter().filter_map(|e| e.key));
    }
    let store = open_store(store_root, None)?;
    // Jobs of a detached run (or of a coordinator that died) write into the cache.
    let in_flight = jobs_in_flight(store.root(), &SlurmClient::new())
        .map_err(|e| fail(miette::miette!(help = "if you are sure no job of this cache runs, remove its slurm/jobs and slurm/detached records", "{e}")))?;
    if !in_flight.is_empty() {
        return Err(fail(miette::miette!(
            help = "wait for them (`pipeline status M`) or cancel them (`scancel ID`), then run gc again",
            "{} Slurm jobs of this cache are still queued or running ({}): gc would remove what they read and write",
            in_flight.len(),
            in_flight.join(", ")
        )));
    }
    wait_notice(&store, "gc");
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if args.dry_run || (interactive && !args.yes) {
        let report = store.gc(&keep, age, true).into_diagnostic().map_err(fail)?;
        let pruned = prune(&store, age, true).into_diagnostic().map_err(fail)?;
        print_gc_summary(&report, &pruned, "would remove");
        if args.dry_run {
            return Ok(0);
        }
        if report.removed_actions + report.removed_objects + pruned.logs + pruned.records == 0 {
            return Ok(0);
        }
        eprint!("remove them? [y/N] ");
        let mut answer = String::new();
        let _ = std::io::stdin().read_line(&mut answer);
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("nothing removed");
            return Ok(0);
        }
    }
    let report = store
        .gc(&keep, age, false)
        .into_diagnostic()
        .map_err(fail)?;
    let pruned = prune(&store, age, false).into_diagnostic().map_err(fail)?;
    print_gc_summary(&report, &pruned, "removed");
    Ok(0)
}

/// `gc`'s one-line account (and one for Slurm leftovers, if any); `verb` is "removed" or
/// "would remove".
fn print_gc_summary(
    report: &pipeline_engine::store::GcReport,
    pruned: &pipeline_engine::slurm::housekeeping::Pruned,
    verb: &str,
) {
    println!(
        "kept {} cached results, {verb} {}; {verb} {} objects ({})",
        report.kept_actions,
        report.removed_actions,
        report.removed_objects,
        HumanBytes(report.freed_bytes)
    );
    if pruned.logs + pruned.records > 0 {
        println!(
            "{verb} {} Slurm job logs and {} job records",
            pruned.logs, pruned.records
        );
    }
}

fn verify(context: &Context<'_>) -> Result<u8, Failure> {
    let store = context.open_store(None)?;
    wait_notice(&store, "verify");
    let report = store.verify().into_diagnostic().map_err(fail)?;
    println!(
        "checked {} objects: {} corrupt",
        report.objects,
        report.corrupt_objects.len()
    );
    for h in &report.corrupt_objects {
        println!("  corrupt object {h} (moved to quarantine/)");
    }
    for m in &report.missing {
        println!("  missing {m}");
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
    Ok(
        if report.corrupt_objects.is_empty() && report.missing.is_empty() {
            0
        } else {
            EXIT_FAILED
        },
    )
}

/// Says so when `command` is about to wait for runs that hold the cache (it needs the cache
/// alone), instead of seeming to hang.
fn wait_notice(store: &Store, command: &str) {
    if !store.is_idle() {
        eprintln!(
            "{command}: waiting for the runs using {} to finish (it needs the cache alone)...",
            store.root().display()
        );
    }
}

fn kinds(args: &KindsArgs, registry: &Registry) -> Result<u8, Failure> {
    let Some(kind) = &args.kind else {
        if args.json {
            let all: Vec<_> = registry
                .kind_names()
                .filter_map(|k| registry.describe(k))
                .collect();
            return print_json(&all).map(|()| 0);
        }
        for kind in registry.kind_names() {
            println!("{kind:<14} {}", registry.summary(kind).unwrap_or(""));
        }
        println!("\n`pipeline kinds KIND` shows a kind's inputs, outputs and parameters.");
        return Ok(0);
    };
    let Some(doc) = registry.describe(kind) else {
        let names: Vec<&str> = registry.kind_names().collect();
        let close = pipeline_engine::params::did_you_mean(kind, names.iter().copied())
            .map(|n| format!("did you mean `{n}`? "));
        return Err(usage(miette::miette!(
            help = format!(
                "{}the kinds are: {}",
                close.unwrap_or_default(),
                names.join(", ")
            ),
            "unknown stage kind `{kind}`"
        )));
    };
    if args.json {
        return print_json(&doc).map(|()| 0);
    }
    print!("{}", kind_text(&doc));
    Ok(0)
}

/// `pipeline kinds KIND` as text: summary, slots, then each parameter with its doc.
fn kind_text(doc: &pipeline_engine::KindDoc) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} (version {}): {}",
        doc.kind, doc.version, doc.summary
    );
    let _ = writeln!(out, "\ninputs:");
    if doc.inputs.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for i in doc.inputs {
        let how = match (i.required, i.many) {
            (true, true) => "required, one or more",
            (true, false) => "required",
            (false, true) => "optional, one or more",
            (false, false) => "optional",
        };
        let _ = writeln!(
            out,
            "  {:<10} {} ({how}): {}",
            i.name,
            i.accepts.join(" | "),
            i.doc
        );
    }
    let _ = writeln!(out, "\noutputs:");
    for o in doc.outputs {
        let _ = writeln!(out, "  {:<10} {}: {}", o.name, o.artifact, o.doc);
    }
    let _ = writeln!(out, "\nparameters:");
    if doc.params.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for p in &doc.params {
        let default = match (&p.default, p.required) {
            (_, true) => "required".to_string(),
            (Some(d), false) => format!("default {d}"),
            (None, false) => "optional".to_string(),
        };
        let _ = writeln!(out, "  {}: {}; {default}", p.name, p.type_text);
        for line in p.doc.as_deref().unwrap_or("(undocumented)").lines() {
            let _ = writeln!(out, "      {line}");
        }
    }
    out
}

fn hash(args: &HashArgs) -> Result<u8, Failure> {
    for f in &args.files {
        let hash = pipeline_engine::hashing::hash_file(f)
            .map_err(|e| fail(miette::miette!("cannot hash {}: {e}", f.display())))?;
        println!("{hash}  {}", f.display());
    }
    Ok(0)
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

fn print_run_table(report: &RunReport) {
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
            HumanBytes(s.bytes).to_string()
        );
    }
}

/// Prints what the run's headline stages say: the text of every summary file
/// ([`pipeline_engine::Stage::summary_file`], a report's answer table), then where the headline
/// files are ([`pipeline_engine::Stage::headline_files`], a report's `report.html`) so the user
/// can open them.
fn print_headline_files(manifest: &Manifest, store: &Store, report: &RunReport) {
    for s in &report.stages {
        let Some(instance) = manifest.stage(&s.stage) else {
            continue;
        };
        let files = instance.headline_files();
        let summary = instance.summary_file();
        if files.is_empty() && summary.is_none() {
            continue;
        }
        let Some(record) = s.key.as_ref().and_then(|k| store.action(k)) else {
            continue;
        };
        for out in record.outputs.values() {
            let view = store.view_path(&out.tree);
            if let Some(text) =
                summary.and_then(|name| std::fs::read_to_string(view.join(name)).ok())
            {
                println!("\n{}:\n{}", s.stage, text.trim_end());
            }
            for path in files.iter().map(|name| view.join(name)) {
                if path.exists() {
                    println!("report: {}", path.display());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Named(&'static str);

    impl pipeline_engine::Command for Named {
        fn name(&self) -> &'static str {
            self.0
        }
        fn about(&self) -> &'static str {
            "a test command"
        }
        fn run(&self, _args: Vec<OsString>) -> miette::Result<u8> {
            Ok(0)
        }
    }

    #[test]
    fn registered_commands_never_shadow_built_in_ones() {
        let mut registry = Registry::new();
        registry
            .register_command(Named("run"))
            .register_command(Named("help"))
            .register_command(Named("echo"));
        let names: Vec<&str> = registered_commands(&registry).map(|c| c.name()).collect();
        assert_eq!(names, ["echo"]);
        assert!(registered_command(&registry, "run").is_none());
        // clap rejects duplicate subcommands when it builds the command line.
        let mut cli = command_line(&registry);
        cli.build();
        let subcommands: Vec<&str> = cli.get_subcommands().map(|c| c.get_name()).collect();
        assert_eq!(subcommands.iter().filter(|n| **n == "run").count(), 1);
        assert!(subcommands.contains(&"echo") && subcommands.last() == Some(&"help"));
    }

    struct OnStage(&'static str);

    impl StageCommand for OnStage {
        fn name(&self) -> &'static str {
            self.0
        }
        fn about(&self) -> &'static str {
            "a test stage command"
        }
        fn kinds(&self) -> &'static [&'static str] {
            &["emit"]
        }
        fn options_help(&self) -> String {
            "      --port <PORT>  where".into()
        }
        fn run(
            &self,
            _stage: &pipeline_engine::CachedStage,
            _args: Vec<OsString>,
        ) -> miette::Result<u8> {
            Ok(0)
        }
    }

    #[test]
    fn stage_commands_never_shadow_built_in_or_registered_ones() {
        let mut registry = Registry::new();
        registry
            .register_command(Named("echo"))
            .register_stage_command(OnStage("show"))
            .register_stage_command(OnStage("echo"))
            .register_stage_command(OnStage("serve"));
        let names: Vec<&str> = registered_stage_commands(&registry)
            .map(|c| c.name())
            .collect();
        assert_eq!(names, ["serve"]);
        let mut cli = command_line(&registry);
        cli.build();
        let serve = cli.find_subcommand("serve").expect("serve is offered");
        let help = serve.clone().render_long_help().to_string();
        assert!(help.contains("--port <PORT>  where"), "{help}");
        assert!(help.contains("`emit`"), "{help}");
        // The manifest, the stage, then the command's own options, hyphens and all.
        let matches = cli
            .clone()
            .try_get_matches_from([
                "pipeline", "serve", "m.toml", "train@a", "--set", "a.b=1", "--port", "0",
            ])
            .expect("parses");
        let (_, sub) = matches.subcommand().expect("a subcommand");
        assert_eq!(
            sub.get_one::<PathBuf>(STAGE_MANIFEST),
            Some(&PathBuf::from("m.toml"))
        );
        assert_eq!(
            sub.get_one::<String>(STAGE_NAME).map(String::as_str),
            Some("train@a")
        );
        let set: Vec<&String> = sub.get_many::<String>(STAGE_SET).unwrap().collect();
        assert_eq!(set, ["a.b=1"]);
        let rest: Vec<&OsString> = sub.get_many::<OsString>(FORWARDED_ARGS).unwrap().collect();
        assert_eq!(rest, ["--port", "0"]);
        // After the command's first option, `--set` is among its arguments
        // (`take_set_options` takes it back out).
        let matches = cli
            .try_get_matches_from([
                "pipeline", "serve", "m.toml", "s", "--port", "0", "--set", "a.b=1",
            ])
            .expect("parses");
        let (_, sub) = matches.subcommand().expect("a subcommand");
        let rest: Vec<&OsString> = sub.get_many::<OsString>(FORWARDED_ARGS).unwrap().collect();
        assert_eq!(rest, ["--port", "0", "--set", "a.b=1"]);
    }

    #[test]
    fn set_options_are_taken_from_a_stage_commands_arguments() {
        let cli = command_line(&Registry::new());
        let args = [
            "--port",
            "0",
            "--set",
            "a.b=1",
            "--set=c.d=x y",
            "--",
            "--set",
            "e",
        ];
        let (set, rest) = take_set_options(args.iter().map(OsString::from).collect(), &cli);
        assert_eq!(set, ["a.b=1", "c.d=x y"]);
        assert_eq!(rest, ["--port", "0", "--", "--set", "e"]);
    }

    #[test]
    fn the_rerun_line_quotes_what_a_shell_would_split() {
        let context = Context {
            cache: Some(PathBuf::from("/tmp/my cache")),
            registry: &Registry::new(),
            error_format: ErrorFormat::Human,
        };
        let args = ManifestArgs {
            manifest: PathBuf::from("m.toml"),
            set: vec!["train.lr=0.1".into(), "train.name=it's".into()],
        };
        assert_eq!(
            rerun_line(&args, "train@a,b", &context),
            "pipeline run m.toml --cache '/tmp/my cache' --set train.lr=0.1 \
             --set 'train.name=it'\\''s' --only train@a,b"
        );
    }

    #[test]
    fn global_options_are_taken_from_a_registered_commands_arguments() {
        let cli = command_line(&Registry::new());
        let mut global = GlobalOptions {
            cache: None,
            error_format: ErrorFormat::Human,
        };
        let args = [
            "a",
            "--error-format",
            "json",
            "--cache=c",
            "b",
            "--",
            "--cache",
            "x",
        ];
        let rest =
            take_global_options(args.iter().map(OsString::from).collect(), &mut global, &cli);
        assert_eq!(rest, ["a", "b", "--", "--cache", "x"]);
        assert_eq!(global.error_format, ErrorFormat::Json);
        assert_eq!(global.cache, Some(PathBuf::from("c")));
    }
}
