//! Feeds arbitrary bytes to every NBD decoder: option headers, option data of every
//! option code, and request headers. A decoder must never panic or allocate beyond the
//! input, and whatever it accepts must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use osstream_nbd::proto::{OptionHeader, REQUEST_HEADER_LEN, Request, parse_option};

fuzz_target!(|data: &[u8]| {
    if data.len() >= 16 {
        let _ = OptionHeader::parse(data[..16].try_into().unwrap());
    }
    if let Some((&option, rest)) = data.split_first() {
        let _ = parse_option(u32::from(option % 12), rest);
    }
    if data.len() >= REQUEST_HEADER_LEN {
        let header: &[u8; REQUEST_HEADER_LEN] = data[..REQUEST_HEADER_LEN].try_into().unwrap();
        if let Ok(request) = Request::parse(header) {
            assert_eq!(&request.encode(), header);
        }
    }
});
