//! interceptor's own command line (audit, approvals, ebpf, doctor), run the way a person on the
//! host would run it: the command is shown, then its output.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd;

/// The interceptor binary and the config its subcommands talk about.
#[derive(Debug, Clone)]
pub struct InterceptorCli {
    bin: PathBuf,
    config: Option<PathBuf>,
}

/// What a finished command printed.
#[derive(Debug)]
pub struct CliOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl InterceptorCli {
    pub fn new(bin: &Path) -> Self {
        InterceptorCli {
            bin: bin.to_path_buf(),
            config: None,
        }
    }

    /// Subcommands that take `-c CONFIG` get this one.
    pub fn with_config(&self, config: &Path) -> Self {
        InterceptorCli {
            bin: self.bin.clone(),
            config: Some(config.to_path_buf()),
        }
    }

    /// `interceptor <subcommand> [-c CONFIG] <args>` as a person types it.
    pub fn line(&self, subcommand: &str, args: &[&str]) -> String {
        let mut words = vec!["interceptor".to_owned(), subcommand.to_owned()];
        if let Some(c) = &self.config {
            words.push("-c".to_owned());
            words.push(cmd::quote(&c.to_string_lossy()));
        }
        words.extend(args.iter().map(|a| cmd::quote(a)));
        words.join(" ")
    }

    /// Runs it without showing anything (for the checks behind what was shown).
    pub fn output(&self, subcommand: &str, args: &[&str]) -> Result<CliOutput> {
        let mut command = Command::new(&self.bin);
        command.arg(subcommand);
        if let Some(c) = &self.config {
            command.arg("-c").arg(c);
        }
        let out = command
            .args(args)
            .output()
            .with_context(|| format!("cannot run {}", self.bin.display()))?;
        Ok(CliOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs it without showing it; it must succeed. Returns stdout.
    pub fn quiet(&self, subcommand: &str, args: &[&str]) -> Result<String> {
        let out = self.output(subcommand, args)?;
        if !out.success {
            bail!(
                "`{}` failed: {}",
                self.line(subcommand, args),
                out.stderr.trim()
            );
        }
        Ok(out.stdout)
    }

    /// Shows the command and its output; it must succeed. Returns stdout.
    pub fn shown(&self, subcommand: &str, args: &[&str]) -> Result<String> {
        println!("$ {}", self.line(subcommand, args));
        let stdout = self.quiet(subcommand, args)?;
        print!("{stdout}");
        Ok(stdout)
    }

    /// Parses the JSON a `--json` (or JSON-printing) subcommand wrote.
    pub fn json(&self, subcommand: &str, args: &[&str]) -> Result<serde_json::Value> {
        let stdout = self.quiet(subcommand, args)?;
        serde_json::from_str(&stdout)
            .with_context(|| format!("`{}` printed no JSON", self.line(subcommand, args)))
    }
}
