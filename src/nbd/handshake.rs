//! The fixed newstyle handshake: greeting, client flags, then options until the client picks
//! an export (EXPORT_NAME or GO) or aborts.
//!
//! Malformed option payloads get `NBD_REP_ERR_INVALID` and the haggling goes on; a bad magic,
//! an option longer than [`proto::MAX_OPTION_LEN`] or a peer that stops talking ends the
//! connection. Nothing the client says is allocated before its length is checked.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codec::{self, ClientOption, CodecError, InfoRequest};
use super::proto;
use crate::export::{Export, MAX_REQUEST};

/// What the server offers during the handshake.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub exports: Arc<HashMap<String, Arc<Export>>>,
    /// The export an empty name selects, if any.
    pub default_export: Option<String>,
}

impl Catalog {
    fn find(&self, name: &str) -> Option<Arc<Export>> {
        let name = if name.is_empty() { self.default_export.as_deref().unwrap_or("") } else { name };
        self.exports.get(name).cloned()
    }
}

/// The outcome of a successful handshake.
#[derive(Debug)]
pub struct Negotiated {
    pub export: Arc<Export>,
    pub structured_replies: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connection failed during the handshake")]
    Io(#[from] std::io::Error),
    #[error("protocol violation during the handshake")]
    Protocol(#[from] CodecError),
    #[error("client does not speak fixed newstyle (flags {0:#x})")]
    NotFixedNewstyle(u32),
    #[error("client sent unknown flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("option {code} claims {len} bytes, more than the {max} allowed")]
    OptionTooLong { code: u32, len: u32, max: u32 },
    #[error("client aborted the handshake")]
    Aborted,
    #[error("client asked for unknown export {0:?} with EXPORT_NAME")]
    UnknownExport(String),
}

/// Transmission flags advertised for an export: only what the export implements.
pub fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut f = proto::FLAG_HAS_FLAGS
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_SEND_FUA
        | proto::FLAG_SEND_WRITE_ZEROES
        | proto::FLAG_SEND_TRIM
        | proto::FLAG_SEND_FAST_ZERO
        | proto::FLAG_SEND_CACHE
        | proto::FLAG_CAN_MULTI_CONN;
    if export.is_read_only() {
        f |= proto::FLAG_READ_ONLY;
    }
    if structured {
        f |= proto::FLAG_SEND_DF;
    }
    f
}

/// Runs the handshake on `stream`. Returns `Ok(None)` if the client ended it cleanly (ABORT).
pub async fn negotiate<S>(stream: &mut S, catalog: &Catalog) -> Result<Option<Negotiated>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&codec::server_greeting(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES)).await?;
    stream.flush().await?;
    let mut cf = [0u8; 4];
    stream.read_exact(&mut cf).await?;
    let client_flags = codec::client_flags(cf);
    if client_flags & proto::FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::NotFixedNewstyle(client_flags));
    }
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(HandshakeError::UnknownClientFlags(client_flags));
    }
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut out = Vec::with_capacity(256);
    let mut data = Vec::new();

    loop {
        let mut hdr = [0u8; 16];
        stream.read_exact(&mut hdr).await?;
        let h = codec::option_header(&hdr)?;
        if h.len > proto::MAX_OPTION_LEN {
            return Err(HandshakeError::OptionTooLong { code: h.code, len: h.len, max: proto::MAX_OPTION_LEN });
        }
        data.clear();
        data.resize(h.len as usize, 0);
        stream.read_exact(&mut data).await?;
        out.clear();
        let opt = match codec::decode_option(h.code, &data) {
            Ok(o) => o,
            Err(e) => {
                let msg = format!("malformed option: {e}");
                codec::option_reply(&mut out, h.code, proto::REP_ERR_INVALID, msg.as_bytes());
                stream.write_all(&out).await?;
                continue;
            }
        };
        match opt {
            ClientOption::ExportName(name) => {
                // No way to report an error: the spec says close the connection.
                let export = catalog.find(&name).ok_or(HandshakeError::UnknownExport(name))?;
                codec::export_name_reply(&mut out, export.size(), transmission_flags(&export, structured), no_zeroes);
                stream.write_all(&out).await?;
                stream.flush().await?;
                return Ok(Some(Negotiated { export, structured_replies: structured }));
            }
            ClientOption::Abort => {
                codec::option_reply(&mut out, h.code, proto::REP_ACK, &[]);
                // The client may already have closed; a failed ack is fine.
                let _ = stream.write_all(&out).await;
                let _ = stream.flush().await;
                return Ok(None);
            }
            ClientOption::List => {
                let mut names: Vec<_> = catalog.exports.keys().collect();
                names.sort();
                for name in names {
                    let desc = catalog.exports.get(name).map(|e| e.description()).unwrap_or("");
                    codec::rep_server(&mut out, h.code, name, desc);
                }
                codec::option_reply(&mut out, h.code, proto::REP_ACK, &[]);
            }
            ClientOption::StructuredReply => {
                structured = true;
                codec::option_reply(&mut out, h.code, proto::REP_ACK, &[]);
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let go = h.code == proto::OPT_GO;
                match catalog.find(&req.name) {
                    None => {
                        let msg = format!("no export named {:?}", req.name);
                        codec::option_reply(&mut out, h.code, proto::REP_ERR_UNKNOWN, msg.as_bytes());
                    }
                    Some(export) => {
                        info_replies(&mut out, h.code, &export, &req, structured);
                        codec::option_reply(&mut out, h.code, proto::REP_ACK, &[]);
                        if go {
                            stream.write_all(&out).await?;
                            stream.flush().await?;
                            return Ok(Some(Negotiated { export, structured_replies: structured }));
                        }
                    }
                }
            }
            ClientOption::StartTls => {
                codec::option_reply(&mut out, h.code, proto::REP_ERR_POLICY, b"TLS is not configured on this server");
            }
            ClientOption::ListMetaContext(_)
            | ClientOption::SetMetaContext(_)
            | ClientOption::ExtendedHeaders
            | ClientOption::Unknown(_) => {
                codec::option_reply(&mut out, h.code, proto::REP_ERR_UNSUP, b"option not supported");
            }
        }
        stream.write_all(&out).await?;
        stream.flush().await?;
    }
}

fn info_replies(out: &mut Vec<u8>, option: u32, export: &Export, req: &InfoRequest, structured: bool) {
    codec::info_export(out, option, export.size(), transmission_flags(export, structured));
    for &r in &req.requests {
        match r {
            proto::INFO_NAME => codec::info_name(out, option, export.name()),
            proto::INFO_DESCRIPTION => codec::info_description(out, option, export.description()),
            _ => {}
        }
    }
    // Always sent (the spec allows it unrequested): the kernel client and qemu size their
    // I/O from it. Minimum 512 so unaligned-to-4096 I/O is legal (served by RMW).
    codec::info_block_size(out, option, 512, export.sector_size().bytes(), MAX_REQUEST);
}
