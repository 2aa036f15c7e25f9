//! pg_hba.conf lines that let a client reach PostgreSQL without going through interceptor.
//!
//! interceptor's upstream is PostgreSQL's unix socket, so it needs no `host` line at all: every
//! TCP line is a way around it (for local processes only while kernel steering is off; for
//! remote ones always), and `trust` lets whoever reaches the server in without a password.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Risk {
    /// A path around interceptor whatever else is configured.
    Bypass,
    /// A path around interceptor unless kernel steering (`[ebpf] enabled`) covers it.
    UnlessSteered,
}

/// One line to change, with what to change it to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finding {
    pub line_no: usize,
    pub line: String,
    pub risk: Risk,
    pub why: String,
    pub change_to: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.risk {
            Risk::Bypass => "bypass",
            Risk::UnlessSteered => "bypass unless [ebpf] steering is on",
        };
        write!(
            f,
            "line {}: {}\n      {tag}: {}\n      change to: {}",
            self.line_no, self.line, self.why, self.change_to
        )
    }
}

fn is_loopback(addr: &str) -> bool {
    let host = addr.split('/').next().unwrap_or(addr);
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Checks the text of a pg_hba.conf.
pub(crate) fn check(text: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(kind) = f.first().copied() else {
            continue;
        };
        let line_no = i + 1;
        let mut push = |risk, why: String, change_to: String| {
            out.push(Finding {
                line_no,
                line: raw.trim_end().to_owned(),
                risk,
                why,
                change_to,
            })
        };
        match kind {
            // local DATABASE USER METHOD
            "local" if f.get(3) == Some(&"trust") => {
                push(
                    Risk::Bypass,
                    "any process that can open the socket logs in as any role without a \
                         password"
                        .into(),
                    format!("local {} {} peer", f[1], f[2]),
                );
            }
            "host" | "hostssl" | "hostnossl" | "hostgssenc" | "hostnogssenc" => {
                // host DATABASE USER ADDRESS [MASK] METHOD
                let Some(addr) = f.get(3).copied() else {
                    continue;
                };
                let commented = format!("# {}", raw.trim());
                if f.contains(&"trust") {
                    push(
                        Risk::Bypass,
                        "trust over TCP: whoever reaches the port logs in without a password"
                            .into(),
                        commented,
                    );
                } else if is_loopback(addr) {
                    push(
                        Risk::UnlessSteered,
                        "local processes can connect over TCP directly (interceptor uses the \
                         unix socket and needs no host line)"
                            .into(),
                        commented,
                    );
                } else {
                    push(
                        Risk::Bypass,
                        format!(
                            "clients from {addr} connect to PostgreSQL directly; point them at \
                             interceptor's listener instead"
                        ),
                        commented,
                    );
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_path_around() {
        let text = "\
# comment line
local   all   postgres                peer
local   all   all                     trust
host    all   all   127.0.0.1/32      scram-sha-256
host    all   all   ::1/128           trust
hostssl app   all   10.0.0.0/8        scram-sha-256   # office
host    all   all   192.168.0.1 255.255.255.255 md5
";
        let f = check(text);
        let lines: Vec<usize> = f.iter().map(|f| f.line_no).collect();
        assert_eq!(lines, [3, 4, 5, 6, 7]);
        assert_eq!(f[0].risk, Risk::Bypass);
        assert_eq!(f[0].change_to, "local all all peer");
        assert_eq!(f[1].risk, Risk::UnlessSteered);
        assert_eq!(f[2].risk, Risk::Bypass);
        assert!(f[2].why.contains("trust"));
        assert_eq!(f[3].risk, Risk::Bypass);
        assert!(f[3].why.contains("10.0.0.0/8"));
        assert!(f[3].change_to.starts_with("# hostssl app"));
        assert!(f[4].to_string().contains("line 7:"));
    }

    #[test]
    fn a_locked_down_file_is_clean() {
        assert!(check("local all postgres peer\nlocal all all scram-sha-256\n").is_empty());
    }
}
