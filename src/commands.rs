//! The commands behind the CLI. Each returns a [`CmdError`] whose `exit_code` the thin `main`
//! uses; nothing here prints key material.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::backend::{Backend, FileBackend};
use crate::cli::{Command, FormatArgs, ServeArgs};
use crate::config::{Config, ConfigError, CreateConfig, ExportConfig, DEFAULT_LISTEN};
use crate::export::{Export, ExportOptions};
use crate::header::{self, store, Header, HeaderError, KeySlot};
use crate::keys::{self, local, EncryptionContext, KeyError, KeyProvider, KeySpec};
use crate::nbd::handshake::Catalog;
use crate::server::{self, ListenAddr, Listener, ServerOptions};
use crate::units::SectorSize;
use crate::volume::{self, VolumeError};

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The command would destroy data or a key and was not told `--yes`.
    #[error("refusing: {0}")]
    Refused(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
}

impl CmdError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CmdError::Volume(v) => v.exit_code(),
            CmdError::Header(_) => 4,
            CmdError::Key(KeyError::UnwrapFailed) => 3,
            CmdError::Refused(_) => 5,
            CmdError::Usage(_) => 2,
            CmdError::Key(_) | CmdError::Config(_) | CmdError::Io { .. } => 1,
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CmdError {
    let what = what.into();
    move |source| CmdError::Io { what, source }
}

pub async fn run(command: Command) -> Result<(), CmdError> {
    match command {
        Command::Genkey { kek_file } => {
            let p = local::generate_kek_file(&kek_file)?;
            println!("wrote key-encryption key {} to {} (mode 0600)", p.key_id(), kek_file.display());
            Ok(())
        }
        Command::Format(args) => format(args).await,
        Command::Serve(args) => serve(args).await,
        Command::Inspect { device, json } => inspect(&device, json),
        Command::Benchmark { seconds } => benchmark(seconds),
    }
}

/// Builds a provider from a `--key` spec.
pub fn provider_for(spec: &KeySpec) -> Result<Box<dyn KeyProvider>, CmdError> {
    match spec {
        KeySpec::Local(path) => Ok(Box::new(local::LocalProvider::load(path)?)),
        KeySpec::AwsKms(_) => Err(CmdError::Usage("the aws-kms provider is not available in this build yet".into())),
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Known signatures of things worth not overwriting: (offset, bytes, name).
const SIGNATURES: &[(usize, &[u8], &str)] = &[
    (0, b"LUKS\xba\xbe", "a LUKS header"),
    (0, b"XFSB", "an XFS filesystem"),
    (1080, b"\x53\xef", "an ext2/3/4 filesystem"),
    (65600, b"_BHRfS_M", "a btrfs filesystem"),
    (4086, b"SWAPSPACE2", "a swap area"),
    (512, b"EFI PART", "a GPT partition table"),
    (510, b"\x55\xaa", "an MBR partition table or boot sector"),
    (3, b"NTFS    ", "an NTFS filesystem"),
    (0x8001, b"CD001", "an ISO 9660 filesystem"),
];

/// Why a device looks like it holds data, if it does: a known signature, or any non-zero
/// byte in its first MiB.
fn looks_used(dev: &dyn Backend) -> Result<Option<String>, CmdError> {
    let n = (1u64 << 20).min(dev.size()) as usize;
    let mut buf = vec![0u8; n];
    dev.read_at(&mut buf, 0).map_err(io_err("reading the start of the device"))?;
    for (off, sig, name) in SIGNATURES {
        if buf.get(*off..off + sig.len()) == Some(sig) {
            return Ok(Some(format!("it holds {name}")));
        }
    }
    Ok(buf.iter().position(|&b| b != 0).map(|i| format!("its first MiB is not blank (non-zero byte at offset {i})")))
}

async fn format(args: FormatArgs) -> Result<(), CmdError> {
    let sector =
        SectorSize::new(args.sector_size).ok_or_else(|| CmdError::Usage("--sector-size must be 512 or 4096".into()))?;
    let provider = provider_for(&args.key)?;
    let dev =
        FileBackend::open(&args.device, true).map_err(io_err(format!("cannot open {}", args.device.display())))?;
    if !args.yes {
        if store::probe(&dev)? {
            return Err(CmdError::Refused(format!(
                "{} already has an nbdcrypt header; formatting destroys its key (use --yes)",
                args.device.display()
            )));
        }
        if let Some(why) = looks_used(&dev)? {
            return Err(CmdError::Refused(format!(
                "{} looks like it holds data: {why} (use --yes)",
                args.device.display()
            )));
        }
    }
    let ctx: Vec<_> = args.context.into_iter().collect();
    let header = format_backend(&dev, provider.as_ref(), sector, ctx).await?;
    println!(
        "formatted {}: uuid {}, aes-xts-plain64, {}-byte sectors, data {} bytes at offset {}, slot 0 = {} {}",
        args.device.display(),
        header.uuid,
        header.sector_size,
        header.data_size,
        header.data_offset,
        header.slots[0].provider,
        header.slots[0].key_id
    );
    Ok(())
}

/// Writes a fresh header with one slot wrapped by `provider`. No safety checks: callers decide.
pub async fn format_backend(
    dev: &dyn Backend,
    provider: &dyn KeyProvider,
    sector: SectorSize,
    extra_context: Vec<(String, String)>,
) -> Result<Header, CmdError> {
    let data_offset = header::DEFAULT_DATA_OFFSET;
    let min = data_offset + (1 << 20);
    if dev.size() < min {
        return Err(CmdError::Usage(format!("the device is {} bytes; it must hold at least {min}", dev.size())));
    }
    let data_size = sector.align_down(dev.size() - data_offset);
    let uuid = uuid::Uuid::new_v4();
    let mut ctx: EncryptionContext = BTreeMap::new();
    for (k, v) in extra_context {
        if k == keys::CONTEXT_VOLUME {
            return Err(CmdError::Usage(format!("context key {k} is reserved")));
        }
        ctx.insert(k, v);
    }
    ctx.insert(keys::CONTEXT_VOLUME.into(), uuid.to_string());
    let (key, wrapped) = provider.generate(&ctx).await?;
    let mut h = Header::new(uuid, sector, data_offset, data_size, None, &key)?;
    h.slots.push(KeySlot {
        id: 0,
        provider: provider.kind().into(),
        key_id: wrapped.key_id,
        wrapped: wrapped.ciphertext,
        context: ctx,
        created: now_secs(),
    });
    store::write_new(dev, &mut h)?;
    Ok(h)
}

fn inspect(device: &Path, json: bool) -> Result<(), CmdError> {
    let dev = FileBackend::open(device, false).map_err(io_err(format!("cannot open {}", device.display())))?;
    let loaded = store::load(&dev)?;
    let h = &loaded.header;
    let copy = |s: &store::CopyState| match s {
        store::CopyState::Valid { seq } => format!("valid (seq {seq})"),
        store::CopyState::Blank => "blank".to_string(),
        store::CopyState::Damaged(why) => format!("damaged: {why}"),
    };
    if json {
        let slots: Vec<_> = h
            .slots
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id, "provider": s.provider, "key_id": s.key_id,
                    "context": s.context, "created": s.created, "wrapped_bytes": s.wrapped.len(),
                })
            })
            .collect();
        let v = serde_json::json!({
            "device": device.display().to_string(),
            "version": h.version, "sequence": h.seq, "uuid": h.uuid.to_string(),
            "cipher": h.cipher.to_string(), "key_bits": 512, "sector_size": h.sector_size.bytes(),
            "data_offset": h.data_offset, "data_size": h.data_size,
            "binding": h.binding.as_ref().map(|b| b.volume_id.clone()),
            "primary": copy(&loaded.primary), "secondary": copy(&loaded.secondary),
            "slots": slots,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("nbdcrypt header of {}", device.display());
    println!("  version:      {}", h.version);
    println!("  uuid:         {}", h.uuid);
    println!("  cipher:       {} (512-bit key)", h.cipher);
    println!("  sector size:  {}", h.sector_size);
    println!("  data offset:  {}", h.data_offset);
    println!("  data size:    {} ({:.2} GiB)", h.data_size, h.data_size as f64 / (1u64 << 30) as f64);
    println!("  sequence:     {}", h.seq);
    println!("  primary:      {}", copy(&loaded.primary));
    println!("  secondary:    {}", copy(&loaded.secondary));
    if let Some(b) = &h.binding {
        println!("  bound to:     {}", b.volume_id);
    }
    println!("  key slots:");
    for s in &h.slots {
        let ctx: Vec<_> = s.context.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("    {}: {} {} (context {})", s.id, s.provider, s.key_id, ctx.join(","));
    }
    Ok(())
}

fn benchmark(seconds: f64) -> Result<(), CmdError> {
    let d = Duration::from_secs_f64(seconds.clamp(0.05, 60.0));
    println!("# aes-xts-plain64, 512-bit key, AWS-LC, one thread");
    println!("{:>8} {:>10} {:>14}", "sector", "request", "encrypt");
    for ss in [SectorSize::S512, SectorSize::S4096] {
        for req in [4096usize, 64 << 10, 1 << 20] {
            let enc = crate::crypto::xts::measure_throughput(ss, req, d);
            println!("{:>8} {:>9}K {:>8.1} MiB/s", ss.bytes(), req >> 10, enc / 1048576.0);
        }
    }
    Ok(())
}

/// One export to open, from the command line or a config file.
struct ExportPlan {
    cfg: ExportConfig,
}

async fn serve(args: ServeArgs) -> Result<(), CmdError> {
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
                description: String::new(),
                create: None,
            };
            (l, 64, 10, vec![ExportPlan { cfg }])
        }
    };

    let mut exports: HashMap<String, Arc<Export>> = HashMap::new();
    for plan in &plans {
        let export = open_export(&plan.cfg).await?;
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

/// Opens (and on first start of a demo config, creates) one export.
async fn open_export(cfg: &ExportConfig) -> Result<Arc<Export>, CmdError> {
    if let Some(create) = &cfg.create {
        create_if_missing(cfg, create).await?;
    }
    let mut providers: Vec<Box<dyn KeyProvider>> = Vec::new();
    for path in &cfg.kek_files {
        providers.push(Box::new(local::LocalProvider::load(path)?));
    }
    let backend = volume::open_backend(&cfg.device, !cfg.read_only)?;
    let unlocked = volume::unlock_backend(backend.clone(), &providers).await?;
    let slot = unlocked.slot;
    let opts = ExportOptions {
        name: cfg.name.clone(),
        description: cfg.description.clone(),
        read_only: cfg.read_only,
        allow_discards: cfg.allow_discards,
    };
    let (export, h) = volume::into_export(unlocked, opts)?;
    tracing::info!(
        export = %cfg.name, device = %backend.describe(), uuid = %h.uuid, slot,
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
