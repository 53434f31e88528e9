//! The `zagreus` binary: parse flags, dispatch, turn errors into one line and an exit code.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use zagreus::cli::Cli;
use zagreus::oneshot::{self, Interrupted};

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("zagreus: internal error: {msg}{at} (please report this)");
    }));
    let cli = Cli::parse();
    let cancel = Arc::new(AtomicBool::new(false));
    install_ctrl_c(cancel.clone());
    match oneshot::run(cli.run, cancel) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(e),
    }
}

/// First Ctrl+C: stop generating (the answer so far is kept). Second: exit at once.
fn install_ctrl_c(cancel: Arc<AtomicBool>) {
    let _ = ctrlc::set_handler(move || {
        if cancel.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
}

fn report(e: anyhow::Error) -> ExitCode {
    if e.downcast_ref::<Interrupted>().is_some() {
        return ExitCode::from(130);
    }
    // A closed stdout (`| head`) is how a reader says it has enough: end quietly.
    if e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    }) {
        return ExitCode::SUCCESS;
    }
    let msg = format!("{e:#}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("zagreus: error: {msg}");
    ExitCode::from(1)
}
