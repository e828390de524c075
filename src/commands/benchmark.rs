//! `nbdcrypt benchmark`: the sector cipher's throughput on this CPU (like `cryptsetup
//! benchmark`), and with `--e2e` a quick end-to-end loop through the real request path.
//!
//! The end-to-end loop serves a temporary file (page cache, or `O_DIRECT` with `--direct`)
//! through [`transmission::serve`] on one end of a Unix socket pair, with a random volume key
//! and no header, and drives the other end with a small pipelined NBD client in the same
//! process: 1 MiB sequential writes and reads at queue depth 8, 4 KiB random writes and reads
//! at queue depth 32 (the jobs of `../shared/bench/anchors.sh`, whose fio and nbdcopy runs
//! against real servers are the numbers to quote). Client and server share the process and
//! the CPUs, so this is a sanity check of a build and a machine, not a comparison.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

use super::{io_err, CmdError};
use crate::backend::{Caching, FileBackend};
use crate::cli::BenchmarkArgs;
use crate::crypto::{SectorCipher, VolumeKey};
use crate::export::{Export, ExportOptions, Geometry};
use crate::nbd::codec::{Command, Request};
use crate::nbd::handshake::Negotiated;
use crate::nbd::transmission::{self, Limits, Transport};
use crate::units::SectorSize;
use crate::volume::VolumeError;

pub(super) async fn benchmark(args: BenchmarkArgs) -> Result<(), CmdError> {
    let seconds = args.seconds.clamp(0.05, 60.0);
    tokio::task::spawn_blocking(move || cipher_table(Duration::from_secs_f64(seconds)))
        .await
        .map_err(|e| CmdError::Io { what: "cipher benchmark failed".into(), source: std::io::Error::other(e) })?;
    if args.e2e {
        let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
        let caching = Caching::new(args.direct, !args.no_map);
        end_to_end(&dir, args.size_mib.max(16) << 20, Duration::from_secs_f64(seconds), caching).await?;
    }
    Ok(())
}

fn cipher_table(d: Duration) {
    println!("# aes-xts-plain64, 512-bit key, one thread; engine: the one `serve` uses here");
    println!("{:>8} {:>10} {:>14} {:>12}", "sector", "request", "encrypt", "engine");
    for ss in [SectorSize::S512, SectorSize::S4096] {
        for req in [4096usize, 64 << 10, 1 << 20] {
            let enc = crate::crypto::xts::measure_throughput(ss, req, d);
            let engine = crate::crypto::CipherEngine::preferred();
            println!("{:>8} {:>9}K {:>8.1} MiB/s {engine:>12}", ss.bytes(), req >> 10, enc / 1048576.0);
        }
    }
}

/// One job of the loop.
#[derive(Debug, Clone, Copy)]
struct Job {
    name: &'static str,
    command: Command,
    block: u32,
    depth: usize,
    random: bool,
}

const JOBS: [Job; 4] = [
    Job { name: "seqwrite1m", command: Command::Write, block: 1 << 20, depth: 8, random: false },
    Job { name: "seqread1m", command: Command::Read, block: 1 << 20, depth: 8, random: false },
    Job { name: "randwrite4k", command: Command::Write, block: 4096, depth: 32, random: true },
    Job { name: "randread4k", command: Command::Read, block: 4096, depth: 32, random: true },
];

/// Deletes the temporary volume file however the loop ends.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn end_to_end(dir: &Path, size: u64, per_job: Duration, caching: Caching) -> Result<(), CmdError> {
    let path = dir.join(format!("nbdcrypt-benchmark-{}.img", std::process::id()));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err(format!("cannot create {}", path.display())))?;
    let _cleanup = TempFile(path.clone());
    f.set_len(size).map_err(io_err("cannot size the temporary volume"))?;
    drop(f);
    let mode = match caching {
        Caching::Mapped => "page cache",
        Caching::Buffered => "page cache, not mapped",
        Caching::Direct => "O_DIRECT",
    };
    println!();
    println!(
        "# end to end: in-process client over a Unix socket pair, {} MiB file in {} ({mode}), {:.1} s per job",
        size >> 20,
        dir.display(),
        per_job.as_secs_f64()
    );
    println!("{:>8} {:>12} {:>6} {:>10} {:>10}", "sector", "job", "depth", "MiB/s", "IOPS");
    for ss in [SectorSize::S4096, SectorSize::S512] {
        let backend =
            FileBackend::open_with(&path, true, caching).map_err(io_err(format!("cannot open {}", path.display())))?;
        let key = VolumeKey::generate().map_err(|_| CmdError::Usage("cannot generate a random key".into()))?;
        let cipher = SectorCipher::new(&key, ss).map_err(VolumeError::Cipher)?;
        drop(key);
        let opts = ExportOptions {
            name: "benchmark".into(),
            description: String::new(),
            read_only: false,
            allow_discards: false,
        };
        let geo = Geometry { sector_size: ss, data_offset: 0, data_size: size };
        let export = Arc::new(Export::new(opts, geo, Arc::new(backend), cipher));
        let (client, server) = tokio::net::UnixStream::pair().map_err(io_err("cannot create a socket pair"))?;
        let (sr, sw) = server.into_split();
        let (_stop_tx, stop_rx) = watch::channel(false);
        let neg = Negotiated { export, structured_replies: false, extended_headers: false };
        let srv = tokio::spawn(transmission::serve(sr, sw, neg, Limits::default(), Transport::Unix, stop_rx));
        let mut client = client;
        for job in JOBS {
            let (bytes, ios, secs) =
                run_job(&mut client, job, size, per_job).await.map_err(io_err(format!("job {} failed", job.name)))?;
            println!(
                "{:>8} {:>12} {:>6} {:>10.1} {:>10.0}",
                ss.bytes(),
                job.name,
                job.depth,
                bytes as f64 / 1048576.0 / secs,
                ios as f64 / secs
            );
        }
        let disc = Request { flags: 0, command: Command::Disc, cookie: 0, offset: 0, len: 0 };
        client.write_all(&disc.encode()).await.map_err(io_err("cannot send DISC"))?;
        match srv.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(CmdError::Io { what: "the server failed".into(), source: std::io::Error::other(e) })
            }
            Err(e) => {
                return Err(CmdError::Io { what: "the server task failed".into(), source: std::io::Error::other(e) })
            }
        }
    }
    Ok(())
}

/// Runs one job for about `duration` with `job.depth` requests in flight; returns bytes,
/// requests and seconds.
async fn run_job(
    stream: &mut tokio::net::UnixStream,
    job: Job,
    size: u64,
    duration: Duration,
) -> std::io::Result<(u64, u64, f64)> {
    let (r, mut w) = stream.split();
    let mut r = BufReader::with_capacity(256 << 10, r);
    let block = u64::from(job.block);
    let blocks = (size / block).max(1);
    // Incompressible, non-zero payload; its content does not matter.
    let payload: Vec<u8> = (0..job.block).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let mut data = vec![0u8; job.block as usize];
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = 0u64;
    let mut offset = move || {
        let b = if job.random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        } else {
            next = (next + 1) % blocks;
            next
        };
        b * block
    };
    let start = Instant::now();
    let (mut in_flight, mut done, mut cookie) = (0usize, 0u64, 0u64);
    loop {
        let running = start.elapsed() < duration;
        while running && in_flight < job.depth {
            let req = Request { flags: 0, command: job.command, cookie, offset: offset(), len: job.block };
            w.write_all(&req.encode()).await?;
            if job.command == Command::Write {
                w.write_all(&payload).await?;
            }
            cookie += 1;
            in_flight += 1;
        }
        if in_flight == 0 {
            break;
        }
        let mut reply = [0u8; 16];
        r.read_exact(&mut reply).await?;
        let error = u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]);
        if error != 0 {
            return Err(std::io::Error::other(format!("the server replied with error {error}")));
        }
        if job.command == Command::Read {
            r.read_exact(&mut data).await?;
        }
        in_flight -= 1;
        done += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((done * block, done, secs))
}
