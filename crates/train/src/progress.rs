//! A dependency-free progress line on stderr.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Prints `label  done/total [pct] message  rate  eta` to stderr: redrawn in place on a
/// terminal, one line per 10% (or per minute) otherwise, so logs stay short.
pub struct Progress {
    label: String,
    total: usize,
    start: Instant,
    last: Instant,
    last_pct: usize,
    /// Units already done when this bar started (a resumed run's): left out of the rate.
    base: Option<usize>,
    tty: bool,
    enabled: bool,
}

fn fmt_dur(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

impl Progress {
    pub fn new(label: &str, total: usize) -> Self {
        let now = Instant::now();
        Self {
            label: label.to_string(),
            total: total.max(1),
            start: now,
            last: now,
            last_pct: 0,
            base: None,
            tty: std::io::stderr().is_terminal(),
            enabled: true,
        }
    }

    /// A progress bar that prints nothing (for library callers and tests).
    pub fn hidden() -> Self {
        let mut p = Self::new("", 1);
        p.enabled = false;
        p
    }

    /// Says that `done` units were finished before this bar's work began (a resumed
    /// run), so that its rate and time left count only the units done since. Only the
    /// first call before any [`Progress::update`] counts: a run continued in stages
    /// calls it at every stage.
    pub fn starting_at(&mut self, done: usize) {
        if self.base.is_none() {
            self.base = Some(done);
            self.start = Instant::now();
            self.last_pct = done * 100 / self.total;
        }
    }

    /// Reports that `done` of `total` units are finished.
    pub fn update(&mut self, done: usize, message: &str) {
        if !self.enabled {
            return;
        }
        let base = *self.base.get_or_insert(0);
        let now = Instant::now();
        let pct = done * 100 / self.total;
        let due = if self.tty {
            now.duration_since(self.last) >= Duration::from_millis(200) || done == self.total
        } else {
            pct / 10 > self.last_pct / 10
                || now.duration_since(self.last) >= Duration::from_secs(60)
                || done == self.total
        };
        if !due {
            return;
        }
        self.last = now;
        self.last_pct = pct;
        let since = done.saturating_sub(base);
        let el = now.duration_since(self.start);
        let rate = since as f64 / el.as_secs_f64().max(1e-9);
        let eta = if since > 0 {
            fmt_dur(Duration::from_secs_f64(
                (self.total - done.min(self.total)) as f64 / rate,
            ))
        } else {
            "?".into()
        };
        let line = format!(
            "{}  {}/{} [{:>3}%] {}  {:.1}/s  elapsed {}  eta {}",
            self.label,
            done,
            self.total,
            pct,
            message,
            rate,
            fmt_dur(el),
            eta
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            if done >= self.total {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}
