//! The `zagreus` binary: parse flags, dispatch, turn errors into one line and an exit code.

use std::process::ExitCode;

use clap::Parser;
use std::io::IsTerminal;

use zagreus::cli::{ChatArgs, Cli, Command};
use zagreus::oneshot::Interrupted;
use zagreus::{commands, interrupt, oneshot, repl};

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
    interrupt::install();
    let result = match cli.command {
        Some(Command::Pull(args)) => commands::pull(&args),
        Some(Command::List(args)) => commands::list(&args),
        Some(Command::Bench(args)) => zagreus::bench::run(&args),
        Some(Command::CheckLogits(args)) => commands::check_logits(&args),
        Some(Command::Chat(args)) => repl::run(*args),
        // No prompt on a terminal: a conversation, as `zagreus chat`.
        None if cli.run.prompt.is_empty() && std::io::stdin().is_terminal() && !cli.run.json && !cli.run.raw => {
            let r = cli.run;
            repl::run(ChatArgs {
                system: r.system,
                verbose: r.verbose,
                no_history: false,
                model: r.model,
                sampling: r.sampling,
            })
        }
        None => oneshot::run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(e),
    }
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
    let msg = format!("{e:#}").split_whitespace().collect::<Vec<_>>().join(" ");
    eprintln!("zagreus: error: {msg}");
    ExitCode::from(1)
}
