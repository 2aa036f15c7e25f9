//! Attaching, re-adopting, inspecting and removing the pinned programs.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{HashMap, Map, MapData, PerCpuArray, SockMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps};
use aya::{Ebpf, EbpfLoader};
use serde::Serialize;

use super::logger::KernelLog;
use super::maps::{self, ConnInfo, FlowKey};
use super::{EbpfError, SteeringConfig, embedded_object, process, sys};
use crate::identity::ProcessIdentity;

/// Programs in the object, with the file name of their pinned link under `<pin_dir>/links`.
const PROG_STEER: &str = "ic_steer";
const PROG_CONNECT4: &str = "ic_connect4";
const PROG_CONNECT6: &str = "ic_connect6";
const PROG_SOCK_OPS: &str = "ic_sock_ops";
const LINKS: [&str; 4] = [PROG_STEER, PROG_CONNECT4, PROG_CONNECT6, PROG_SOCK_OPS];

/// The attached kernel programs, as seen by the running interceptor.
pub struct Steering {
    flows: HashMap<MapData, FlowKey, ConnInfo>,
    exempt: Mutex<HashMap<MapData, u64, u8>>,
    netns_cookie: u64,
    cgroup_root: Option<PathBuf>,
    /// The cgroup the connect/sock_ops programs are attached to.
    cgroup: PathBuf,
    pin_dir: PathBuf,
    // Keeps the programs loaded for as long as interceptor runs; the pins keep them attached.
    _ebpf: Ebpf,
    _log: Option<KernelLog>,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("pin_dir", &self.pin_dir)
            .field("netns_cookie", &self.netns_cookie)
            .finish_non_exhaustive()
    }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> EbpfError {
    move |source| EbpfError::Program { name, source }
}

impl Steering {
    /// Load the programs (re-adopting pinned maps), attach `sk_lookup` to the current thread's
    /// network namespace and connect/sock_ops to `cfg.cgroup` (default: the cgroup2 root),
    /// protect `cfg.ports`, and insert `listeners` (IPv4 and/or IPv6 TCP listening sockets) into
    /// the socket map. A port with no listener of the connection's family refuses connections.
    pub fn attach(
        cfg: &SteeringConfig,
        listeners: &[BorrowedFd<'_>],
    ) -> Result<Steering, EbpfError> {
        let object = embedded_object().ok_or(EbpfError::NotCompiledIn)?;
        if listeners.is_empty() {
            return Err(EbpfError::Config(
                "eBPF steering needs at least one listener".into(),
            ));
        }
        if cfg.ports.is_empty() || cfg.ports.contains(&0) {
            return Err(EbpfError::Config(
                "[ebpf] ports must be a non-empty list of non-zero ports".into(),
            ));
        }
        let pin_dir = cfg.pin_dir.clone();
        sys::ensure_pin_dir(&pin_dir)?;
        let cgroup_root = sys::ensure_cgroup2()?;
        let cgroup = cfg.cgroup.clone().unwrap_or_else(|| cgroup_root.clone());
        let cgroup = std::fs::canonicalize(&cgroup)
            .map_err(|e| EbpfError::io(format!("cgroup {}", cgroup.display()), e))?;
        if !sys::is_cgroup2(&cgroup) {
            return Err(EbpfError::Config(format!(
                "cgroup {} is not a cgroup v2 directory",
                cgroup.display()
            )));
        }

        drop_incompatible_pins(&pin_dir.join("maps"));
        // Without the offsets the programs still steer and identify, but cannot record the
        // executable; process identities then carry no exe (exe-matching policies refuse).
        let offsets = match super::btf::KernelBtf::from_sys_fs().and_then(|b| b.task_offsets()) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(
                    "cannot record executables at connect ({e}): clients get no attested executable"
                );
                [0; interceptor_common::OFF_SLOTS]
            }
        };
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir.join("maps"))
            .override_global(interceptor_common::TASK_OFFSETS_SYMBOL, &offsets, true)
            .load(object)
            .map_err(|source| {
                let pinned = std::fs::read_dir(pin_dir.join("maps"))
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(false);
                if pinned {
                    EbpfError::LoadPinned {
                        pin_dir: pin_dir.clone(),
                        source: Box::new(source),
                    }
                } else {
                    EbpfError::Load(Box::new(source))
                }
            })?;
        let log = KernelLog::start(&mut ebpf);

        // sk_lookup is attached to this thread's namespace; listeners elsewhere would never be
        // chosen and every connection would be refused.
        let netns_cookie = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| sys::netns_cookie(s.as_fd()))
            .map_err(|e| EbpfError::io("reading this thread's netns cookie", e))?;

        // Listeners first: once sk_lookup runs, a missing listener means refused connections.
        let mut identify_ports = Vec::new();
        {
            let mut sockets: SockMap<&mut MapData> = ebpf
                .map_mut(maps::SOCKETS)
                .ok_or(EbpfError::Missing(maps::SOCKETS))?
                .try_into()
                .map_err(map_err(maps::SOCKETS))?;
            let mut v4_taken = false;
            let mut dual_stack = None;
            for fd in listeners {
                let (addr, v6only) = sys::listener_info(*fd)
                    .map_err(|e| EbpfError::io("inspecting a listener", e))?;
                identify_ports.push(addr.port());
                let cookie = sys::netns_cookie(*fd)
                    .map_err(|e| EbpfError::io("reading a listener's netns cookie", e))?;
                if cookie != netns_cookie {
                    return Err(EbpfError::Config(
                        "a listener lives in another network namespace than the calling thread"
                            .into(),
                    ));
                }
                let slot = if addr.is_ipv4() {
                    v4_taken = true;
                    maps::SLOT_V4
                } else {
                    if !v6only {
                        dual_stack = Some(*fd);
                    }
                    maps::SLOT_V6
                };
                sockets.set(slot, fd, 0).map_err(map_err(maps::SOCKETS))?;
            }
            // A dual-stack IPv6 listener also takes IPv4 when no IPv4 listener was given.
            if let (false, Some(fd)) = (v4_taken, dual_stack) {
                sockets
                    .set(maps::SLOT_V4, &fd, 0)
                    .map_err(map_err(maps::SOCKETS))?;
            }
        }

        {
            let mut ports: HashMap<&mut MapData, u16, u8> = ebpf
                .map_mut(maps::PORTS)
                .ok_or(EbpfError::Missing(maps::PORTS))?
                .try_into()
                .map_err(map_err(maps::PORTS))?;
            let mut wanted: BTreeMap<u16, u8> = BTreeMap::new();
            for p in &identify_ports {
                *wanted.entry(*p).or_default() |= maps::PORT_IDENTIFY;
            }
            for p in &cfg.ports {
                *wanted.entry(*p).or_default() |= maps::PORT_STEER | maps::PORT_IDENTIFY;
            }
            let stale: Vec<u16> = ports
                .keys()
                .filter_map(Result::ok)
                .filter(|p| !wanted.contains_key(p))
                .collect();
            for (p, flags) in &wanted {
                ports.insert(p, flags, 0).map_err(map_err(maps::PORTS))?;
            }
            for p in stale {
                ports.remove(&p).map_err(map_err(maps::PORTS))?;
            }
        }

        let links = pin_dir.join("links");
        let netns = File::open("/proc/thread-self/ns/net")
            .map_err(|e| EbpfError::io("opening the network namespace", e))?;
        let cgroup_fd = File::open(&cgroup)
            .map_err(|e| EbpfError::io(format!("opening cgroup {}", cgroup.display()), e))?;

        // Identity before steering, so that no steered connection misses its record. Links
        // (kernel >= 5.7, which sk_lookup needs anyway) take no flags and always allow other
        // programs in the cgroup subtree; `Single` is what passes flags 0.
        for (name, v6) in [(PROG_CONNECT4, false), (PROG_CONNECT6, true)] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
            let id = prog
                .attach(&cgroup_fd, CgroupAttachMode::Single)
                .map_err(prog_err(name))?;
            let link = prog.take_link(id).map_err(prog_err(name))?;
            let link = FdLink::try_from(link).map_err(|e| EbpfError::Link {
                path: links.join(name),
                message: e.to_string(),
            })?;
            replace_pin(link, &links.join(name))?;
            tracing::debug!(v6, "attached {name} to {}", cgroup.display());
        }
        {
            let prog: &mut SockOps = program(&mut ebpf, PROG_SOCK_OPS)?;
            prog.load().map_err(prog_err(PROG_SOCK_OPS))?;
            let id = prog
                .attach(&cgroup_fd, CgroupAttachMode::Single)
                .map_err(prog_err(PROG_SOCK_OPS))?;
            let link = prog.take_link(id).map_err(prog_err(PROG_SOCK_OPS))?;
            let link = FdLink::try_from(link).map_err(|e| EbpfError::Link {
                path: links.join(PROG_SOCK_OPS),
                message: e.to_string(),
            })?;
            replace_pin(link, &links.join(PROG_SOCK_OPS))?;
        }
        {
            let prog: &mut SkLookup = program(&mut ebpf, PROG_STEER)?;
            prog.load().map_err(prog_err(PROG_STEER))?;
            let id = prog.attach(&netns).map_err(prog_err(PROG_STEER))?;
            let link = prog.take_link(id).map_err(prog_err(PROG_STEER))?;
            replace_pin(FdLink::from(link), &links.join(PROG_STEER))?;
        }

        let flows = HashMap::try_from(
            ebpf.take_map(maps::FLOWS)
                .ok_or(EbpfError::Missing(maps::FLOWS))?,
        )
        .map_err(map_err(maps::FLOWS))?;
        let exempt = HashMap::try_from(
            ebpf.take_map(maps::EXEMPT_COOKIES)
                .ok_or(EbpfError::Missing(maps::EXEMPT_COOKIES))?,
        )
        .map_err(map_err(maps::EXEMPT_COOKIES))?;

        tracing::info!(
            ports = ?cfg.ports,
            cgroup = %cgroup.display(),
            pin_dir = %pin_dir.display(),
            "eBPF steering and process identity attached"
        );
        // Only now: a connection closed before the programs were attached could reconnect
        // around them.
        super::existing::handle(&cfg.ports, cfg.on_existing);
        Ok(Steering {
            flows,
            exempt: Mutex::new(exempt),
            netns_cookie,
            cgroup_root: Some(cgroup_root),
            cgroup,
            pin_dir,
            _ebpf: ebpf,
            _log: log,
        })
    }

    /// The local process behind an accepted connection (`peer` = its remote address, `local` =
    /// its local address, i.e. the address the client dialled). `None` for remote clients, for
    /// processes outside the attached cgroup and for other network namespaces.
    pub fn identity_for(&self, peer: SocketAddr, local: SocketAddr) -> Option<ProcessIdentity> {
        let key = FlowKey::new(self.netns_cookie, peer, local);
        match self.flows.get(&key, 0) {
            Ok(info) => Some(process::process_identity(
                &info,
                self.cgroup_root.as_deref(),
            )),
            Err(aya::maps::MapError::KeyNotFound) => None,
            Err(e) => {
                tracing::warn!("reading the eBPF flow map: {e}");
                None
            }
        }
    }

    /// Exempts interceptor's own upstream TCP socket from steering. Call it on the unconnected
    /// socket right before connect(); the exemption covers that socket's connection (over
    /// loopback) and ends when it closes. interceptor must run inside the attached cgroup.
    pub fn exempt_upstream(&self, socket: BorrowedFd<'_>) -> Result<(), EbpfError> {
        // The exemption is made by the sock_ops program, which only sees sockets of processes
        // inside the attached cgroup; outside it the upstream would be steered back to us.
        let root = self.cgroup_root.as_deref().unwrap_or(Path::new("/"));
        if !sys::current_cgroup(root).is_some_and(|c| c.starts_with(&self.cgroup)) {
            return Err(EbpfError::Config(format!(
                "interceptor runs outside the attached cgroup {}: its TCP upstream connection \
                 cannot be exempted from steering (attach to a cgroup that contains interceptor, \
                 or reach PostgreSQL over its unix socket)",
                self.cgroup.display()
            )));
        }
        let cookie = sys::socket_cookie(socket)
            .map_err(|e| EbpfError::io("reading the upstream socket's cookie", e))?;
        let mut map = self
            .exempt
            .lock()
            .map_err(|_| EbpfError::Config("exemption map lock poisoned".into()))?;
        map.insert(cookie, 1, 0)
            .map_err(map_err(maps::EXEMPT_COOKIES))
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

/// Removes pinned maps whose key or value size is not this build's (left by another version of
/// interceptor): reusing them would silently cut records short. The programs of the older
/// version keep their own references until their links are replaced.
fn drop_incompatible_pins(maps_dir: &Path) {
    let expected = [
        (maps::CONNECTS, 8, std::mem::size_of::<ConnInfo>()),
        (
            maps::FLOWS,
            std::mem::size_of::<FlowKey>(),
            std::mem::size_of::<ConnInfo>(),
        ),
    ];
    for (name, key, value) in expected {
        let path = maps_dir.join(name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&path) else {
            continue;
        };
        if info.key_size() as usize != key || info.value_size() as usize != value {
            tracing::info!(
                "replacing the pinned map {} of another layout ({}+{} bytes, now {key}+{value})",
                path.display(),
                info.key_size(),
                info.value_size()
            );
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("removing {}: {e}", path.display());
            }
        }
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(EbpfError::Missing(name))?
        .try_into()
        .map_err(prog_err(name))
}

/// Pins `link` at `path`, replacing (and so detaching) a link pinned there by an earlier run.
/// The new link is attached before the old one goes, so there is no unprotected moment.
fn replace_pin(link: FdLink, path: &Path) -> Result<(), EbpfError> {
    let link_err = |message: String| EbpfError::Link {
        path: path.to_owned(),
        message,
    };
    if path.exists() {
        // Force the detach: a still-running earlier instance may hold the old link open.
        match sys::obj_get(path).and_then(|fd| sys::link_detach(fd.as_fd())) {
            Ok(()) => tracing::info!("replaced the pinned link {}", path.display()),
            Err(e) => tracing::warn!("detaching the previous link at {}: {e}", path.display()),
        }
        std::fs::remove_file(path).map_err(|e| link_err(format!("removing the old pin: {e}")))?;
    }
    link.pin(path).map_err(|e| link_err(e.to_string()))?;
    Ok(())
}

/// What is installed under a pin directory.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub pin_dir: PathBuf,
    pub links: Vec<LinkStatus>,
    /// Protected (steered) ports.
    pub steered_ports: Vec<u16>,
    /// Ports whose connections are only identified (interceptor's own listeners).
    pub identified_ports: Vec<u16>,
    pub counters: Counters,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    pub program: &'static str,
    pub pinned: bool,
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
}

/// Kernel counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Connections handed to interceptor's listener.
    pub steered: u64,
    /// Connections refused because no listener was present.
    pub dropped: u64,
    /// interceptor's own upstream connections let through.
    pub exempted: u64,
    /// connect() calls recorded.
    pub recorded: u64,
    /// Connections (SYNs sent) keyed by 4-tuple for identity lookup.
    pub identified: u64,
}

impl Status {
    /// Steering is complete: every link pinned.
    pub fn attached(&self) -> bool {
        self.links.iter().all(|l| l.pinned)
    }
}

fn open_pinned(pin_dir: &Path, name: &'static str) -> Result<Option<Map>, EbpfError> {
    let path = pin_dir.join("maps").join(name);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path).map_err(|source| {
        match &source {
            aya::maps::MapError::SyscallError(e) => denied_reading(pin_dir, &e.io_error),
            _ => None,
        }
        .unwrap_or(EbpfError::Map { name, source })
    })?;
    Map::from_map_data(data).map(Some).map_err(map_err(name))
}

fn denied_reading(pin_dir: &Path, e: &std::io::Error) -> Option<EbpfError> {
    matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)).then(|| {
        EbpfError::Config(format!(
            "permission denied on {}: reading interceptor's pinned programs needs root; run it \
             as root",
            pin_dir.display()
        ))
    })
}

/// What is attached under `pin_dir`, with the kernel counters.
pub fn status(pin_dir: &Path) -> Result<Status, EbpfError> {
    let links = LINKS
        .iter()
        .map(|&program| {
            let path = pin_dir.join("links").join(program);
            let info = PinnedLink::from_pin(&path)
                .ok()
                .and_then(|l| FdLink::from(l).info().ok());
            LinkStatus {
                program,
                pinned: info.is_some(),
                link_id: info.as_ref().map(|i| i.id()),
                program_id: info.as_ref().map(|i| i.program_id()),
            }
        })
        .collect();

    let mut steered_ports = Vec::new();
    let mut identified_ports = Vec::new();
    if let Some(map) = open_pinned(pin_dir, maps::PORTS)? {
        let ports: HashMap<MapData, u16, u8> =
            HashMap::try_from(map).map_err(map_err(maps::PORTS))?;
        for entry in ports.iter() {
            let (port, flags) = entry.map_err(map_err(maps::PORTS))?;
            if flags & maps::PORT_STEER != 0 {
                steered_ports.push(port);
            } else if flags & maps::PORT_IDENTIFY != 0 {
                identified_ports.push(port);
            }
        }
    }
    steered_ports.sort_unstable();
    identified_ports.sort_unstable();

    let mut counters = Counters::default();
    if let Some(map) = open_pinned(pin_dir, maps::COUNTERS)? {
        let arr: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(map).map_err(map_err(maps::COUNTERS))?;
        let sum = |slot: u32| -> Result<u64, EbpfError> {
            Ok(arr
                .get(&slot, 0)
                .map_err(map_err(maps::COUNTERS))?
                .iter()
                .fold(0u64, |a, v| a.saturating_add(*v)))
        };
        counters = Counters {
            steered: sum(maps::CNT_STEERED)?,
            dropped: sum(maps::CNT_DROPPED)?,
            exempted: sum(maps::CNT_EXEMPTED)?,
            recorded: sum(maps::CNT_RECORDED)?,
            identified: sum(maps::CNT_IDENTIFIED)?,
        };
    }
    Ok(Status {
        pin_dir: pin_dir.to_owned(),
        links,
        steered_ports,
        identified_ports,
        counters,
    })
}

/// What [`detach`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detached {
    /// No pins under the directory: nothing was attached there.
    Nothing,
    /// This many links were detached and their pins (and the maps') removed.
    Links(usize),
}

fn denied(pin_dir: &Path, e: &std::io::Error) -> Option<EbpfError> {
    matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)).then(|| {
        EbpfError::Config(format!(
            "permission denied on {}: detaching needs root (CAP_BPF and CAP_SYS_ADMIN); run it \
             as root",
            pin_dir.display()
        ))
    })
}

/// Uninstalls: detaches every pinned link (even if a running interceptor holds it), then removes
/// the pins. After this, connections to the protected ports reach whatever listens on them.
pub fn detach(pin_dir: &Path) -> Result<Detached, EbpfError> {
    let io = |what: String, e: std::io::Error| {
        denied(pin_dir, &e).unwrap_or_else(|| EbpfError::io(what, e))
    };
    // `exists()` would call an unreadable directory absent and report success.
    match std::fs::symlink_metadata(pin_dir) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Detached::Nothing),
        Err(e) => return Err(io(format!("inspecting {}", pin_dir.display()), e)),
    }
    let links = pin_dir.join("links");
    let mut detached = 0;
    let mut pins = 0;
    for name in LINKS {
        let path = links.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(format!("inspecting {}", path.display()), e)),
        }
        // Detach explicitly in case some process still holds the link open; a link whose
        // target is gone (deleted netns or cgroup) refuses this, and removing its pin suffices.
        match sys::obj_get(&path).and_then(|fd| sys::link_detach(fd.as_fd())) {
            Ok(()) => detached += 1,
            Err(e) => {
                if let Some(err) = denied(pin_dir, &e) {
                    return Err(err);
                }
                tracing::warn!("BPF_LINK_DETACH {}: {e}", path.display())
            }
        }
        std::fs::remove_file(&path).map_err(|e| io(format!("removing {}", path.display()), e))?;
        pins += 1;
    }
    for name in maps::PINNED_MAPS {
        let path = pin_dir.join("maps").join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => pins += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("removing {}", path.display()), e)),
        }
    }
    for dir in [links, pin_dir.join("maps"), pin_dir.to_owned()] {
        // Leave directories holding anything we did not create.
        let _ = std::fs::remove_dir(&dir);
    }
    if pins == 0 {
        return Ok(Detached::Nothing);
    }
    tracing::info!("eBPF steering detached from {}", pin_dir.display());
    Ok(Detached::Links(detached))
}

// The server shares one `Steering` between connection tasks.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<Steering>();
};
