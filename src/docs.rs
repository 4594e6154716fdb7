//! `kiln completions SHELL` and `kiln man`: shell completions and the manual page, generated
//! from the same clap definitions as the command line itself.

use clap::CommandFactory;

/// Prints the completion script of `shell` on stdout; returns the exit status.
pub fn completions(shell: clap_complete::Shell) -> i32 {
    let mut cmd = crate::Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "kiln", &mut buf);
    crate::endpoint::out_bytes(&buf);
    0
}

/// Prints the manual page (roff) on stdout: `kiln` and, as sections, every subcommand;
/// returns the exit status.
pub fn man() -> i32 {
    let cmd = crate::Cli::command();
    let mut buf = Vec::new();
    if let Err(e) = render(&cmd, &mut buf) {
        eprintln!("kiln: {e}");
        return 1;
    }
    crate::endpoint::out_bytes(&buf);
    0
}

/// The page of `cmd`, then those of its subcommands (`kiln-instance-list`), one after another.
fn render(cmd: &clap::Command, out: &mut Vec<u8>) -> std::io::Result<()> {
    clap_mangen::Man::new(cmd.clone()).render(out)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("{}-{}", cmd.get_name(), sub.get_name());
        let sub = sub.clone().name(name.clone()).display_name(name);
        render(&sub, out)?;
    }
    Ok(())
}
