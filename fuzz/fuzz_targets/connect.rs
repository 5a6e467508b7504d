//! Fuzzes the first-packet path: the length check, then the CONNECT parser, on any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate::mqtt::connect;

fuzz_target!(|data: &[u8]| {
    // As the proxy does: check the fixed header and length first, parse only a whole packet.
    if let Ok(Some(total)) = connect::check(data, 64 * 1024) {
        if let Ok(c) = connect::parse(&data[..total]) {
            // A parsed CONNECT names a protocol level meshgate speaks.
            assert!(matches!(c.version, 3..=5));
        }
    }
    // The parser alone must also survive any input, whole or not.
    let _ = connect::parse(data);
});
