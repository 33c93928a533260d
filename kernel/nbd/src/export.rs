//! What the NBD server exports, seen from the protocol: an [`ExportCatalog`] the connection
//! asks for names and geometry, implemented by the kernel over its volumes (devices and
//! snapshots) so that the protocol code does not depend on the storage code.

use core::fmt;

use super::proto::Errno;

/// An export name or description as the catalog hands it out: up to 64 bytes of UTF-8,
/// fixed capacity, no heap.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ExportName {
    bytes: [u8; 64],
    len: u8,
}

impl ExportName {
    /// The empty name.
    pub const fn new() -> ExportName {
        ExportName {
            bytes: [0; 64],
            len: 0,
        }
    }

    /// A copy of `s`, cut after the last whole character that fits.
    pub fn from_str_truncated(s: &str) -> ExportName {
        let mut take = s.len().min(64);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        let mut out = ExportName::new();
        out.bytes[..take].copy_from_slice(&s.as_bytes()[..take]);
        out.len = take as u8;
        out
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only whole UTF-8 characters are stored (`from_str_truncated`).
        core::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }

    /// Whether the name is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Default for ExportName {
    fn default() -> Self {
        ExportName::new()
    }
}

impl fmt::Display for ExportName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl fmt::Debug for ExportName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// One export as the protocol needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// The catalog's own key for the export (the server glue maps it back to a volume); the
    /// protocol never interprets it.
    pub handle: u64,
    /// Size in bytes.
    pub size: u64,
    /// The smallest addressable unit in bytes (the device's logical block size); requests
    /// must be aligned to it. A power of two up to 65536; anything else is treated as 512.
    pub block_size: u32,
    /// Writes and trims are refused with `NBD_EPERM`.
    pub read_only: bool,
    /// `NBD_CMD_FLUSH` is offered (`NBD_FLAG_SEND_FLUSH`).
    pub flush: bool,
    /// `NBD_CMD_FLAG_FUA` is offered (`NBD_FLAG_SEND_FUA`).
    pub fua: bool,
    /// `NBD_CMD_TRIM` is offered (`NBD_FLAG_SEND_TRIM`, never on a read-only export).
    pub trim: bool,
    /// `NBD_FLAG_CAN_MULTI_CONN`: a flush on any connection to this export makes durable
    /// every write completed on any connection to it (the backend's flush covers the whole
    /// volume, not one client's writes).
    pub multi_conn: bool,
    /// The largest READ/WRITE payload this export takes (what the server's buffers for it
    /// can hold); 0 = the server's limit only.
    pub max_payload: u32,
}

/// The exports a server offers. Called during the handshake, and for block status
/// (`NBD_CMD_BLOCK_STATUS` on a `snapfw:changed:NAME` context, looked up per request).
pub trait ExportCatalog {
    /// The export called `name` (the empty name is the client's "default export": return
    /// one if there is a sensible default, else `None`).
    fn lookup(&self, name: &str) -> Option<ExportInfo>;

    /// The name of the `index`-th export, for `NBD_OPT_LIST`; `None` past the last one.
    fn name(&self, index: usize) -> Option<ExportName>;

    /// A human-readable description (`NBD_INFO_DESCRIPTION`), if the catalog has one.
    fn description(&self, _export: &ExportInfo) -> Option<ExportName> {
        None
    }

    /// The name of the `index`-th snapshot whose `snapfw:changed:NAME` context `export`
    /// offers (an origin: each of its snapshots; a snapshot: itself), for
    /// `NBD_OPT_LIST_META_CONTEXT`; `None` past the last.
    fn changed_snapshot(&self, _export: &ExportInfo, _index: usize) -> Option<ExportName> {
        None
    }

    /// The key of context `snapfw:changed:NAME` on `export` (a stable identity of snapshot
    /// `name`, e.g. its instance number), if `export` offers it.
    fn changed_key(&self, _export: &ExportInfo, _name: &str) -> Option<u32> {
        None
    }

    /// The chunk size in bytes of the snapshot `key` names, if it still serves `export`'s
    /// context (`Err(EIO)` once it is gone).
    fn changed_chunk_bytes(&self, _export: &ExportInfo, _key: u32) -> Result<u64, Errno> {
        Err(Errno::Io)
    }

    /// Calls `each` with whether chunk `first + i` has an exception in snapshot `key`, for
    /// `i` in `0..count` in order, until it returns false. Bounded work: one lookup a chunk.
    fn changed_chunks(
        &self,
        _export: &ExportInfo,
        _key: u32,
        _first: u64,
        _count: u64,
        _each: &mut dyn FnMut(bool) -> bool,
    ) -> Result<(), Errno> {
        Err(Errno::Io)
    }
}

/// Size constraints of one export as advertised in `NBD_INFO_BLOCK_SIZE` and enforced on
/// every request ("Size constraints").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Alignment and granularity of offsets and lengths.
    pub minimum: u32,
    /// `max(minimum, 4096)`.
    pub preferred: u32,
    /// Largest READ or WRITE payload accepted.
    pub maximum: u32,
}

impl BlockSizes {
    /// The constraints of an export with the server's payload cap `max_payload`: the minimum
    /// is the export's block size (512 if that is not a power of two up to 64 KiB); the
    /// maximum is the smaller of the cap and the export's own limit, rounded down to the
    /// minimum and never below the preferred size.
    pub fn of(export: &ExportInfo, max_payload: u32) -> BlockSizes {
        let max_payload = match export.max_payload {
            0 => max_payload,
            own => own.min(max_payload),
        };
        let minimum = if export.block_size.is_power_of_two() && export.block_size <= 65536 {
            export.block_size
        } else {
            512
        };
        let preferred = minimum.max(4096);
        let maximum = (max_payload - max_payload % minimum).max(preferred);
        BlockSizes {
            minimum,
            preferred,
            maximum,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cut_at_a_character_boundary() {
        let long = "é".repeat(40);
        let name = ExportName::from_str_truncated(&long);
        assert_eq!(name.as_str(), "é".repeat(32));
        assert_eq!(ExportName::from_str_truncated("vda").as_str(), "vda");
        assert!(ExportName::default().is_empty());
        assert_eq!(
            alloc::format!(
                "{:>5}|{:?}",
                name.as_str().len(),
                ExportName::from_str_truncated("s1")
            ),
            "   64|\"s1\""
        );
    }
}
