//! NBD wire constants and big-endian field helpers, as named in the protocol document
//! (NetworkBlockDevice/nbd `doc/proto.md`, "Values"). Only what the server side of the fixed
//! newstyle handshake and the transmission phase (simple and structured replies) need.

/// `NBDMAGIC`: first 8 bytes of the server greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second 8 bytes of the greeting, and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`: first 4 bytes of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`: first 4 bytes of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`: first 4 bytes of every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag `NBD_FLAG_FIXED_NEWSTYLE` (bit 0).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag `NBD_FLAG_NO_ZEROES` (bit 1).
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag `NBD_FLAG_C_FIXED_NEWSTYLE` (bit 0).
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag `NBD_FLAG_C_NO_ZEROES` (bit 1).
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag `NBD_FLAG_HAS_FLAGS` (always set).
pub const TX_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag `NBD_FLAG_READ_ONLY`.
pub const TX_READ_ONLY: u16 = 1 << 1;
/// Transmission flag `NBD_FLAG_SEND_FLUSH`.
pub const TX_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag `NBD_FLAG_SEND_FUA`.
pub const TX_SEND_FUA: u16 = 1 << 3;
/// Transmission flag `NBD_FLAG_SEND_TRIM`.
pub const TX_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag `NBD_FLAG_SEND_WRITE_ZEROES`.
pub const TX_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag `NBD_FLAG_SEND_DF` (only with structured replies).
pub const TX_SEND_DF: u16 = 1 << 7;
/// Transmission flag `NBD_FLAG_CAN_MULTI_CONN`: a flush on one connection covers the
/// writes completed on every connection to the same export.
pub const TX_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag `NBD_FLAG_SEND_CACHE`.
pub const TX_SEND_CACHE: u16 = 1 << 10;

/// `NBD_OPT_EXPORT_NAME`: choose an export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`: end the negotiation (soft disconnect).
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`: list the exports.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`: not supported (answered with `NBD_REP_ERR_UNSUP`).
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`: describe an export.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`: replies in the transmission phase become structured.
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// `NBD_OPT_LIST_META_CONTEXT`: which metadata contexts an export offers.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`: choose the contexts `NBD_CMD_BLOCK_STATUS` reports.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`: one export in a list.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`: one information item about an export.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`: a context id and name.
pub const REP_META_CONTEXT: u32 = 4;
/// `NBD_REP_ERR_UNSUP`: option unknown to this server.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// `NBD_REP_ERR_INVALID`: option known but malformed.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// `NBD_REP_ERR_UNKNOWN`: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// `NBD_REP_ERR_TOO_BIG`: the request is too large to process.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: canonical export name.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum payload sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`: soft disconnect, no reply.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;

/// `NBD_CMD_CACHE`: a hint to prefetch (answered at once: nothing is cached).
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag `NBD_CMD_FLAG_FUA`.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag `NBD_CMD_FLAG_NO_HOLE` (WRITE_ZEROES: do not punch a hole).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag `NBD_CMD_FLAG_DF` (READ: do not fragment the reply).
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag `NBD_CMD_FLAG_REQ_ONE` (BLOCK_STATUS: one extent per context).
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply flag `NBD_REPLY_FLAG_DONE`: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`: the reply carries nothing (success without data).
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`: offset, then data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`: context id, then (length, flags) descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_ERROR`: error, message length, message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`: error, message length, message, offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// Length of the server greeting (`NBDMAGIC`, `IHAVEOPT`, handshake flags).
pub const GREETING_LEN: usize = 18;
/// Length of a client option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header (magic, flags, type, cookie, length).
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was negotiated.
pub const EXPORT_NAME_PADDING: usize = 124;

/// Error values of the transmission phase ("Error values"): the `error` field of a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    /// `NBD_EPERM` (1): write or trim on a read-only export.
    Perm = 1,
    /// `NBD_EIO` (5): the device failed.
    Io = 5,
    /// `NBD_ENOMEM` (12).
    NoMem = 12,
    /// `NBD_EINVAL` (22): bad command, flags, alignment, length, or read/trim past the end.
    Inval = 22,
    /// `NBD_ENOSPC` (28): write past the end of the export.
    NoSpc = 28,
    /// `NBD_EOVERFLOW` (75).
    Overflow = 75,
    /// `NBD_ENOTSUP` (95).
    NotSup = 95,
    /// `NBD_ESHUTDOWN` (108): the server is shutting down.
    Shutdown = 108,
}

/// Reads a big-endian u16 at `at` (the caller has checked the length).
pub fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

/// Reads a big-endian u32 at `at`.
pub fn be32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(b)
}

/// Reads a big-endian u64 at `at`.
pub fn be64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(b)
}

/// The `base:allocation` context.
pub const CONTEXT_ALLOCATION: &str = "base:allocation";
/// The prefix of snapfw's changed-chunks contexts: `snapfw:changed:NAME`.
pub const CONTEXT_CHANGED: &str = "snapfw:changed:";
/// Flag of a `snapfw:changed:` extent: the chunks have an exception in the snapshot (on an
/// origin: written since the snapshot; on a snapshot: differ from its origin). Bit 0, as
/// `qemu:dirty-bitmap`'s "dirty", so `x-dirty-bitmap=` clients read it the same way.
pub const STATE_CHANGED: u32 = 1;
