//! Feeds arbitrary bytes to the DHCP message parser and the client classifier. They must
//! never panic, and what parses re-encodes to a message that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use osstream_pxe::decide::classify;
use osstream_pxe::message::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = Message::parse(data) {
        let _ = classify(&message);
        let again = Message::parse(&message.encode()).expect("an encoded message parses");
        assert_eq!(again.xid, message.xid);
        assert_eq!(again.options, message.options);
    }
});
