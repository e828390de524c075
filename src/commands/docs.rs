//! `nbdcrypt completions` and `nbdcrypt manpage`: generated from the clap definitions in
//! [`crate::cli`], so they cannot drift from the real options.

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;

use super::{io_err, CmdError};
use crate::cli::Cli;

pub(super) fn completions(shell: clap_complete::Shell) -> Result<(), CmdError> {
    let mut cmd = Cli::command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut cmd, "nbdcrypt", &mut out);
    out.flush().map_err(io_err("cannot write the completion script"))
}

pub(super) fn manpage(dir: Option<&Path>) -> Result<(), CmdError> {
    let cmd = Cli::command();
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
            clap_mangen::generate_to(cmd, dir)
                .map_err(io_err(format!("cannot write man pages to {}", dir.display())))?;
            println!("wrote man pages to {}", dir.display());
            Ok(())
        }
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(cmd).render(&mut out).map_err(io_err("cannot write the man page"))?;
            out.flush().map_err(io_err("cannot write the man page"))
        }
    }
}
