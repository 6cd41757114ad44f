//! Any bytes, split anywhere, into the server's decoder: it must never panic, never
//! reserve beyond the frame limit, and decode the same frames however the bytes arrive.
#![no_main]

use libfuzzer_sys::fuzz_target;

use chat::protocol::FrameBuf;

const MAX: u32 = 64 * 1024;

fn decode(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, bool) {
    let mut buf = FrameBuf::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend(chunk);
        loop {
            match buf.decode_client(MAX) {
                Ok(Some(f)) => {
                    assert!(f.body().len() <= MAX as usize);
                    frames.push(f.wire.to_vec());
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(e.length > MAX);
                    return (frames, true);
                }
            }
        }
        assert!(buf.space().len() <= 16 * 1024 + 13 + MAX as usize);
    }
    (frames, false)
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    // The first byte picks where to split the rest.
    let (split, rest) = (data[0] as usize, &data[1..]);
    let whole = decode(&[rest]);
    let at = if rest.is_empty() { 0 } else { split % rest.len() };
    let (a, b) = rest.split_at(at);
    let parts = decode(&[a, b]);
    let bytewise: Vec<&[u8]> = rest.chunks(1).collect();
    assert_eq!(whole, parts);
    assert_eq!(whole, decode(&bytewise));
});
