//! Any bytes as a control stream: decoding never panics or loops, partial messages
//! consume nothing, and known messages round-trip.
use bytes::BytesMut;
use tower_proto::ControlMessage;

/// Checks one input.
pub fn check(data: &[u8]) {
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
}
