//! Running the stock `psql` and `pgbench` binaries against a cluster or the proxy.

use std::io::Write;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::conn::ConnParams;

/// Output of a finished client program.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Fails with the full output when the program did not succeed.
    pub fn ok(self) -> Result<CmdOutput> {
        if !self.success() {
            bail!(
                "command failed ({}):\nstdout:\n{}\nstderr:\n{}",
                self.status,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }
}

/// A `psql` or `pgbench` invocation with a libpq environment built from [`ConnParams`].
#[derive(Debug)]
pub struct PgCommand {
    program: String,
    args: Vec<String>,
    params: ConnParams,
    stdin: Option<Vec<u8>>,
    env: Vec<(String, String)>,
    timeout: Duration,
    cwd: Option<std::path::PathBuf>,
}

impl PgCommand {
    /// `psql -X -v ON_ERROR_STOP=1` (no psqlrc; a failing statement makes psql exit 3).
    pub fn psql(params: &ConnParams) -> Self {
        let mut cmd = Self::new("psql", params);
        cmd.args
            .extend(["-X", "-v", "ON_ERROR_STOP=1"].map(String::from));
        cmd
    }

    pub fn pgbench(params: &ConnParams) -> Self {
        Self::new("pgbench", params)
    }

    pub fn new(program: &str, params: &ConnParams) -> Self {
        PgCommand {
            program: program.to_owned(),
            args: Vec::new(),
            params: params.clone(),
            stdin: None,
            env: Vec::new(),
            timeout: Duration::from_secs(60),
            cwd: None,
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Feeds `input` on stdin (e.g. a psql script with `-f -`).
    pub fn stdin(mut self, input: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(input.into());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Kill the program when it runs longer than this (default 60 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn current_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Runs the program and collects its output; a timeout is an error.
    pub fn run(self) -> Result<CmdOutput> {
        let mut cmd = Command::new(&self.program);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(&key);
            }
        }
        cmd.envs(self.params.libpq_env())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(&self.args)
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        // Files, not pipes: no deadlock on large output while we poll for the deadline.
        let out_file = tempfile::tempfile().context("stdout temp file")?;
        let err_file = tempfile::tempfile().context("stderr temp file")?;
        cmd.stdout(out_file.try_clone().context("dup stdout")?)
            .stderr(err_file.try_clone().context("dup stderr")?);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {} (is it installed?)", self.program))?;
        // Feed stdin from a thread so a program that stops reading cannot dodge the deadline.
        let feeder = match (self.stdin.clone(), child.stdin.take()) {
            (Some(input), Some(mut pipe)) => Some(std::thread::spawn(move || {
                // A program that exits early closes the pipe; its exit status tells why.
                let _ = pipe.write_all(&input);
            })),
            _ => None,
        };
        let status = crate::os::wait_with_deadline(&mut child, self.timeout)?;
        if let Some(f) = feeder {
            let _ = f.join();
        }
        let read = |mut f: std::fs::File| -> Result<String> {
            use std::io::{Read, Seek};
            f.rewind()?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf).into_owned())
        };
        let stdout = read(out_file)?;
        let stderr = read(err_file)?;
        match status {
            Some(status) => Ok(CmdOutput {
                status,
                stdout,
                stderr,
            }),
            None => bail!(
                "{} {:?} timed out after {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
                self.program,
                self.args,
                self.timeout
            ),
        }
    }
}
