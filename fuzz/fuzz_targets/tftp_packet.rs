//! Feeds arbitrary bytes to the TFTP packet parser, and arbitrary ACK sequences to the
//! transfer state machine. Neither may panic (the state machine checks every ACK against
//! the window it sent, so an ACK past the end is ignored, not applied).
#![no_main]

use libfuzzer_sys::fuzz_target;
use osstream_tftp::codec::parse;
use osstream_tftp::transfer::Transfer;

fuzz_target!(|data: &[u8]| {
    let _ = parse(data);
    if data.len() >= 4 {
        let size = u64::from(u16::from_le_bytes([data[0], data[1]]));
        let blksize = u16::from(data[2]).max(1);
        let window = u16::from(data[3] % 17).max(1);
        let mut transfer = Transfer::new(size, blksize, window);
        for ack in data[4..].chunks(2) {
            let _ = transfer.window();
            let n = u16::from_le_bytes([ack[0], *ack.get(1).unwrap_or(&0)]);
            let _ = transfer.ack(n);
            if transfer.done() {
                break;
            }
        }
    }
});
