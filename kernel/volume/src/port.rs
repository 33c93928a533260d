//! Completion ports: every device request carries in its tag the [`Port`] of the client
//! that issued it, and [`crate::Volumes::poll`] hands each completion back through that
//! port: an origin's engine, the NBD server, or the running console task. This module is
//! the only one that knows how a port sits in a tag; each client numbers its own requests
//! inside its port's [`PAYLOAD_BITS`] and never looks at the rest.
//!
//! Layout: the top three bits name the kind (`1xx` engine, `001` NBD, `000` task; `010` and
//! `011` are never made), the 61 bits below are the client's. An engine's payload is its
//! origin's index (above bit 32) and its I/O slot (the low 32 bits).

/// Bits of a tag that belong to the client.
pub const PAYLOAD_BITS: u32 = 61;
/// The largest payload.
pub const PAYLOAD_MAX: u64 = (1 << PAYLOAD_BITS) - 1;
/// Origins an engine port can name.
pub const MAX_ORIGINS: u32 = 1 << (PAYLOAD_BITS - 32);

const ENGINE: u64 = 1 << 63;
const NBD: u64 = 1 << PAYLOAD_BITS;
const KIND: u64 = !PAYLOAD_MAX;

/// Who a device request belongs to, and that client's own number for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// I/O of the engine of origin `origin` (its index in `Volumes::origins`), its I/O slot
    /// `slot`.
    Engine {
        /// The origin's index (below [`MAX_ORIGINS`]).
        origin: u32,
        /// The engine I/O's slot.
        slot: u32,
    },
    /// A request of the NBD server, by the server's request id (at most [`PAYLOAD_MAX`]).
    Nbd(u64),
    /// A request of the running console task, by the task's own number (at most
    /// [`PAYLOAD_MAX`]).
    Task(u64),
}

impl Port {
    /// The device-request tag of this port (a payload wider than the port's is cut to it;
    /// debug builds assert it fits).
    pub const fn tag(self) -> u64 {
        match self {
            Port::Engine { origin, slot } => {
                debug_assert!(origin < MAX_ORIGINS);
                ENGINE | (((origin % MAX_ORIGINS) as u64) << 32) | slot as u64
            }
            Port::Nbd(id) => {
                debug_assert!(id <= PAYLOAD_MAX);
                NBD | (id & PAYLOAD_MAX)
            }
            Port::Task(id) => {
                debug_assert!(id <= PAYLOAD_MAX);
                id & PAYLOAD_MAX
            }
        }
    }

    /// The port a completion's tag names; `None` for a tag no port makes.
    pub fn of(tag: u64) -> Option<Port> {
        if tag & ENGINE != 0 {
            return Some(Port::Engine {
                origin: ((tag & PAYLOAD_MAX) >> 32) as u32,
                slot: tag as u32,
            });
        }
        match tag & KIND {
            NBD => Some(Port::Nbd(tag & PAYLOAD_MAX)),
            0 => Some(Port::Task(tag)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_port_comes_back_from_its_tag() {
        let ports = [
            Port::Engine { origin: 0, slot: 0 },
            Port::Engine {
                origin: MAX_ORIGINS - 1,
                slot: u32::MAX,
            },
            Port::Engine { origin: 3, slot: 7 },
            Port::Nbd(0),
            Port::Nbd(1),
            Port::Nbd(PAYLOAD_MAX),
            Port::Task(0),
            Port::Task(u32::MAX as u64),
            Port::Task(PAYLOAD_MAX),
        ];
        for port in ports {
            assert_eq!(Port::of(port.tag()), Some(port), "{port:?}");
        }
    }

    #[test]
    fn ports_never_share_a_tag() {
        let payloads = [0, 1, 0xffff_ffff, 1 << 32, 1 << 60, PAYLOAD_MAX];
        for &p in &payloads {
            let engine = Port::Engine {
                origin: (p >> 32) as u32,
                slot: p as u32,
            }
            .tag();
            let nbd = Port::Nbd(p).tag();
            let task = Port::Task(p).tag();
            assert_ne!(engine, nbd);
            assert_ne!(engine, task);
            assert_ne!(nbd, task);
        }
    }

    #[test]
    fn tags_no_port_makes_are_not_taken_for_one() {
        assert_eq!(Port::of(1 << 62), None);
        assert_eq!(Port::of((1 << 62) | (1 << 61) | 5), None);
        // Engine tags win on the top bit whatever the bits below say.
        assert!(matches!(
            Port::of(u64::MAX),
            Some(Port::Engine { slot: u32::MAX, .. })
        ));
    }
}
