//! Block-aligned heap buffers for O_DIRECT I/O.

use std::alloc::{alloc, alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use bytes::Bytes;

use crate::BLOCK_SIZE;

/// A zero-initialised buffer whose address and length are multiples of [`BLOCK_SIZE`], as
/// O_DIRECT requires. Owned and `Send`, so it can travel to an I/O thread and back.
///
/// It may also be a view of received bytes that happen to be aligned
/// ([`AlignedBuf::shared`]): a large write's data, received at an aligned address, goes to
/// the device without being copied. Such a buffer is read-only memory; writing into it
/// (`DerefMut`, `as_mut_ptr`) first copies it into a buffer of its own.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// The bytes `ptr` points into, when the memory is theirs rather than this buffer's.
    shared: Option<Bytes>,
}

// SAFETY: the buffer is plain owned memory with no interior references.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `blocks` blocks (at least one block is allocated).
    pub fn zeroed(blocks: usize) -> AlignedBuf {
        let len = blocks * BLOCK_SIZE;
        let layout = Self::layout(len);
        // SAFETY: layout has non-zero size and a valid power-of-two alignment.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len,
            shared: None,
        }
    }

    /// A buffer of `blocks` blocks holding `data` at byte `at`, zeros elsewhere; only the
    /// bytes `data` does not cover are zeroed (a large write is not written twice).
    pub fn with_data(blocks: usize, at: usize, data: &[u8]) -> AlignedBuf {
        let len = blocks * BLOCK_SIZE;
        assert!(at + data.len() <= len, "data beyond the buffer");
        let layout = Self::layout(len);
        // SAFETY: layout has non-zero size and a valid power-of-two alignment.
        let raw = unsafe { alloc(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        // SAFETY: every byte of 0..len is written below before the buffer is read: the
        // head and the tail are zeroed, the middle copied from `data`; the regions are in
        // bounds (asserted) and do not overlap `data`, which is another allocation.
        unsafe {
            std::ptr::write_bytes(raw, 0, at);
            std::ptr::copy_nonoverlapping(data.as_ptr(), raw.add(at), data.len());
            let end = at + data.len();
            std::ptr::write_bytes(raw.add(end), 0, len - end);
        }
        AlignedBuf {
            ptr,
            len,
            shared: None,
        }
    }

    /// A buffer holding `parts` one after another, which must fill whole blocks (no
    /// zeroing: every byte is copied once).
    pub fn concat(parts: &[&[u8]]) -> AlignedBuf {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        assert!(
            len > 0 && len.is_multiple_of(BLOCK_SIZE),
            "parts must fill whole blocks"
        );
        let layout = Self::layout(len);
        // SAFETY: layout has non-zero size and a valid power-of-two alignment.
        let raw = unsafe { alloc(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        let mut at = 0;
        for p in parts {
            // SAFETY: the parts' lengths sum to len, so each copy stays in bounds, and
            // together they write every byte; the parts are other allocations.
            unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), raw.add(at), p.len()) };
            at += p.len();
        }
        AlignedBuf {
            ptr,
            len,
            shared: None,
        }
    }

    /// `bytes` as a buffer without a copy, if they start at an aligned address and are a
    /// whole, non-zero number of blocks; otherwise they are given back.
    pub fn shared(bytes: Bytes) -> Result<AlignedBuf, Bytes> {
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(BLOCK_SIZE)
            && !bytes.is_empty()
            && bytes.len().is_multiple_of(BLOCK_SIZE);
        if !aligned {
            return Err(bytes);
        }
        // `Bytes` never hands out a null pointer for non-empty contents.
        let Some(ptr) = NonNull::new(bytes.as_ptr().cast_mut()) else {
            return Err(bytes);
        };
        Ok(AlignedBuf {
            ptr,
            len: bytes.len(),
            shared: Some(bytes),
        })
    }

    /// Whether the memory is another buffer's ([`AlignedBuf::shared`]).
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Blocks `first..first + n` of the buffer as a buffer of their own: shared without a
    /// copy when this one is shared, copied otherwise.
    pub fn blocks_of(&self, first: usize, n: usize) -> AlignedBuf {
        let range = first * BLOCK_SIZE..(first + n) * BLOCK_SIZE;
        match &self.shared {
            Some(b) => {
                AlignedBuf::shared(b.slice(range)).unwrap_or_else(|b| AlignedBuf::concat(&[&b[..]]))
            }
            None => AlignedBuf::concat(&[&self[range]]),
        }
    }

    /// Makes the memory this buffer's own, copying it if it is shared.
    fn unshare(&mut self) {
        if self.shared.is_some() {
            *self = AlignedBuf::concat(&[&self[..]]);
        }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.max(BLOCK_SIZE), BLOCK_SIZE)
            .expect("block-multiple sizes with block alignment form a valid layout")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn blocks(&self) -> usize {
        self.len / BLOCK_SIZE
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.unshare();
        self.ptr.as_ptr()
    }

    /// Block `i` of the buffer.
    pub fn block(&self, i: usize) -> &[u8] {
        &self[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]
    }

    pub fn block_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes for the buffer's lifetime: its own
        // allocation, or the shared bytes it holds.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

/// Lets a buffer back a [`bytes::Bytes`] (`Bytes::from_owner`) without a copy.
impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.unshare();
        // SAFETY: as above, and &mut self guarantees exclusive access; the memory is this
        // buffer's own (unshared above), not read-only bytes of another.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.shared.is_some() {
            // The memory is the bytes', released with them.
            return;
        }
        // SAFETY: allocated by a constructor above with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_bytes_are_shared_and_copied_before_any_write() {
        let owned = AlignedBuf::with_data(3, 0, &[7u8; 3 * BLOCK_SIZE]);
        let bytes = Bytes::from_owner(owned);
        let mut shared = AlignedBuf::shared(bytes.clone()).unwrap();
        assert!(shared.is_shared());
        assert_eq!(shared.as_ptr(), bytes.as_ptr(), "no copy");
        assert_eq!(shared.blocks(), 3);
        shared.block_mut(1)[0] = 9;
        assert!(!shared.is_shared());
        assert_ne!(shared.as_ptr(), bytes.as_ptr());
        assert_eq!((shared[BLOCK_SIZE], shared[0]), (9, 7));
        assert!(
            bytes.iter().all(|&b| b == 7),
            "the shared bytes stay as they were"
        );
        let again = AlignedBuf::shared(bytes.clone()).unwrap();
        let part = again.blocks_of(1, 2);
        assert!(part.is_shared());
        assert_eq!(part.as_ptr(), bytes[BLOCK_SIZE..].as_ptr());
        assert_eq!(part.len(), 2 * BLOCK_SIZE);
        let copied = AlignedBuf::with_data(3, 0, &bytes).blocks_of(2, 1);
        assert!(!copied.is_shared());
        assert_eq!(&copied[..], &bytes[2 * BLOCK_SIZE..]);
        // Not aligned, not whole blocks, or empty: given back.
        assert!(AlignedBuf::shared(bytes.slice(1..BLOCK_SIZE + 1)).is_err());
        assert!(AlignedBuf::shared(bytes.slice(..BLOCK_SIZE - 1)).is_err());
        assert!(AlignedBuf::shared(bytes.slice(..0)).is_err());
    }

    #[test]
    fn aligned_and_zeroed() {
        let mut b = AlignedBuf::zeroed(3);
        assert_eq!(b.len(), 3 * BLOCK_SIZE);
        assert_eq!(b.as_ptr() as usize % BLOCK_SIZE, 0);
        assert!(b.iter().all(|x| *x == 0));
        b.block_mut(2)[0] = 7;
        assert_eq!(b[2 * BLOCK_SIZE], 7);
    }

    #[test]
    fn concat_copies_the_parts_in_order() {
        let a = vec![1u8; BLOCK_SIZE];
        let b = vec![2u8; 2 * BLOCK_SIZE];
        let c = AlignedBuf::concat(&[&a, &b]);
        assert_eq!(c.blocks(), 3);
        assert_eq!(c.as_ptr() as usize % BLOCK_SIZE, 0);
        assert!(c.block(0).iter().all(|x| *x == 1));
        assert!(c[BLOCK_SIZE..].iter().all(|x| *x == 2));
    }
}
