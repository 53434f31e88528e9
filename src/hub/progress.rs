//! A per-file download bar on a terminal (bytes, rate, ETA), drawn by indicatif; nothing when
//! stderr is not a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct DownloadProgress {
    bar: ProgressBar,
}

impl DownloadProgress {
    /// A bar for `name` of `total` bytes, `resumed_at` of them already on disk.
    pub fn new(tty: bool, name: &str, total: u64, resumed_at: u64) -> Self {
        let target = if tty {
            ProgressDrawTarget::stderr_with_hz(10)
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total), target);
        bar.set_style(
            ProgressStyle::with_template(
                "  {msg}  {bytes} / {total_bytes}  {percent:>3}%  {binary_bytes_per_sec}  ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(name.to_string());
        // Bytes already on disk do not count towards the rate.
        bar.set_position(resumed_at);
        bar.reset_eta();
        Self { bar }
    }

    pub fn update(&mut self, bytes: u64) {
        self.bar.inc(bytes);
    }

    pub fn finish(&mut self) {
        self.bar.finish();
    }
}
