//! Free local TCP ports and waiting for a listener.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Ports this process has handed out; never handed out twice, so two clusters or proxies
/// started by parallel tests in one process do not race for the same port.
fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
        let port = listener.local_addr().context("local_addr")?.port();
        drop(listener);
        let mut ports = handed_out()
            .lock()
            .map_err(|_| anyhow::anyhow!("port registry poisoned"))?;
        if ports.insert(port) {
            return Ok(port);
        }
    }
    bail!("no free TCP port found")
}

/// Polls until `addr` accepts a TCP connection, or `timeout` passes.
/// `still_alive` is asked between attempts so a crashed server fails fast.
pub fn wait_for_tcp(
    addr: SocketAddr,
    timeout: Duration,
    mut still_alive: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        still_alive()?;
        if Instant::now() >= deadline {
            bail!("{addr} did not accept connections within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
