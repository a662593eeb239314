//! Any bytes: decoding never panics, a partial preamble consumes nothing, and whatever
//! decodes re-encodes to the bytes it consumed.
use bytes::BytesMut;
use tower_proto::Preamble;

/// Checks one input.
pub fn check(data: &[u8]) {
    let mut view = data;
    match Preamble::decode(&mut view) {
        Ok(Some(preamble)) => {
            let used = data.len() - view.len();
            let mut again = BytesMut::new();
            preamble
                .encode(&mut again)
                .expect("a decoded preamble encodes");
            let mut reread = &again[..];
            assert_eq!(
                Preamble::decode(&mut reread).expect("re-decodes"),
                Some(preamble)
            );
            assert!(
                again.len() <= used,
                "unknown fields are dropped, nothing is added"
            );
        }
        Ok(None) => assert_eq!(view.len(), data.len()),
        Err(_) => {}
    }
}
