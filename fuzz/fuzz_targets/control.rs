#![forbid(unsafe_code)]
#![no_main]
//! Any bytes as a control stream: decoding never panics or loops, partial messages
//! consume nothing, and known messages round-trip.
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tower_proto::ControlMessage;

fuzz_target!(|data: &[u8]| {
    let mut view = data;
    loop {
        let before = view.len();
        match ControlMessage::decode(&mut view) {
            Ok(Some(ControlMessage::Unknown { .. })) => assert!(view.len() < before),
            Ok(Some(message)) => {
                assert!(view.len() < before);
                let mut again = BytesMut::new();
                message
                    .encode(&mut again)
                    .expect("a decoded message encodes");
                assert_eq!(
                    ControlMessage::decode(&mut again).expect("re-decodes"),
                    Some(message)
                );
            }
            Ok(None) => {
                assert_eq!(view.len(), before);
                break;
            }
            Err(_) => break,
        }
    }
});
