//! Any bytes from the backend: the decoder must not panic, and a decoded
//! text payload must be a slice the tab can be sent as is.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tabmux::config::Payload;
use tabmux::envelope::{self, BackendFrame, Body, TabId, Utf8Bytes};

fuzz_target!(|data: &[u8]| {
    // Text frames reach the decoder only once tungstenite found them UTF-8.
    if let Ok(frame) = Utf8Bytes::try_from(Bytes::copy_from_slice(data)) {
        for payload in [Payload::Json, Payload::Text] {
            if let Ok(BackendFrame::Deliver { body: Body::Text(t), .. }) = envelope::decode(&frame, payload) {
                assert!(t.len() <= data.len() || payload == Payload::Text);
            }
        }
    }
    // Whatever a tab sends is either refused or wrapped into valid JSON.
    if let Ok(text) = std::str::from_utf8(data) {
        for payload in [Payload::Json, Payload::Text] {
            if let Ok(up) = envelope::data_text(TabId(7), text, payload) {
                let back = envelope::decode(&up, payload);
                assert!(back.is_ok(), "an encoded tab message must decode");
            }
        }
    }
});
