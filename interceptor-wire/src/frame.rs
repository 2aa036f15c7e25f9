//! Splitting a byte stream into whole PostgreSQL messages by their length header.
//!
//! Every message is framed here *before* anything decodes it, so a body can never run into the next
//! message (request smuggling) and a declared length beyond the limit is refused before any memory is
//! reserved for it.

use bytes::{Buf, Bytes, BytesMut};

/// Read granularity; messages larger than this grow the buffer up to the configured limit.
pub const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("invalid message length {0}")]
    BadLength(i32),
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One typed message inside a validated chunk.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub tag: u8,
    /// The body after the 5-byte header.
    pub body: &'a [u8],
    /// The whole message, header included.
    pub raw: &'a [u8],
}

/// Bytes received from one direction of a connection, handed out as whole messages. The caller
/// reads into [`FrameBuffer::spare`] and asks again; nothing here touches a socket.
pub struct FrameBuffer {
    buf: BytesMut,
    max: usize,
}

impl FrameBuffer {
    pub fn new(max: usize) -> Self {
        FrameBuffer {
            buf: BytesMut::with_capacity(READ_CHUNK),
            max,
        }
    }

    /// Changes the message size limit (once the session's policy is known).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// The message size limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes received but not yet handed out (e.g. pipelined after the startup packet).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The buffer to read more bytes into (at its end).
    pub fn spare(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Makes room for a read when little is left: a chunk at a time.
    pub fn reserve_chunk(&mut self) {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
    }

    /// What the end of the stream means now: `Ok(None)` between messages, else
    /// [`FrameError::Truncated`].
    pub fn end_of_stream<T>(&self) -> Result<Option<T>, FrameError> {
        if self.buf.is_empty() {
            Ok(None)
        } else {
            Err(FrameError::Truncated)
        }
    }

    /// Every whole message buffered, as one contiguous chunk (see [`frames`]); `None` until at
    /// least one is whole.
    pub fn split_chunk(&mut self) -> Result<Option<Bytes>, FrameError> {
        let complete = self.complete_prefix()?;
        if complete > 0 {
            return Ok(Some(self.buf.split_to(complete).freeze()));
        }
        Ok(None)
    }

    /// Length of the longest prefix of whole messages; reserves room for a partial one.
    fn complete_prefix(&mut self) -> Result<usize, FrameError> {
        let mut pos = 0;
        let buf = &self.buf[..];
        while buf.len() - pos >= 5 {
            let len = i32::from_be_bytes([buf[pos + 1], buf[pos + 2], buf[pos + 3], buf[pos + 4]]);
            let total = checked_len(len, self.max)? + 1;
            if buf.len() - pos < total {
                if pos == 0 {
                    // Only a partial message: make room for all of it in one go.
                    self.buf.reserve(total);
                }
                break;
            }
            pos += total;
        }
        Ok(pos)
    }

    /// Exactly one typed message, its tag and body; `None` until it is whole (room for all of it
    /// is then reserved).
    pub fn split_message(&mut self) -> Result<Option<(u8, Bytes)>, FrameError> {
        if self.buf.len() >= 5 {
            let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
            let total = checked_len(len, self.max)? + 1;
            if self.buf.len() >= total {
                let mut msg = self.buf.split_to(total);
                let tag = msg[0];
                msg.advance(5);
                return Ok(Some((tag, msg.freeze())));
            }
            self.buf.reserve(total - self.buf.len());
        }
        Ok(None)
    }

    /// One untyped startup-phase packet (StartupMessage, SSLRequest, CancelRequest...), its body
    /// after the length, bounded by `max`; `None` until it is whole.
    pub fn split_startup(&mut self, max: usize) -> Result<Option<Bytes>, FrameError> {
        if self.buf.len() >= 4 {
            let len = i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
            let len = checked_len(len, max)?;
            if self.buf.len() >= len {
                let mut packet = self.buf.split_to(len);
                packet.advance(4);
                return Ok(Some(packet.freeze()));
            }
            self.buf.reserve(len - self.buf.len());
        }
        Ok(None)
    }
}

fn checked_len(len: i32, max: usize) -> Result<usize, FrameError> {
    if len < 4 {
        return Err(FrameError::BadLength(len));
    }
    let len = len as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Iterates over the messages of a chunk returned by [`FrameBuffer::split_chunk`].
pub fn frames(chunk: &[u8]) -> Frames<'_> {
    Frames { rest: chunk }
}

pub struct Frames<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Frames<'a> {
    type Item = Frame<'a>;

    fn next(&mut self) -> Option<Frame<'a>> {
        if self.rest.len() < 5 {
            return None;
        }
        let len = i32::from_be_bytes([self.rest[1], self.rest[2], self.rest[3], self.rest[4]]);
        // Chunks were validated when they were split off; stay defensive anyway.
        let total = usize::try_from(len).ok()?.checked_add(1)?;
        if total < 5 || total > self.rest.len() {
            return None;
        }
        let (raw, rest) = self.rest.split_at(total);
        self.rest = rest;
        Some(Frame {
            tag: raw[0],
            body: &raw[5..],
            raw,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        crate::message::message(tag, body).to_vec()
    }

    fn buffer(data: &[u8]) -> FrameBuffer {
        let mut b = FrameBuffer::new(1 << 20);
        b.spare().extend_from_slice(data);
        b
    }

    #[test]
    fn splits_whole_messages_and_keeps_partial_ones() {
        let mut data = msg(b'Q', b"select 1\0");
        data.extend(msg(b'S', b""));
        let partial = msg(b'Q', b"select 2\0");
        data.extend_from_slice(&partial[..7]);
        let mut b = buffer(&data);
        let chunk = b.split_chunk().unwrap().unwrap();
        let tags: Vec<u8> = frames(&chunk).map(|f| f.tag).collect();
        assert_eq!(tags, vec![b'Q', b'S']);
        assert_eq!(frames(&chunk).next().unwrap().body, b"select 1\0");
        assert_eq!(b.buffered(), 7);
        assert!(b.split_chunk().unwrap().is_none());
        // The stream ends inside a message: that is an error, not a silent drop.
        assert!(matches!(
            b.end_of_stream::<()>(),
            Err(FrameError::Truncated)
        ));
        b.spare().extend_from_slice(&partial[7..]);
        let (tag, body) = b.split_message().unwrap().unwrap();
        assert_eq!((tag, body.as_ref()), (b'Q', &b"select 2\0"[..]));
        assert!(matches!(b.end_of_stream::<()>(), Ok(None)));
    }

    #[test]
    fn refuses_lengths_that_lie() {
        for len in [-1i32, 0, 3] {
            let mut data = vec![b'Q'];
            data.extend_from_slice(&len.to_be_bytes());
            let r = buffer(&data).split_chunk();
            assert!(matches!(r, Err(FrameError::BadLength(_))), "{len}");
            let r = buffer(&data).split_message();
            assert!(matches!(r, Err(FrameError::BadLength(_))), "{len}");
        }
        let mut data = vec![b'Q'];
        data.extend_from_slice(&(100_000_000i32).to_be_bytes());
        let r = buffer(&data).split_chunk();
        assert!(matches!(r, Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn startup_packets_are_bounded() {
        let mut b = buffer(&[0u8, 0, 0, 8, 4, 210, 22]);
        assert!(b.split_startup(10_000).unwrap().is_none());
        b.spare().extend_from_slice(&[47]);
        let body = b.split_startup(10_000).unwrap();
        assert_eq!(body.unwrap().as_ref(), &[4, 210, 22, 47]);
        let huge = [0x7fu8, 0, 0, 0];
        assert!(buffer(&huge).split_startup(10_000).is_err());
    }
}
