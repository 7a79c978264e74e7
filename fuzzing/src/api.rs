//! The node API's request reader and its decision on the head, what a stranger reaches
//! before any certificate is asked for.

use basalt_api::node::path;
use basalt_init::node_api::guard::Client;
use basalt_init::node_api::http::{read_body, read_head, BODY_LIMIT, HEAD_LIMIT};
use basalt_init::node_api::routes::authorize_with;
use std::io::{self, Read, Write};

/// The request's bytes, handed out in pieces of a size the input's first byte sets (as
/// TCP may split them), with every write kept.
struct Wire<'a> {
    data: &'a [u8],
    piece: usize,
    written: Vec<u8>,
}

impl Read for Wire<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.data.len().min(buf.len()).min(self.piece);
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

impl Write for Wire<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The input is a piece size byte, then what a client sends. Properties: a head within
/// its limit; a stranger gets 401 on the head for everything but health, before any of
/// the body is read and with nothing written; a body exactly `Content-Length` long.
pub fn request(data: &[u8]) {
    let Some((&piece, bytes)) = data.split_first() else {
        return;
    };
    let mut wire = Wire {
        data: bytes,
        piece: usize::from(piece).max(1) * 16,
        written: Vec::new(),
    };
    let Ok(head) = read_head(&mut wire) else {
        return;
    };
    assert!(head.length <= BODY_LIMIT);
    let consumed = bytes.len() - wire.data.len();
    assert!(
        consumed <= HEAD_LIMIT + 4096 * 2,
        "read {consumed} bytes for a head"
    );
    let stranger = Client::from_peer(None);
    let req = &head.request;
    if let Err(refusal) = authorize_with(&[], &req.method, &req.path, &stranger) {
        assert_ne!(head.request.path, path::HEALTH);
        assert_eq!(refusal.status, 401);
        assert!(
            wire.written.is_empty(),
            "something was written before the refusal"
        );
        return;
    }
    assert_eq!(
        head.request.path,
        path::HEALTH,
        "a stranger passed the head check"
    );
    let length = head.length;
    if let Ok(req) = read_body(&mut wire, head) {
        assert_eq!(req.body.len(), length);
    }
}
