//! A raw NBD client over `std::net::TcpStream`, for input no real client would send. Everything
//! is encoded by hand here (not with the crate's codec), so a codec bug cannot hide itself.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub const IHAVEOPT: u64 = 0x49484156454F5054;
pub const REP_MAGIC: u64 = 0x3e889045565a9;
pub const REQUEST_MAGIC: u32 = 0x25609513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x67446698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e33ef;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e41c71;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a278c;
pub const OPT_EXTENDED_HEADERS: u32 = 11;
pub const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;
pub const FLAG_PAYLOAD_LEN: u16 = 32;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;
pub const FLAG_DF: u16 = 4;
pub const FLAG_FAST_ZERO: u16 = 16;

pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

/// An option reply.
#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// A structured reply chunk.
#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl Chunk {
    /// The error of an error chunk.
    pub fn error(&self) -> u32 {
        u32::from_be_bytes(self.payload[..4].try_into().unwrap())
    }
}

/// An extended reply chunk.
#[derive(Debug)]
pub struct ExtChunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    /// The request's offset, echoed.
    pub offset: u64,
    pub payload: Vec<u8>,
}

impl ExtChunk {
    pub fn error(&self) -> u32 {
        u32::from_be_bytes(self.payload[..4].try_into().unwrap())
    }
}

/// What GO told about the export.
#[derive(Debug, Clone, Copy)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
}

pub struct Raw<S: Read + Write = TcpStream> {
    pub s: S,
}

impl Raw<TcpStream> {
    pub fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the daemon");
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.set_nodelay(true).unwrap();
        Raw { s }
    }

    /// True if the server has closed (or reset) the connection: a read gives EOF or an error
    /// other than a timeout. Reads and drops anything the server still had queued.
    pub fn is_closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => return false,
                Err(_) => return true,
            }
        }
    }
}

impl<S: Read + Write> Raw<S> {
    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send to the daemon");
        self.s.flush().unwrap();
    }

    /// Sends without failing the test if the server already closed.
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes)?;
        self.s.flush()
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("read from the daemon");
        b
    }

    /// Reads the greeting and answers with `flags`.
    pub fn greet(&mut self, flags: u32) {
        let g = self.read_n(18);
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]) & 1, 1, "fixed newstyle");
        self.send(&flags.to_be_bytes());
    }

    pub fn option(&mut self, code: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    pub fn reply(&mut self) -> OptReply {
        let h = self.read_n(20);
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REP_MAGIC, "option reply magic");
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        OptReply {
            option: u32::from_be_bytes(h[8..12].try_into().unwrap()),
            kind: u32::from_be_bytes(h[12..16].try_into().unwrap()),
            data: self.read_n(len),
        }
    }

    /// Replies up to and including the final one (ACK or an error).
    pub fn replies(&mut self) -> Vec<OptReply> {
        let mut all = Vec::new();
        loop {
            let r = self.reply();
            let last = r.kind == REP_ACK || r.kind & 0x8000_0000 != 0;
            all.push(r);
            if last {
                return all;
            }
        }
    }

    /// Sends GO (or INFO) for `name` and returns the replies.
    pub fn go_replies(&mut self, code: u32, name: &[u8], items: &[u16]) -> Vec<OptReply> {
        self.option(code, &info_data(name, items));
        self.replies()
    }

    /// GO on `name`, which must succeed.
    pub fn go(&mut self, name: &str) -> ExportInfo {
        let replies = self.go_replies(OPT_GO, name.as_bytes(), &[3]);
        let last = replies.last().unwrap();
        assert_eq!(last.kind, REP_ACK, "GO failed: {replies:?}");
        export_info(&replies).expect("NBD_INFO_EXPORT in the GO replies")
    }

    /// Greets, optionally negotiates structured replies, and GOes to `name`.
    pub fn open(mut self, name: &str, structured: bool) -> (Self, ExportInfo) {
        self.greet(3);
        if structured {
            self.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.reply().kind, REP_ACK);
        }
        let info = self.go(name);
        (self, info)
    }

    pub fn request(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// An extended request (32-byte header, 64-bit length).
    pub fn ext_request(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u64, payload: &[u8]) {
        let mut b = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
    }

    pub fn ext_chunk(&mut self) -> ExtChunk {
        let h = self.read_n(32);
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), EXTENDED_REPLY_MAGIC, "extended reply magic");
        let len = u64::from_be_bytes(h[24..32].try_into().unwrap()) as usize;
        ExtChunk {
            flags: u16::from_be_bytes([h[4], h[5]]),
            kind: u16::from_be_bytes([h[6], h[7]]),
            cookie: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(h[16..24].try_into().unwrap()),
            payload: self.read_n(len),
        }
    }

    /// A simple reply header: (error, cookie).
    pub fn simple(&mut self) -> (u32, u64) {
        let h = self.read_n(16);
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC, "simple reply magic");
        (u32::from_be_bytes(h[4..8].try_into().unwrap()), u64::from_be_bytes(h[8..16].try_into().unwrap()))
    }

    pub fn chunk(&mut self) -> Chunk {
        let h = self.read_n(20);
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), STRUCTURED_REPLY_MAGIC, "chunk magic");
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        Chunk {
            flags: u16::from_be_bytes([h[4], h[5]]),
            kind: u16::from_be_bytes([h[6], h[7]]),
            cookie: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            payload: self.read_n(len),
        }
    }

    /// WRITE (simple replies), returning the error.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.request(0, CMD_WRITE, 0x77, offset, data.len() as u32, data);
        let (err, cookie) = self.simple();
        assert_eq!(cookie, 0x77);
        err
    }

    /// READ (simple replies), returning the data or the error.
    pub fn read_at(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(0, CMD_READ, 0x88, offset, len, &[]);
        let (err, cookie) = self.simple();
        assert_eq!(cookie, 0x88);
        if err == 0 {
            Ok(self.read_n(len as usize))
        } else {
            Err(err)
        }
    }

    /// A command without payload (simple replies), returning the error.
    pub fn command(&mut self, flags: u16, cmd: u16, offset: u64, len: u32) -> u32 {
        self.request(flags, cmd, 0x99, offset, len, &[]);
        let (err, cookie) = self.simple();
        assert_eq!(cookie, 0x99);
        err
    }

    pub fn disconnect(mut self) {
        self.request(0, CMD_DISC, 0, 0, 0, &[]);
    }
}

/// INFO/GO option data.
pub fn info_data(name: &[u8], items: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(items.len() as u16).to_be_bytes());
    for i in items {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// LIST/SET_META_CONTEXT option data.
pub fn meta_data(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
    }
    d
}

/// The NBD_INFO_EXPORT item of INFO/GO replies.
pub fn export_info(replies: &[OptReply]) -> Option<ExportInfo> {
    replies.iter().find(|r| r.kind == REP_INFO && r.data[..2] == [0, 0]).map(|r| ExportInfo {
        size: u64::from_be_bytes(r.data[2..10].try_into().unwrap()),
        flags: u16::from_be_bytes([r.data[10], r.data[11]]),
    })
}

/// A fresh connection writes, reads back and flushes correctly: the server still serves.
pub fn assert_serves(port: u16) {
    let (mut c, info) = Raw::connect(port).open("t", false);
    assert!(info.size >= 1 << 20);
    let data = super::pseudo_random(8192, u64::from(port));
    assert_eq!(c.write_at(4096 + 512, &data), 0, "write on a fresh connection");
    assert_eq!(c.read_at(4096 + 512, 8192).expect("read on a fresh connection"), data);
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0), 0);
    c.disconnect();
}
