//! The NBD protocol against hostile and unusual clients: a raw-socket client (tests/common/raw.rs)
//! sends malformed input; after each case a fresh connection must still be served correctly
//! (`assert_serves`: a real write, read-back and flush). Then negotiation details with
//! nbdsh/libnbd, multi-connection consistency, limits and shutdown.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::raw::*;
use common::*;

/// Waits (a little) for a log line: the server may log just after closing the socket.
fn log_has(d: &Daemon, text: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if d.log_text().contains(text) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn daemon(extra: &[&str]) -> (Volume, Daemon) {
    let vol = Volume::new(8 << 20, 4096);
    let d = Daemon::start(&vol, extra);
    (vol, d)
}

// ---- Handshake: malformed input --------------------------------------------------------------

#[test]
fn client_flags_without_fixed_newstyle_close_the_connection() {
    let (_v, d) = daemon(&[]);
    let mut c = Raw::connect(d.port);
    c.greet(0);
    assert!(c.is_closed());
    assert_serves(d.port);
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let (_v, d) = daemon(&[]);
    let mut c = Raw::connect(d.port);
    c.greet(0x0000_0101);
    assert!(c.is_closed());
    assert_serves(d.port);
}

#[test]
fn bad_option_magic_closes_the_connection() {
    let (_v, d) = daemon(&[]);
    let mut c = Raw::connect(d.port);
    c.greet(3);
    let mut b = b"IHAVEOPX".to_vec();
    b.extend_from_slice(&[0, 0, 0, 3, 0, 0, 0, 0]);
    c.send(&b);
    assert!(c.is_closed());
    assert_serves(d.port);
}

#[test]
fn truncated_handshakes_leave_the_server_serving() {
    let (_v, d) = daemon(&[]);
    // Gone before answering the greeting; half the flags; half an option header; an option
    // header whose data never fully arrives.
    drop(Raw::connect(d.port));
    let mut c = Raw::connect(d.port);
    c.read_n(18);
    c.send(&[0, 0]);
    drop(c);
    let mut c = Raw::connect(d.port);
    c.greet(3);
    c.send(&IHAVEOPT.to_be_bytes()[..5]);
    drop(c);
    let mut c = Raw::connect(d.port);
    c.greet(3);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&100u32.to_be_bytes());
    b.extend_from_slice(&[0; 10]);
    c.send(&b);
    drop(c);
    assert_serves(d.port);
}

#[test]
fn unknown_options_get_unsup_and_negotiation_goes_on() {
    let (_v, d) = daemon(&[]);
    let mut c = Raw::connect(d.port);
    c.greet(3);
    for code in [0u32, 4, 0x1234, 0xffff_ffff] {
        c.option(code, b"some data");
        let r = c.reply();
        assert_eq!((r.option, r.kind), (code, REP_ERR_UNSUP), "option {code}");
    }
    // Known options with data they must not have are INVALID, not UNSUP.
    c.option(OPT_EXTENDED_HEADERS, b"x");
    assert_eq!(c.reply().kind, REP_ERR_INVALID);
    c.go("t");
    assert_eq!(c.write_at(0, &[7; 4096]), 0);
    assert_serves(d.port);
}

#[test]
fn malformed_option_data_gets_invalid_and_negotiation_goes_on() {
    let (_v, d) = daemon(&[]);
    let mut c = Raw::connect(d.port);
    c.greet(3);
    c.option(OPT_LIST, b"x");
    assert_eq!(c.reply().kind, REP_ERR_INVALID);
    c.option(OPT_GO, &[0, 0, 0, 200, b'a']); // name length past the data
    assert_eq!(c.reply().kind, REP_ERR_INVALID);
    c.option(OPT_INFO, &[0xff, 0xff, 0xff, 0xff, 0, 0]); // 4 GiB name
    assert_eq!(c.reply().kind, REP_ERR_INVALID);
    c.go("t");
}

#[test]
fn option_claiming_4_gib_closes_the_connection() {
    let (_v, d) = daemon(&[]);
    let mut c = Raw::connect(d.port);
    c.greet(3);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&b);
    let _ = c.try_send(&[0u8; 65536]);
    assert!(c.is_closed());
    assert_serves(d.port);
}

#[test]
fn option_over_the_limit_is_read_and_refused_too_big() {
    let (_v, d) = daemon(&[]);
    let mut c = Raw::connect(d.port);
    c.greet(3);
    c.option(OPT_INFO, &vec![0u8; 1 << 20]);
    let r = c.reply();
    assert_eq!((r.option, r.kind), (OPT_INFO, REP_ERR_TOO_BIG));
    c.go("t");
    assert_eq!(c.read_at(0, 512).map(|d| d.len()), Ok(512));
}

#[test]
fn empty_export_name_selects_the_default_export() {
    let (_v, d) = daemon(&[]);
    let (mut c, info) = Raw::connect(d.port).open("", false);
    assert_eq!(info.size, (8 << 20) - (2 << 20));
    assert_eq!(c.write_at(0, &[1; 512]), 0);
    // EXPORT_NAME with an empty name too.
    let mut c = Raw::connect(d.port);
    c.greet(3);
    c.option(OPT_EXPORT_NAME, b"");
    let reply = c.read_n(10); // size + flags; NO_ZEROES was asked for
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), info.size);
    assert_eq!(c.read_at(0, 512), Ok(vec![1; 512]));
}

#[test]
fn export_name_of_5000_bytes_is_refused() {
    let (_v, d) = daemon(&[]);
    let name = vec![b'a'; 5000];
    let mut c = Raw::connect(d.port);
    c.greet(3);
    let replies = c.go_replies(OPT_GO, &name, &[]);
    assert_eq!(replies.last().unwrap().kind, REP_ERR_INVALID);
    c.option(OPT_EXPORT_NAME, &name);
    assert!(c.is_closed(), "EXPORT_NAME cannot be refused: the connection closes");
    assert_serves(d.port);
}

#[test]
fn unknown_export_gets_unknown_with_go_and_a_close_with_export_name() {
    let (_v, d) = daemon(&[]);
    let mut c = Raw::connect(d.port);
    c.greet(3);
    assert_eq!(c.go_replies(OPT_GO, b"nope", &[]).last().unwrap().kind, REP_ERR_UNKNOWN);
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.is_closed());
    assert_serves(d.port);
}

#[test]
fn list_info_and_meta_contexts() {
    let (_v, d) = daemon(&[]);
    let mut c = Raw::connect(d.port);
    c.greet(3);
    c.option(OPT_LIST, &[]);
    let r = c.replies();
    assert_eq!(r.len(), 2);
    assert_eq!((r[0].kind, &r[0].data[4..5]), (REP_SERVER, &b"t"[..]));
    let r = c.go_replies(OPT_INFO, b"t", &[1, 1, 1, 2, 3]);
    let items: Vec<u16> =
        r.iter().filter(|r| r.kind == REP_INFO).map(|r| u16::from_be_bytes([r.data[0], r.data[1]])).collect();
    assert_eq!(items, [0, 1, 2, 3], "each item once");
    let bs = r.iter().find(|r| r.kind == REP_INFO && r.data[..2] == [0, 3]).unwrap();
    let sizes: Vec<u32> = bs.data[2..].chunks(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect();
    assert_eq!(sizes, [512, 4096, 32 << 20]);
    // No metadata context is offered: zero contexts, then ACK.
    c.option(OPT_LIST_META_CONTEXT, &meta_data(b"t", &[]));
    assert_eq!(c.reply().kind, REP_ACK);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply().kind, REP_ACK);
    c.option(OPT_SET_META_CONTEXT, &meta_data(b"t", &[b"base:allocation"]));
    assert_eq!(c.reply().kind, REP_ACK);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.reply().kind, REP_ACK);
    assert!(c.is_closed());
}

#[test]
fn starttls_without_tls_is_refused_by_policy() {
    let (_v, d) = daemon(&[]);
    let mut c = Raw::connect(d.port);
    c.greet(3);
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.reply().kind, REP_ERR_POLICY);
    c.go("t");
}

// ---- Transmission: malformed requests --------------------------------------------------------

#[test]
fn bad_request_magic_closes_the_connection() {
    let (_v, d) = daemon(&[]);
    let (mut c, _) = Raw::connect(d.port).open("t", false);
    let mut b = 0x2560_9514u32.to_be_bytes().to_vec();
    b.extend_from_slice(&[0; 24]);
    c.send(&b);
    assert!(c.is_closed());
    assert_serves(d.port);
}

#[test]
fn unknown_commands_get_einval_and_the_connection_goes_on() {
    let (_v, d) = daemon(&[]);
    let (mut c, _) = Raw::connect(d.port).open("t", false);
    for cmd in [CMD_BLOCK_STATUS, 8, 9, 0x42, 0xffff] {
        assert_eq!(c.command(0, cmd, 0, 4096), EINVAL, "command {cmd}");
    }
    assert_eq!(c.write_at(0, &[3; 4096]), 0);
    assert_serves(d.port);
}

#[test]
fn unknown_flags_get_einval_and_a_write_payload_is_still_consumed() {
    let (_v, d) = daemon(&[]);
    let (mut c, _) = Raw::connect(d.port).open("t", false);
    assert_eq!(c.command(1 << 15, CMD_READ, 0, 512), EINVAL);
    assert_eq!(c.command(FLAG_DF, CMD_READ, 0, 512), EINVAL, "DF needs structured replies");
    assert_eq!(c.command(FLAG_NO_HOLE, CMD_TRIM, 0, 512), EINVAL);
    assert_eq!(c.command(1 << 9, CMD_FLUSH, 0, 0), EINVAL);
    // A write with a bad flag: EINVAL, its payload skipped, and nothing written.
    c.request(1 << 12, CMD_WRITE, 5, 0, 4096, &[0xee; 4096]);
    assert_eq!(c.simple(), (EINVAL, 5));
    assert_ne!(c.read_at(0, 4096).unwrap(), vec![0xee; 4096]);
    // FUA is tolerated on any command (the spec notes clients send it).
    assert_eq!(c.command(FLAG_FUA, CMD_FLUSH, 0, 0), 0);
    assert_eq!(c.write_at(0, &[4; 512]), 0);
}

#[test]
fn requests_past_the_end_get_the_spec_errnos() {
    let (_v, d) = daemon(&[]);
    let (mut c, info) = Raw::connect(d.port).open("t", false);
    let end = info.size;
    assert_eq!(c.read_at(end - 512, 1024), Err(EINVAL));
    assert_eq!(c.write_at(end - 512, &[1; 1024]), ENOSPC);
    assert_eq!(c.command(0, CMD_WRITE_ZEROES, end, 512), ENOSPC);
    assert_eq!(c.command(0, CMD_TRIM, end, 512), EINVAL);
    assert_eq!(c.command(0, CMD_CACHE, end, 512), EINVAL);
    // offset + length overflows 64 bits.
    assert_eq!(c.read_at(u64::MAX - 100, 4096), Err(EINVAL));
    assert_eq!(c.write_at(u64::MAX - 100, &[1; 4096]), ENOSPC);
    assert_eq!(c.command(0, CMD_WRITE_ZEROES, u64::MAX, 4096), ENOSPC);
    assert_eq!(c.command(0, CMD_TRIM, u64::MAX - 1, 2), EINVAL);
    assert_eq!(c.read_at(end - 512, 512).map(|d| d.len()), Ok(512));
    assert_serves(d.port);
}

#[test]
fn zero_length_requests_succeed() {
    let (_v, d) = daemon(&[]);
    let (mut c, _) = Raw::connect(d.port).open("t", false);
    assert_eq!(c.read_at(4096, 0), Ok(vec![]));
    assert_eq!(c.write_at(4096, &[]), 0);
    assert_eq!(c.command(0, CMD_TRIM, 4096, 0), 0);
    assert_eq!(c.command(0, CMD_WRITE_ZEROES, 4096, 0), 0);
    assert_eq!(c.command(0, CMD_CACHE, 4096, 0), 0);
    // With structured replies a zero-length read is a lone NONE chunk (OFFSET_DATA needs data).
    let (mut c, _) = Raw::connect(d.port).open("t", true);
    c.request(0, CMD_READ, 9, 4096, 0, &[]);
    let ch = c.chunk();
    assert_eq!((ch.kind, ch.flags, ch.cookie, ch.payload.len()), (REPLY_TYPE_NONE, 1, 9, 0));
    c.disconnect();
}

#[test]
fn oversized_write_payload_closes_and_oversized_read_gets_einval() {
    let (_v, d) = daemon(&[]);
    let (mut c, _) = Raw::connect(d.port).open("t", false);
    assert_eq!(c.read_at(0, 64 << 20), Err(EINVAL));
    c.request(0, CMD_WRITE, 1, 0, 64 << 20, &[0; 4096]);
    assert!(c.is_closed());
    assert_serves(d.port);
}

#[test]
fn disconnect_in_the_middle_of_a_payload_writes_nothing() {
    let (_v, d) = daemon(&[]);
    let (mut c, _) = Raw::connect(d.port).open("t", false);
    assert_eq!(c.write_at(0, &[5; 8192]), 0);
    c.request(0, CMD_WRITE, 1, 0, 8192, &[6; 4000]);
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    let (mut c, _) = Raw::connect(d.port).open("t", false);
    assert_eq!(c.read_at(0, 8192), Ok(vec![5; 8192]));
    assert_serves(d.port);
}

#[test]
fn disconnect_in_the_middle_of_a_request_header() {
    let (_v, d) = daemon(&[]);
    let (mut c, _) = Raw::connect(d.port).open("t", false);
    c.send(&REQUEST_MAGIC.to_be_bytes());
    drop(c);
    assert_serves(d.port);
}

// ---- Transmission: features ------------------------------------------------------------------

#[test]
fn structured_replies_use_chunks_and_error_chunks() {
    let (_v, d) = daemon(&[]);
    let (mut c, info) = Raw::connect(d.port).open("t", true);
    assert_ne!(info.flags & TF_SEND_DF, 0, "DF is offered with structured replies");
    c.request(0, CMD_WRITE, 1, 8192, 4096, &[9; 4096]);
    assert_eq!(c.simple(), (0, 1), "non-read commands get simple replies");
    for flags in [0, FLAG_DF] {
        c.request(flags, CMD_READ, 2, 8192, 4096, &[]);
        let ch = c.chunk();
        assert_eq!((ch.kind, ch.flags & 1, ch.cookie), (REPLY_TYPE_OFFSET_DATA, 1, 2));
        assert_eq!(&ch.payload[..8], &8192u64.to_be_bytes());
        assert_eq!(&ch.payload[8..], &[9; 4096][..]);
    }
    c.request(0, CMD_READ, 3, info.size, 512, &[]);
    let ch = c.chunk();
    assert_eq!((ch.kind, ch.flags & 1, ch.cookie, ch.error()), (REPLY_TYPE_ERROR, 1, 3, EINVAL));
    let msg_len = u16::from_be_bytes([ch.payload[4], ch.payload[5]]) as usize;
    assert_eq!(ch.payload.len(), 6 + msg_len);
    assert!(std::str::from_utf8(&ch.payload[6..]).unwrap().contains("past the end"));
    c.disconnect();
}

#[test]
fn extended_headers_carry_64_bit_lengths_and_extended_replies() {
    let (_v, d) = daemon(&[]);
    let mut c = Raw::connect(d.port);
    c.greet(3);
    c.option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.reply().kind, REP_ACK);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply().kind, REP_ERR_EXT_HEADER_REQD, "no going back to structured replies");
    let info = c.go("t");
    assert_ne!(info.flags & TF_SEND_DF, 0);
    let data = pseudo_random(4096, 5);
    // A write (with or without PAYLOAD_LEN: qemu omits it) gets a lone NONE chunk.
    for (cookie, flags) in [(1u64, FLAG_PAYLOAD_LEN), (2, 0)] {
        c.ext_request(flags, CMD_WRITE, cookie, 8192, 4096, &data);
        let ch = c.ext_chunk();
        assert_eq!((ch.kind, ch.flags, ch.cookie, ch.offset, ch.payload.len()), (REPLY_TYPE_NONE, 1, cookie, 8192, 0));
    }
    // A read: OFFSET_DATA, the request's offset in the header and in the payload.
    c.ext_request(FLAG_DF, CMD_READ, 3, 8192, 4096, &[]);
    let ch = c.ext_chunk();
    assert_eq!((ch.kind, ch.flags, ch.cookie, ch.offset), (REPLY_TYPE_OFFSET_DATA, 1, 3, 8192));
    assert_eq!(&ch.payload[..8], &8192u64.to_be_bytes());
    assert_eq!(&ch.payload[8..], &data[..]);
    // A payload on a command that takes none: consumed, then EINVAL.
    c.ext_request(FLAG_PAYLOAD_LEN, CMD_FLUSH, 4, 0, 100, &[0xaa; 100]);
    let ch = c.ext_chunk();
    assert_eq!((ch.kind, ch.cookie, ch.error()), (REPLY_TYPE_ERROR, 4, EINVAL));
    // 64-bit effect lengths: past the end, or more zeroing than one request may ask.
    c.ext_request(0, CMD_TRIM, 5, 0, 1 << 40, &[]);
    assert_eq!((c.ext_chunk().error()), EINVAL);
    c.ext_request(0, CMD_WRITE_ZEROES, 6, 0, 1 << 33, &[]);
    assert_eq!(c.ext_chunk().error(), EINVAL);
    c.ext_request(0, CMD_CACHE, 7, 0, info.size, &[]);
    assert_eq!(c.ext_chunk().kind, REPLY_TYPE_NONE, "cache of the whole export in one request");
    c.ext_request(0, CMD_READ, 8, 0, 0, &[]);
    let ch = c.ext_chunk();
    assert_eq!((ch.kind, ch.payload.len()), (REPLY_TYPE_NONE, 0), "zero-length read");
    c.ext_request(0, CMD_READ, 9, info.size, 512, &[]);
    let ch = c.ext_chunk();
    assert_eq!((ch.kind, ch.offset, ch.error()), (REPLY_TYPE_ERROR, info.size, EINVAL));
    // A compact header once extended headers are on is a protocol violation.
    c.request(0, CMD_READ, 10, 0, 512, &[]);
    let _ = c.try_send(&[0; 4]);
    assert!(c.is_closed());
    assert_serves(d.port);
}

#[test]
fn extended_write_payload_over_the_maximum_closes_the_connection() {
    let (_v, d) = daemon(&[]);
    let mut c = Raw::connect(d.port);
    c.greet(3);
    c.option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.reply().kind, REP_ACK);
    c.go("t");
    c.ext_request(FLAG_PAYLOAD_LEN, CMD_WRITE, 1, 0, 1 << 40, &[0; 4096]);
    assert!(c.is_closed());
    assert_serves(d.port);
}

#[test]
fn fast_zero_is_refused_at_once_and_zeroes_are_written() {
    let (_v, d) = daemon(&[]);
    let (mut c, _) = Raw::connect(d.port).open("t", false);
    assert_eq!(c.write_at(0, &[1; 8192]), 0);
    assert_eq!(c.command(FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 0, 8192), ENOTSUP);
    assert_eq!(c.read_at(0, 8192), Ok(vec![1; 8192]), "a refused fast zero changes nothing");
    assert_eq!(c.command(FLAG_NO_HOLE | FLAG_FUA, CMD_WRITE_ZEROES, 512, 4096), 0);
    let mut want = vec![1u8; 8192];
    want[512..4608].fill(0);
    assert_eq!(c.read_at(0, 8192), Ok(want));
}

#[test]
fn read_only_export_refuses_every_write_with_eperm() {
    let (_v, d) = daemon(&["--read-only"]);
    let (mut c, info) = Raw::connect(d.port).open("t", false);
    assert_ne!(info.flags & TF_READ_ONLY, 0);
    assert_eq!(info.flags & (TF_SEND_TRIM | TF_SEND_WRITE_ZEROES), 0, "no write command advertised");
    assert_eq!(c.write_at(0, &[1; 4096]), EPERM);
    assert_eq!(c.command(0, CMD_TRIM, 0, 4096), EPERM);
    assert_eq!(c.command(0, CMD_WRITE_ZEROES, 0, 4096), EPERM);
    assert_eq!(c.read_at(0, 4096).map(|d| d.len()), Ok(4096));
    assert_eq!(c.command(0, CMD_FLUSH, 0, 0), 0);
}

#[test]
fn writes_flushed_on_one_connection_are_seen_by_another() {
    let (_v, d) = daemon(&[]);
    let (mut a, info) = Raw::connect(d.port).open("t", false);
    let (mut b, _) = Raw::connect(d.port).open("t", true);
    assert_ne!(info.flags & TF_CAN_MULTI_CONN, 0);
    for round in 0..20u64 {
        let offset = round * 12288 + 512 * (round % 8);
        let data = pseudo_random(8192, round + 1);
        // Writes on A, FLUSH on A, then B reads them.
        assert_eq!(a.write_at(offset, &data), 0);
        assert_eq!(a.command(0, CMD_FLUSH, 0, 0), 0);
        b.request(0, CMD_READ, round, offset, 8192, &[]);
        let ch = b.chunk();
        assert_eq!(&ch.payload[8..], &data[..], "round {round}: B sees A's flushed write");
        // Writes acknowledged on A, FLUSH on B, then B reads them.
        let data = pseudo_random(4096, round + 100);
        assert_eq!(a.write_at(offset + 1000, &data), 0);
        b.request(0, CMD_FLUSH, 7, 0, 0, &[]);
        assert_eq!(b.simple(), (0, 7));
        b.request(0, CMD_READ, 8, offset + 1000, 4096, &[]);
        assert_eq!(&b.chunk().payload[8..], &data[..], "round {round}: after B's flush");
    }
    a.disconnect();
    b.disconnect();
}

#[test]
fn nbdsh_negotiation_and_commands() {
    let (_v, d) = daemon(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/protocol.py");
    let out = run("/usr/bin/python3", &[script, &d.uri]);
    assert!(
        out.status.success(),
        "protocol.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.stop(), 0);
}

// ---- Limits and shutdown ---------------------------------------------------------------------

#[test]
fn a_queue_deeper_than_the_byte_budget_is_answered_in_full() {
    // 1000 reads and writes of 512 bytes (over the 128-request cap) and 256 x 1 MiB (over the 12 MiB
    // cap) queued at once: requests wait for budget inside the server, and the client sends
    // nothing more until they are answered.
    let (_v, d) = daemon(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/deep_queue.py");
    for (depth, len) in [("1000", "512"), ("256", "1048576")] {
        let out = run("/usr/bin/python3", &[script, &d.uri, depth, len]);
        assert!(
            out.status.success(),
            "deep_queue.py {depth} x {len} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(d.stop(), 0);
}

#[test]
fn connections_over_the_cap_are_closed_at_once() {
    let (_v, d) = daemon(&["--max-connections", "2"]);
    let (a, _) = Raw::connect(d.port).open("t", false);
    let (b, _) = Raw::connect(d.port).open("t", false);
    let mut c = Raw::connect(d.port);
    assert!(c.is_closed(), "the third connection is closed without a greeting");
    assert!(log_has(&d, "connection limit reached"));
    a.disconnect();
    b.disconnect();
    std::thread::sleep(Duration::from_millis(300));
    assert_serves(d.port);
}

#[test]
fn silent_clients_are_dropped_after_the_handshake_timeout() {
    let (_v, d) = daemon(&["--handshake-timeout", "1"]);
    let mut c = Raw::connect(d.port);
    let started = Instant::now();
    c.read_n(18);
    assert!(c.is_closed());
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert!(log_has(&d, "handshake timed out"));
    assert_serves(d.port);
}

#[test]
fn sigterm_finishes_in_flight_requests_then_answers_eshutdown() {
    let (vol, d) = daemon(&[]);
    let (mut c, _) = Raw::connect(d.port).open("t", false);
    // A batch in flight when the signal lands: every one is answered, none is lost.
    let data = pseudo_random(1 << 20, 3);
    for i in 0..4u64 {
        c.request(0, CMD_WRITE, i, i << 20, 1 << 20, &data);
    }
    let pid = d.child.id().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let mut acknowledged = Vec::new();
    for _ in 0..4 {
        let (err, cookie) = c.simple();
        assert!(err == 0 || err == ESHUTDOWN, "{err}");
        if err == 0 {
            acknowledged.push(cookie);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    // New requests during the grace period get ESHUTDOWN (a write's payload is consumed).
    c.request(0, CMD_WRITE, 10, 0, 4096, &[1; 4096]);
    assert_eq!(c.simple(), (ESHUTDOWN, 10));
    assert_eq!(c.command(0, CMD_READ, 0, 512), ESHUTDOWN);
    // New connections are no longer accepted.
    assert!(std::net::TcpStream::connect(("127.0.0.1", d.port)).is_err());
    c.disconnect();
    assert_eq!(d.stop(), 0, "clean exit");
    // What was acknowledged is on disk.
    let d = Daemon::start(&vol, &[]);
    let (mut c, _) = Raw::connect(d.port).open("t", false);
    for i in acknowledged {
        assert_eq!(c.read_at(i << 20, 4096).unwrap(), data[..4096], "acknowledged write {i}");
    }
}

#[test]
fn sigterm_with_an_idle_client_exits_after_the_grace_period() {
    let (_v, d) = daemon(&[]);
    let (c, _) = Raw::connect(d.port).open("t", false);
    let started = Instant::now();
    assert_eq!(d.stop(), 0);
    assert!(started.elapsed() < Duration::from_secs(6), "{:?}", started.elapsed());
    drop(c);
}

#[test]
fn unix_socket_gets_the_configured_mode_and_group() {
    let vol = Volume::new(4 << 20, 4096);
    let sock = vol.path("nbd.sock");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let d = Daemon::spawn(
        &[
            "serve",
            vol.image.to_str().unwrap(),
            "--export",
            "t",
            "--kek-file",
            vol.kek.to_str().unwrap(),
            "--listen",
            &listen,
            "--socket",
            sock.to_str().unwrap(),
            "--socket-mode",
            "0660",
            "--socket-group",
            "12345",
        ],
        vol.dir.path(),
        format!("nbd+unix:///t?socket={}", sock.display()),
        port,
    )
    .unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o660);
    assert_eq!(m.gid(), 12345);
    let out = check(run("nbdinfo", &["--json", &d.uri]), "nbdinfo over the unix socket");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"export-size\""));
    assert_eq!(d.stop(), 0);
    assert!(!sock.exists(), "the socket file is removed on exit");
}
