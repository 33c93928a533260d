//! A fixed-capacity string on the stack, for text built on the I/O path (progress lines)
//! where the heap must not be used. Text past the capacity is dropped.

use core::fmt;

/// Up to `N` bytes of UTF-8.
pub struct StackStr<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Default for StackStr<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> StackStr<N> {
    /// Empty.
    pub const fn new() -> Self {
        StackStr {
            buf: [0; N],
            len: 0,
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }

    /// Empties it.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

impl<const N: usize> fmt::Write for StackStr<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            let mut b = [0u8; 4];
            let e = c.encode_utf8(&mut b);
            if self.len + e.len() > N {
                return Ok(());
            }
            self.buf[self.len..self.len + e.len()].copy_from_slice(e.as_bytes());
            self.len += e.len();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn truncates_at_char_boundary() {
        let mut s = StackStr::<5>::new();
        s.write_str("abcdé").unwrap();
        assert_eq!(s.as_str(), "abcd");
        s.clear();
        write!(s, "{}", 12).unwrap();
        assert_eq!(s.as_str(), "12");
    }
}
