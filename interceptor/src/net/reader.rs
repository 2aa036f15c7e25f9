//! Reading whole PostgreSQL messages from one direction of a connection.
//!
//! The framing itself (length checks, splitting) is [`interceptor_wire::frame::FrameBuffer`]; this
//! is the loop that feeds it from a stream.

use bytes::Bytes;
use interceptor_wire::frame::{FrameBuffer, FrameError, READ_CHUNK};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Accumulates bytes from one direction of a connection and hands out whole messages.
pub(crate) struct FrameReader {
    buf: FrameBuffer,
}

impl FrameReader {
    pub(crate) fn new(max: usize) -> Self {
        FrameReader {
            buf: FrameBuffer::new(max),
        }
    }

    /// Changes the message size limit (once the session's policy is known).
    pub(crate) fn set_max(&mut self, max: usize) {
        self.buf.set_max(max);
    }

    /// Bytes received but not yet handed out (e.g. pipelined after the startup packet).
    pub(crate) fn buffered(&self) -> usize {
        self.buf.buffered()
    }

    /// Reads until at least one whole message is buffered and returns every whole message
    /// buffered, as one contiguous chunk. `Ok(None)` on a clean end of stream between messages.
    pub(crate) async fn read_chunk<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> Result<Option<Bytes>, FrameError> {
        loop {
            if let Some(chunk) = self.buf.split_chunk()? {
                return Ok(Some(chunk));
            }
            self.buf.reserve_chunk();
            if reader.read_buf(self.buf.spare()).await? == 0 {
                return self.buf.end_of_stream();
            }
        }
    }

    /// Reads more bytes into the buffer without handing anything out (used to notice a client
    /// that disconnects while its statement is held). Returns the number of bytes read.
    pub(crate) async fn fill<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> Result<usize, FrameError> {
        if self.buf.buffered() > self.buf.max() {
            // Enough pipelined input is waiting; do not grow without bound.
            std::future::pending::<()>().await;
        }
        let spare = self.buf.spare();
        spare.reserve(READ_CHUNK);
        Ok(reader.read_buf(spare).await?)
    }

    /// Reads exactly one typed message (for the authentication exchange, where the client sends
    /// one message at a time). `Ok(None)` on a clean end of stream.
    pub(crate) async fn read_message<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
    ) -> Result<Option<(u8, Bytes)>, FrameError> {
        loop {
            if let Some(message) = self.buf.split_message()? {
                return Ok(Some(message));
            }
            if reader.read_buf(self.buf.spare()).await? == 0 {
                return self.buf.end_of_stream();
            }
        }
    }

    /// Reads one untyped startup-phase packet (StartupMessage, SSLRequest, CancelRequest...),
    /// returning its body after the length. `Ok(None)` on a clean end of stream.
    pub(crate) async fn read_startup<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        max: usize,
    ) -> Result<Option<Bytes>, FrameError> {
        loop {
            if let Some(packet) = self.buf.split_startup(max)? {
                return Ok(Some(packet));
            }
            if reader.read_buf(self.buf.spare()).await? == 0 {
                return self.buf.end_of_stream();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use interceptor_wire::frame::frames;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        interceptor_wire::message::message(tag, body).to_vec()
    }

    #[tokio::test]
    async fn splits_whole_messages_and_keeps_partial_ones() {
        let mut data = msg(b'Q', b"select 1\0");
        data.extend(msg(b'S', b""));
        let partial = msg(b'Q', b"select 2\0");
        data.extend_from_slice(&partial[..7]);
        let mut reader = FrameReader::new(1 << 20);
        let mut src = &data[..];
        let chunk = reader.read_chunk(&mut src).await.unwrap().unwrap();
        let tags: Vec<u8> = frames(&chunk).map(|f| f.tag).collect();
        assert_eq!(tags, vec![b'Q', b'S']);
        assert_eq!(frames(&chunk).next().unwrap().body, b"select 1\0");
        assert_eq!(reader.buffered(), 7);
        // The stream ends inside a message: that is an error, not a silent drop.
        assert!(matches!(
            reader.read_chunk(&mut src).await,
            Err(FrameError::Truncated)
        ));
    }

    #[tokio::test]
    async fn refuses_lengths_that_lie() {
        for len in [-1i32, 0, 3] {
            let mut data = vec![b'Q'];
            data.extend_from_slice(&len.to_be_bytes());
            let mut reader = FrameReader::new(1 << 20);
            let r = reader.read_chunk(&mut &data[..]).await;
            assert!(matches!(r, Err(FrameError::BadLength(_))), "{len}");
        }
        let mut data = vec![b'Q'];
        data.extend_from_slice(&(100_000_000i32).to_be_bytes());
        let mut reader = FrameReader::new(1 << 20);
        let r = reader.read_chunk(&mut &data[..]).await;
        assert!(matches!(r, Err(FrameError::TooLarge { .. })));
    }

    #[tokio::test]
    async fn startup_packets_are_bounded() {
        let mut reader = FrameReader::new(1 << 20);
        let data = [0u8, 0, 0, 8, 4, 210, 22, 47];
        let body = reader.read_startup(&mut &data[..], 10_000).await.unwrap();
        assert_eq!(body.unwrap().as_ref(), &[4, 210, 22, 47]);
        let huge = [0x7fu8, 0, 0, 0];
        let mut reader = FrameReader::new(1 << 20);
        assert!(reader.read_startup(&mut &huge[..], 10_000).await.is_err());
    }
}
