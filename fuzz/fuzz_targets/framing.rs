//! Fuzzes the packet scanner that checks every client stream after CONNECT, fed in random chunk sizes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate::mqtt::{connack, FrameScanner};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    // The same bytes fed whole and in chunks must give the same packets and the same verdict.
    let mut whole = FrameScanner::new(1 << 20);
    let mut a = Vec::new();
    let ra = whole.feed(rest, |h| a.push(h));
    let mut chunked = FrameScanner::new(1 << 20);
    let mut b = Vec::new();
    let step = usize::from(split % 16) + 1;
    let mut rb = Ok(());
    for c in rest.chunks(step) {
        rb = chunked.feed(c, |h| b.push(h));
        if rb.is_err() {
            break;
        }
    }
    assert_eq!(ra, rb);
    assert_eq!(a, b);
    let _ = connack::parse(rest);
});
