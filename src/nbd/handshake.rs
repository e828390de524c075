//! The fixed newstyle handshake: greeting, client flags, then option haggling until the client
//! picks an export (EXPORT_NAME or GO), aborts, or asks for TLS (STARTTLS).
//!
//! The handshake knows nothing of rustls: [`haggle`] returns [`Outcome::StartTls`] after
//! acknowledging `NBD_OPT_STARTTLS`; the caller runs the TLS handshake and calls [`haggle`]
//! again on the encrypted stream. Every piece of negotiation state (structured replies,
//! metadata contexts) lives in one call of [`haggle`], so none survives STARTTLS, as the spec
//! requires.
//!
//! TLS modes (`doc/proto.md`, "TLS support"): [`TlsMode::Off`] is NOTLS (STARTTLS gets
//! `NBD_REP_ERR_POLICY`); [`TlsMode::Optional`] is SELECTIVETLS with no TLS-only export;
//! [`TlsMode::Require`] is FORCEDTLS: before TLS, every option but STARTTLS and ABORT gets
//! `NBD_REP_ERR_TLS_REQD`, and EXPORT_NAME (which cannot be refused) closes the connection.
//!
//! Extended headers (`NBD_OPT_EXTENDED_HEADERS`) are offered: they take precedence over
//! structured replies (a STRUCTURED_REPLY after them gets `NBD_REP_ERR_EXT_HEADER_REQD`).
//!
//! Metadata contexts: none is offered. `base:allocation` would have to report holes and zeros,
//! but a hole in the raw volume decrypts to noise, not zeros, and knowing which blocks hold
//! zeros would need reading and decrypting them; an honest answer is "every block is data", which
//! is what a client assumes without the context. So LIST/SET_META_CONTEXT succeed with zero
//! contexts (valid per the spec, and more useful to clients than `NBD_REP_ERR_UNSUP`), and
//! `NBD_CMD_BLOCK_STATUS` is never valid.
//!
//! Hostile input: malformed option data gets `NBD_REP_ERR_INVALID` and the haggling goes on.
//! Option data longer than [`proto::MAX_OPTION_LEN`] is read in small pieces and thrown away,
//! then answered with `NBD_REP_ERR_TOO_BIG`; beyond [`proto::MAX_OPTION_DISCARD`] (or for
//! EXPORT_NAME, which has no error reply) the connection is closed. A bad magic, unknown client
//! flags or a peer that stops talking end the connection. Nothing the client says is allocated
//! before its length is checked, and each `NBD_INFO_*` item is answered at most once per option
//! however often it is asked for (no reply amplification).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::codec::{self, ClientOption, CodecError, InfoRequest, MetaQuery};
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

/// The TLS policy of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS: STARTTLS is refused with `NBD_REP_ERR_POLICY` (the spec's NOTLS).
    Off,
    /// The client may upgrade with STARTTLS, or not (SELECTIVETLS, no TLS-only export).
    Optional,
    /// Nothing but STARTTLS and ABORT before TLS (FORCEDTLS).
    Require,
}

/// Where a connection stands with TLS when [`haggle`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsState {
    pub mode: TlsMode,
    /// TLS has been initiated on this connection (the stream is encrypted).
    pub active: bool,
}

impl TlsState {
    /// A listener without TLS.
    pub const OFF: TlsState = TlsState { mode: TlsMode::Off, active: false };

    /// FORCEDTLS and not yet upgraded: options other than STARTTLS and ABORT are refused.
    fn must_upgrade(self) -> bool {
        self.mode == TlsMode::Require && !self.active
    }
}

/// What the client asked for in its greeting reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// `NBD_FLAG_C_NO_ZEROES`: omit the 124 zero bytes after EXPORT_NAME.
    pub no_zeroes: bool,
}

/// The outcome of a successful handshake.
#[derive(Debug)]
pub struct Negotiated {
    pub export: Arc<Export>,
    pub structured_replies: bool,
    /// `NBD_OPT_EXTENDED_HEADERS`: 32-byte requests with 64-bit lengths, and every reply an
    /// extended chunk (takes precedence over structured replies).
    pub extended_headers: bool,
}

/// How one call of [`haggle`] ended.
#[derive(Debug)]
pub enum Outcome {
    /// The client chose an export: on to transmission.
    Transmission(Negotiated),
    /// The client sent `NBD_OPT_ABORT` (acknowledged): close.
    Abort,
    /// `NBD_OPT_STARTTLS` was acknowledged: run the TLS handshake on the stream, then call
    /// [`haggle`] again on the TLS stream with `active: true`.
    StartTls,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The stream failed or ended.
    #[error("connection failed during the handshake")]
    Io(#[from] std::io::Error),
    /// A magic number was wrong.
    #[error("protocol violation during the handshake")]
    Protocol(#[from] CodecError),
    /// The client did not set `NBD_FLAG_C_FIXED_NEWSTYLE`.
    #[error("client does not speak fixed newstyle (flags {0:#x})")]
    NotFixedNewstyle(u32),
    /// The client set flags the server did not offer (the spec says drop the connection).
    #[error("client sent unknown flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option claimed more data than the server reads or discards.
    #[error("option {code} claims {len} bytes, more than the {max} allowed")]
    OptionTooLong { code: u32, len: u32, max: u32 },
    /// EXPORT_NAME for an export that does not exist (no error reply is possible).
    #[error("client asked for unknown export {0:?} with EXPORT_NAME")]
    UnknownExport(String),
    /// EXPORT_NAME with a name that is not a valid string (no error reply is possible).
    #[error("client sent a malformed EXPORT_NAME")]
    BadExportName(#[source] CodecError),
    /// EXPORT_NAME before STARTTLS on a listener that requires TLS.
    #[error("client chose an export with EXPORT_NAME before starting TLS, which this listener requires")]
    TlsRequired,
    /// EXPORT_NAME while the server shuts down.
    #[error("client chose an export while the server is shutting down")]
    ShuttingDown,
}

/// Transmission flags advertised for an export: only what the export implements. A read-only
/// export advertises no command that writes (they would fail with EPERM anyway).
pub fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut f = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH | proto::FLAG_SEND_CACHE | proto::FLAG_CAN_MULTI_CONN;
    if export.is_read_only() {
        f |= proto::FLAG_READ_ONLY;
    } else {
        f |= proto::FLAG_SEND_FUA
            | proto::FLAG_SEND_WRITE_ZEROES
            | proto::FLAG_SEND_TRIM
            // Zeroing is emulated by writing encrypted zeros, so FAST_ZERO always gets
            // ENOTSUP, at once; advertising it lets clients learn that cheaply.
            | proto::FLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= proto::FLAG_SEND_DF;
    }
    f
}

/// Sends the greeting and reads the client flags.
pub async fn greet<S>(stream: &mut S) -> Result<ClientFlags, HandshakeError>
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
    Ok(ClientFlags { no_zeroes: client_flags & proto::FLAG_C_NO_ZEROES != 0 })
}

/// The whole handshake on a stream that cannot be upgraded: [`greet`], then [`haggle`].
/// With a `tls` mode other than `Off`, [`Outcome::StartTls`] is returned for the caller to act
/// on (or to drop the connection).
pub async fn negotiate<S>(
    stream: &mut S,
    catalog: &Catalog,
    tls: TlsState,
    shutdown: &watch::Receiver<bool>,
) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let flags = greet(stream).await?;
    haggle(stream, catalog, flags, tls, shutdown).await
}

/// Option haggling, from the first option (or the first after STARTTLS) to an [`Outcome`].
///
/// Once `shutdown` is true, options get `NBD_REP_ERR_SHUTDOWN` (ABORT is still acknowledged,
/// EXPORT_NAME closes the connection); the caller bounds how long that may go on.
pub async fn haggle<S>(
    stream: &mut S,
    catalog: &Catalog,
    flags: ClientFlags,
    tls: TlsState,
    shutdown: &watch::Receiver<bool>,
) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Negotiation state: fresh on every call, so nothing survives STARTTLS.
    let mut structured = false;
    let mut extended = false;
    let mut out = Vec::with_capacity(256);
    let mut data = Vec::new();

    loop {
        let mut hdr = [0u8; codec::OPTION_HEADER_LEN];
        stream.read_exact(&mut hdr).await?;
        let h = codec::option_header(&hdr)?;
        out.clear();

        if h.len > proto::MAX_OPTION_LEN {
            if h.code == proto::OPT_EXPORT_NAME || h.len > proto::MAX_OPTION_DISCARD {
                let max =
                    if h.code == proto::OPT_EXPORT_NAME { proto::MAX_OPTION_LEN } else { proto::MAX_OPTION_DISCARD };
                return Err(HandshakeError::OptionTooLong { code: h.code, len: h.len, max });
            }
            discard(stream, u64::from(h.len)).await?;
            if tls.must_upgrade() && h.code != proto::OPT_STARTTLS && h.code != proto::OPT_ABORT {
                codec::rep_error(&mut out, h.code, proto::REP_ERR_TLS_REQD, "this server requires TLS: send STARTTLS");
            } else {
                let msg = format!("option data of {} bytes is over the limit of {}", h.len, proto::MAX_OPTION_LEN);
                codec::rep_error(&mut out, h.code, proto::REP_ERR_TOO_BIG, &msg);
            }
            send(stream, &out).await?;
            continue;
        }
        data.clear();
        data.resize(h.len as usize, 0);
        stream.read_exact(&mut data).await?;

        // Policy before syntax: a client that must upgrade or go learns that first.
        if *shutdown.borrow() && h.code != proto::OPT_ABORT {
            if h.code == proto::OPT_EXPORT_NAME {
                return Err(HandshakeError::ShuttingDown);
            }
            codec::rep_error(&mut out, h.code, proto::REP_ERR_SHUTDOWN, "the server is shutting down");
            send(stream, &out).await?;
            continue;
        }
        if tls.must_upgrade() && h.code != proto::OPT_STARTTLS && h.code != proto::OPT_ABORT {
            if h.code == proto::OPT_EXPORT_NAME {
                return Err(HandshakeError::TlsRequired);
            }
            codec::rep_error(&mut out, h.code, proto::REP_ERR_TLS_REQD, "this server requires TLS: send STARTTLS");
            send(stream, &out).await?;
            continue;
        }

        let opt = match codec::decode_option(h.code, &data) {
            Ok(o) => o,
            Err(e) if h.code == proto::OPT_EXPORT_NAME => return Err(HandshakeError::BadExportName(e)),
            Err(e) => {
                codec::rep_error(&mut out, h.code, proto::REP_ERR_INVALID, &format!("malformed option: {e}"));
                send(stream, &out).await?;
                continue;
            }
        };
        match opt {
            ClientOption::ExportName(name) => {
                // No way to report an error: the spec says close the connection.
                let export = catalog.find(&name).ok_or(HandshakeError::UnknownExport(name))?;
                codec::export_name_reply(
                    &mut out,
                    export.size(),
                    transmission_flags(&export, structured || extended),
                    flags.no_zeroes,
                );
                send(stream, &out).await?;
                let neg = Negotiated { export, structured_replies: structured, extended_headers: extended };
                return Ok(Outcome::Transmission(neg));
            }
            ClientOption::Abort => {
                codec::option_reply(&mut out, h.code, proto::REP_ACK, &[]);
                // The client may already have closed; a failed ack is fine.
                let _ = send(stream, &out).await;
                return Ok(Outcome::Abort);
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
            ClientOption::StartTls => {
                if tls.active {
                    codec::rep_error(&mut out, h.code, proto::REP_ERR_INVALID, "TLS is already active");
                } else if tls.mode == TlsMode::Off {
                    codec::rep_error(&mut out, h.code, proto::REP_ERR_POLICY, "TLS is not offered on this listener");
                } else {
                    codec::option_reply(&mut out, h.code, proto::REP_ACK, &[]);
                    send(stream, &out).await?;
                    return Ok(Outcome::StartTls);
                }
            }
            ClientOption::StructuredReply if extended => {
                let msg = "extended headers are in use: no going back to structured replies";
                codec::rep_error(&mut out, h.code, proto::REP_ERR_EXT_HEADER_REQD, msg);
            }
            ClientOption::StructuredReply => {
                // A repeat is tolerated (the spec allows refusing it, nothing requires it).
                structured = true;
                codec::option_reply(&mut out, h.code, proto::REP_ACK, &[]);
            }
            ClientOption::ExtendedHeaders => {
                extended = true;
                codec::option_reply(&mut out, h.code, proto::REP_ACK, &[]);
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let go = h.code == proto::OPT_GO;
                match catalog.find(&req.name) {
                    None => {
                        let msg = format!("no export named {:?}", req.name);
                        codec::rep_error(&mut out, h.code, proto::REP_ERR_UNKNOWN, &msg);
                    }
                    Some(export) => {
                        info_replies(&mut out, h.code, &export, &req, structured || extended);
                        codec::option_reply(&mut out, h.code, proto::REP_ACK, &[]);
                        if go {
                            send(stream, &out).await?;
                            let neg = Negotiated { export, structured_replies: structured, extended_headers: extended };
                            return Ok(Outcome::Transmission(neg));
                        }
                    }
                }
            }
            ClientOption::ListMetaContext(q) => meta_context_reply(&mut out, h.code, catalog, &q),
            ClientOption::SetMetaContext(q) => {
                if structured || extended {
                    meta_context_reply(&mut out, h.code, catalog, &q);
                } else {
                    let msg = "negotiate structured replies before SET_META_CONTEXT";
                    codec::rep_error(&mut out, h.code, proto::REP_ERR_INVALID, msg);
                }
            }
            ClientOption::Unknown(_) => {
                codec::rep_error(&mut out, h.code, proto::REP_ERR_UNSUP, "option not supported");
            }
        }
        send(stream, &out).await?;
    }
}

async fn send<S>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Reads and drops `len` bytes through a small fixed buffer.
async fn discard<S>(stream: &mut S, len: u64) -> std::io::Result<()>
where
    S: AsyncRead + Unpin,
{
    let mut sink = tokio::io::sink();
    let copied = tokio::io::copy(&mut (&mut *stream).take(len), &mut sink).await?;
    if copied < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// LIST/SET_META_CONTEXT: the export must exist; no context is ever returned (see the module
/// documentation), so a successful reply is a lone `NBD_REP_ACK`.
fn meta_context_reply(out: &mut Vec<u8>, option: u32, catalog: &Catalog, q: &MetaQuery) {
    if catalog.find(&q.export).is_none() {
        let msg = format!("no export named {:?}", q.export);
        codec::rep_error(out, option, proto::REP_ERR_UNKNOWN, &msg);
        return;
    }
    codec::option_reply(out, option, proto::REP_ACK, &[]);
}

fn info_replies(out: &mut Vec<u8>, option: u32, export: &Export, req: &InfoRequest, structured: bool) {
    codec::info_export(out, option, export.size(), transmission_flags(export, structured));
    // Each item once, whatever the client repeats (clients MUST NOT repeat; tolerated).
    if req.requests.contains(&proto::INFO_NAME) {
        codec::info_name(out, option, export.name());
    }
    if req.requests.contains(&proto::INFO_DESCRIPTION) {
        codec::info_description(out, option, export.description());
    }
    // Always sent (the spec allows it unrequested): the kernel client and qemu size their
    // I/O from it. Minimum 512 so unaligned-to-4096 I/O is legal (served by RMW).
    codec::info_block_size(out, option, 512, export.sector_size().bytes(), MAX_REQUEST);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;
    use crate::crypto::{SectorCipher, VolumeKey};
    use crate::export::{ExportOptions, Geometry};
    use crate::units::SectorSize;
    use tokio::io::{duplex, DuplexStream};

    fn catalog(read_only: bool) -> Catalog {
        let ss = SectorSize::S4096;
        let mem = Arc::new(MemBackend::new(1 << 20));
        let key = VolumeKey::generate().unwrap();
        let opts = ExportOptions { name: "vol".into(), description: "a disk".into(), read_only, allow_discards: false };
        let geo = Geometry { sector_size: ss, data_offset: 0, data_size: 1 << 20 };
        let export = Arc::new(Export::new(opts, geo, mem, SectorCipher::new(&key, ss).unwrap()));
        let mut exports = HashMap::new();
        exports.insert("vol".to_string(), export);
        Catalog { exports: Arc::new(exports), default_export: Some("vol".into()) }
    }

    /// Runs the server side of the handshake on one end of a pipe; returns the client end and
    /// the server task.
    fn start(
        tls: TlsState,
        shutdown: bool,
    ) -> (DuplexStream, tokio::task::JoinHandle<Result<Outcome, HandshakeError>>) {
        let (client, mut server) = duplex(1 << 20);
        let cat = catalog(false);
        let task = tokio::spawn(async move {
            let (_tx, rx) = watch::channel(shutdown);
            negotiate(&mut server, &cat, tls, &rx).await
        });
        (client, task)
    }

    async fn client_hello(c: &mut DuplexStream) {
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        c.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes()).await.unwrap();
    }

    async fn send_opt(c: &mut DuplexStream, opt: &ClientOption) {
        let mut w = Vec::new();
        opt.encode(&mut w);
        c.write_all(&w).await.unwrap();
    }

    /// Reads one option reply: (option, type, data).
    async fn reply(c: &mut DuplexStream) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).await.unwrap();
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), proto::REP_MAGIC);
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        c.read_exact(&mut data).await.unwrap();
        (u32::from_be_bytes(h[8..12].try_into().unwrap()), u32::from_be_bytes(h[12..16].try_into().unwrap()), data)
    }

    fn go(name: &str, requests: Vec<u16>) -> ClientOption {
        ClientOption::Go(InfoRequest { name: name.into(), requests })
    }

    #[tokio::test]
    async fn go_replies_export_info_block_size_then_ack() {
        let (mut c, task) = start(TlsState::OFF, false);
        client_hello(&mut c).await;
        send_opt(&mut c, &go("vol", vec![proto::INFO_BLOCK_SIZE])).await;
        let (_, t, d) = reply(&mut c).await;
        assert_eq!((t, &d[..2]), (proto::REP_INFO, &proto::INFO_EXPORT.to_be_bytes()[..]));
        let (_, t, d) = reply(&mut c).await;
        assert_eq!((t, &d[..2]), (proto::REP_INFO, &proto::INFO_BLOCK_SIZE.to_be_bytes()[..]));
        assert_eq!(reply(&mut c).await.1, proto::REP_ACK);
        assert!(matches!(task.await.unwrap(), Ok(Outcome::Transmission(_))));
    }

    #[tokio::test]
    async fn repeated_info_items_are_answered_once() {
        let (mut c, task) = start(TlsState::OFF, false);
        client_hello(&mut c).await;
        send_opt(
            &mut c,
            &ClientOption::Info(InfoRequest { name: "vol".into(), requests: vec![proto::INFO_NAME; 500] }),
        )
        .await;
        let mut types = Vec::new();
        loop {
            let (_, t, d) = reply(&mut c).await;
            if t == proto::REP_ACK {
                break;
            }
            types.push(u16::from_be_bytes([d[0], d[1]]));
        }
        assert_eq!(types, [proto::INFO_EXPORT, proto::INFO_NAME, proto::INFO_BLOCK_SIZE]);
        send_opt(&mut c, &ClientOption::Abort).await;
        assert!(matches!(task.await.unwrap(), Ok(Outcome::Abort)));
    }

    #[tokio::test]
    async fn meta_contexts_are_listed_and_set_as_none() {
        let (mut c, task) = start(TlsState::OFF, false);
        client_hello(&mut c).await;
        let q = MetaQuery { export: "vol".into(), queries: vec!["base:allocation".into()] };
        send_opt(&mut c, &ClientOption::SetMetaContext(q.clone())).await;
        assert_eq!(reply(&mut c).await.1, proto::REP_ERR_INVALID, "SET before structured replies");
        send_opt(&mut c, &ClientOption::StructuredReply).await;
        assert_eq!(reply(&mut c).await.1, proto::REP_ACK);
        send_opt(&mut c, &ClientOption::ListMetaContext(q.clone())).await;
        assert_eq!(reply(&mut c).await.1, proto::REP_ACK);
        send_opt(&mut c, &ClientOption::SetMetaContext(q)).await;
        assert_eq!(reply(&mut c).await.1, proto::REP_ACK);
        let unknown = MetaQuery { export: "nope".into(), queries: vec![] };
        send_opt(&mut c, &ClientOption::ListMetaContext(unknown)).await;
        assert_eq!(reply(&mut c).await.1, proto::REP_ERR_UNKNOWN);
        send_opt(&mut c, &ClientOption::Abort).await;
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn extended_headers_are_accepted_and_exclude_structured_replies() {
        let (mut c, task) = start(TlsState::OFF, false);
        client_hello(&mut c).await;
        send_opt(&mut c, &ClientOption::ExtendedHeaders).await;
        assert_eq!(reply(&mut c).await.1, proto::REP_ACK);
        send_opt(&mut c, &ClientOption::StructuredReply).await;
        assert_eq!(reply(&mut c).await.1, proto::REP_ERR_EXT_HEADER_REQD);
        send_opt(&mut c, &go("vol", vec![])).await;
        let (_, _, d) = reply(&mut c).await;
        let tflags = u16::from_be_bytes([d[10], d[11]]);
        assert_ne!(tflags & proto::FLAG_SEND_DF, 0, "DF with extended headers");
        while reply(&mut c).await.1 != proto::REP_ACK {}
        match task.await.unwrap() {
            Ok(Outcome::Transmission(n)) => assert!(n.extended_headers && !n.structured_replies),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn oversized_option_is_discarded_and_refused_too_big() {
        let (mut c, task) = start(TlsState::OFF, false);
        client_hello(&mut c).await;
        let big = vec![0u8; proto::MAX_OPTION_LEN as usize + 1];
        let mut w = Vec::new();
        codec::option_request(&mut w, proto::OPT_GO, &big);
        c.write_all(&w).await.unwrap();
        assert_eq!(reply(&mut c).await.1, proto::REP_ERR_TOO_BIG);
        send_opt(&mut c, &go("", vec![])).await;
        let mut t = 0;
        while t != proto::REP_ACK {
            t = reply(&mut c).await.1;
        }
        assert!(matches!(task.await.unwrap(), Ok(Outcome::Transmission(_))));
    }

    #[tokio::test]
    async fn option_claiming_4_gib_closes_the_connection() {
        let (mut c, task) = start(TlsState::OFF, false);
        client_hello(&mut c).await;
        let mut w = Vec::new();
        w.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        w.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        w.extend_from_slice(&u32::MAX.to_be_bytes());
        c.write_all(&w).await.unwrap();
        assert!(matches!(task.await.unwrap(), Err(HandshakeError::OptionTooLong { .. })));
    }

    #[tokio::test]
    async fn require_mode_refuses_everything_but_starttls_and_abort() {
        let (mut c, task) = start(TlsState { mode: TlsMode::Require, active: false }, false);
        client_hello(&mut c).await;
        for opt in [ClientOption::List, ClientOption::StructuredReply, go("vol", vec![]), ClientOption::Unknown(99)] {
            send_opt(&mut c, &opt).await;
            assert_eq!(reply(&mut c).await.1, proto::REP_ERR_TLS_REQD, "{opt:?}");
        }
        send_opt(&mut c, &ClientOption::StartTls).await;
        assert_eq!(reply(&mut c).await.1, proto::REP_ACK);
        assert!(matches!(task.await.unwrap(), Ok(Outcome::StartTls)));
    }

    #[tokio::test]
    async fn require_mode_closes_on_export_name_before_tls() {
        let (mut c, task) = start(TlsState { mode: TlsMode::Require, active: false }, false);
        client_hello(&mut c).await;
        send_opt(&mut c, &ClientOption::ExportName("vol".into())).await;
        assert!(matches!(task.await.unwrap(), Err(HandshakeError::TlsRequired)));
    }

    #[tokio::test]
    async fn starttls_is_refused_by_policy_when_off_and_invalid_when_active() {
        let (mut c, task) = start(TlsState::OFF, false);
        client_hello(&mut c).await;
        send_opt(&mut c, &ClientOption::StartTls).await;
        assert_eq!(reply(&mut c).await.1, proto::REP_ERR_POLICY);
        send_opt(&mut c, &ClientOption::Abort).await;
        task.await.unwrap().unwrap();

        let (mut c, mut s) = duplex(1 << 16);
        let cat = catalog(false);
        let task = tokio::spawn(async move {
            let (_tx, rx) = watch::channel(false);
            let tls = TlsState { mode: TlsMode::Require, active: true };
            haggle(&mut s, &cat, ClientFlags { no_zeroes: true }, tls, &rx).await
        });
        send_opt(&mut c, &ClientOption::StartTls).await;
        assert_eq!(reply(&mut c).await.1, proto::REP_ERR_INVALID);
        send_opt(&mut c, &ClientOption::Abort).await;
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn shutdown_refuses_options_but_acknowledges_abort() {
        let (mut c, task) = start(TlsState::OFF, true);
        client_hello(&mut c).await;
        send_opt(&mut c, &go("vol", vec![])).await;
        assert_eq!(reply(&mut c).await.1, proto::REP_ERR_SHUTDOWN);
        send_opt(&mut c, &ClientOption::Abort).await;
        assert_eq!(reply(&mut c).await.1, proto::REP_ACK);
        assert!(matches!(task.await.unwrap(), Ok(Outcome::Abort)));
    }

    #[tokio::test]
    async fn unknown_client_flags_end_the_handshake() {
        let (mut c, task) = start(TlsState::OFF, false);
        let mut greeting = [0u8; 18];
        c.read_exact(&mut greeting).await.unwrap();
        c.write_all(&0x8000_0001u32.to_be_bytes()).await.unwrap();
        assert!(matches!(task.await.unwrap(), Err(HandshakeError::UnknownClientFlags(0x8000_0001))));
    }

    #[test]
    fn read_only_exports_advertise_no_write_commands() {
        let cat = catalog(true);
        let f = transmission_flags(cat.exports.get("vol").unwrap(), false);
        assert_ne!(f & proto::FLAG_READ_ONLY, 0);
        for w in
            [proto::FLAG_SEND_FUA, proto::FLAG_SEND_TRIM, proto::FLAG_SEND_WRITE_ZEROES, proto::FLAG_SEND_FAST_ZERO]
        {
            assert_eq!(f & w, 0, "{w:#x}");
        }
        assert_eq!(f & proto::FLAG_SEND_DF, 0, "DF only with structured replies");
    }
}
