//! Whether a stage is taken from the cache or runs, and why: one decision shared by
//! `pipeline plan` and the executor, like cargo's `DirtyReason`. Reasons are typed; the words
//! `plan` prints come from their `Display`.

use std::fmt;
use std::sync::Arc;

use serde::{Serialize, Serializer};

use crate::fingerprint::Change;

/// What a run does with a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Takes its result from the cache.
    Cached,
    /// Runs it.
    Run,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cached => "cached",
            Self::Run => "run",
        })
    }
}

/// Why a stage runs.
#[derive(Debug, Clone)]
pub enum RunReason {
    /// No run of this stage is on record.
    NeverRun,
    /// `--force` named it (it would otherwise be cached).
    Forced,
    /// A producer will run first, so its output (and this stage's key) is not known yet.
    UpstreamWillRun {
        /// The first such producer.
        producer: String,
    },
    /// The key cannot be computed (e.g. an external file is missing).
    KeyNotComputable(Arc<miette::Report>),
    /// The key differs from the last run's, for these reasons.
    Changed(Vec<Change>),
    /// The key is the last run's, but its result is gone (removed by `gc`, or dropped by
    /// `verify`).
    ResultMissing,
    /// The last run's record cannot be read, so what changed is unknown.
    LastRecordUnreadable,
}

impl RunReason {
    /// The reason as separate lines (one per change), as `run --json` lists them.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Self::Changed(changes) => changes.iter().map(Change::to_string).collect(),
            other => vec![other.to_string()],
        }
    }
}

impl fmt::Display for RunReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NeverRun => f.write_str("never run"),
            Self::Forced => f.write_str("forced (--force)"),
            Self::UpstreamWillRun { producer } => {
                write!(f, "input from `{producer}`, which will run")
            }
            Self::KeyNotComputable(report) => write!(f, "cannot compute key: {report}"),
            Self::Changed(_) => f.write_str(&self.lines().join("; ")),
            Self::ResultMissing => {
                f.write_str("no cached result for this key (it was removed or failed verification)")
            }
            Self::LastRecordUnreadable => f.write_str("the last run's record is unreadable"),
        }
    }
}

/// What a run does with a stage, and why it runs.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Its result is in the cache.
    Cached,
    /// It runs.
    Run(RunReason),
}

impl Decision {
    /// Cached or run.
    pub fn action(&self) -> Action {
        match self {
            Self::Cached => Action::Cached,
            Self::Run(_) => Action::Run,
        }
    }

    /// Why it runs (`None` if cached).
    pub fn reason(&self) -> Option<&RunReason> {
        match self {
            Self::Cached => None,
            Self::Run(reason) => Some(reason),
        }
    }
}

/// Serialises an optional reason as its lines (`[]` when there is none).
pub(crate) fn serialize_reason_lines<S: Serializer>(
    reason: &Option<RunReason>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    reason
        .as_ref()
        .map(RunReason::lines)
        .unwrap_or_default()
        .serialize(serializer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::ValueChange;

    #[test]
    fn reasons_read_as_plan_prints_them() {
        let changed = RunReason::Changed(vec![
            Change::Parameter {
                name: "steps".into(),
                change: ValueChange::Changed {
                    old: "150".into(),
                    new: "100".into(),
                },
            },
            Change::Seed {
                old: Some(1),
                new: Some(2),
            },
        ]);
        assert_eq!(
            changed.to_string(),
            "parameter `steps` changed: 150 -> 100; seed changed: Some(1) -> Some(2)"
        );
        assert_eq!(changed.lines().len(), 2);
        assert_eq!(RunReason::NeverRun.to_string(), "never run");
        assert_eq!(RunReason::Forced.to_string(), "forced (--force)");
        assert_eq!(
            RunReason::UpstreamWillRun {
                producer: "a@x".into()
            }
            .to_string(),
            "input from `a@x`, which will run"
        );
        let missing = miette::miette!("cannot read ./input.txt");
        assert_eq!(
            RunReason::KeyNotComputable(Arc::new(missing)).to_string(),
            "cannot compute key: cannot read ./input.txt"
        );
        assert_eq!(Decision::Cached.action().to_string(), "cached");
        assert!(Decision::Run(RunReason::NeverRun).reason().is_some());
    }
}
