//! Fuzzes a whole NBD connection as the server sees it: the fuzz bytes are everything a client
//! sends, over an in-memory duplex stream, to `handshake::negotiate` and then, if an export is
//! chosen, to `transmission::serve` on a 1 MiB in-memory export. The server must never panic
//! and never hang: every input ends with the stream's EOF.
//!
//! The first byte picks the server's situation:
//! - bits 0-1: TLS mode: 0 off, 1 optional, 2 or 3 require. After an acknowledged STARTTLS
//!   the haggling goes on over the same (plain) stream as if TLS were active, so the
//!   state machine after the upgrade is reached without a TLS handshake;
//! - bit 2: the server is shutting down (options get ERR_SHUTDOWN, requests ESHUTDOWN);
//! - bit 3: the export is read-only.
//!
//! Seeds: `fuzz/seeds/nbd_handshake/` (made by `fuzz/seeds/make_nbd_seeds.py`).

#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nbdcrypt::backend::MemBackend;
use nbdcrypt::crypto::{SectorCipher, VolumeKey};
use nbdcrypt::export::{Export, ExportOptions, Geometry};
use nbdcrypt::nbd::handshake::{haggle, negotiate, Catalog, ClientFlags, Outcome, TlsMode, TlsState};
use nbdcrypt::nbd::transmission::{serve, Limits, Transport};
use nbdcrypt::units::SectorSize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

fn catalog(read_only: bool) -> Catalog {
    static CATALOGS: OnceLock<[Catalog; 2]> = OnceLock::new();
    let make = |read_only: bool| {
        let ss = SectorSize::S512;
        let size = 1u64 << 20;
        let key = VolumeKey::generate().expect("a random key");
        let cipher = SectorCipher::new(&key, ss).expect("a cipher");
        let opts = ExportOptions {
            name: "vol".into(),
            description: "fuzzed".into(),
            read_only,
            allow_discards: true,
        };
        let geo = Geometry { sector_size: ss, data_offset: 4096, data_size: size };
        let backend = Arc::new(MemBackend::new((size + 4096) as usize));
        let export = Arc::new(Export::new(opts, geo, backend, cipher));
        let mut exports = HashMap::new();
        exports.insert("vol".to_string(), export);
        Catalog { exports: Arc::new(exports), default_export: Some("vol".into()) }
    };
    CATALOGS.get_or_init(|| [make(false), make(true)])[usize::from(read_only)].clone()
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a tokio runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let tls_mode = match mode & 3 {
        0 => TlsMode::Off,
        1 => TlsMode::Optional,
        _ => TlsMode::Require,
    };
    let shutting_down = mode & 4 != 0;
    let cat = catalog(mode & 8 != 0);
    let input = input.to_vec();
    runtime().block_on(async move {
        let (mut client, mut server) = tokio::io::duplex(64 << 10);
        let (_tx, shutdown) = watch::channel(shutting_down);
        let client_task = tokio::spawn(async move {
            // Send everything, then EOF; drain whatever the server says meanwhile.
            let (mut rd, mut wr) = tokio::io::split(&mut client);
            let send = async {
                let _ = wr.write_all(&input).await;
                let _ = wr.shutdown().await;
            };
            let drain = async {
                let mut sink = [0u8; 8192];
                while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
            };
            tokio::join!(send, drain);
        });
        let tls = TlsState { mode: tls_mode, active: false };
        let mut outcome = negotiate(&mut server, &cat, tls, &shutdown).await;
        if let Ok(Outcome::StartTls) = outcome {
            let tls = TlsState { mode: tls_mode, active: true };
            let flags = ClientFlags { no_zeroes: true };
            outcome = haggle(&mut server, &cat, flags, tls, &shutdown).await;
            assert!(!matches!(outcome, Ok(Outcome::StartTls)), "a second STARTTLS was accepted");
        }
        if let Ok(Outcome::Transmission(neg)) = outcome {
            let limits =
                Limits { max_requests: 16, max_bytes: 1 << 20, shutdown_grace: Duration::from_secs(1), ..Limits::default() };
            let (r, w) = tokio::io::split(server);
            let _ = serve(r, w, neg, limits, Transport::Tcp, shutdown.clone()).await;
        } else {
            drop(server);
        }
        let _ = client_task.await;
    });
});
