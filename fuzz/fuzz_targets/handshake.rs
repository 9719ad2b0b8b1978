//! Any request headers from a tab: handshake checks, cookie lookup and
//! subprotocol parsing must not panic.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, Method, Version};
use libfuzzer_sys::fuzz_target;
use tabmux::upgrade;

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    let _ = upgrade::check_handshake(&Method::GET, Version::HTTP_11, &headers);
    let _ = upgrade::find_cookie(&headers, "sessionid");
    let _ = upgrade::requested_protocols(&headers);
});
