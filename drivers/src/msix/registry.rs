//! Which CPU vector belongs to which device queue, and which ones have fired.
//!
//! The registry is a fixed table of atomics, usable from a `static` and from interrupt context:
//! [`VectorRegistry::dispatch`] (called by the kernel's interrupt stub) only sets a pending
//! flag and bumps a counter; the main loop collects pending owners with
//! [`VectorRegistry::take_pending`] and drains those devices' completions.

use super::MsixError;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Lowest vector handed to devices (0..32 are exceptions).
pub const FIRST_DEVICE_VECTOR: u8 = 0x30;
/// Highest vector handed to devices (the kernel keeps 0xF0..=0xFF for the APIC timer,
/// spurious interrupts and IPIs).
pub const LAST_DEVICE_VECTOR: u8 = 0xef;

const VECTORS: usize = (LAST_DEVICE_VECTOR - FIRST_DEVICE_VECTOR) as usize + 1;
/// Owner word of a free vector.
const FREE: u32 = 0;

/// Who an interrupt vector belongs to: the kernel's index of the device, and the device's
/// queue (or [`InterruptOwner::CONFIG_QUEUE`] for configuration-change interrupts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InterruptOwner {
    /// Index of the device in the kernel's device table.
    pub device: u16,
    /// Queue number within the device.
    pub queue: u16,
}

impl InterruptOwner {
    /// Queue number used for configuration-change / admin interrupts.
    pub const CONFIG_QUEUE: u16 = 0xffff;

    fn encode(self) -> u32 {
        // +1 on the device so that no owner encodes as FREE; device 0xffff is not supported.
        (u32::from(self.device) + 1) << 16 | u32::from(self.queue)
    }

    fn decode(word: u32) -> Option<Self> {
        if word == FREE {
            return None;
        }
        Some(Self {
            device: ((word >> 16) as u16).wrapping_sub(1),
            queue: word as u16,
        })
    }
}

#[derive(Debug)]
struct Slot {
    owner: AtomicU32,
    pending: AtomicBool,
    count: AtomicU64,
}

impl Slot {
    const fn new() -> Self {
        Self {
            owner: AtomicU32::new(FREE),
            pending: AtomicBool::new(false),
            count: AtomicU64::new(0),
        }
    }
}

/// The vector → owner table.
#[derive(Debug)]
pub struct VectorRegistry {
    slots: [Slot; VECTORS],
    /// Interrupts on vectors nobody owns.
    spurious: AtomicU64,
}

impl Default for VectorRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl VectorRegistry {
    /// An empty registry (usable as a `static`).
    pub const fn new() -> Self {
        Self {
            slots: [const { Slot::new() }; VECTORS],
            spurious: AtomicU64::new(0),
        }
    }

    fn slot(&self, vector: u8) -> Option<&Slot> {
        if vector < FIRST_DEVICE_VECTOR {
            return None;
        }
        self.slots.get(usize::from(vector - FIRST_DEVICE_VECTOR))
    }

    /// Allocates the lowest free vector for `owner`.
    pub fn allocate(&self, owner: InterruptOwner) -> Result<u8, MsixError> {
        if owner.device == u16::MAX {
            return Err(MsixError::NoFreeVector);
        }
        for (i, slot) in self.slots.iter().enumerate() {
            if slot
                .owner
                .compare_exchange(FREE, owner.encode(), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                slot.pending.store(false, Ordering::Relaxed);
                slot.count.store(0, Ordering::Relaxed);
                return Ok(FIRST_DEVICE_VECTOR + i as u8);
            }
        }
        Err(MsixError::NoFreeVector)
    }

    /// Frees `vector` (device failed or removed). Mask the MSI-X entry first.
    pub fn release(&self, vector: u8) -> Result<(), MsixError> {
        let slot = self.slot(vector).ok_or(MsixError::InvalidVector(vector))?;
        if slot.owner.swap(FREE, Ordering::AcqRel) == FREE {
            return Err(MsixError::VectorNotAllocated(vector));
        }
        slot.pending.store(false, Ordering::Release);
        Ok(())
    }

    /// The owner of `vector`, if allocated.
    pub fn owner(&self, vector: u8) -> Option<InterruptOwner> {
        InterruptOwner::decode(self.slot(vector)?.owner.load(Ordering::Acquire))
    }

    /// Interrupt context: records that `vector` fired. Returns its owner (`None` for a vector
    /// nobody owns, counted as spurious). Never blocks, never allocates.
    pub fn dispatch(&self, vector: u8) -> Option<InterruptOwner> {
        let Some(slot) = self.slot(vector) else {
            self.spurious.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let owner = InterruptOwner::decode(slot.owner.load(Ordering::Acquire));
        if owner.is_none() {
            self.spurious.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        slot.count.fetch_add(1, Ordering::Relaxed);
        slot.pending.store(true, Ordering::Release);
        owner
    }

    /// Main loop: whether `vector` fired since the last call (clears the flag).
    pub fn take_vector(&self, vector: u8) -> bool {
        self.slot(vector)
            .is_some_and(|slot| slot.pending.swap(false, Ordering::AcqRel))
    }

    /// Main loop: calls `f` once for every owner whose vector fired since the last call
    /// (clearing the flags) and returns how many there were.
    pub fn take_pending(&self, mut f: impl FnMut(InterruptOwner)) -> usize {
        let mut taken = 0;
        for slot in &self.slots {
            if slot.pending.load(Ordering::Relaxed) && slot.pending.swap(false, Ordering::AcqRel) {
                if let Some(owner) = InterruptOwner::decode(slot.owner.load(Ordering::Acquire)) {
                    f(owner);
                    taken += 1;
                }
            }
        }
        taken
    }

    /// Marks `vector` pending again (the main loop ran out of budget before draining it).
    pub fn repend(&self, vector: u8) {
        if let Some(slot) = self.slot(vector) {
            slot.pending.store(true, Ordering::Release);
        }
    }

    /// How often `vector` fired since it was allocated.
    pub fn count(&self, vector: u8) -> u64 {
        self.slot(vector)
            .map_or(0, |slot| slot.count.load(Ordering::Relaxed))
    }

    /// Interrupts on vectors nobody owns.
    pub fn spurious(&self) -> u64 {
        self.spurious.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static REGISTRY: VectorRegistry = VectorRegistry::new();

    #[test]
    fn allocate_dispatch_take_release() {
        let registry = VectorRegistry::new();
        let a = InterruptOwner {
            device: 0,
            queue: 0,
        };
        let b = InterruptOwner {
            device: 1,
            queue: InterruptOwner::CONFIG_QUEUE,
        };
        let va = registry.allocate(a).unwrap();
        let vb = registry.allocate(b).unwrap();
        assert_eq!((va, vb), (FIRST_DEVICE_VECTOR, FIRST_DEVICE_VECTOR + 1));
        assert_eq!(registry.owner(vb), Some(b));

        assert_eq!(registry.dispatch(vb), Some(b));
        assert_eq!(registry.dispatch(vb), Some(b));
        assert_eq!(registry.dispatch(0x20), None);
        assert_eq!(registry.dispatch(0xff), None);
        assert_eq!(registry.spurious(), 2);
        assert_eq!(registry.count(vb), 2);

        let mut seen = Vec::new();
        assert_eq!(registry.take_pending(|o| seen.push(o)), 1);
        assert_eq!(seen, vec![b]);
        assert_eq!(registry.take_pending(|_| panic!("nothing pending")), 0);

        registry.dispatch(va);
        assert!(registry.take_vector(va));
        assert!(!registry.take_vector(va));
        registry.repend(va);
        assert!(registry.take_vector(va));

        registry.release(va).unwrap();
        assert_eq!(registry.release(va), Err(MsixError::VectorNotAllocated(va)));
        assert_eq!(registry.dispatch(va), None);
        assert_eq!(
            registry.allocate(b).unwrap(),
            va,
            "lowest free vector is reused"
        );
        assert_eq!(registry.release(3), Err(MsixError::InvalidVector(3)));
    }

    #[test]
    fn exhaustion_is_an_error() {
        let registry = VectorRegistry::new();
        for i in 0..VECTORS {
            registry
                .allocate(InterruptOwner {
                    device: 2,
                    queue: i as u16,
                })
                .unwrap();
        }
        assert_eq!(
            registry.allocate(InterruptOwner {
                device: 2,
                queue: 999
            }),
            Err(MsixError::NoFreeVector)
        );
        assert_eq!(
            registry.owner(LAST_DEVICE_VECTOR).map(|o| o.queue),
            Some(VECTORS as u16 - 1)
        );
    }

    #[test]
    fn works_as_a_static_across_threads() {
        let owner = InterruptOwner {
            device: 7,
            queue: 1,
        };
        let vector = REGISTRY.allocate(owner).unwrap();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        REGISTRY.dispatch(vector);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(REGISTRY.count(vector), 4000);
        assert!(REGISTRY.take_vector(vector));
    }
}
