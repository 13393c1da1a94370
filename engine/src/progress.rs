//! How a run shows its progress on stderr: bars on a terminal (one per running stage), a line
//! per stage start and finish otherwise (a log file or CI page, as cargo prints
//! `Compiling ...`), or nothing.

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How a run shows its progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// Nothing (library use, tests).
    #[default]
    Quiet,
    /// A line on stderr when a stage starts computing and when it finishes.
    Lines,
    /// Progress bars on stderr (a terminal).
    Bars,
}

/// The progress display of one run.
#[derive(Clone)]
pub struct RunProgress {
    multi: MultiProgress,
    lines: bool,
}

impl RunProgress {
    /// The display for `mode`.
    pub fn new(mode: ProgressMode) -> Self {
        let target = if mode == ProgressMode::Bars {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            multi: MultiProgress::with_draw_target(target),
            lines: mode == ProgressMode::Lines,
        }
    }

    /// Says that a stage finished computing (in lines mode).
    pub(crate) fn finished(&self, name: &str, wall_s: f64) {
        if self.lines {
            eprintln!("{:>9} {name} in {wall_s:.1} s", "finished");
        }
    }

    pub(crate) fn stage(&self, name: &str) -> StageProgress {
        if self.lines {
            eprintln!("{:>9} {name}", "running");
        }
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(spinner_style());
        bar.set_prefix(name.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        StageProgress { bar }
    }

    /// Prints a line above the bars without tearing them.
    pub fn println(&self, line: &str) {
        if self.multi.is_hidden() {
            eprintln!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix:.bold} {msg} [{elapsed}]")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

/// The progress bar of one running stage.
#[derive(Clone)]
pub struct StageProgress {
    bar: ProgressBar,
}

impl StageProgress {
    /// A bar that draws nothing (tests, standalone contexts).
    pub fn hidden() -> Self {
        Self {
            bar: ProgressBar::hidden(),
        }
    }

    /// Switches to a bounded bar of `total` units named `unit` (e.g. "tok", "samples", "B");
    /// throughput is shown as units per second.
    pub fn start(&self, total: u64, unit: &str) {
        let template = if unit == "B" {
            "{spinner} {prefix:.bold} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}".to_string()
        } else {
            format!("{{spinner}} {{prefix:.bold}} {{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{per_sec}} eta {{eta}}")
        };
        if let Ok(style) = ProgressStyle::with_template(&template) {
            self.bar.set_style(style.progress_chars("=> "));
        }
        self.bar.set_length(total);
        self.bar.set_position(0);
    }

    /// Advances by `n` units.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Sets the position.
    pub fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
    }

    /// Sets the short status text.
    pub fn set_message(&self, msg: impl Into<String>) {
        self.bar.set_message(msg.into());
    }

    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
