//! `nbdcrypt serve`: open and unlock every export, bind the listeners, serve until a signal,
//! drain, flush.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{format_backend, io_err, kms_options, CmdError};
use crate::backend::FileBackend;
use crate::cli::ServeArgs;
use crate::config::{Config, CreateConfig, ExportConfig, DEFAULT_LISTEN};
use crate::export::{Export, ExportOptions};
use crate::keys::{local, KeyProvider, Keyring, KmsOptions};
use crate::nbd::handshake::Catalog;
use crate::server::{self, ListenAddr, Listener, ServerOptions};
use crate::volume;

/// One export to open, from the command line or a config file.
struct ExportPlan {
    cfg: ExportConfig,
}

pub(super) async fn serve(args: ServeArgs) -> Result<(), CmdError> {
    let started = Instant::now();
    match crate::hardening::disable_core_dumps() {
        Ok(()) => tracing::debug!("core dumps disabled"),
        Err(e) => tracing::warn!(error = %e, "could not disable core dumps"),
    }
    let (listeners, max_connections, handshake_timeout, plans) = match &args.config {
        Some(path) => {
            let c = Config::load(path)?;
            let plans = c.exports.into_iter().map(|cfg| ExportPlan { cfg }).collect::<Vec<_>>();
            (c.listeners, c.max_connections, c.handshake_timeout_secs, plans)
        }
        None => {
            let Some(device) = args.device.clone() else {
                return Err(CmdError::Usage("serve needs DEVICE or --config".into()));
            };
            let mut l: Vec<ListenAddr> = args.listen.iter().map(|a| ListenAddr::Tcp(a.clone())).collect();
            if let Some(s) = &args.socket {
                l.push(ListenAddr::Unix { path: s.clone(), mode: 0o600 });
            }
            if l.is_empty() {
                l.push(ListenAddr::Tcp(DEFAULT_LISTEN.into()));
            }
            let cfg = ExportConfig {
                name: args.export.clone(),
                device,
                kek_files: args.kek_file.clone(),
                read_only: args.read_only,
                allow_discards: args.allow_discards,
                direct: args.direct,
                description: String::new(),
                create: None,
                device_id: args.device_id.clone(),
                strict_binding: args.strict_binding,
            };
            (l, 64, 10, vec![ExportPlan { cfg }])
        }
    };

    let kms = kms_options(&args.kms);
    let mut exports: HashMap<String, Arc<Export>> = HashMap::new();
    for plan in &plans {
        let export = open_export(&plan.cfg, &kms, args.strict_binding).await?;
        exports.insert(plan.cfg.name.clone(), export);
    }
    let default_export = (plans.len() == 1).then(|| plans[0].cfg.name.clone());
    let exports = Arc::new(exports);

    let mut bound = Vec::new();
    for l in &listeners {
        let b = Listener::bind(l).await.map_err(io_err(format!("cannot listen on {l:?}")))?;
        tracing::info!(listener = %b.describe(), "listening");
        bound.push(b);
    }
    tracing::info!(startup_ms = started.elapsed().as_millis() as u64, exports = exports.len(), "ready");

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: draining in-flight requests");
        let _ = shutdown_tx.send(true);
    });
    let opts = ServerOptions {
        max_connections,
        handshake_timeout: Duration::from_secs(handshake_timeout),
        ..Default::default()
    };
    let catalog = Catalog { exports: exports.clone(), default_export };
    server::run(bound, catalog, opts, shutdown_rx).await;

    let mut failed = false;
    for (name, e) in exports.iter() {
        if let Err(err) = e.flush() {
            failed = true;
            tracing::error!(export = %name, error = %server::error_chain(&err), "final flush failed");
        }
    }
    if failed {
        return Err(CmdError::Io { what: "final flush failed".into(), source: std::io::Error::other("flush") });
    }
    tracing::info!("shutdown complete");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers the process still dies on the default action.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Opens (and on first start of a demo config, creates) one export. KMS is contacted here
/// only, once per aws-kms slot tried; the export never needs it again.
async fn open_export(cfg: &ExportConfig, kms: &KmsOptions, strict_binding: bool) -> Result<Arc<Export>, CmdError> {
    if let Some(create) = &cfg.create {
        create_if_missing(cfg, create).await?;
    }
    let keyring = Keyring::new(&cfg.kek_files, kms.clone())?;
    let backend = volume::open_backend_with(&cfg.device, !cfg.read_only, cfg.direct)?;
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
        "volume unlocked"
    );
    Ok(export)
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
