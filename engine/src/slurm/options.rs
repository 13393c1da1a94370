//! What a manifest says about Slurm: the executor, where each stage launches, and each stage's
//! resources.
//!
//! ```toml
//! [experiment]
//! name = "quality"
//! executor = "slurm"              # `pipeline run --executor` wins
//!
//! [experiment.slurm]              # defaults for every stage, and the scheduling knobs
//! partition = "gpu"
//! account = "lab"
//! poll = "30s"
//!
//! [train.slurm]                   # this stage's resources (fields override the defaults)
//! time = "4h"
//! cpus = 8
//! mem = "32G"
//! sbatch = ["--constraint=a100"]  # raw options, passed through unchanged
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the stages of a run execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// Threads of this process.
    #[default]
    Local,
    /// Slurm jobs (stages whose kind or manifest says `local` still run here).
    Slurm,
}

impl ExecutorKind {
    /// The name manifests and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            ExecutorKind::Local => "local",
            ExecutorKind::Slurm => "slurm",
        }
    }
}

/// Where one stage runs when the executor is a cluster (`launch = "local" | "slurm"` in a stage
/// table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Launch {
    /// On the coordinator, as a thread (cheap stages, or stages that need the network).
    Local,
    /// As a cluster job.
    Slurm,
}

/// Resources and scheduling knobs: `[experiment.slurm]` (defaults and knobs) and
/// `[STAGE.slurm]` (one stage's resources; knobs are rejected there).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmOptions {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--time`: a duration such as `90m` or `4h` (converted to minutes), or Slurm's own format
    /// (`4:00:00`, `1-00:00:00`), passed through.
    pub time: Option<String>,
    /// `--cpus-per-task`.
    pub cpus: Option<u32>,
    /// `--mem` (Slurm's format: `16G`, `4000M`).
    pub mem: Option<String>,
    /// `--gres`; a GPU stage asks for `gpu:1` unless this or `gpus` says otherwise (`gres = ""`
    /// asks for none, for sites that want `--gpus` or a raw option instead).
    pub gres: Option<String>,
    /// `--gpus` (sites that count GPUs this way); when set, no default `--gres` is added.
    pub gpus: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// `--qos`.
    pub qos: Option<String>,
    /// Raw `sbatch` options, passed through unchanged after the others (stage options after
    /// the experiment's).
    #[serde(default)]
    pub sbatch: Vec<String>,

    /// How often the coordinator asks `squeue` about its jobs (one call for all of them);
    /// experiment level only. Default 30 s.
    pub poll: Option<String>,
    /// How long a job that Slurm reports finished may take to show its result on the shared
    /// filesystem before it counts as failed; experiment level only. Default 60 s.
    pub record_wait: Option<String>,
    /// How many times a stage that hit its time limit is resubmitted; experiment level only.
    /// Default 2.
    pub max_resubmits: Option<u32>,
    /// How long before its time limit a job gets SIGUSR1 to checkpoint and requeue itself;
    /// experiment level only.
    /// Default 120 s.
    pub signal_before: Option<String>,
    /// How many tasks of one job array run at once (`--array=0-N%P`); experiment level only.
    /// Default: as many as Slurm allows.
    pub array_parallelism: Option<u32>,
}

/// A problem with the Slurm options of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlurmOptionsError {
    /// A scheduling knob in a stage's table.
    #[error("`{0}` is a setting of the whole run: move it to [experiment.slurm]")]
    KnobInStage(&'static str),
    /// A duration that does not parse.
    #[error("`{field}`: invalid duration `{value}` ({message})")]
    Duration {
        /// The field.
        field: &'static str,
        /// What was written.
        value: String,
        /// Why it is invalid.
        message: String,
    },
    /// An empty raw option, or one with a line break.
    #[error(
        "`sbatch`: invalid option `{0}` (one option per string, such as \"--constraint=a100\")"
    )]
    RawOption(String),
}

const DEFAULT_POLL: Duration = Duration::from_secs(30);
const DEFAULT_RECORD_WAIT: Duration = Duration::from_secs(60);
const DEFAULT_SIGNAL_BEFORE: Duration = Duration::from_secs(120);
const DEFAULT_MAX_RESUBMITS: u32 = 2;

fn duration(
    field: &'static str,
    value: &Option<String>,
) -> Result<Option<Duration>, SlurmOptionsError> {
    value
        .as_deref()
        .map(|v| {
            humantime::parse_duration(v).map_err(|e| SlurmOptionsError::Duration {
                field,
                value: v.to_string(),
                message: e.to_string(),
            })
        })
        .transpose()
}

impl SlurmOptions {
    /// Checks the options of one stage's table: resources only, every duration readable.
    pub fn validate_stage(&self) -> Result<(), SlurmOptionsError> {
        let knobs = [
            ("poll", self.poll.is_some()),
            ("record_wait", self.record_wait.is_some()),
            ("max_resubmits", self.max_resubmits.is_some()),
            ("signal_before", self.signal_before.is_some()),
            ("array_parallelism", self.array_parallelism.is_some()),
        ];
        if let Some((name, _)) = knobs.iter().find(|(_, set)| *set) {
            return Err(SlurmOptionsError::KnobInStage(name));
        }
        self.validate_resources()
    }

    /// Checks the options of `[experiment.slurm]`.
    pub fn validate_experiment(&self) -> Result<(), SlurmOptionsError> {
        duration("poll", &self.poll)?;
        duration("record_wait", &self.record_wait)?;
        duration("signal_before", &self.signal_before)?;
        self.validate_resources()
    }

    fn validate_resources(&self) -> Result<(), SlurmOptionsError> {
        if let Some(bad) = self
            .sbatch
            .iter()
            .find(|o| o.trim().is_empty() || o.contains('\n'))
        {
            return Err(SlurmOptionsError::RawOption(bad.clone()));
        }
        Ok(())
    }

    /// These resources over `defaults`: each field set here wins, raw options add up.
    pub fn over(&self, defaults: &SlurmOptions) -> SlurmOptions {
        let pick = |own: &Option<String>, default: &Option<String>| own.clone().or(default.clone());
        SlurmOptions {
            partition: pick(&self.partition, &defaults.partition),
            time: pick(&self.time, &defaults.time),
            cpus: self.cpus.or(defaults.cpus),
            mem: pick(&self.mem, &defaults.mem),
            gres: pick(&self.gres, &defaults.gres),
            gpus: pick(&self.gpus, &defaults.gpus),
            account: pick(&self.account, &defaults.account),
            qos: pick(&self.qos, &defaults.qos),
            sbatch: defaults
                .sbatch
                .iter()
                .chain(&self.sbatch)
                .cloned()
                .collect(),
            poll: defaults.poll.clone(),
            record_wait: defaults.record_wait.clone(),
            max_resubmits: defaults.max_resubmits,
            signal_before: defaults.signal_before.clone(),
            array_parallelism: defaults.array_parallelism,
        }
    }

    /// The poll interval.
    pub fn poll_interval(&self) -> Duration {
        duration("poll", &self.poll)
            .ok()
            .flatten()
            .unwrap_or(DEFAULT_POLL)
    }

    /// How long a finished job's record may take to appear.
    pub fn record_wait_time(&self) -> Duration {
        duration("record_wait", &self.record_wait)
            .ok()
            .flatten()
            .unwrap_or(DEFAULT_RECORD_WAIT)
    }

    /// How long before the time limit the job is signalled.
    pub fn signal_before_time(&self) -> Duration {
        duration("signal_before", &self.signal_before)
            .ok()
            .flatten()
            .unwrap_or(DEFAULT_SIGNAL_BEFORE)
    }

    /// How many times a timed-out stage is resubmitted.
    pub fn resubmits(&self) -> u32 {
        self.max_resubmits.unwrap_or(DEFAULT_MAX_RESUBMITS)
    }

    /// `--time`'s value: a humane duration in whole minutes (rounded up), else as written.
    pub fn time_limit(&self) -> Option<String> {
        let time = self.time.as_deref()?;
        Some(match humantime::parse_duration(time) {
            Ok(d) => d.as_secs().div_ceil(60).max(1).to_string(),
            Err(_) => time.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_fields_win_and_raw_options_add_up() {
        let defaults = SlurmOptions {
            partition: Some("cpu".into()),
            account: Some("lab".into()),
            sbatch: vec!["--mail-type=FAIL".into()],
            poll: Some("5s".into()),
            ..SlurmOptions::default()
        };
        let stage = SlurmOptions {
            partition: Some("gpu".into()),
            sbatch: vec!["--constraint=a100".into()],
            ..SlurmOptions::default()
        };
        let merged = stage.over(&defaults);
        assert_eq!(merged.partition.as_deref(), Some("gpu"));
        assert_eq!(merged.account.as_deref(), Some("lab"));
        assert_eq!(merged.sbatch, ["--mail-type=FAIL", "--constraint=a100"]);
        assert_eq!(merged.poll_interval(), Duration::from_secs(5));
    }

    #[test]
    fn knobs_belong_to_the_experiment() {
        let stage = SlurmOptions {
            poll: Some("5s".into()),
            ..SlurmOptions::default()
        };
        assert_eq!(
            stage.validate_stage(),
            Err(SlurmOptionsError::KnobInStage("poll"))
        );
        let experiment = SlurmOptions {
            poll: Some("often".into()),
            ..SlurmOptions::default()
        };
        assert!(matches!(
            experiment.validate_experiment(),
            Err(SlurmOptionsError::Duration { field: "poll", .. })
        ));
    }

    #[test]
    fn time_limits_convert_humane_durations_to_minutes() {
        let with = |t: &str| SlurmOptions {
            time: Some(t.into()),
            ..SlurmOptions::default()
        };
        assert_eq!(with("4h").time_limit().as_deref(), Some("240"));
        assert_eq!(with("90s").time_limit().as_deref(), Some("2"));
        assert_eq!(
            with("1-00:00:00").time_limit().as_deref(),
            Some("1-00:00:00")
        );
    }
}
