//! Fuzzes option haggling input as the handshake sees it: a 16-byte option header, then its
//! data (bounded by the header's length and by `MAX_OPTION_LEN`, as the handshake does). Any
//! input decodes or fails cleanly, and a decoded option re-encodes to something that decodes
//! to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbdcrypt::nbd::codec::{decode_option, option_header, OPTION_HEADER_LEN};
use nbdcrypt::nbd::proto::MAX_OPTION_LEN;

fuzz_target!(|data: &[u8]| {
    let Some((header, rest)) = data.split_first_chunk::<OPTION_HEADER_LEN>() else {
        return;
    };
    let Ok(header) = option_header(header) else {
        return;
    };
    if header.len > MAX_OPTION_LEN {
        return;
    }
    let payload = rest.get(..header.len as usize).unwrap_or(rest);
    let Ok(option) = decode_option(header.code, payload) else {
        return;
    };
    let mut wire = Vec::new();
    option.encode(&mut wire);
    let (again, data) = wire
        .split_first_chunk::<OPTION_HEADER_LEN>()
        .expect("an encoded option starts with its header");
    let again = option_header(again).expect("an encoded option has the IHAVEOPT magic");
    assert_eq!(again.code, header.code);
    assert_eq!(decode_option(again.code, data), Ok(option));
});
