//! The `nbdcrypt` binary: parse, set up logging, run, print the error chain, exit.

use clap::Parser;
use nbdcrypt::cli::{Cli, LogFormat};

fn main() {
    let cli = Cli::parse();
    init_logging(&cli.log_level, cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nbdcrypt: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(nbdcrypt::commands::run(cli.command));
    if let Err(e) = result {
        eprintln!("nbdcrypt: {}", nbdcrypt::server::error_chain(&e));
        std::process::exit(e.exit_code());
    }
}

fn init_logging(level: &str, format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        b.json().flatten_event(true).init();
    } else {
        b.init();
    }
}
