//! Block-aligned heap buffers for O_DIRECT I/O.

use std::alloc::{alloc, alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use crate::BLOCK_SIZE;

/// A zero-initialised buffer whose address and length are multiples of [`BLOCK_SIZE`], as
/// O_DIRECT requires. Owned and `Send`, so it can travel to an I/O thread and back.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
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
        AlignedBuf { ptr, len }
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
        AlignedBuf { ptr, len }
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
        AlignedBuf { ptr, len }
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
        // SAFETY: ptr is valid for len initialised (zeroed) bytes for the buffer's lifetime.
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
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
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
