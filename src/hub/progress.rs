//! A per-file progress line on a terminal (bytes, rate, ETA), redrawn in place; nothing when
//! stderr is not a terminal.

use std::io::Write;
use std::time::{Duration, Instant};

use super::human_bytes;

pub struct DownloadProgress {
    tty: bool,
    name: String,
    total: u64,
    done: u64,
    started: Instant,
    /// Bytes already on disk when a download resumed (not counted in the rate).
    resumed_at: u64,
    last_draw: Option<Instant>,
}

impl DownloadProgress {
    /// A line for `name` of `total` bytes, `resumed_at` of them already on disk.
    pub fn new(tty: bool, name: &str, total: u64, resumed_at: u64) -> Self {
        let mut p = Self {
            tty,
            name: name.to_string(),
            total,
            done: resumed_at,
            started: Instant::now(),
            resumed_at,
            last_draw: None,
        };
        p.draw(true);
        p
    }

    pub fn update(&mut self, bytes: u64) {
        self.done += bytes;
        self.draw(false);
    }

    pub fn finish(&mut self) {
        if self.tty {
            self.draw(true);
            crate::note!();
        }
    }

    fn draw(&mut self, force: bool) {
        if !self.tty {
            return;
        }
        let now = Instant::now();
        if !force && self.last_draw.is_some_and(|t| now - t < Duration::from_millis(100)) {
            return;
        }
        self.last_draw = Some(now);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = self.done.saturating_sub(self.resumed_at) as f64 / secs;
        let pct = if self.total > 0 {
            self.done as f64 * 100.0 / self.total as f64
        } else {
            100.0
        };
        let eta = if rate > 0.0 {
            format!("{:.0}s", (self.total.saturating_sub(self.done)) as f64 / rate)
        } else {
            "?".into()
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K  {}  {} / {}  {pct:5.1}%  {}/s  ETA {eta}",
            self.name,
            human_bytes(self.done),
            human_bytes(self.total),
            human_bytes(rate as u64)
        );
        let _ = err.flush();
    }
}
