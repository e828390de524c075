//! Fuzzes the transmission request decoder: any 28 bytes decode or fail cleanly, and whatever
//! decodes re-encodes to the same bytes (nothing is lost or invented).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbdcrypt::nbd::codec::{decode_request, REQUEST_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((header, _)) = data.split_first_chunk::<REQUEST_LEN>() else {
        return;
    };
    if let Ok(request) = decode_request(header) {
        assert_eq!(&request.encode(), header);
    }
});
