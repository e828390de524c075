//! `nbdcrypt serve`: open and unlock every export, bind the listeners (and the optional
//! control socket and metrics endpoint), tell systemd it is ready, serve until a signal, drain,
//! flush.
//!
//! Signals: SIGTERM/SIGINT start the shutdown (`STOPPING=1`); SIGHUP re-reads the config file
//! and applies what can change safely (log level, metrics endpoint), naming what needs a
//! restart. The control socket answers `status`, `suspend` and `resume` ([`Daemon`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use super::{format_backend, io_err, kms_options, CmdError};
use crate::backend::{Caching, FileBackend};
use crate::cli::ServeArgs;
use crate::config::{Config, ControlSocket, CreateConfig, ExportConfig, TlsSettings, DEFAULT_LISTEN};
use crate::control::{
    self, ControlHandler, ControlRequest, ControlResponse, ControlServer, DaemonStatus, ExportStatus,
};
use crate::crypto::{GateState, SectorCipher};
use crate::export::{Export, ExportOptions};
use crate::keys::{local, BoxFuture, KeyProvider, Keyring, KmsOptions};
use crate::logging::{self, LevelChange};
use crate::metrics::{self, ExportView, ProcessView};
use crate::metrics_http::MetricsServer;
use crate::nbd::handshake::Catalog;
use crate::nbd::transmission::Limits;
use crate::notify::notify_or_warn;
use crate::server::{self, ListenAddr, Listener, ServerOptions, SocketPerms};
use crate::tls::TlsSetup;
use crate::volume::{self, VolumeError};

/// One served export and what `status` and `resume` need to know about it.
struct Served {
    cfg: ExportConfig,
    export: Arc<Export>,
    uuid: String,
    /// The key slot that unlocked the volume last.
    slot: AtomicU32,
}

/// The running daemon, as the control socket and the metrics endpoint see it.
struct Daemon {
    served: Vec<Served>,
    /// For resume: KMS slots are unwrapped again.
    kms: KmsOptions,
    started: Instant,
    start_time: SystemTime,
}

pub(super) async fn serve(args: ServeArgs) -> Result<(), CmdError> {
    let started = Instant::now();
    match crate::hardening::disable_core_dumps() {
        Ok(()) => tracing::debug!("core dumps disabled"),
        Err(e) => tracing::warn!(error = %e, "could not disable core dumps"),
    }
    let config = load_config(&args)?;
    let source = args.config.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "command line".into());
    tracing::info!(version = env!("CARGO_PKG_VERSION"), pid = std::process::id(), config = %source, "starting");
    // TLS credentials before any key is unwrapped: a bad file fails the start at once.
    let tls = match &config.tls.files {
        None => TlsSetup::off(),
        Some(files) => TlsSetup::load(config.tls.mode, files)?,
    };

    let kms = kms_options(&args.kms);
    let mut served = Vec::new();
    for cfg in &config.exports {
        served.push(open_export(cfg, &kms, args.strict_binding).await?);
    }
    let default_export = (served.len() == 1).then(|| served[0].cfg.name.clone());
    let exports: HashMap<String, Arc<Export>> = served.iter().map(|s| (s.cfg.name.clone(), s.export.clone())).collect();
    let daemon = Arc::new(Daemon { served, kms, started, start_time: SystemTime::now() });

    let mut bound = Vec::new();
    for l in &config.listeners {
        let b = Listener::bind(l).await.map_err(io_err(format!("cannot listen on {l:?}")))?;
        tracing::info!(listener = %b.describe(), "listening");
        bound.push(b);
    }
    let control = bind_control(&config.control_socket).await?;
    let metrics = match config.metrics_listen {
        Some(addr) => {
            Some(start_metrics(addr, &daemon).await.map_err(io_err(format!("cannot serve metrics on {addr}")))?)
        }
        None => None,
    };

    // Handlers go in before READY: a SIGTERM right after READY must drain, not kill.
    let signals = Signals::install().map_err(io_err("cannot install signal handlers"))?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    if let Some(c) = control {
        tokio::spawn(c.run(daemon.clone(), shutdown_rx.clone()));
    }
    tracing::info!(startup_ms = started.elapsed().as_millis() as u64, exports = exports.len(), "ready");
    notify_or_warn(&format!("READY=1\nMAINPID={}\nSTATUS={}", std::process::id(), daemon.status_line()));

    tracing::info!(
        tls = ?tls.mode, client_certificates = tls.verifies_clients,
        max_connections = config.max_connections, busy_poll_us = config.busy_poll_us, "server options"
    );
    let opts = ServerOptions {
        max_connections: config.max_connections,
        io_threads: config.io_threads,
        handshake_timeout: Duration::from_secs(config.handshake_timeout_secs),
        limits: Limits {
            max_requests: config.max_requests_per_connection,
            max_bytes: config.max_bytes_per_connection,
            shutdown_grace: Duration::from_secs(config.shutdown_grace_secs),
            busy_poll: Duration::from_micros(config.busy_poll_us),
        },
        tls,
    };
    let signals =
        tokio::spawn(handle_signals(signals, args, Reloadable { config, metrics }, daemon.clone(), shutdown_tx));
    let catalog = Catalog { exports: Arc::new(exports), default_export };
    server::run(bound, catalog, opts, shutdown_rx).await;
    if let Ok(r) = signals.await {
        // Stops the metrics endpoint (dropping it closes the listener).
        drop(r);
    }

    let mut failed = false;
    for s in &daemon.served {
        tracing::info!(export = %s.cfg.name, io_errors = s.export.io_errors(), "export closing");
        if let Err(err) = s.export.flush() {
            failed = true;
            tracing::error!(export = %s.cfg.name, error = %logging::error_chain(&err), "final flush failed");
        }
    }
    if failed {
        return Err(CmdError::Io { what: "final flush failed".into(), source: std::io::Error::other("flush") });
    }
    tracing::info!(uptime_secs = daemon.started.elapsed().as_secs(), "shutdown complete");
    Ok(())
}

/// The configuration from `--config` (with the command line's overrides) or from the command
/// line alone.
fn load_config(args: &ServeArgs) -> Result<Config, CmdError> {
    let mut c = match &args.config {
        Some(path) => Config::load(path)?,
        None => {
            let Some(device) = args.device.clone() else {
                return Err(CmdError::Usage("serve needs DEVICE or --config".into()));
            };
            let mut l: Vec<ListenAddr> = args.listen.iter().map(|a| ListenAddr::Tcp(a.clone())).collect();
            if let Some(s) = &args.socket {
                let perms = SocketPerms {
                    mode: args.socket_mode,
                    owner: args.socket_owner.clone(),
                    group: args.socket_group.clone(),
                };
                l.push(ListenAddr::Unix { path: s.clone(), perms });
            }
            let tls = TlsSettings::new(args.tls, args.tls_cert.clone(), args.tls_key.clone(), args.tls_ca.clone())
                .map_err(|m| CmdError::Usage(m.replace("tls_", "--tls-")))?;
            if l.is_empty() {
                l.push(ListenAddr::Tcp(DEFAULT_LISTEN.into()));
            }
            let cfg = ExportConfig {
                name: args.export.clone(),
                device,
                kek_files: args.kek_file.clone(),
                read_only: args.read_only,
                allow_discards: args.allow_discards,
                caching: Caching::new(args.direct, !args.no_map),
                description: String::new(),
                create: None,
                device_id: args.device_id.clone(),
                strict_binding: args.strict_binding,
            };
            Config {
                listeners: l,
                max_connections: args.max_connections.max(1),
                handshake_timeout_secs: args.handshake_timeout.max(1),
                max_requests_per_connection: Limits::default().max_requests,
                max_bytes_per_connection: Limits::default().max_bytes,
                shutdown_grace_secs: Limits::default().shutdown_grace.as_secs(),
                io_threads: args.io_threads.map(|n| n as usize),
                busy_poll_us: args.busy_poll_us,
                tls,
                exports: vec![cfg],
                metrics_listen: None,
                control_socket: ControlSocket::Default(control::default_path(None, &args.export)),
                log_level: None,
                log_format: None,
            }
        }
    };
    apply_overrides(&mut c, args);
    Ok(c)
}

/// Command-line options that override the config file (at start and on every reload).
fn apply_overrides(c: &mut Config, args: &ServeArgs) {
    if let Some(a) = args.metrics_listen {
        c.metrics_listen = Some(a);
    }
    match &args.control_socket {
        Some(p) if p.as_os_str().is_empty() => c.control_socket = ControlSocket::Off,
        Some(p) => c.control_socket = ControlSocket::Path(p.clone()),
        None => {}
    }
}

/// Binds the control socket. Failing to bind the *default* path is only a warning (a demo run
/// as a normal user cannot write to /run); an explicitly configured one is an error.
async fn bind_control(cs: &ControlSocket) -> Result<Option<ControlServer>, CmdError> {
    let r = match cs {
        ControlSocket::Off => return Ok(None),
        ControlSocket::Default(p) | ControlSocket::Path(p) => ControlServer::bind(p).await.map_err(|e| (p, e)),
    };
    match (r, cs) {
        (Ok(c), _) => {
            tracing::info!(control = %c.describe(), "control socket listening");
            Ok(Some(c))
        }
        (Err((p, e)), ControlSocket::Default(_)) => {
            tracing::warn!(path = %p.display(), error = %e, "no control socket (status/suspend/resume unavailable); set server.control_socket");
            Ok(None)
        }
        (Err((p, e)), _) => {
            Err(CmdError::Io { what: format!("cannot bind the control socket {}", p.display()), source: e })
        }
    }
}

async fn start_metrics(addr: std::net::SocketAddr, daemon: &Arc<Daemon>) -> std::io::Result<MetricsServer> {
    let d = daemon.clone();
    let m = MetricsServer::start(addr, Arc::new(move || d.render_metrics())).await?;
    tracing::info!(metrics = %m.addr(), "metrics endpoint listening");
    Ok(m)
}

/// What SIGHUP can change.
struct Reloadable {
    config: Config,
    metrics: Option<MetricsServer>,
}

/// The signals the daemon handles.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Waits for signals: SIGTERM/SIGINT start the shutdown, SIGHUP reloads. Returns the reloadable
/// state (its metrics endpoint is stopped by the caller dropping it).
async fn handle_signals(
    mut sig: Signals,
    args: ServeArgs,
    mut state: Reloadable,
    daemon: Arc<Daemon>,
    shutdown: watch::Sender<bool>,
) -> Reloadable {
    loop {
        tokio::select! {
            _ = sig.term.recv() => break,
            _ = sig.int.recv() => break,
            _ = sig.hup.recv() => reload(&args, &mut state, &daemon).await,
        }
    }
    tracing::info!("shutdown requested: draining in-flight requests");
    notify_or_warn("STOPPING=1\nSTATUS=draining");
    // Requests waiting on a suspended export would hold up the drain forever: fail them.
    for s in &daemon.served {
        s.export.close();
    }
    let _ = shutdown.send(true);
    state
}

/// SIGHUP: re-read the config file; apply the log level and the metrics endpoint; name what
/// needs a restart. A config that does not load leaves everything as it was.
async fn reload(args: &ServeArgs, state: &mut Reloadable, daemon: &Arc<Daemon>) {
    let Some(path) = &args.config else {
        tracing::info!("SIGHUP: nothing to reload (no --config)");
        return;
    };
    notify_or_warn("RELOADING=1");
    let new = match Config::load(path) {
        Ok(mut c) => {
            apply_overrides(&mut c, args);
            c
        }
        Err(e) => {
            tracing::error!(error = %logging::error_chain(&e), "SIGHUP: config not reloaded, keeping the running one");
            notify_or_warn(&format!("READY=1\nSTATUS={}", daemon.status_line()));
            return;
        }
    };
    match logging::reload_level(new.log_level.as_deref()) {
        Ok(LevelChange::Applied(level)) => tracing::info!(%level, "SIGHUP: log level applied"),
        Ok(LevelChange::Overridden(by)) => {
            tracing::info!(by, "SIGHUP: log level fixed by the command line or environment")
        }
        Ok(LevelChange::NotInitialised) => {}
        Err(e) => tracing::error!(error = %e, "SIGHUP: log level not applied"),
    }
    if new.metrics_listen != state.config.metrics_listen || (new.metrics_listen.is_some() && state.metrics.is_none()) {
        if let Some(m) = state.metrics.take() {
            let addr = m.addr();
            m.stop().await;
            tracing::info!(metrics = %addr, "SIGHUP: metrics endpoint stopped");
        }
        if let Some(addr) = new.metrics_listen {
            match start_metrics(addr, daemon).await {
                Ok(m) => state.metrics = Some(m),
                Err(e) => tracing::error!(metrics = %addr, error = %e, "SIGHUP: cannot serve metrics"),
            }
        }
    }
    let restart = state.config.needs_restart(&new);
    if restart.is_empty() {
        tracing::info!("SIGHUP: configuration reloaded");
    } else {
        tracing::warn!(settings = %restart.join(", "), "SIGHUP: configuration reloaded; these changes need a restart and were not applied");
    }
    // Keep the running values of what was not applied, so the next reload compares against
    // what is really in force.
    let Config { log_level, metrics_listen, .. } = new;
    state.config.log_level = log_level;
    state.config.metrics_listen = metrics_listen;
    notify_or_warn(&format!("READY=1\nSTATUS={}", daemon.status_line()));
}

impl Daemon {
    fn status_line(&self) -> String {
        let suspended: Vec<&str> =
            self.served.iter().filter(|s| s.export.state() != GateState::Active).map(|s| s.cfg.name.as_str()).collect();
        if suspended.is_empty() {
            format!("serving {} export(s)", self.served.len())
        } else {
            format!("serving {} export(s); suspended: {}", self.served.len(), suspended.join(", "))
        }
    }

    fn render_metrics(&self) -> String {
        let views: Vec<ExportView<'_>> = self
            .served
            .iter()
            .map(|s| ExportView {
                name: &s.cfg.name,
                metrics: s.export.metrics(),
                suspended: s.export.state() != GateState::Active,
                size: s.export.size(),
            })
            .collect();
        metrics::encode(&views, ProcessView { start_time: self.start_time })
    }

    fn status(&self) -> DaemonStatus {
        DaemonStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            cipher_contexts: crate::crypto::live_contexts(),
            locked_key_pages: crate::crypto::mlock::locked_pages(),
            unlocked_key_allocations: crate::crypto::mlock::unlocked_allocations(),
            exports: self
                .served
                .iter()
                .map(|s| ExportStatus {
                    name: s.cfg.name.clone(),
                    state: match s.export.state() {
                        GateState::Active => "active",
                        GateState::Suspended => "suspended",
                        GateState::Closed => "closed",
                    }
                    .into(),
                    device: s.cfg.device.display().to_string(),
                    uuid: s.uuid.clone(),
                    slot: s.slot.load(Ordering::Relaxed),
                    size: s.export.size(),
                    sector_size: s.export.sector_size().bytes(),
                    read_only: s.export.is_read_only(),
                    cipher: s.export.cipher_engine().map(|e| e.name().to_string()),
                    counters: s.export.metrics().snapshot(),
                })
                .collect(),
        }
    }

    /// The exports a suspend/resume names (all if none), or an error answer.
    fn targets(&self, name: Option<&str>) -> Result<Vec<&Served>, ControlResponse> {
        match name {
            None => Ok(self.served.iter().collect()),
            Some(n) => match self.served.iter().find(|s| s.cfg.name == n) {
                Some(s) => Ok(vec![s]),
                None => Err(ControlResponse::Error { message: format!("no export named {n:?}"), exit_code: 2 }),
            },
        }
    }

    async fn suspend(&self, name: Option<&str>) -> ControlResponse {
        let targets = match self.targets(name) {
            Ok(t) => t,
            Err(e) => return e,
        };
        let mut done = Vec::new();
        for s in targets {
            let export = s.export.clone();
            // Waits for cipher calls in progress, then fsyncs: off the runtime.
            let r = tokio::task::spawn_blocking(move || export.suspend()).await;
            match r {
                Ok(Ok(true)) => {
                    tracing::info!(export = %s.cfg.name, contexts_left = crate::crypto::live_contexts(), "volume suspended: key wiped from memory, I/O held");
                    done.push(format!("{}: suspended", s.cfg.name));
                }
                Ok(Ok(false)) => done.push(format!("{}: already suspended", s.cfg.name)),
                Ok(Err(e)) => {
                    let message =
                        format!("{}: suspended, but the flush failed: {}", s.cfg.name, logging::error_chain(&e));
                    tracing::error!(export = %s.cfg.name, error = %logging::error_chain(&e), "flush at suspend failed");
                    return ControlResponse::Error { message, exit_code: 1 };
                }
                Err(e) => return ControlResponse::Error { message: format!("suspend failed: {e}"), exit_code: 1 },
            }
        }
        notify_or_warn(&format!("STATUS={}", self.status_line()));
        ControlResponse::Done { message: done.join("\n") }
    }

    async fn resume(&self, name: Option<&str>, kek_file: Option<&Path>) -> ControlResponse {
        let targets = match self.targets(name) {
            Ok(t) => t,
            Err(e) => return e,
        };
        let mut done = Vec::new();
        for s in targets {
            if s.export.state() != GateState::Suspended {
                if name.is_some() {
                    done.push(format!("{}: not suspended", s.cfg.name));
                }
                continue;
            }
            match resume_one(s, &self.kms, kek_file).await {
                Ok(true) => done.push(format!("{}: resumed (slot {})", s.cfg.name, s.slot.load(Ordering::Relaxed))),
                Ok(false) => done.push(format!("{}: not suspended", s.cfg.name)),
                Err(e) => {
                    tracing::warn!(export = %s.cfg.name, error = %logging::error_chain(&e), "resume failed; the export stays suspended");
                    let message = format!("{}: {}", s.cfg.name, logging::error_chain(&e));
                    return ControlResponse::Error { message, exit_code: e.exit_code() };
                }
            }
        }
        notify_or_warn(&format!("STATUS={}", self.status_line()));
        if done.is_empty() {
            done.push("nothing was suspended".into());
        }
        ControlResponse::Done { message: done.join("\n") }
    }
}

impl ControlHandler for Daemon {
    fn handle(&self, req: ControlRequest) -> BoxFuture<'_, ControlResponse> {
        Box::pin(async move {
            match req {
                ControlRequest::Status {} => ControlResponse::Status(self.status()),
                ControlRequest::Suspend { export } => self.suspend(export.as_deref()).await,
                ControlRequest::Resume { export, kek_file } => {
                    if kek_file.as_deref().is_some_and(|p| !p.is_absolute()) {
                        return ControlResponse::Error {
                            message: "kek_file must be an absolute path".into(),
                            exit_code: 2,
                        };
                    }
                    self.resume(export.as_deref(), kek_file.as_deref()).await
                }
            }
        })
    }
}

/// Unlocks a suspended export again: re-reads the header from its raw volume, unwraps a slot
/// (with `kek_file`, or the export's configured providers), checks that it is the same volume
/// with the same geometry, and gives the export a new cipher. False if it was resumed meanwhile.
async fn resume_one(s: &Served, kms: &KmsOptions, kek_file: Option<&Path>) -> Result<bool, CmdError> {
    let keyring = match kek_file {
        Some(p) => Keyring::new(&[p.to_owned()], kms.clone())?,
        None => Keyring::new(&s.cfg.kek_files, kms.clone())?,
    };
    let unlocked = volume::unlock_backend(s.export.backend().clone(), &keyring).await?;
    let h = unlocked.header();
    let geo = s.export.geometry();
    if h.uuid.to_string() != s.uuid
        || h.sector_size != geo.sector_size
        || h.data_offset != geo.data_offset
        || h.data_size != geo.data_size
    {
        return Err(CmdError::Refused(format!(
            "the header on {} now describes another volume (uuid {}) or geometry; restart the daemon to serve it",
            s.cfg.device.display(),
            h.uuid
        )));
    }
    let cipher =
        SectorCipher::new(&unlocked.key, h.sector_size).map_err(VolumeError::from)?.with_zero_sectors(h.zero_sectors);
    let slot = unlocked.slot;
    drop(unlocked);
    if !s.export.resume(cipher) {
        return Ok(false);
    }
    s.slot.store(slot, Ordering::Relaxed);
    tracing::info!(export = %s.cfg.name, slot, "volume unlocked: resumed");
    Ok(true)
}

/// Opens (and on first start of a demo config, creates) one export. KMS is contacted here
/// (and on resume) only, once per aws-kms slot tried; serving never needs it.
async fn open_export(cfg: &ExportConfig, kms: &KmsOptions, strict_binding: bool) -> Result<Served, CmdError> {
    if let Some(create) = &cfg.create {
        create_if_missing(cfg, create).await?;
    }
    let keyring = Keyring::new(&cfg.kek_files, kms.clone())?;
    let backend = volume::open_backend_for_serving(&cfg.device, !cfg.read_only, cfg.caching)?;
    let device_id = cfg.device_id.clone().or_else(|| crate::identity::device_volume_id(&cfg.device));
    let strict = strict_binding || cfg.strict_binding;
    let unlock_started = Instant::now();
    let unlocked = volume::unlock_backend_checked(backend.clone(), &keyring, |h| {
        volume::check_binding(h, device_id.as_deref(), strict)
    })
    .await?;
    let unlock_ms = unlock_started.elapsed().as_millis() as u64;
    let slot = unlocked.slot;
    let slot_provider = unlocked.header().slot(slot).map(|s| s.provider.clone()).unwrap_or_default();
    let opts = ExportOptions {
        name: cfg.name.clone(),
        description: cfg.description.clone(),
        read_only: cfg.read_only,
        allow_discards: cfg.allow_discards,
    };
    let (export, h) = volume::into_export(unlocked, opts)?;
    tracing::info!(
        export = %cfg.name, device = %backend.describe(), uuid = %h.uuid, slot, provider = %slot_provider, unlock_ms,
        sector_size = h.sector_size.bytes(), size = h.data_size, read_only = cfg.read_only,
        cipher = export.cipher_engine().map_or("none", |e| e.name()), "volume unlocked"
    );
    Ok(Served { cfg: cfg.clone(), export, uuid: h.uuid.to_string(), slot: AtomicU32::new(slot) })
}

/// Creates and formats a demo volume file, only if no file exists at that path.
async fn create_if_missing(cfg: &ExportConfig, create: &CreateConfig) -> Result<(), CmdError> {
    if cfg.device.exists() {
        return Ok(());
    }
    let Some(kek_path) = cfg.kek_files.first() else {
        return Err(CmdError::Usage(format!("export {}: create needs a kek_files entry", cfg.name)));
    };
    if let Some(dir) = cfg.device.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    }
    let provider: Box<dyn KeyProvider> = if kek_path.exists() {
        Box::new(local::LocalProvider::load(kek_path)?)
    } else {
        if let Some(dir) = kek_path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
        }
        let p = local::generate_kek_file(kek_path)?;
        tracing::info!(kek = %kek_path.display(), key_id = p.key_id(), "generated a local key-encryption key");
        Box::new(p)
    };
    // create_new: if something appeared at the path meanwhile, leave it alone.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&cfg.device)
        .map_err(io_err(format!("cannot create {}", cfg.device.display())))?;
    f.set_len(create.size).map_err(io_err("cannot size the demo volume"))?;
    drop(f);
    let dev = FileBackend::open(&cfg.device, true).map_err(io_err(format!("cannot open {}", cfg.device.display())))?;
    let h = format_backend(&dev, provider.as_ref(), create.sector_size, Vec::new()).await?;
    tracing::info!(device = %cfg.device.display(), uuid = %h.uuid, size = create.size, "created and formatted a new volume file");
    Ok(())
}
