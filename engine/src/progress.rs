//! Progress bars: one per running stage, drawn only on a terminal.

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The set of bars of one run.
#[derive(Clone)]
pub struct RunProgress {
    multi: MultiProgress,
}

impl RunProgress {
    /// Bars on stderr when it is a terminal and `enabled`; hidden otherwise.
    pub fn new(enabled: bool) -> Self {
        let target = if enabled {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            multi: MultiProgress::with_draw_target(target),
        }
    }

    pub(crate) fn stage(&self, name: &str) -> StageProgress {
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
