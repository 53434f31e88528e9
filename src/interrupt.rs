//! Ctrl+C: while a model is generating it stops the answer (the text so far is kept); at any
//! other moment (loading, downloading, a second press) it ends the program with exit code 130.

use std::sync::atomic::{AtomicBool, Ordering};

static GENERATING: AtomicBool = AtomicBool::new(false);
static CANCEL: AtomicBool = AtomicBool::new(false);

/// Installs the handler once per process.
pub fn install() {
    let _ = ctrlc::set_handler(|| {
        if GENERATING.load(Ordering::SeqCst) && !CANCEL.swap(true, Ordering::SeqCst) {
            return;
        }
        // Leave the terminal on a fresh line, as shells do.
        crate::note!();
        std::process::exit(130);
    });
}

/// The flag generation polls between tokens.
pub fn cancel_flag() -> &'static AtomicBool {
    &CANCEL
}

/// Marks a generation in progress until dropped; Ctrl+C then only cancels it.
pub struct Generating(());

pub fn generating() -> Generating {
    CANCEL.store(false, Ordering::SeqCst);
    GENERATING.store(true, Ordering::SeqCst);
    Generating(())
}

impl Drop for Generating {
    fn drop(&mut self) {
        GENERATING.store(false, Ordering::SeqCst);
    }
}
