//! Feeds arbitrary bytes to the HTTP request parser and the Range parser. They must never
//! panic; a parsed request never claims more bytes than it was given, and a range is
//! always inside the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use osstream_http::request::{RangeAnswer, parse_range, parse_request};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((request, used))) = parse_request(data) {
        assert!(used <= data.len());
        assert!(!request.path.split('/').any(|s| s == ".."));
    }
    if let Some((&size, rest)) = data.split_first()
        && let Ok(header) = std::str::from_utf8(rest)
    {
        let size = u64::from(size) * 1000;
        if let RangeAnswer::Part { start, end } = parse_range(header, size) {
            assert!(start <= end && end < size);
        }
    }
});
