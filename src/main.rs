//! The `zagreus` binary: parse flags, dispatch, turn errors into one line and an exit code.

use std::process::ExitCode;

use clap::Parser;
use std::io::IsTerminal;

use zagreus::cli::{ChatArgs, Cli, Command};
use zagreus::oneshot::Interrupted;
use zagreus::{commands, interrupt, note, oneshot, repl};

// Runs before Rust's runtime reopens a closed stdout on /dev/null (see output.rs).
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static RECORD_STDOUT: extern "C" fn() = zagreus::output::record_stdout_at_start;

#[cfg(target_os = "macos")]
#[used]
#[link_section = "__DATA,__mod_init_func"]
static RECORD_STDOUT: extern "C" fn() = zagreus::output::record_stdout_at_start;

fn main() -> ExitCode {
    // Errors are reported in one line, never with a backtrace: do not capture one for every error
    // when RUST_BACKTRACE is set (capturing takes a process-wide lock that a budgeted tokenizer or
    // template thread could be holding when it is stopped). RUST_LIB_BACKTRACE=1 still asks.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: the first statement of main, before any other thread exists.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    zagreus::output::install_panic_hook();
    let cli = Cli::parse();
    if zagreus::output::stdout_was_closed() {
        note!("zagreus: error: stdout is closed, so the answer would be lost; redirect it to a file or to /dev/null");
        return ExitCode::from(1);
    }
    if let Some(Command::Serve(args)) = &cli.command {
        // The server handles its own signals (a graceful shutdown).
        return match zagreus::server::run(args.config()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => report(e),
        };
    }
    interrupt::install();
    let result = match cli.command {
        Some(Command::Pull(args)) => commands::pull(&args),
        Some(Command::List(args)) => commands::list(&args),
        Some(Command::Bench(args)) => zagreus::bench::run(&args),
        Some(Command::Batch(args)) => zagreus::batch::run(*args),
        Some(Command::Serve(_)) => unreachable!("handled above"),
        Some(Command::Perplexity(args)) => commands::perplexity(&args),
        Some(Command::Completions(args)) => commands::completions(&args),
        Some(Command::Man) => commands::man(),
        Some(Command::CheckLogits(args)) => commands::check_logits(&args),
        Some(Command::Chat(args)) => repl::run(*args),
        // No prompt on a terminal: a conversation, as `zagreus chat`.
        None if cli.run.prompt.is_empty() && std::io::stdin().is_terminal() && !cli.run.json && !cli.run.raw => {
            let r = cli.run;
            repl::run(ChatArgs {
                system: r.system,
                verbose: r.verbose,
                no_history: false,
                tools: r.shape.tools,
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
    if zagreus::output::is_broken_pipe(&e) {
        return ExitCode::SUCCESS;
    }
    let msg = format!("{e:#}").split_whitespace().collect::<Vec<_>>().join(" ");
    note!("zagreus: error: {msg}");
    ExitCode::from(1)
}
