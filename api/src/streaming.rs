//! Streamed bodies: a request body read as a blocking reader (imports, uploads), and a
//! blocking writer whose bytes become a response body (exports). Bytes move through a fixed
//! buffer, never into memory whole.

use std::io::{Read, Write};

use axum::body::Body;
use futures_util::TryStreamExt;

/// The request body as a blocking reader, for the blocking pool.
pub(crate) fn body_reader(body: Body) -> impl Read + Send + 'static {
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream))
}

/// Chunks written to it by a blocking writer, as a response body: the writer, to be moved to
/// the blocking pool, and the body. Writes of up to 1 MiB go out as one chunk; an error sent
/// with [`BodyWriter::fail`] cuts the body short.
///
/// The last write is held back until [`BodyWriter::finish`]: a client never has the whole
/// body before the writer's producer is done and has let go of what it held (an export's
/// mark on its disk), so its next request cannot find the disk still marked.
pub(crate) fn body_writer() -> (BodyWriter, Body) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let writer = BodyWriter {
        buf: std::io::BufWriter::with_capacity(1 << 20, Chunks(tx.clone())),
        held: Vec::new(),
        tx,
    };
    (writer, Body::from_stream(stream))
}

/// See [`body_writer`].
pub(crate) struct BodyWriter {
    buf: std::io::BufWriter<Chunks>,
    /// The latest write, sent with the next one or by `finish`.
    held: Vec<u8>,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>,
}

impl BodyWriter {
    /// Sends what is held and buffered; the body ends when the writer is dropped.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.buf.write_all(&self.held)?;
        self.buf.flush()
    }

    /// Ends the body with an error (the client sees it cut short).
    pub fn fail(self, e: impl std::fmt::Display) {
        let _ = self
            .tx
            .blocking_send(Err(std::io::Error::other(e.to_string())));
    }
}

impl Write for BodyWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.buf.write_all(&self.held)?;
        self.held.clear();
        self.held.extend_from_slice(buf);
        Ok(buf.len())
    }

    /// Sends what is buffered, not the held write (see [`body_writer`]).
    fn flush(&mut self) -> std::io::Result<()> {
        self.buf.flush()
    }
}

/// Sends what it is given as one chunk of the body.
struct Chunks(tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>);

impl Write for Chunks {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(buf.to_vec()))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
