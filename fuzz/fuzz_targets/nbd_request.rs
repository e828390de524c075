//! Fuzzes the transmission request decoders: any 28 bytes decode as a compact header, and any
//! 32 bytes as an extended header, or fail cleanly; whatever decodes re-encodes to the same
//! bytes (nothing is lost or invented).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbdcrypt::nbd::codec::{decode_extended_request, decode_request, EXTENDED_REQUEST_LEN, REQUEST_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((header, _)) = data.split_first_chunk::<REQUEST_LEN>() else {
        return;
    };
    if let Ok(request) = decode_request(header) {
        assert_eq!(&request.encode(), header);
    }
    if let Some(header) = data.first_chunk::<EXTENDED_REQUEST_LEN>() {
        if let Ok(request) = decode_extended_request(header) {
            assert_eq!(&request.encode(), header);
        }
    }
});
