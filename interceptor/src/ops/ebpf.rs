//! `interceptor ebpf status|detach`.

use std::io::Write;
use std::path::PathBuf;

use crate::ebpf::{DEFAULT_PIN_DIR, Detached, EbpfError, detach, status};

#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum EbpfCommand {
    /// Show which kernel programs are attached and their counters.
    Status {
        /// bpffs directory holding interceptor's pins.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Detach the kernel programs and remove their pins (uninstall). Connections to the protected
    /// ports then reach whatever listens on them.
    Detach {
        /// bpffs directory holding interceptor's pins (default: the config's `[ebpf] pin_dir`,
        /// else /sys/fs/bpf/interceptor).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// The daemon's configuration file: its `[ebpf] pin_dir` is used.
        #[arg(long, short, env = "INTERCEPTOR_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// The pin directory `detach` works on: `--pin-dir`, else the config's, else the default.
fn detach_pin_dir(
    pin_dir: &Option<PathBuf>,
    config: &Option<PathBuf>,
) -> Result<PathBuf, EbpfError> {
    if let Some(p) = pin_dir {
        return Ok(p.clone());
    }
    match config {
        Some(c) => crate::config::Config::load(c)
            .map(|c| c.ebpf.pin_dir)
            .map_err(|e| EbpfError::Config(format!("{}: {e}", c.display()))),
        None => Ok(PathBuf::from(DEFAULT_PIN_DIR)),
    }
}

pub fn run_command(cmd: &EbpfCommand, out: &mut dyn Write) -> Result<(), EbpfError> {
    let w = |e: std::io::Error| EbpfError::io("writing output", e);
    match cmd {
        EbpfCommand::Status { pin_dir, json } => {
            let st = status(pin_dir)?;
            if *json {
                let text = serde_json::to_string_pretty(&st)
                    .map_err(|e| EbpfError::Config(format!("serialising status: {e}")))?;
                writeln!(out, "{text}").map_err(w)?;
                return Ok(());
            }
            writeln!(
                out,
                "eBPF steering under {}: {}",
                pin_dir.display(),
                if st.attached() {
                    "attached"
                } else {
                    "NOT attached"
                }
            )
            .map_err(w)?;
            for l in &st.links {
                match (l.link_id, l.program_id) {
                    (Some(link), Some(prog)) => {
                        writeln!(out, "  {:<12} link {link}, program {prog}", l.program)
                    }
                    _ => writeln!(out, "  {:<12} not attached", l.program),
                }
                .map_err(w)?;
            }
            writeln!(out, "  steered ports:    {:?}", st.steered_ports).map_err(w)?;
            writeln!(out, "  identified ports: {:?}", st.identified_ports).map_err(w)?;
            let c = st.counters;
            writeln!(
                out,
                "  counters: steered {} dropped {} exempted {} recorded {} identified {}",
                c.steered, c.dropped, c.exempted, c.recorded, c.identified
            )
            .map_err(w)?;
        }
        EbpfCommand::Detach { pin_dir, config } => {
            let pin_dir = detach_pin_dir(pin_dir, config)?;
            match detach(&pin_dir)? {
                Detached::Nothing => writeln!(
                    out,
                    "nothing attached under {}: no pins to remove",
                    pin_dir.display()
                ),
                Detached::Links(n) => writeln!(
                    out,
                    "detached {n} program link(s); removed the pins under {}",
                    pin_dir.display()
                ),
            }
            .map_err(w)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: EbpfCommand,
    }

    #[test]
    fn parses_and_reports_an_empty_pin_dir() {
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("none");
        let cli = Cli::try_parse_from(["x", "status", "--pin-dir", pin.to_str().unwrap()]).unwrap();
        let mut out = Vec::new();
        run_command(&cli.cmd, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("NOT attached"), "{text}");
        assert!(text.contains("ic_steer"), "{text}");

        let cli = Cli::try_parse_from(["x", "detach"]).unwrap();
        assert_eq!(
            cli.cmd,
            EbpfCommand::Detach {
                pin_dir: None,
                config: None
            }
        );
        // Detaching nothing succeeds and says so.
        let mut out = Vec::new();
        let cmd = EbpfCommand::Detach {
            pin_dir: Some(pin),
            config: None,
        };
        run_command(&cmd, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("nothing attached"), "{text}");

        // The config's pin dir is the one used.
        let cfg = dir.path().join("c.toml");
        let example =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../interceptor.example.toml");
        let text = std::fs::read_to_string(example).unwrap();
        let text = text.replace(
            "pin_dir = \"/sys/fs/bpf/interceptor\"",
            "pin_dir = \"/sys/fs/bpf/elsewhere\"",
        );
        assert!(text.contains("/sys/fs/bpf/elsewhere"));
        std::fs::write(&cfg, text).unwrap();
        assert_eq!(
            detach_pin_dir(&None, &Some(cfg.clone())).unwrap(),
            PathBuf::from("/sys/fs/bpf/elsewhere")
        );
        assert_eq!(
            detach_pin_dir(&Some(PathBuf::from("/x")), &Some(cfg)).unwrap(),
            PathBuf::from("/x")
        );
    }
}
