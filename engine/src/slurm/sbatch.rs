//! A stage's job: its script (the worker's command line) and its `sbatch` command line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::SlurmOptions;

/// Everything `sbatch` needs for one stage.
#[derive(Debug, Clone)]
pub struct JobSpec<'a> {
    /// `--job-name`.
    pub name: String,
    /// The job script.
    pub script: &'a Path,
    /// `--output` (appended to across requeues).
    pub log: &'a Path,
    /// `--chdir`: where the coordinator runs, so relative paths mean the same on the node.
    pub workdir: &'a Path,
    /// The stage's resources (defaults merged in).
    pub resources: &'a SlurmOptions,
    /// Whether the stage needs a GPU.
    pub gpu: bool,
    /// `--array`, for a job array (`0-N`, with `%P` to cap how many run at once).
    pub array: Option<String>,
    /// Jobs that must succeed first (`--dependency=afterok:...`, detached runs); a job whose
    /// dependency failed is removed instead of pending forever (`--kill-on-invalid-dep=yes`).
    pub after: Vec<String>,
}

/// Quotes `word` for a POSIX shell.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, '-' | '_' | '.' | '/' | '=' | ':' | '@' | ',' | '+')
        });
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The job script: the worker's command line, run with `exec` so that Slurm's signals
/// (preemption, the time-limit warning) reach the worker itself.
pub fn script_text(stage: &str, key: &str, worker: &[String]) -> String {
    let command = worker
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "#!/bin/sh\n\
         # pipeline worker for stage `{stage}`, key {key}.\n\
         # Written by the coordinator; the worker refuses any other key and any producer that\n\
         # is not cached, checkpoints on SIGTERM (preemption), and checkpoints and requeues its\n\
         # job on SIGUSR1 (the time limit is near).\n\
         echo \"pipeline: job ${{SLURM_JOB_ID:-?}} on $(hostname), attempt ${{SLURM_RESTART_COUNT:-0}}\"\n\
         exec {command}\n"
    )
}

/// The script of a job array whose task `i` runs the `i`-th worker: `(stage, key, command
/// line)` per task. Each task writes its output to its stage's own log, `logs[i]`.
pub fn array_script_text(tasks: &[(String, String, Vec<String>)], logs: &[PathBuf]) -> String {
    let mut text = String::from(
        "#!/bin/sh\n\
         # pipeline workers, one stage per array task. Written by the coordinator; each worker\n\
         # refuses any other key and any producer that is not cached, checkpoints on SIGTERM\n\
         # (preemption), and checkpoints and requeues its task on SIGUSR1 (time limit near).\n\
         case \"${SLURM_ARRAY_TASK_ID:-}\" in\n",
    );
    for (i, ((stage, key, worker), log)) in tasks.iter().zip(logs).enumerate() {
        let command = worker
            .iter()
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ");
        let log = shell_quote(&log.display().to_string());
        text.push_str(&format!(
            "  {i})  # stage `{stage}`, key {key}\n    exec >>{log} 2>&1\n    \
             echo \"pipeline: job ${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}} on $(hostname), attempt ${{SLURM_RESTART_COUNT:-0}}\"\n    \
             exec {command} ;;\n"
        ));
    }
    text.push_str(
        "  *) echo \"pipeline: no stage for array task ${SLURM_ARRAY_TASK_ID:-?}\" >&2; exit 2 ;;\nesac\n",
    );
    text
}

/// `sbatch`'s arguments (without the program name) for `spec`, `--parsable` first.
pub fn sbatch_args(spec: &JobSpec<'_>, signal_before: Duration) -> Vec<String> {
    let r = spec.resources;
    let mut args = vec![
        "--parsable".to_string(),
        format!("--job-name={}", spec.name),
        format!("--output={}", spec.log.display()),
        "--open-mode=append".to_string(),
        format!("--chdir={}", spec.workdir.display()),
        // Preempted jobs come back (resuming from their checkpoint) instead of failing.
        "--requeue".to_string(),
        // SIGUSR1 to the batch shell, which `exec` made the worker, ahead of the time limit: it
        // checkpoints and requeues its own job. (SIGTERM means preemption or scancel.)
        format!("--signal=B:USR1@{}", signal_before.as_secs().max(1)),
    ];
    if let Some(range) = &spec.array {
        args.push(format!("--array={range}"));
    }
    if !spec.after.is_empty() {
        args.push(format!("--dependency=afterok:{}", spec.after.join(":")));
        args.push("--kill-on-invalid-dep=yes".to_string());
    }
    let mut opt = |flag: &str, value: &Option<String>| {
        if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
            args.push(format!("--{flag}={v}"));
        }
    };
    opt("partition", &r.partition);
    opt("time", &r.time_limit());
    opt("cpus-per-task", &r.cpus.map(|c| c.to_string()));
    opt("mem", &r.mem);
    let gres = match (&r.gres, &r.gpus) {
        (Some(g), _) => Some(g.clone()),
        (None, None) if spec.gpu => Some("gpu:1".to_string()),
        (None, _) => None,
    };
    opt("gres", &gres);
    opt("gpus", &r.gpus);
    opt("account", &r.account);
    opt("qos", &r.qos);
    args.extend(r.sbatch.iter().cloned());
    args.push(spec.script.display().to_string());
    args
}

/// A job name Slurm shows in `squeue`: `pipeline:<experiment>:<stage>`, without characters
/// that job names should not hold.
pub fn job_name(experiment: &str, stage: &str) -> String {
    format!("pipeline:{experiment}:{stage}")
        .chars()
        .map(|c| {
            if c.is_whitespace() || c == '\'' || c == '"' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_spaces_and_quotes() {
        assert_eq!(shell_quote("train@messy,1"), "train@messy,1");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn gpu_stages_ask_for_one_gpu_unless_told_otherwise() {
        let script = PathBuf::from("/c/slurm/jobs/k.sh");
        let log = PathBuf::from("/c/slurm/logs/k.log");
        let dir = PathBuf::from("/work");
        let args = |resources: &SlurmOptions, gpu: bool| {
            sbatch_args(
                &JobSpec {
                    name: "n".into(),
                    script: &script,
                    log: &log,
                    workdir: &dir,
                    resources,
                    gpu,
                    array: None,
                    after: Vec::new(),
                },
                Duration::from_secs(120),
            )
        };
        let plain = SlurmOptions::default();
        assert!(args(&plain, true).contains(&"--gres=gpu:1".to_string()));
        assert!(!args(&plain, false).iter().any(|a| a.starts_with("--gres")));
        let counted = SlurmOptions {
            gpus: Some("1".into()),
            ..SlurmOptions::default()
        };
        let a = args(&counted, true);
        assert!(a.contains(&"--gpus=1".to_string()));
        assert!(!a.iter().any(|a| a.starts_with("--gres")));
        let none = SlurmOptions {
            gres: Some(String::new()),
            sbatch: vec!["--constraint=a100".into()],
            time: Some("2h".into()),
            ..SlurmOptions::default()
        };
        let a = args(&none, true);
        assert!(!a.iter().any(|a| a.starts_with("--gres")));
        assert!(a.contains(&"--time=120".to_string()));
        assert!(a.contains(&"--signal=B:USR1@120".to_string()));
        assert_eq!(a[a.len() - 2], "--constraint=a100");
        assert_eq!(a[a.len() - 1], "/c/slurm/jobs/k.sh");
    }
}
