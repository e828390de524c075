//! What a migration reads from: a block device or file, or an NBD export (`nbd://host[:port]
//! [/export]`, `nbd+unix:///export?socket=PATH`) read with a small blocking NBD client built on
//! [`crate::nbd::codec`]: fixed newstyle, `NBD_OPT_GO`, `NBD_CMD_READ` with simple replies,
//! several reads in flight.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::backend::{Backend, FileBackend};
use crate::crypto::kdf::sha256;
use crate::nbd::codec::{ClientOption, Command, InfoRequest, Reader, Request};
use crate::nbd::proto::{
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE,
    INFO_EXPORT, NBDMAGIC, OPT_GO, REP_ACK, REP_FLAG_ERROR, REP_INFO, REP_MAGIC, SIMPLE_REPLY_MAGIC,
};

/// A read-only source of bytes with a size.
pub trait Source: Send {
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; short reads are errors.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn describe(&self) -> String;
}

/// Opens `spec`: an NBD URI, or a path to a file or block device.
pub fn open(spec: &str) -> io::Result<Box<dyn Source>> {
    if spec.starts_with("nbd://") || spec.starts_with("nbd+unix://") {
        return Ok(Box::new(NbdSource::connect(spec)?));
    }
    let b = FileBackend::open(Path::new(spec), false)?;
    Ok(Box::new(FileSource(b)))
}

/// A file or block device, read-only.
#[derive(Debug)]
pub struct FileSource(pub FileBackend);

impl Source for FileSource {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}

/// Identifies a source's contents cheaply: SHA-256 over its size, its first MiB and its last
/// MiB. Recorded in the target's checkpoint so that a resumed migration is refused if the
/// source is not the one it started from (another device, or one that was written to).
pub fn fingerprint(src: &mut dyn Source) -> io::Result<[u8; 32]> {
    let size = src.size();
    let n = size.min(1 << 20);
    let mut buf = vec![0u8; (2 * n) as usize + 8];
    buf[..8].copy_from_slice(&size.to_be_bytes());
    let (head, tail) = buf[8..].split_at_mut(n as usize);
    src.read_at(head, 0)?;
    src.read_at(tail, size - n)?;
    Ok(sha256(&buf))
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// Where an NBD URI points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    Tcp(String),
    Unix(String),
}

/// Parses `nbd://host[:port][/export]` and `nbd+unix:///[export]?socket=PATH`.
pub fn parse_uri(uri: &str) -> Result<(NbdAddr, String), String> {
    if let Some(rest) = uri.strip_prefix("nbd://") {
        let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
        if hostport.is_empty() {
            return Err(format!("{uri}: no host"));
        }
        let addr = if hostport.starts_with('[') {
            if hostport.contains("]:") {
                hostport.to_owned()
            } else {
                format!("{hostport}:10809")
            }
        } else if hostport.contains(':') {
            hostport.to_owned()
        } else {
            format!("{hostport}:10809")
        };
        return Ok((NbdAddr::Tcp(addr), export.to_owned()));
    }
    if let Some(rest) = uri.strip_prefix("nbd+unix://") {
        let (path, query) = rest.split_once('?').ok_or_else(|| format!("{uri}: needs ?socket=PATH"))?;
        let export = path.strip_prefix('/').unwrap_or(path).to_owned();
        let socket = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("socket="))
            .ok_or_else(|| format!("{uri}: needs ?socket=PATH"))?;
        return Ok((NbdAddr::Unix(socket.to_owned()), export));
    }
    Err(format!("{uri}: not an nbd:// or nbd+unix:// URI"))
}

/// Largest read request sent (servers advertise at least 32 MiB or accept it by default).
const MAX_REQUEST: u32 = 4 << 20;
/// Reads in flight at once.
const IN_FLIGHT: usize = 8;
/// Longest option reply data accepted (INFO replies are a few bytes; errors carry a message).
const MAX_OPTION_REPLY: u32 = 64 << 10;

/// A connected, read-only NBD client.
pub struct NbdSource {
    stream: Stream,
    uri: String,
    size: u64,
    max_request: u32,
    cookie: u64,
}

impl std::fmt::Debug for NbdSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdSource").field("uri", &self.uri).field("size", &self.size).finish()
    }
}

fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl NbdSource {
    /// Connects and negotiates (fixed newstyle, `NBD_OPT_GO`).
    pub fn connect(uri: &str) -> io::Result<NbdSource> {
        let (addr, export) = parse_uri(uri).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut stream = match &addr {
            NbdAddr::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(120)))?;
                Stream::Tcp(s)
            }
            NbdAddr::Unix(p) => {
                let s = UnixStream::connect(p)?;
                s.set_read_timeout(Some(Duration::from_secs(120)))?;
                Stream::Unix(s)
            }
        };
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        let mut r = Reader::new(&greeting);
        let (magic, opt, flags) = (r.u64(), r.u64(), r.u16());
        if magic != Ok(NBDMAGIC) || opt != Ok(IHAVEOPT) {
            return Err(proto("not a newstyle NBD server"));
        }
        let flags = flags.unwrap_or(0);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto("the server does not speak fixed newstyle"));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        stream.write_all(&cflags.to_be_bytes())?;
        let mut out = Vec::new();
        ClientOption::Go(InfoRequest { name: export.clone(), requests: vec![INFO_BLOCK_SIZE] }).encode(&mut out);
        stream.write_all(&out)?;
        let (mut size, mut max_request) = (None, MAX_REQUEST);
        loop {
            let mut h = [0u8; 20];
            stream.read_exact(&mut h)?;
            let mut r = Reader::new(&h);
            let (magic, option, kind, len) = (r.u64(), r.u32(), r.u32(), r.u32().unwrap_or(u32::MAX));
            if magic != Ok(REP_MAGIC) || option != Ok(OPT_GO) {
                return Err(proto("bad option reply"));
            }
            if len > MAX_OPTION_REPLY {
                return Err(proto(format!("option reply of {len} bytes is too long")));
            }
            let mut data = vec![0u8; len as usize];
            stream.read_exact(&mut data)?;
            let kind = kind.unwrap_or(0);
            if kind == REP_ACK {
                break;
            }
            if kind & REP_FLAG_ERROR != 0 {
                let msg = String::from_utf8_lossy(&data);
                return Err(io::Error::other(format!("server refused export {export:?}: {msg} ({kind:#x})")));
            }
            if kind == REP_INFO {
                let mut r = Reader::new(&data);
                match r.u16() {
                    Ok(INFO_EXPORT) => size = r.u64().ok(),
                    Ok(INFO_BLOCK_SIZE) => {
                        let _min = r.u32();
                        let _pref = r.u32();
                        if let Ok(max) = r.u32() {
                            max_request = max_request.min(max.max(4096));
                        }
                    }
                    _ => {}
                }
            }
        }
        let size = size.ok_or_else(|| proto("the server sent no export size"))?;
        Ok(NbdSource { stream, uri: uri.to_owned(), size, max_request, cookie: 0 })
    }

    fn read_reply(&mut self) -> io::Result<(u32, u64)> {
        let mut h = [0u8; 16];
        self.stream.read_exact(&mut h)?;
        let mut r = Reader::new(&h);
        if r.u32() != Ok(SIMPLE_REPLY_MAGIC) {
            return Err(proto("expected a simple reply"));
        }
        let error = r.u32().unwrap_or(0);
        let cookie = r.u64().unwrap_or(0);
        Ok((error, cookie))
    }
}

impl Source for NbdSource {
    fn size(&self) -> u64 {
        self.size
    }

    /// Splits the read into requests of at most the server's maximum block size, keeps up to
    /// `IN_FLIGHT` of them outstanding, and places each reply by its cookie.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.size);
        if end.is_none() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let step = self.max_request as usize;
        let pieces: Vec<(usize, usize)> =
            (0..buf.len()).step_by(step.max(1)).map(|s| (s, (s + step).min(buf.len()))).collect();
        let base = self.cookie;
        let mut sent = 0;
        let mut received = 0;
        while received < pieces.len() {
            while sent < pieces.len() && sent - received < IN_FLIGHT {
                let (s, e) = pieces[sent];
                let req = Request {
                    flags: 0,
                    command: Command::Read,
                    cookie: base + sent as u64,
                    offset: offset + s as u64,
                    len: (e - s) as u32,
                };
                self.stream.write_all(&req.encode())?;
                sent += 1;
            }
            let (error, cookie) = self.read_reply()?;
            let idx = cookie.wrapping_sub(base) as usize;
            let Some(&(s, e)) = pieces.get(idx) else {
                return Err(proto(format!("reply with unknown cookie {cookie}")));
            };
            if error != 0 {
                return Err(io::Error::other(format!("NBD read at {} failed with error {error}", offset + s as u64)));
            }
            self.stream.read_exact(&mut buf[s..e])?;
            received += 1;
        }
        self.cookie = base + pieces.len() as u64;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("NBD export {}", self.uri)
    }
}

impl Drop for NbdSource {
    fn drop(&mut self) {
        let req = Request { flags: 0, command: Command::Disc, cookie: self.cookie, offset: 0, len: 0 };
        let _ = self.stream.write_all(&req.encode());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse() {
        assert_eq!(parse_uri("nbd://127.0.0.1/x").unwrap(), (NbdAddr::Tcp("127.0.0.1:10809".into()), "x".into()));
        assert_eq!(parse_uri("nbd://h:1234").unwrap(), (NbdAddr::Tcp("h:1234".into()), String::new()));
        assert_eq!(
            parse_uri("nbd+unix:///e?socket=/run/s.sock").unwrap(),
            (NbdAddr::Unix("/run/s.sock".into()), "e".into())
        );
        assert!(parse_uri("nbd+unix:///e").is_err());
        assert!(parse_uri("http://x").is_err());
    }
}
