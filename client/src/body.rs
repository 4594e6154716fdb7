//! Request bodies: none, bytes, JSON, or a file streamed in chunks by a thread that reads it
//! (never held in memory whole), with its progress reported as it goes.

use std::fs::File;
use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, SizeHint};

/// Any error a request body can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a request.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Bytes read from a file per frame of the body.
pub const CHUNK: usize = 1 << 20;

/// No body.
pub fn empty() -> Body {
    bytes(Bytes::new())
}

/// A body of these bytes.
pub fn bytes(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// The first `len` bytes of `file`, streamed in [`CHUNK`]s read by a thread of their own;
/// `progress` is told the bytes of each chunk as the request takes it.
pub fn file(file: File, len: u64, progress: impl FnMut(u64) + Send + Sync + 'static) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::spawn(move || {
        let mut reader = file.take(len);
        loop {
            let mut buf = vec![0u8; CHUNK];
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    break;
                }
            }
        }
    });
    Body::new(FileBody {
        rx,
        left: len,
        progress: Box::new(progress),
    })
}

/// A body fed by the thread of [`file`].
struct FileBody {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    left: u64,
    progress: Box<dyn FnMut(u64) + Send + Sync>,
}

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(b))) => {
                let n = b.len() as u64;
                self.left = self.left.saturating_sub(n);
                (self.progress)(n);
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}
