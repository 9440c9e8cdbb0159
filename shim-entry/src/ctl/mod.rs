//! joeyctl subcommands.

pub mod boot;
pub mod cri;
pub mod owner;
pub mod run;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Exit code for bad input (config, missing kernel or QEMU, bad arguments).
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit code for a runtime failure (VM or agent), like `docker run`'s 125.
pub const EXIT_RUNTIME: i32 = 125;
/// The command could not be executed (permission, bad cwd).
pub const EXIT_CANNOT_EXEC: i32 = 126;
/// The command was not found in the guest.
pub const EXIT_NOT_FOUND: i32 = 127;

#[derive(Parser, Debug)]
#[command(name = "joeyctl", version, about = "joey secure container runtime: developer/operator CLI")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Boot a sandbox microVM, run CMD in it, stream its output, exit with its exit code.
    Run(run::RunArgs),
    /// Print the effective configuration (defaults merged with the config file) as TOML.
    Config {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Boot a kernel on the built-in VMM alone (no agent, no sandbox), guest serial on stdout;
    /// exit 0 when the guest resets or powers off.
    Boot(boot::BootArgs),
    /// Run a pod through a CRI runtime (containerd's CRI plugin), as kubelet would (docs/cri.md).
    Cri(cri::CriArgs),
    /// Say what the host's KVM is and which hypervisor/accelerator joey would pick, and why.
    HostCheck {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Reports a failure on one stderr line, `joeyctl: error: <what>`: the lines of a multi-line
/// error (a dead VM's last console lines) are joined with " | ".
pub(crate) fn print_error(what: impl std::fmt::Display) {
    eprintln!("joeyctl: error: {}", one_line(&what.to_string()));
}

fn one_line(text: &str) -> String {
    text.lines().map(str::trim_end).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" | ")
}

fn load_config(p: Option<&std::path::Path>) -> Result<(joey_config::Config, String), i32> {
    match joey_config::Config::load(p) {
        Ok((c, origin)) => Ok((
            c,
            origin
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "<defaults>".to_string()),
        )),
        Err(e) => {
            eprintln!("joeyctl: error: {e}");
            Err(EXIT_BAD_INPUT)
        }
    }
}

/// Parses the command line; `Err` is the exit code after clap printed help, the version (0)
/// or the usage error ([`EXIT_BAD_INPUT`]).
pub fn parse_args<C: Parser>() -> Result<C, i32> {
    C::try_parse().map_err(|e| {
        let _ = e.print();
        match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
            _ => EXIT_BAD_INPUT,
        }
    })
}

/// Parses arguments and runs the subcommand; returns the process exit code.
pub fn main() -> i32 {
    let cli: Cli = match parse_args() {
        Ok(c) => c,
        Err(code) => return code,
    };
    match cli.cmd {
        Cmd::Run(args) => run::run(args),
        Cmd::Cri(args) => cri::run(args),
        Cmd::Boot(args) => boot::run(args),
        Cmd::Config { config } => match load_config(config.as_deref()) {
            Ok((c, origin)) => {
                println!("# effective joey configuration (from {origin})");
                print!("{}", c.to_toml_string());
                0
            }
            Err(code) => code,
        },
        Cmd::HostCheck { config } => {
            let (c, _) = match load_config(config.as_deref()) {
                Ok(v) => v,
                Err(code) => return code,
            };
            use joey_actors::hypervisor::host;
            let flavor = host::detect_kvm(&host::HostPaths::default());
            println!("kvm: {flavor:?}");
            match host::choose_backend(c.hypervisor.kind, &flavor) {
                Ok((b, why)) => println!("hypervisor: {b} ({why})"),
                Err(e) => println!("hypervisor: none ({e})"),
            }
            // Whether the built-in VMM can run the Linux guest here, whatever is configured.
            match host::builtin_support(&flavor) {
                Ok(why) => println!("builtin vmm: available: {why}"),
                Err(why) => println!("builtin vmm: unavailable: {why}"),
            }
            match host::choose_qemu_accel(c.hypervisor.qemu.accel, &flavor) {
                Ok(a) => println!("qemu accelerator: {a}"),
                Err(e) => println!("qemu accelerator: none ({e})"),
            }
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_fold_into_one_line() {
        assert_eq!(
            one_line("the VM killed by signal 9 unexpectedly; last console lines:\njoey-agent: started\r\n\njoey-agent: ready\n"),
            "the VM killed by signal 9 unexpectedly; last console lines: | joey-agent: started | joey-agent: ready"
        );
        assert_eq!(one_line("plain"), "plain");
    }
}
