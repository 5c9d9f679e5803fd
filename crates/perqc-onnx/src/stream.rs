//! A `BufMut` that streams into a writer, so prost can encode a model of any size straight
//! to disk through a fixed buffer instead of building the whole encoding in memory.

use bytes::buf::UninitSlice;
use bytes::{Buf, BufMut};
use std::io::{self, Write};

const CHUNK: usize = 1 << 20;

pub struct StreamBuf<W: Write> {
    out: W,
    buf: Vec<u8>,
    written: u64,
    /// The first write error; later writes are skipped. `BufMut` cannot fail, so the caller
    /// checks this through [`StreamBuf::finish`].
    error: Option<io::Error>,
}

impl<W: Write> StreamBuf<W> {
    pub fn new(out: W) -> Self {
        StreamBuf {
            out,
            buf: Vec::with_capacity(CHUNK),
            written: 0,
            error: None,
        }
    }

    /// Bytes accepted so far.
    pub fn position(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    fn flush_buf(&mut self) {
        if self.error.is_none()
            && let Err(e) = self.out.write_all(&self.buf)
        {
            self.error = Some(e);
        }
        self.written += self.buf.len() as u64;
        self.buf.clear();
    }

    /// Flushes and returns the writer, or the first error.
    pub fn finish(mut self) -> io::Result<W> {
        self.flush_buf();
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

// SAFETY: `chunk_mut` hands out the spare capacity of `buf`, and `advance_mut` only extends
// `buf`'s length over bytes the caller has initialized, as `BufMut` requires.
unsafe impl<W: Write> BufMut for StreamBuf<W> {
    fn remaining_mut(&self) -> usize {
        usize::MAX - self.buf.len()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        let len = self.buf.len() + cnt;
        assert!(len <= self.buf.capacity());
        // SAFETY: the caller initialized `cnt` bytes of the spare capacity.
        unsafe { self.buf.set_len(len) };
        if self.buf.len() == self.buf.capacity() {
            self.flush_buf();
        }
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        if self.buf.len() == self.buf.capacity() {
            self.flush_buf();
        }
        UninitSlice::uninit(self.buf.spare_capacity_mut())
    }

    fn put_slice(&mut self, src: &[u8]) {
        if src.len() >= CHUNK {
            // Large payloads (weights) go straight to the writer.
            self.flush_buf();
            if self.error.is_none()
                && let Err(e) = self.out.write_all(src)
            {
                self.error = Some(e);
            }
            self.written += src.len() as u64;
            return;
        }
        if self.buf.len() + src.len() > self.buf.capacity() {
            self.flush_buf();
        }
        self.buf.extend_from_slice(src);
    }

    fn put<T: Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        while src.has_remaining() {
            let chunk = src.chunk();
            let n = chunk.len();
            self.put_slice(chunk);
            src.advance(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_large_and_small_writes() {
        let mut s = StreamBuf::new(Vec::new());
        s.put_u8(1);
        s.put_slice(&vec![7u8; CHUNK + 3]);
        s.put(bytes::Bytes::from_static(b"abc"));
        assert_eq!(s.position(), CHUNK as u64 + 7);
        let out = s.finish().unwrap();
        assert_eq!(out.len(), CHUNK + 7);
        assert_eq!(out[0], 1);
        assert_eq!(&out[CHUNK + 4..], b"abc");
    }
}
