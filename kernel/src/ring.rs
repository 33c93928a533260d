//! A fixed-capacity byte ring, used for the UART's receive and transmit buffers.

/// A byte FIFO of capacity `N` (N must be a power of two).
pub struct ByteRing<const N: usize> {
    buf: [u8; N],
    head: usize,
    tail: usize,
}

impl<const N: usize> Default for ByteRing<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> ByteRing<N> {
    const MASK: usize = {
        assert!(N.is_power_of_two());
        N - 1
    };

    /// An empty ring.
    pub const fn new() -> Self {
        ByteRing {
            buf: [0; N],
            head: 0,
            tail: 0,
        }
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.head.wrapping_sub(self.tail)
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.head == self.tail
    }

    /// Free space.
    pub fn space(&self) -> usize {
        N - self.len()
    }

    /// Appends a byte; false (and the byte dropped) when full.
    pub fn push(&mut self, byte: u8) -> bool {
        if self.space() == 0 {
            return false;
        }
        self.buf[self.head & Self::MASK] = byte;
        self.head = self.head.wrapping_add(1);
        true
    }

    /// Removes the oldest byte.
    pub fn pop(&mut self) -> Option<u8> {
        if self.is_empty() {
            return None;
        }
        let b = self.buf[self.tail & Self::MASK];
        self.tail = self.tail.wrapping_add(1);
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::ByteRing;

    #[test]
    fn fifo_order_wrap_and_full() {
        let mut r = ByteRing::<4>::new();
        for round in 0..10u8 {
            assert!(r.push(round));
            assert!(r.push(round + 1));
            assert_eq!(r.len(), 2);
            assert_eq!(r.pop(), Some(round));
            assert_eq!(r.pop(), Some(round + 1));
            assert!(r.is_empty());
        }
        for i in 0..4 {
            assert!(r.push(i));
        }
        assert!(!r.push(9));
        assert_eq!(r.space(), 0);
        assert_eq!(r.pop(), Some(0));
    }
}
