//! The `nbdcrypt` binary: parse, set up logging, run, print the error chain, exit.

use clap::Parser;
use nbdcrypt::cli::{Cli, Command};
use nbdcrypt::config::Config;
use nbdcrypt::logging::LogFormat;

fn main() {
    let cli = Cli::parse();
    // A config file's [log] table applies from the first line the daemon logs.
    let (config_level, config_format) = match &cli.command {
        Command::Serve(a) => a.config.as_deref().map(Config::peek_log).unwrap_or_default(),
        _ => (None, None),
    };
    let format = cli.log_format.or(config_format).unwrap_or(LogFormat::Auto);
    // The daemon logs from a thread of its own, so a stuck log sink cannot stall connections.
    let daemon = matches!(cli.command, Command::Serve(_));
    let log = nbdcrypt::logging::init(cli.log_level.as_deref(), config_level.as_deref(), format, daemon);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            drop(log);
            eprintln!("nbdcrypt: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(nbdcrypt::commands::run(cli.command));
    // Queued log lines go out before the exit message (waiting at most a second for a
    // stuck sink).
    drop(log);
    if let Err(e) = result {
        eprintln!("nbdcrypt: {}", nbdcrypt::logging::error_chain(&e));
        std::process::exit(e.exit_code());
    }
}
