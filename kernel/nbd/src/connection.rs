//! One NBD connection, server side, as a sans-I/O state machine (no sockets, no storage, no
//! allocation after [`Connection::new`]).
//!
//! Spec: NetworkBlockDevice/nbd `doc/proto.md`: "Fixed newstyle negotiation", "Option types"
//! (`EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT`,
//! `SET_META_CONTEXT`; everything else,
//! `STARTTLS` included, is answered `NBD_REP_ERR_UNSUP`), "Transmission" with simple
//! replies, or structured replies once the client asked for them, "Size constraints" and
//! "Error values".
//!
//! The session ([`crate::session`]) drives it with three calls:
//! - [`Connection::receive`] takes bytes from the socket and returns how many it consumed and
//!   at most one [`Event`]: a request for the volume layer (read, write + its payload in
//!   pieces, flush, trim), the export chosen, or the client's disconnect. Call it again with
//!   the rest of the input until it consumes nothing and returns no event.
//! - [`Connection::complete`] reports the volume layer's result for a request slot.
//! - [`Connection::poll_transmit`] / [`Connection::transmitted`] hand out what goes on the
//!   wire: bytes staged here (greeting, option replies, reply headers) or a range of a read
//!   reply's payload that the glue sends straight from its own DMA buffers.
//!
//! Requests are identified by a *slot* (`0..MAX_IN_FLIGHT`), an index in a fixed table
//! that also holds the client's cookie; the session puts the slot into its request ids. When
//! every slot is busy, `receive` consumes nothing more (TCP back-pressure). Requests that
//! fail validation take a slot too and are answered here, never reaching the glue.
//!
//! Choices the spec leaves open:
//! - Minimum block size = the export's block size; requests that are not aligned to it, or
//!   have length 0, get `NBD_EINVAL` (also for clients that never asked for block sizes).
//!   `NBD_INFO_BLOCK_SIZE` is always sent in `INFO`/`GO` replies.
//! - READ longer than the advertised maximum payload: `NBD_EINVAL`. WRITE longer than it:
//!   the payload is read and dropped and the reply is `NBD_EINVAL`, up to 32 MiB (2^25, the
//!   spec's never-a-DoS size); a longer write closes the connection.
//! - Write past the end: `NBD_ENOSPC`; read/trim past the end: `NBD_EINVAL`; write/trim on a
//!   read-only export: `NBD_EPERM`; unknown command or flag, or a command the export does
//!   not offer (flush, trim): `NBD_EINVAL`. `NBD_CMD_FLAG_FUA` is accepted on every command
//!   when offered.
//! - Structured replies (`NBD_OPT_STRUCTURED_REPLY`, per connection; a client that never
//!   asks gets simple replies): every reply is one chunk with `NBD_REPLY_FLAG_DONE`. A read
//!   is one `NBD_REPLY_TYPE_OFFSET_DATA` chunk (header and offset staged here, the data sent
//!   from the glue's buffers as with simple replies), so `NBD_CMD_FLAG_DF` is accepted on
//!   reads and `NBD_FLAG_SEND_DF` offered; other successes are `NBD_REPLY_TYPE_NONE`;
//!   errors are `NBD_REPLY_TYPE_ERROR` with a short message, or `NBD_REPLY_TYPE_ERROR_OFFSET`
//!   for a read whose failed chunk the glue named ([`Connection::complete_at`]). No
//!   `OFFSET_HOLE` chunks: the volumes cannot tell holes cheaply.
//! - `NBD_CMD_WRITE_ZEROES` (offered on writable exports, `NBD_CMD_FLAG_NO_HOLE` accepted:
//!   zeroes are always written, never punched) goes to the glue like a write without
//!   payload; `NBD_CMD_CACHE` (offered everywhere) is checked and answered here at once: a
//!   hint, nothing is prefetched. `NBD_FLAG_CAN_MULTI_CONN` as the export says.
//! - Block status (contexts are listed to anybody, chosen only after structured replies):
//!   `base:allocation` on every export
//!   (all data: neither devices nor the engine tell holes cheaply) and
//!   `snapfw:changed:NAME` where the catalog offers it ([`ExportCatalog::changed_key`]:
//!   on an origin, each of its snapshots; on a snapshot, itself), flag
//!   [`STATE_CHANGED`] on the chunks with an exception in that snapshot. Up to [`MAX_META`]
//!   contexts chosen, ids 1.. in the order chosen; chosen for another export than GO's,
//!   they are dropped. `NBD_CMD_BLOCK_STATUS` (`REQ_ONE` accepted) is answered here when
//!   its reply is staged: one chunk per context, at most [`MAX_EXTENTS`] extents each and
//!   [`MAX_SCAN_CHUNKS`] snapshot chunks looked up (the reply may cover less than asked;
//!   clients ask again), within the request; `EINVAL` without contexts, `EIO` when the
//!   snapshot is gone.
//! - Option data is buffered up to [`OPTION_DATA_MAX`] bytes. Longer options are skipped
//!   without buffering and answered `NBD_REP_ERR_TOO_BIG` (or `ERR_UNSUP` when unknown) up
//!   to [`OPTION_SKIP_MAX`] bytes; beyond that, or for a too long `EXPORT_NAME`, the
//!   connection is closed.

use alloc::boxed::Box;
use alloc::vec;

use super::error::NbdError;
use super::export::{BlockSizes, ExportCatalog, ExportInfo};
use super::proto::*;

/// Requests per connection waiting for the volume layer or for their reply to be sent.
pub const MAX_IN_FLIGHT: usize = 32;
/// Option data buffered (the spec caps strings at 4096 bytes).
pub const OPTION_DATA_MAX: usize = 4096 + 64;
/// Option data skipped unread before the connection is closed as abusive.
pub const OPTION_SKIP_MAX: u32 = 1 << 20;
/// The payload size no server may treat as denial of service (2^25, 32 MiB).
pub const DOS_PAYLOAD: u32 = 1 << 25;
/// Bytes staged for sending (option replies are produced only when this many are free).
const STAGE_CAP: usize = 8192;
/// The largest reply one option produces (see `reply_info`; names longer than
/// `INFO_NAME_MAX` are not echoed).
const OPTION_REPLY_MAX: usize = 4096;
/// Longest name echoed in `NBD_INFO_NAME`.
const INFO_NAME_MAX: usize = 256;
/// Metadata contexts selected at once (`NBD_OPT_SET_META_CONTEXT`); more are not selected.
pub const MAX_META: usize = 4;
/// Extents per context in one `NBD_CMD_BLOCK_STATUS` reply (a reply may cover less than
/// the request: the client asks again for the rest).
pub const MAX_EXTENTS: usize = 32;
/// Snapshot chunks looked up for one `snapfw:changed:` context of one request.
pub const MAX_SCAN_CHUNKS: u64 = 16384;
/// The largest reply staged at once: a block status reply (a chunk per context), larger
/// than a structured error with its message and offset (see `reply`).
const REPLY_MAX: usize = MAX_META * (STRUCTURED_REPLY_LEN + 4 + 8 * MAX_EXTENTS);
const _: () = assert!(REPLY_MAX >= STRUCTURED_REPLY_LEN + 6 + 64 + 8);

/// Settings of the server, the same for every connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionConfig {
    /// Largest READ/WRITE payload advertised and accepted (rounded down to each export's
    /// block size, at least 4096). At most [`DOS_PAYLOAD`].
    pub max_payload: u32,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            max_payload: DOS_PAYLOAD,
        }
    }
}

/// Something the glue must act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// The handshake chose `export`: transmission starts (log it; route requests to it).
    Export(ExportInfo),
    /// Read `len` bytes at `offset`; answer with [`Connection::complete`], then send the
    /// data when [`Connection::poll_transmit`] asks for it with [`Transmit::ReadData`].
    Read {
        /// The request's slot.
        slot: u16,
        /// Byte offset in the export (aligned, in range).
        offset: u64,
        /// Byte count (aligned, non-zero, at most the maximum payload).
        len: u32,
    },
    /// Write `len` bytes at `offset`; the data follows in [`Event::WriteData`] pieces.
    /// Complete it once the data is written (durably if `fua`).
    Write {
        /// The request's slot.
        slot: u16,
        /// Byte offset in the export (aligned, in range).
        offset: u64,
        /// Byte count (aligned, non-zero, at most the maximum payload).
        len: u32,
        /// `NBD_CMD_FLAG_FUA`: complete only once the data is durable.
        fua: bool,
    },
    /// Bytes `at..at + data.len()` of the payload of write `slot` (borrowed from the input).
    /// To take fewer bytes than are available, call `receive` with a shorter input: see
    /// [`Connection::payload_pending`].
    WriteData {
        /// The write's slot.
        slot: u16,
        /// Offset of `data` within the write's payload.
        at: u32,
        /// The bytes.
        data: &'a [u8],
        /// This piece ends the payload.
        last: bool,
    },
    /// Make every completed write durable, then complete.
    Flush {
        /// The request's slot.
        slot: u16,
    },
    /// Write `len` zero bytes at `offset` (no payload follows); complete once written
    /// (durably if `fua`).
    WriteZeroes {
        /// The request's slot.
        slot: u16,
        /// Byte offset (aligned, in range).
        offset: u64,
        /// Byte count (aligned, non-zero; not bounded by the maximum payload).
        len: u32,
        /// `NBD_CMD_FLAG_FUA`.
        fua: bool,
    },
    /// Discard `len` bytes at `offset` (a hint; completing without doing anything is fine).
    Trim {
        /// The request's slot.
        slot: u16,
        /// Byte offset (aligned, in range).
        offset: u64,
        /// Byte count (aligned, non-zero).
        len: u32,
        /// `NBD_CMD_FLAG_FUA`.
        fua: bool,
    },
    /// The client ended the session (`NBD_CMD_DISC` or `NBD_OPT_ABORT`): finish what is in
    /// flight; close once [`Connection::is_finished`].
    Disconnect,
}

/// What to send next.
#[derive(Debug, PartialEq, Eq)]
pub enum Transmit<'a> {
    /// These bytes.
    Bytes(&'a [u8]),
    /// Bytes `at..at + len` of the data of read `slot` (from the glue's buffers).
    ReadData {
        /// The read's slot.
        slot: u16,
        /// Offset within the read's data.
        at: u32,
        /// Bytes left to send.
        len: u32,
    },
    /// Nothing to send now.
    Idle,
}

/// The result of one [`Connection::receive`] call.
#[derive(Debug, PartialEq, Eq)]
pub struct Received<'a> {
    /// Input bytes consumed (the caller drops them from its buffer).
    pub consumed: usize,
    /// At most one event.
    pub event: Option<Event<'a>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Trim,
    Zero,
    /// `NBD_CMD_BLOCK_STATUS`: answered here from the catalog when its reply is staged.
    Status,
    /// Answered here (validation error); never reaches the glue.
    Local,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    busy: bool,
    cookie: u64,
    kind: Kind,
    offset: u64,
    len: u32,
    /// Where a failed read failed (for `NBD_REPLY_TYPE_ERROR_OFFSET`).
    error_offset: Option<u64>,
    /// `NBD_CMD_FLAG_REQ_ONE` of a block status request.
    req_one: bool,
    /// A write whose payload is still arriving.
    payload_pending: bool,
    /// The result once complete: 0 or an `Errno` value.
    result: Option<u32>,
}

const FREE_SLOT: Slot = Slot {
    busy: false,
    cookie: 0,
    kind: Kind::Local,
    offset: 0,
    len: 0,
    error_offset: None,
    req_one: false,
    payload_pending: false,
    result: None,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting for the 4 bytes of client flags.
    ClientFlags,
    /// Waiting for an option header.
    OptionHeader,
    /// Buffering `len` bytes of option data.
    OptionData { option: u32, len: usize },
    /// Dropping `remaining` bytes of an option too long to buffer.
    OptionSkip { option: u32, remaining: u32 },
    /// Sending `NBD_REP_SERVER` replies; `next` is the catalog index.
    Listing { next: usize },
    /// Waiting for a request header.
    Request,
    /// Passing a write's payload to the glue.
    Payload { slot: u16, at: u32, len: u32 },
    /// Dropping a refused write's payload.
    Discard { slot: u16, remaining: u32 },
    /// The client said goodbye; input is ignored.
    Disconnecting,
    /// Closed after an error; input is ignored.
    Closed,
}

/// One client connection (see the module documentation). About 7 KiB, and an 8 KiB stage
/// on the heap; allocate it once when the connection is accepted.
pub struct Connection {
    config: ConnectionConfig,
    state: State,
    no_zeroes: bool,
    /// The client negotiated structured replies.
    structured: bool,
    /// Contexts chosen by `NBD_OPT_SET_META_CONTEXT`; context id = index + 1.
    meta: [Option<Meta>; MAX_META],
    /// The export they were chosen for (cleared at GO for another export).
    meta_export: Option<u64>,
    /// Scratch for a block status reply: (length, flags) per context.
    extents: [[(u32, u32); MAX_EXTENTS]; MAX_META],
    export: Option<ExportInfo>,
    sizes: BlockSizes,
    /// Accumulates headers and option data split across `receive` calls.
    acc: [u8; OPTION_DATA_MAX],
    acc_len: usize,
    /// Bytes staged for sending ([`STAGE_CAP`], on the heap: kept off the kernel stack
    /// when a connection is built).
    stage: Box<[u8]>,
    stage_start: usize,
    stage_end: usize,
    /// The read whose data is being sent: (slot, bytes sent, length).
    sending: Option<(u16, u32, u32)>,
    slots: [Slot; MAX_IN_FLIGHT],
    /// Slots whose reply can be sent, in completion order.
    ready: [u16; MAX_IN_FLIGHT],
    ready_head: usize,
    ready_len: usize,
}

impl Connection {
    /// A new connection with the server greeting staged for sending.
    pub fn new(config: ConnectionConfig) -> Connection {
        let mut c = Connection {
            config: ConnectionConfig {
                max_payload: config.max_payload.min(DOS_PAYLOAD),
            },
            state: State::ClientFlags,
            no_zeroes: false,
            structured: false,
            meta: [None; MAX_META],
            meta_export: None,
            extents: [[(0, 0); MAX_EXTENTS]; MAX_META],
            export: None,
            sizes: BlockSizes {
                minimum: 1,
                preferred: 4096,
                maximum: 0,
            },
            acc: [0; OPTION_DATA_MAX],
            acc_len: 0,
            stage: vec![0; STAGE_CAP].into_boxed_slice(),
            stage_start: 0,
            stage_end: 0,
            sending: None,
            slots: [FREE_SLOT; MAX_IN_FLIGHT],
            ready: [0; MAX_IN_FLIGHT],
            ready_head: 0,
            ready_len: 0,
        };
        c.put(&NBDMAGIC.to_be_bytes());
        c.put(&IHAVEOPT.to_be_bytes());
        c.put(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        c
    }

    /// The export chosen by the handshake, once in transmission.
    pub fn export(&self) -> Option<&ExportInfo> {
        self.export.as_ref()
    }

    /// Whether the client negotiated structured replies.
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// The size constraints in force (meaningful once an export is chosen).
    pub fn block_sizes(&self) -> BlockSizes {
        self.sizes
    }

    /// True once the handshake is over and requests are accepted.
    pub fn in_transmission(&self) -> bool {
        matches!(
            self.state,
            State::Request | State::Payload { .. } | State::Discard { .. }
        )
    }

    /// The write whose payload the next input bytes belong to: (slot, bytes already passed
    /// on, total length). The glue uses it to cut its input to what it can store now.
    pub fn payload_pending(&self) -> Option<(u16, u32, u32)> {
        match self.state {
            State::Payload { slot, at, len } if self.slot_wants_data(slot) => Some((slot, at, len)),
            _ => None,
        }
    }

    /// Requests taken from the client and not yet fully answered.
    pub fn in_flight(&self) -> usize {
        self.slots.iter().filter(|s| s.busy).count()
    }

    /// True after an error closed the connection: drop the TCP connection (once the volume
    /// layer has returned this connection's in-flight I/O).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// True when the client said goodbye (or an error closed the connection) and every
    /// request is answered and every byte sent: the TCP connection can be closed.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Disconnecting | State::Closed)
            && self.in_flight() == 0
            && self.stage_start == self.stage_end
            && self.sending.is_none()
    }

    /// Consumes bytes of `input` (see the module documentation). An error closes the
    /// connection: the glue logs it and drops the TCP connection.
    pub fn receive<'a>(
        &mut self,
        input: &'a [u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<Received<'a>, NbdError> {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match self.state {
                State::Closed => return Err(NbdError::Closed),
                State::Disconnecting => {
                    // The client must not send after DISC/ABORT; ignore whatever it does.
                    return Ok(Received {
                        consumed: input.len(),
                        event: None,
                    });
                }
                State::Listing { .. } => return Ok(done(pos)),
                State::ClientFlags => {
                    if !self.fill(rest, &mut pos, 4) {
                        return Ok(done(pos));
                    }
                    let flags = be32(&self.acc, 0);
                    self.acc_len = 0;
                    if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
                        return Err(self.close(NbdError::BadClientFlags(flags)));
                    }
                    self.no_zeroes = flags & CLIENT_NO_ZEROES != 0;
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    // Produce an option's replies only when they fit in the stage.
                    if self.acc_len == 0 && self.stage_free() < OPTION_REPLY_MAX {
                        return Ok(done(pos));
                    }
                    if !self.fill(rest, &mut pos, OPTION_HEADER_LEN) {
                        return Ok(done(pos));
                    }
                    let magic = be64(&self.acc, 0);
                    let option = be32(&self.acc, 8);
                    let len = be32(&self.acc, 12);
                    self.acc_len = 0;
                    if magic != IHAVEOPT {
                        return Err(self.close(NbdError::BadOptionMagic(magic)));
                    }
                    if len as usize <= OPTION_DATA_MAX {
                        self.state = State::OptionData {
                            option,
                            len: len as usize,
                        };
                    } else if option == OPT_EXPORT_NAME || len > OPTION_SKIP_MAX {
                        return Err(self.close(NbdError::OptionTooLong { option, len }));
                    } else {
                        self.state = State::OptionSkip {
                            option,
                            remaining: len,
                        };
                    }
                }
                State::OptionData { option, len } => {
                    if !self.fill(rest, &mut pos, len) {
                        return Ok(done(pos));
                    }
                    self.acc_len = 0;
                    self.state = State::OptionHeader;
                    if let Some(event) = self.option(option, len, catalog)? {
                        return Ok(Received {
                            consumed: pos,
                            event: Some(event),
                        });
                    }
                }
                State::OptionSkip { option, remaining } => {
                    let take = rest.len().min(remaining as usize);
                    pos += take;
                    let remaining = remaining - take as u32;
                    if remaining > 0 {
                        self.state = State::OptionSkip { option, remaining };
                        return Ok(done(pos));
                    }
                    self.state = State::OptionHeader;
                    match option {
                        OPT_ABORT => {
                            // "A server SHOULD ignore any data sent by the client."
                            self.option_reply(option, REP_ACK, &[]);
                            self.state = State::Disconnecting;
                            return Ok(Received {
                                consumed: pos,
                                event: Some(Event::Disconnect),
                            });
                        }
                        OPT_LIST
                        | OPT_INFO
                        | OPT_GO
                        | OPT_LIST_META_CONTEXT
                        | OPT_SET_META_CONTEXT => {
                            self.option_reply(option, REP_ERR_TOO_BIG, b"option data too long")
                        }
                        _ => self.option_reply(option, REP_ERR_UNSUP, b"option not supported"),
                    }
                }
                State::Request => {
                    if self.acc_len == 0 && self.free_slot().is_none() {
                        return Ok(done(pos));
                    }
                    if !self.fill(rest, &mut pos, REQUEST_LEN) {
                        return Ok(done(pos));
                    }
                    self.acc_len = 0;
                    if let Some(event) = self.request()? {
                        return Ok(Received {
                            consumed: pos,
                            event: Some(event),
                        });
                    }
                }
                State::Payload { slot, at, len } => {
                    if rest.is_empty() {
                        return Ok(done(pos));
                    }
                    let take = rest.len().min((len - at) as usize);
                    let data = &rest[..take];
                    pos += take;
                    let next = at + take as u32;
                    let last = next == len;
                    let wanted = self.slot_wants_data(slot);
                    if last {
                        self.state = State::Request;
                        self.payload_done(slot);
                    } else {
                        self.state = State::Payload {
                            slot,
                            at: next,
                            len,
                        };
                    }
                    if wanted {
                        return Ok(Received {
                            consumed: pos,
                            event: Some(Event::WriteData {
                                slot,
                                at,
                                data,
                                last,
                            }),
                        });
                    }
                }
                State::Discard { slot, remaining } => {
                    let take = rest.len().min(remaining as usize);
                    pos += take;
                    let remaining = remaining - take as u32;
                    if remaining > 0 {
                        self.state = State::Discard { slot, remaining };
                        return Ok(done(pos));
                    }
                    self.state = State::Request;
                    self.payload_done(slot);
                }
            }
        }
    }

    /// Reports the volume layer's result for request `slot` (`Err` becomes the reply's error
    /// value; a failed read sends no data). A write may be completed with an error before
    /// its payload has all arrived: the rest is then dropped here.
    pub fn complete(&mut self, slot: u16, result: Result<(), Errno>) -> Result<(), NbdError> {
        self.complete_at(slot, result, None)
    }

    /// [`Connection::complete`] of a read that failed at byte `at` of the export (within
    /// the request), reported as `NBD_REPLY_TYPE_ERROR_OFFSET` with structured replies. An
    /// offset outside the read, or on another command, is not sent.
    pub fn complete_at(
        &mut self,
        slot: u16,
        result: Result<(), Errno>,
        at: Option<u64>,
    ) -> Result<(), NbdError> {
        let Some(s) = self.slots.get_mut(usize::from(slot)) else {
            return Err(NbdError::BadCompletion(slot));
        };
        if !s.busy || s.result.is_some() || matches!(s.kind, Kind::Local | Kind::Status) {
            return Err(NbdError::BadCompletion(slot));
        }
        s.result = Some(match result {
            Ok(()) => 0,
            Err(e) => e as u32,
        });
        let end = s.offset + u64::from(s.len);
        s.error_offset = at
            .filter(|&at| result.is_err() && s.kind == Kind::Read && (s.offset..end).contains(&at));
        if !s.payload_pending {
            self.push_ready(slot);
        }
        Ok(())
    }

    /// What to send next. `catalog` feeds `NBD_OPT_LIST` replies, produced as room frees.
    pub fn poll_transmit(&mut self, catalog: &dyn ExportCatalog) -> Transmit<'_> {
        if self.stage_start == self.stage_end {
            self.stage_start = 0;
            self.stage_end = 0;
            if let Some((slot, at, len)) = self.sending {
                return Transmit::ReadData {
                    slot,
                    at,
                    len: len - at,
                };
            }
            if let State::Listing { next } = self.state {
                self.list(next, catalog);
            }
            // Reply headers, in completion order, until one carries data.
            while self.sending.is_none() && self.stage_free() >= REPLY_MAX {
                let Some(slot) = self.pop_ready() else { break };
                self.reply(slot, catalog);
            }
        }
        if self.stage_start < self.stage_end {
            Transmit::Bytes(&self.stage[self.stage_start..self.stage_end])
        } else {
            Transmit::Idle
        }
    }

    /// Records that `n` bytes of what [`Connection::poll_transmit`] returned were sent.
    /// Returns the slot of a read whose data is now fully sent (the glue frees its buffers).
    pub fn transmitted(&mut self, n: usize) -> Option<u16> {
        if self.stage_start < self.stage_end {
            self.stage_start = (self.stage_start + n).min(self.stage_end);
            return None;
        }
        let (slot, at, len) = self.sending?;
        let at = at.saturating_add(n as u32).min(len);
        if at < len {
            self.sending = Some((slot, at, len));
            return None;
        }
        self.sending = None;
        self.free(slot);
        Some(slot)
    }

    // --- handshake -------------------------------------------------------------------

    fn option(
        &mut self,
        option: u32,
        len: usize,
        catalog: &dyn ExportCatalog,
    ) -> Result<Option<Event<'static>>, NbdError> {
        match option {
            OPT_EXPORT_NAME => {
                let Ok(name) = core::str::from_utf8(&self.acc[..len]) else {
                    return Err(self.close(NbdError::BadExportName));
                };
                let Some(export) = catalog.lookup(name) else {
                    return Err(self.close(NbdError::UnknownExport));
                };
                self.put(&export.size.to_be_bytes());
                self.put(&transmission_flags(&export, self.structured).to_be_bytes());
                if !self.no_zeroes {
                    self.put(&[0; EXPORT_NAME_PADDING]);
                }
                Ok(Some(self.enter_transmission(export)))
            }
            OPT_ABORT => {
                self.option_reply(option, REP_ACK, &[]);
                self.state = State::Disconnecting;
                Ok(Some(Event::Disconnect))
            }
            OPT_LIST => {
                if len != 0 {
                    self.option_reply(option, REP_ERR_INVALID, b"LIST takes no data");
                } else {
                    self.state = State::Listing { next: 0 };
                }
                Ok(None)
            }
            OPT_INFO | OPT_GO => Ok(self.info(option, len, catalog)),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_option(option, len, catalog);
                Ok(None)
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    self.option_reply(option, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data");
                } else {
                    self.structured = true;
                    self.option_reply(option, REP_ACK, &[]);
                }
                Ok(None)
            }
            _ => {
                self.option_reply(option, REP_ERR_UNSUP, b"option not supported");
                Ok(None)
            }
        }
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO` with `len` bytes of data in `acc`.
    fn info(
        &mut self,
        option: u32,
        len: usize,
        catalog: &dyn ExportCatalog,
    ) -> Option<Event<'static>> {
        let Some((name_len, requests)) = parse_info(&self.acc[..len]) else {
            self.option_reply(option, REP_ERR_INVALID, b"malformed INFO/GO data");
            return None;
        };
        let Ok(name) = core::str::from_utf8(&self.acc[4..4 + name_len]) else {
            self.option_reply(option, REP_ERR_INVALID, b"export name is not UTF-8");
            return None;
        };
        let Some(export) = catalog.lookup(name) else {
            self.option_reply(option, REP_ERR_UNKNOWN, b"no such export");
            return None;
        };
        let asked =
            |info: u16| (0..requests).any(|i| be16(&self.acc, 4 + name_len + 2 + 2 * i) == info);
        let (want_name, want_description) = (asked(INFO_NAME), asked(INFO_DESCRIPTION));
        let sizes = BlockSizes::of(&export, self.config.max_payload);

        let mut item = [0u8; 2 + INFO_NAME_MAX];
        item[..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
        item[2..10].copy_from_slice(&export.size.to_be_bytes());
        item[10..12].copy_from_slice(&transmission_flags(&export, self.structured).to_be_bytes());
        self.option_reply(option, REP_INFO, &item[..12]);

        item[..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        item[2..6].copy_from_slice(&sizes.minimum.to_be_bytes());
        item[6..10].copy_from_slice(&sizes.preferred.to_be_bytes());
        item[10..14].copy_from_slice(&sizes.maximum.to_be_bytes());
        self.option_reply(option, REP_INFO, &item[..14]);

        if want_name && name_len <= INFO_NAME_MAX {
            item[..2].copy_from_slice(&INFO_NAME.to_be_bytes());
            item[2..2 + name_len].copy_from_slice(&self.acc[4..4 + name_len]);
            self.option_reply(option, REP_INFO, &item[..2 + name_len]);
        }
        if want_description {
            if let Some(text) = catalog.description(&export) {
                let text = text.as_str().as_bytes();
                let n = text.len().min(INFO_NAME_MAX);
                item[..2].copy_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                item[2..2 + n].copy_from_slice(&text[..n]);
                self.option_reply(option, REP_INFO, &item[..2 + n]);
            }
        }
        self.option_reply(option, REP_ACK, &[]);
        (option == OPT_GO).then(|| self.enter_transmission(export))
    }

    /// Stages `NBD_REP_SERVER` replies from catalog index `next` while they fit, then the
    /// final `NBD_REP_ACK`.
    fn list(&mut self, mut next: usize, catalog: &dyn ExportCatalog) {
        while self.stage_free() >= OPTION_REPLY_MAX {
            let Some(name) = catalog.name(next) else {
                self.option_reply(OPT_LIST, REP_ACK, &[]);
                self.state = State::OptionHeader;
                return;
            };
            let name = name.as_str().as_bytes();
            let mut data = [0u8; 4 + 64];
            let n = name.len().min(64);
            data[..4].copy_from_slice(&(n as u32).to_be_bytes());
            data[4..4 + n].copy_from_slice(&name[..n]);
            self.option_reply(OPT_LIST, REP_SERVER, &data[..4 + n]);
            next += 1;
        }
        self.state = State::Listing { next };
    }

    /// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` with `len` bytes in `acc`.
    fn meta_option(&mut self, option: u32, len: usize, catalog: &dyn ExportCatalog) {
        let set = option == OPT_SET_META_CONTEXT;
        // Listing is harmless; choosing needs the replies block status is sent in.
        if set && !self.structured {
            self.option_reply(option, REP_ERR_INVALID, b"structured replies first");
            return;
        }
        let Some((name_len, queries)) = parse_meta(&self.acc[..len]) else {
            self.option_reply(option, REP_ERR_INVALID, b"malformed meta context data");
            return;
        };
        let export = core::str::from_utf8(&self.acc[4..4 + name_len])
            .ok()
            .and_then(|name| catalog.lookup(name));
        let Some(export) = export else {
            self.option_reply(option, REP_ERR_UNKNOWN, b"no such export");
            return;
        };
        if set {
            self.meta = [None; MAX_META];
            self.meta_export = Some(export.handle);
        }
        // Room for each META_CONTEXT reply and the final ACK.
        const ONE: usize = OPTION_REPLY_HEADER_LEN + 4 + CONTEXT_CHANGED.len() + 64;
        let mut at = 4 + name_len + 4;
        let mut list_all = queries == 0 && !set;
        for _ in 0..queries {
            let qlen = be32(&self.acc, at) as usize;
            let (qstart, qend) = (at + 4, at + 4 + qlen);
            at = qend;
            let mut query = [0u8; 64 + 15];
            let Some(q) = self
                .acc
                .get(qstart..qend)
                .filter(|q| q.len() <= query.len())
            else {
                continue;
            };
            query[..qlen].copy_from_slice(q);
            let Ok(q) = core::str::from_utf8(&query[..qlen]) else {
                continue;
            };
            if self.stage_free() < ONE + OPTION_REPLY_HEADER_LEN {
                break;
            }
            match q {
                "base:" if !set => self.meta_reply(option, None, CONTEXT_ALLOCATION, ""),
                CONTEXT_ALLOCATION => {
                    let id = self.select(set, Meta::Allocation);
                    self.meta_reply(option, id, CONTEXT_ALLOCATION, "");
                }
                "snapfw:" | CONTEXT_CHANGED if !set => list_all = true,
                _ => {
                    let Some(name) = q.strip_prefix(CONTEXT_CHANGED) else {
                        continue;
                    };
                    let Some(key) = catalog.changed_key(&export, name) else {
                        continue;
                    };
                    let id = self.select(set, Meta::Changed(key));
                    self.meta_reply(option, id, CONTEXT_CHANGED, name);
                }
            }
        }
        if list_all {
            if queries == 0 {
                self.meta_reply(option, None, CONTEXT_ALLOCATION, "");
            }
            let mut index = 0;
            while self.stage_free() >= ONE + OPTION_REPLY_HEADER_LEN {
                let Some(name) = catalog.changed_snapshot(&export, index) else {
                    break;
                };
                self.meta_reply(option, None, CONTEXT_CHANGED, name.as_str());
                index += 1;
            }
        }
        self.option_reply(option, REP_ACK, &[]);
    }

    /// Selects `meta` (SET) and returns its context id; `Some(0)` for LIST; `None` when it
    /// is already selected or no more fit (no reply then).
    fn select(&mut self, set: bool, meta: Meta) -> Option<u32> {
        if !set {
            return Some(0);
        }
        if self.meta.contains(&Some(meta)) {
            return None;
        }
        let free = self.meta.iter().position(Option::is_none)?;
        self.meta[free] = Some(meta);
        Some(free as u32 + 1)
    }

    /// Stages one `NBD_REP_META_CONTEXT` (for LIST, `id` is `None` or 0, sent as 0; for
    /// SET, `None` sends nothing).
    fn meta_reply(&mut self, option: u32, id: Option<u32>, prefix: &str, name: &str) {
        let id = match (id, option) {
            (Some(id), _) => id,
            (None, OPT_LIST_META_CONTEXT) => 0,
            (None, _) => return,
        };
        let mut data = [0u8; 4 + 15 + 64];
        let n = prefix.len() + name.len();
        if n > data.len() - 4 {
            return;
        }
        data[..4].copy_from_slice(&id.to_be_bytes());
        data[4..4 + prefix.len()].copy_from_slice(prefix.as_bytes());
        data[4 + prefix.len()..4 + n].copy_from_slice(name.as_bytes());
        self.option_reply(option, REP_META_CONTEXT, &data[..4 + n]);
    }

    fn enter_transmission(&mut self, export: ExportInfo) -> Event<'static> {
        if self.meta_export != Some(export.handle) {
            // Chosen for another export (or never): none apply.
            self.meta = [None; MAX_META];
        }
        self.sizes = BlockSizes::of(&export, self.config.max_payload);
        self.export = Some(export);
        self.state = State::Request;
        Event::Export(export)
    }

    fn option_reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        self.put(&OPTION_REPLY_MAGIC.to_be_bytes());
        self.put(&option.to_be_bytes());
        self.put(&kind.to_be_bytes());
        self.put(&(data.len() as u32).to_be_bytes());
        self.put(data);
    }

    // --- transmission ----------------------------------------------------------------

    /// Handles the request header in `acc`.
    fn request(&mut self) -> Result<Option<Event<'static>>, NbdError> {
        let magic = be32(&self.acc, 0);
        if magic != REQUEST_MAGIC {
            return Err(self.close(NbdError::BadRequestMagic(magic)));
        }
        let flags = be16(&self.acc, 4);
        let command = be16(&self.acc, 6);
        let cookie = be64(&self.acc, 8);
        let offset = be64(&self.acc, 16);
        let len = be32(&self.acc, 24);
        let Some(export) = self.export else {
            return Err(self.close(NbdError::Closed));
        };
        if command == CMD_DISC {
            self.state = State::Disconnecting;
            return Ok(Some(Event::Disconnect));
        }
        if command == CMD_WRITE && len > DOS_PAYLOAD {
            return Err(self.close(NbdError::WriteTooLarge(len)));
        }
        // The caller checked that a slot is free.
        let Some(slot) = self.free_slot() else {
            return Err(self.close(NbdError::Closed));
        };
        let fua = flags & CMD_FLAG_FUA != 0;
        let allowed = CMD_FLAG_FUA
            | match command {
                CMD_READ if self.structured => CMD_FLAG_DF,
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE,
                CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
                _ => 0,
            };
        let flags_ok = flags & !allowed == 0 && (!fua || export.fua);
        let sizes = self.sizes;
        let aligned = len != 0
            && offset.is_multiple_of(u64::from(sizes.minimum))
            && len.is_multiple_of(sizes.minimum);
        let in_range = offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= export.size);
        // Each command's checks in order: the first that refuses names the error.
        let malformed = !flags_ok || !aligned;
        let (kind, verdict) = match command {
            CMD_READ => (
                Kind::Read,
                refusal(&[(malformed || len > sizes.maximum || !in_range, Errno::Inval)]),
            ),
            CMD_WRITE => (
                Kind::Write,
                refusal(&[
                    (malformed || len > sizes.maximum, Errno::Inval),
                    (export.read_only, Errno::Perm),
                    (!in_range, Errno::NoSpc),
                ]),
            ),
            CMD_FLUSH => (
                Kind::Flush,
                refusal(&[(
                    !flags_ok || !export.flush || offset != 0 || len != 0,
                    Errno::Inval,
                )]),
            ),
            CMD_TRIM => (
                Kind::Trim,
                refusal(&[
                    (malformed || !in_range, Errno::Inval),
                    (export.read_only, Errno::Perm),
                    (!export.trim, Errno::Inval),
                ]),
            ),
            CMD_WRITE_ZEROES => (
                Kind::Zero,
                refusal(&[
                    (malformed, Errno::Inval),
                    (export.read_only, Errno::Perm),
                    (!in_range, Errno::NoSpc),
                ]),
            ),
            // Answered here when its reply is staged (`block_status`).
            CMD_BLOCK_STATUS => (
                Kind::Status,
                refusal(&[(
                    malformed || !in_range || self.meta.iter().all(Option::is_none),
                    Errno::Inval,
                )]),
            ),
            // A hint: checked, then answered here without reading anything.
            CMD_CACHE => (
                Kind::Local,
                refusal(&[(malformed || !in_range, Errno::Inval)]),
            ),
            _ => (Kind::Local, Err(Errno::Inval)),
        };
        let s = &mut self.slots[usize::from(slot)];
        *s = Slot {
            busy: true,
            cookie,
            kind,
            offset,
            len,
            error_offset: None,
            req_one: flags & CMD_FLAG_REQ_ONE != 0,
            payload_pending: false,
            result: None,
        };
        if matches!(kind, Kind::Local | Kind::Status) && verdict.is_ok() {
            s.result = Some(0);
            self.push_ready(slot);
            return Ok(None);
        }
        if let Err(errno) = verdict {
            s.kind = Kind::Local;
            s.result = Some(errno as u32);
            if command == CMD_WRITE && len > 0 {
                s.payload_pending = true;
                self.state = State::Discard {
                    slot,
                    remaining: len,
                };
            } else {
                self.push_ready(slot);
            }
            return Ok(None);
        }
        Ok(Some(match kind {
            Kind::Read => Event::Read { slot, offset, len },
            Kind::Write => {
                s.payload_pending = true;
                self.state = State::Payload { slot, at: 0, len };
                Event::Write {
                    slot,
                    offset,
                    len,
                    fua,
                }
            }
            Kind::Flush => Event::Flush { slot },
            Kind::Zero => Event::WriteZeroes {
                slot,
                offset,
                len,
                fua,
            },
            Kind::Trim | Kind::Local | Kind::Status => Event::Trim {
                slot,
                offset,
                len,
                fua,
            },
        }))
    }

    /// Stages the reply of `slot`, simple or structured as negotiated (a read's data
    /// follows via `sending`). At most [`REPLY_MAX`] bytes.
    fn reply(&mut self, slot: u16, catalog: &dyn ExportCatalog) {
        let mut s = self.slots[usize::from(slot)];
        if s.kind == Kind::Status && s.result == Some(0) {
            match self.block_status(&s, catalog) {
                Ok(()) => {
                    self.free(slot);
                    return;
                }
                Err(e) => s.result = Some(e as u32),
            }
        }
        let error = s.result.unwrap_or(Errno::Io as u32);
        let data = s.kind == Kind::Read && error == 0;
        if !self.structured {
            self.put(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            self.put(&error.to_be_bytes());
            self.put(&s.cookie.to_be_bytes());
        } else if data {
            // One chunk: the offset, then the data from the glue's buffers.
            self.chunk_header(s.cookie, REPLY_TYPE_OFFSET_DATA, 8 + s.len);
            self.put(&s.offset.to_be_bytes());
        } else if error == 0 {
            self.chunk_header(s.cookie, REPLY_TYPE_NONE, 0);
        } else {
            let message = error_message(error).as_bytes();
            let (kind, extra) = match s.error_offset {
                Some(_) => (REPLY_TYPE_ERROR_OFFSET, 8),
                None => (REPLY_TYPE_ERROR, 0),
            };
            self.chunk_header(s.cookie, kind, (6 + message.len() + extra) as u32);
            self.put(&error.to_be_bytes());
            self.put(&(message.len() as u16).to_be_bytes());
            self.put(message);
            if let Some(at) = s.error_offset {
                self.put(&at.to_be_bytes());
            }
        }
        if data {
            self.sending = Some((slot, 0, s.len));
        } else {
            self.free(slot);
        }
    }

    /// Stages the reply to block status request `s`: one `NBD_REPLY_TYPE_BLOCK_STATUS`
    /// chunk per selected context, in context id order, the last one `DONE`. Every context
    /// is computed before anything is staged, so a failure is one error reply.
    fn block_status(&mut self, s: &Slot, catalog: &dyn ExportCatalog) -> Result<(), Errno> {
        let export = self.export.ok_or(Errno::Io)?;
        let mut counts = [0usize; MAX_META];
        for (i, meta) in self.meta.into_iter().enumerate() {
            let Some(meta) = meta else { continue };
            counts[i] = self.extents_of(i, meta, &export, s, catalog)?;
        }
        let last = self.meta.iter().rposition(Option::is_some).unwrap_or(0);
        for (i, &n) in counts.iter().enumerate() {
            if self.meta[i].is_none() {
                continue;
            }
            let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
            self.chunk_header_flags(s.cookie, flags, REPLY_TYPE_BLOCK_STATUS, 4 + 8 * n as u32);
            self.put(&(i as u32 + 1).to_be_bytes());
            for k in 0..n {
                let (len, state) = self.extents[i][k];
                self.put(&len.to_be_bytes());
                self.put(&state.to_be_bytes());
            }
        }
        Ok(())
    }

    /// Fills `extents[i]` for context `meta` over the request `s`: the number of extents
    /// (at least one, starting at the request's offset, within its length).
    fn extents_of(
        &mut self,
        i: usize,
        meta: Meta,
        export: &ExportInfo,
        s: &Slot,
        catalog: &dyn ExportCatalog,
    ) -> Result<usize, Errno> {
        let key = match meta {
            Meta::Allocation => {
                // Everything is data: neither the devices nor the engine can tell holes
                // cheaply (virtio-blk cannot say which blocks are deallocated; the engine
                // knows which chunks changed since a snapshot, not which were never
                // written before it). See README's block status table.
                self.extents[i][0] = (s.len, 0);
                return Ok(1);
            }
            Meta::Changed(key) => key,
        };
        let cs = catalog.changed_chunk_bytes(export, key)?;
        if cs == 0 {
            return Err(Errno::Io);
        }
        let end = s.offset + u64::from(s.len);
        let first = s.offset / cs;
        let count = ((end - 1) / cs - first + 1).min(MAX_SCAN_CHUNKS);
        let max = if s.req_one { 1 } else { MAX_EXTENTS };
        let extents = &mut self.extents[i];
        let (mut n, mut pos) = (0usize, s.offset);
        catalog.changed_chunks(export, key, first, count, &mut |changed| {
            let piece_end = ((pos / cs + 1) * cs).min(end);
            let piece = (piece_end - pos) as u32;
            let state = if changed { STATE_CHANGED } else { 0 };
            if n > 0 && extents[n - 1].1 == state {
                extents[n - 1].0 += piece;
            } else if n == max {
                return false;
            } else {
                extents[n] = (piece, state);
                n += 1;
            }
            pos = piece_end;
            pos < end
        })?;
        if n == 0 {
            return Err(Errno::Io);
        }
        Ok(n)
    }

    /// A structured reply chunk's header, the last of its reply.
    fn chunk_header(&mut self, cookie: u64, kind: u16, len: u32) {
        self.chunk_header_flags(cookie, REPLY_FLAG_DONE, kind, len);
    }

    fn chunk_header_flags(&mut self, cookie: u64, flags: u16, kind: u16, len: u32) {
        self.put(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        self.put(&flags.to_be_bytes());
        self.put(&kind.to_be_bytes());
        self.put(&cookie.to_be_bytes());
        self.put(&len.to_be_bytes());
    }

    fn slot_wants_data(&self, slot: u16) -> bool {
        self.slots
            .get(usize::from(slot))
            .is_some_and(|s| s.busy && s.kind == Kind::Write && s.result.is_none())
    }

    fn payload_done(&mut self, slot: u16) {
        if let Some(s) = self.slots.get_mut(usize::from(slot)) {
            s.payload_pending = false;
            if s.result.is_some() {
                self.push_ready(slot);
            }
        }
    }

    fn free_slot(&self) -> Option<u16> {
        self.slots.iter().position(|s| !s.busy).map(|i| i as u16)
    }

    fn free(&mut self, slot: u16) {
        if let Some(s) = self.slots.get_mut(usize::from(slot)) {
            *s = FREE_SLOT;
        }
    }

    fn push_ready(&mut self, slot: u16) {
        // Each busy slot is queued at most once, so the ring never overflows.
        if self.ready_len < MAX_IN_FLIGHT {
            self.ready[(self.ready_head + self.ready_len) % MAX_IN_FLIGHT] = slot;
            self.ready_len += 1;
        }
    }

    fn pop_ready(&mut self) -> Option<u16> {
        if self.ready_len == 0 {
            return None;
        }
        let slot = self.ready[self.ready_head];
        self.ready_head = (self.ready_head + 1) % MAX_IN_FLIGHT;
        self.ready_len -= 1;
        Some(slot)
    }

    // --- buffers ---------------------------------------------------------------------

    /// Copies input into `acc` until it holds `want` bytes; true when it does.
    fn fill(&mut self, rest: &[u8], pos: &mut usize, want: usize) -> bool {
        let take = want.saturating_sub(self.acc_len).min(rest.len());
        self.acc[self.acc_len..self.acc_len + take].copy_from_slice(&rest[..take]);
        self.acc_len += take;
        *pos += take;
        self.acc_len == want
    }

    fn stage_free(&self) -> usize {
        STAGE_CAP - (self.stage_end - self.stage_start)
    }

    /// Appends to the stage. Callers make room first (`OPTION_REPLY_MAX` before an option,
    /// one reply header at a time in transmission); bytes that would not fit are dropped.
    fn put(&mut self, bytes: &[u8]) {
        if self.stage_end + bytes.len() > STAGE_CAP {
            self.stage.copy_within(self.stage_start..self.stage_end, 0);
            self.stage_end -= self.stage_start;
            self.stage_start = 0;
        }
        let n = bytes.len().min(STAGE_CAP - self.stage_end);
        self.stage[self.stage_end..self.stage_end + n].copy_from_slice(&bytes[..n]);
        self.stage_end += n;
    }

    fn close(&mut self, error: NbdError) -> NbdError {
        self.state = State::Closed;
        error
    }
}

fn done(consumed: usize) -> Received<'static> {
    Received {
        consumed,
        event: None,
    }
}

/// The message of a structured error reply (at most 64 bytes).
fn error_message(error: u32) -> &'static str {
    match error {
        e if e == Errno::Perm as u32 => "read-only export",
        e if e == Errno::Io as u32 => "I/O error",
        e if e == Errno::NoMem as u32 => "out of memory",
        e if e == Errno::Inval as u32 => "invalid request",
        e if e == Errno::NoSpc as u32 => "past the end of the export",
        e if e == Errno::Overflow as u32 => "request too large",
        e if e == Errno::NotSup as u32 => "not supported",
        e if e == Errno::Shutdown as u32 => "server shutting down",
        _ => "error",
    }
}

/// The transmission flags of an export, for a client that did (`structured`) or did not
/// negotiate structured replies.
pub fn transmission_flags(export: &ExportInfo, structured: bool) -> u16 {
    let mut flags = TX_HAS_FLAGS | TX_SEND_CACHE;
    if export.read_only {
        flags |= TX_READ_ONLY;
    } else {
        flags |= TX_SEND_WRITE_ZEROES;
    }
    if structured {
        flags |= TX_SEND_DF;
    }
    if export.multi_conn {
        flags |= TX_CAN_MULTI_CONN;
    }
    if export.flush {
        flags |= TX_SEND_FLUSH;
    }
    if export.fua {
        flags |= TX_SEND_FUA;
    }
    if export.trim && !export.read_only {
        flags |= TX_SEND_TRIM;
    }
    flags
}

/// A metadata context chosen by `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Meta {
    /// `base:allocation`.
    Allocation,
    /// `snapfw:changed:NAME`, by the catalog's key of snapshot NAME.
    Changed(u32),
}

/// Checks `NBD_OPT_LIST_META_CONTEXT`/`SET_META_CONTEXT` data: export name length, name,
/// number of queries, each query's length and bytes, nothing more. Returns (name length,
/// number of queries).
fn parse_meta(data: &[u8]) -> Option<(usize, usize)> {
    if data.len() < 8 {
        return None;
    }
    let name_len = be32(data, 0) as usize;
    if name_len > data.len() - 8 {
        return None;
    }
    let queries = be32(data, 4 + name_len) as usize;
    let mut at = 4 + name_len + 4;
    for _ in 0..queries {
        if data.len() - at < 4 {
            return None;
        }
        let len = be32(data, at) as usize;
        if len > data.len() - at - 4 {
            return None;
        }
        at += 4 + len;
    }
    (at == data.len()).then_some((name_len, queries))
}

/// Checks `NBD_OPT_INFO`/`NBD_OPT_GO` data: name length, name, request count, requests,
/// nothing more. Returns (name length, number of information requests).
fn parse_info(data: &[u8]) -> Option<(usize, usize)> {
    if data.len() < 6 {
        return None;
    }
    let name_len = be32(data, 0) as usize;
    if name_len > data.len() - 6 {
        return None;
    }
    let requests = usize::from(be16(data, 4 + name_len));
    (data.len() == 4 + name_len + 2 + 2 * requests).then_some((name_len, requests))
}

/// The error of the first check that refuses (`(true, errno)`), if any.
fn refusal(checks: &[(bool, Errno)]) -> Result<(), Errno> {
    match checks.iter().find(|(refused, _)| *refused) {
        Some(&(_, errno)) => Err(errno),
        None => Ok(()),
    }
}
