//! Host tests of the NBD connection: a scripted client for every handshake path, every
//! command and every bad input, plus a property test over arbitrary byte streams.

use std::collections::HashMap;

use super::connection::{MAX_EXTENTS, MAX_SCAN_CHUNKS, OPTION_DATA_MAX, OPTION_SKIP_MAX};
use super::proto::*;
use super::*;

// --- a catalog and a glue stand-in -------------------------------------------------------

struct Catalog {
    exports: Vec<(String, ExportInfo)>,
    /// Snapshot "s1" of "vda" (key 11) and "snap1" (key 12, its own export): their changed
    /// 4 KiB chunks; a key missing here is a snapshot that is gone.
    changed: HashMap<u32, std::collections::BTreeSet<u64>>,
}

impl ExportCatalog for Catalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.exports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, info)| *info)
    }
    fn name(&self, index: usize) -> Option<ExportName> {
        self.exports
            .get(index)
            .map(|(n, _)| ExportName::from_str_truncated(n))
    }
    fn description(&self, export: &ExportInfo) -> Option<ExportName> {
        (export.handle == 1).then(|| ExportName::from_str_truncated("virtio disk"))
    }
    fn changed_snapshot(&self, export: &ExportInfo, index: usize) -> Option<ExportName> {
        let names: &[&str] = match export.handle {
            1 => &["s1", "s2"],
            3 => &["snap1"],
            _ => &[],
        };
        names.get(index).map(|n| ExportName::from_str_truncated(n))
    }
    fn changed_key(&self, export: &ExportInfo, name: &str) -> Option<u32> {
        match (export.handle, name) {
            (1, "s1") => Some(11),
            (1, "s2") => Some(13),
            (3, "snap1") => Some(12),
            _ => None,
        }
    }
    fn changed_chunk_bytes(&self, _: &ExportInfo, key: u32) -> Result<u64, Errno> {
        self.changed.get(&key).map(|_| 4096).ok_or(Errno::Io)
    }
    fn changed_chunks(
        &self,
        _: &ExportInfo,
        key: u32,
        first: u64,
        count: u64,
        each: &mut dyn FnMut(bool) -> bool,
    ) -> Result<(), Errno> {
        let set = self.changed.get(&key).ok_or(Errno::Io)?;
        for c in first..first + count {
            if !each(set.contains(&c)) {
                break;
            }
        }
        Ok(())
    }
}

const MIB: u64 = 1 << 20;

/// The transmission flags of every writable export of [`catalog`] but "plain", before its
/// own (flush, FUA, trim): cache and write-zeroes offered, multi-conn.
const WRITABLE: u16 = TX_HAS_FLAGS | TX_SEND_CACHE | TX_SEND_WRITE_ZEROES | TX_CAN_MULTI_CONN;

fn info(handle: u64, size: u64, block_size: u32) -> ExportInfo {
    ExportInfo {
        handle,
        size,
        block_size,
        read_only: false,
        flush: true,
        fua: true,
        trim: true,
        multi_conn: true,
        max_payload: 0,
    }
}

fn catalog() -> Catalog {
    Catalog {
        exports: vec![
            ("vda".into(), info(1, 64 * MIB, 512)),
            ("nvme0n1".into(), info(2, 16 * MIB, 4096)),
            (
                "snap1".into(),
                ExportInfo {
                    read_only: true,
                    trim: false,
                    ..info(3, 64 * MIB, 512)
                },
            ),
            (
                "plain".into(),
                ExportInfo {
                    flush: false,
                    fua: false,
                    trim: false,
                    multi_conn: false,
                    ..info(4, MIB, 512)
                },
            ),
        ],
        changed: HashMap::from([
            (11, [1, 2, 5].into_iter().chain(1000..1100).collect()),
            (12, (0..200).step_by(2).collect()),
        ]),
    }
}

/// An event with its data owned (write payload pieces are joined).
#[derive(Clone, Debug, PartialEq)]
enum Ev {
    Export(u64),
    Read(u16, u64, u32),
    Write(u16, u64, u32, bool, Vec<u8>),
    Flush(u16),
    Trim(u16, u64, u32, bool),
    Zero(u16, u64, u32, bool),
    Disconnect,
}

/// The byte a fake disk holds at `offset` (what read replies carry).
fn disk_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(7) ^ (offset >> 9)) as u8
}

struct Harness {
    conn: Box<Connection>,
    catalog: Catalog,
    /// Everything the server sent.
    out: Vec<u8>,
    events: Vec<Ev>,
    /// Complete requests as soon as they arrive (writes when their payload is in).
    auto: bool,
    /// Offset of each read in flight, to produce its data.
    reads: HashMap<u16, u64>,
    /// Input chunk size (to exercise split headers); 0 = all at once.
    chunk: usize,
    error: Option<NbdError>,
}

impl Harness {
    fn new() -> Harness {
        Harness::with(ConnectionConfig::default())
    }

    fn with(config: ConnectionConfig) -> Harness {
        let mut h = Harness {
            conn: Box::new(Connection::new(config)),
            catalog: catalog(),
            out: Vec::new(),
            events: Vec::new(),
            auto: true,
            reads: HashMap::new(),
            chunk: 0,
            error: None,
        };
        h.pump();
        h
    }

    /// A harness past the greeting and client flags.
    fn negotiated(client_flags: u32) -> Harness {
        let mut h = Harness::new();
        assert_eq!(h.take().len(), GREETING_LEN);
        h.send(&client_flags.to_be_bytes());
        h
    }

    /// A harness in transmission on `export` (via GO).
    fn serving(export: &str) -> Harness {
        let mut h = Harness::negotiated(3);
        h.send(&option(OPT_GO, &info_data(export, &[])));
        let replies = parse_option_replies(&h.take());
        assert_eq!(replies.last().map(|r| r.1), Some(REP_ACK), "{export}");
        assert!(h.conn.in_transmission());
        h.events.clear();
        h
    }

    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Feeds `bytes` (in chunks if set), handling every event, and pumps the output.
    /// Returns the number of bytes the connection did not take (back-pressure).
    fn send(&mut self, bytes: &[u8]) -> usize {
        let mut rest = bytes;
        let chunk = if self.chunk == 0 {
            bytes.len().max(1)
        } else {
            self.chunk
        };
        while !rest.is_empty() {
            let piece = &rest[..chunk.min(rest.len())];
            let taken = self.feed(piece);
            rest = &rest[taken..];
            if taken < piece.len() {
                break;
            }
        }
        rest.len()
    }

    /// Feeds one buffer until the connection takes no more; returns bytes taken.
    fn feed(&mut self, input: &[u8]) -> usize {
        let mut pos = 0;
        loop {
            self.pump();
            if self.error.is_some() {
                return pos;
            }
            match self.conn.receive(&input[pos..], &self.catalog) {
                Err(e) => {
                    self.error = Some(e);
                    return pos;
                }
                Ok(Received { consumed, event }) => {
                    pos += consumed;
                    let got = event.is_some();
                    if let Some(event) = event {
                        self.handle(event);
                    }
                    if !got && consumed == 0 {
                        self.pump();
                        return pos;
                    }
                }
            }
        }
    }

    fn handle(&mut self, event: Event<'_>) {
        let conn = &mut self.conn;
        match event {
            Event::Export(e) => self.events.push(Ev::Export(e.handle)),
            Event::Read { slot, offset, len } => {
                self.events.push(Ev::Read(slot, offset, len));
                self.reads.insert(slot, offset);
                if self.auto {
                    conn.complete(slot, Ok(())).unwrap();
                }
            }
            Event::Write {
                slot,
                offset,
                len,
                fua,
            } => self
                .events
                .push(Ev::Write(slot, offset, len, fua, Vec::new())),
            Event::WriteData {
                slot,
                at,
                data,
                last,
            } => {
                let Some(Ev::Write(s, _, len, _, buf)) = self
                    .events
                    .iter_mut()
                    .rev()
                    .find(|e| matches!(e, Ev::Write(s, ..) if *s == slot))
                else {
                    panic!("data for slot {slot} without a write");
                };
                assert_eq!(*s, slot);
                assert_eq!(at as usize, buf.len());
                buf.extend_from_slice(data);
                assert!(buf.len() <= *len as usize);
                assert_eq!(last, buf.len() == *len as usize);
                if last && self.auto {
                    conn.complete(slot, Ok(())).unwrap();
                }
            }
            Event::Flush { slot } => {
                self.events.push(Ev::Flush(slot));
                if self.auto {
                    conn.complete(slot, Ok(())).unwrap();
                }
            }
            Event::Trim {
                slot,
                offset,
                len,
                fua,
            } => {
                self.events.push(Ev::Trim(slot, offset, len, fua));
                if self.auto {
                    conn.complete(slot, Ok(())).unwrap();
                }
            }
            Event::WriteZeroes {
                slot,
                offset,
                len,
                fua,
            } => {
                self.events.push(Ev::Zero(slot, offset, len, fua));
                if self.auto {
                    conn.complete(slot, Ok(())).unwrap();
                }
            }
            Event::Disconnect => self.events.push(Ev::Disconnect),
        }
    }

    fn pump(&mut self) {
        loop {
            match self.conn.poll_transmit(&self.catalog) {
                Transmit::Bytes(b) => {
                    let n = b.len();
                    self.out.extend_from_slice(b);
                    assert_eq!(self.conn.transmitted(n), None);
                }
                Transmit::ReadData { slot, at, len } => {
                    let base = self.reads[&slot] + u64::from(at);
                    self.out
                        .extend((0..u64::from(len)).map(|i| disk_byte(base + i)));
                    assert_eq!(self.conn.transmitted(len as usize), Some(slot));
                    self.reads.remove(&slot);
                }
                Transmit::Idle => return,
            }
        }
    }

    fn complete(&mut self, slot: u16, result: Result<(), Errno>) {
        self.conn.complete(slot, result).unwrap();
        self.pump();
    }
}

// --- client-side message builders and parsers --------------------------------------------

fn option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

use super::fake::request;

/// (option, reply type, data) for each option reply in `bytes` (which must hold only those).
fn parse_option_replies(mut bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut replies = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= OPTION_REPLY_HEADER_LEN, "{bytes:?}");
        assert_eq!(be64(bytes, 0), OPTION_REPLY_MAGIC);
        let len = be32(bytes, 16) as usize;
        replies.push((
            be32(bytes, 8),
            be32(bytes, 12),
            bytes[20..20 + len].to_vec(),
        ));
        bytes = &bytes[20 + len..];
    }
    replies
}

/// (error, cookie) of each simple reply; `data` gives each read cookie's data length.
fn parse_simple_replies(mut bytes: &[u8], data: &HashMap<u64, u32>) -> Vec<(u32, u64, Vec<u8>)> {
    let mut replies = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= SIMPLE_REPLY_LEN);
        assert_eq!(be32(bytes, 0), SIMPLE_REPLY_MAGIC);
        let error = be32(bytes, 4);
        let cookie = be64(bytes, 8);
        let n = if error == 0 {
            data.get(&cookie).copied().unwrap_or(0) as usize
        } else {
            0
        };
        replies.push((error, cookie, bytes[16..16 + n].to_vec()));
        bytes = &bytes[16 + n..];
    }
    replies
}

/// The single reply to one request without data.
fn one_reply(h: &mut Harness) -> (u32, u64) {
    let replies = parse_simple_replies(&h.take(), &HashMap::new());
    assert_eq!(replies.len(), 1, "{replies:?}");
    (replies[0].0, replies[0].1)
}

// --- handshake ---------------------------------------------------------------------------

#[test]
fn greeting_offers_fixed_newstyle_and_no_zeroes() {
    let mut h = Harness::new();
    let g = h.take();
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(be16(&g, 16), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    assert!(!h.conn.in_transmission());
}

#[test]
fn unknown_client_flags_close() {
    for flags in [4u32, 0x8000_0000, 0xffff_ffff] {
        let mut h = Harness::negotiated(flags);
        assert_eq!(h.error, Some(NbdError::BadClientFlags(flags)));
        assert!(h.conn.is_closed());
        assert_eq!(
            h.conn.receive(&[0], &h.catalog),
            Err(NbdError::Closed),
            "a closed connection stays closed"
        );
    }
    // A client without FIXED_NEWSTYLE (plain newstyle) is served.
    let mut h = Harness::negotiated(0);
    h.send(&option(OPT_EXPORT_NAME, b"vda"));
    assert_eq!(h.error, None);
    assert_eq!(h.take().len(), 8 + 2 + EXPORT_NAME_PADDING);
}

#[test]
fn export_name_with_and_without_zeroes() {
    for (flags, padding) in [(1u32, EXPORT_NAME_PADDING), (3, 0)] {
        let mut h = Harness::negotiated(flags);
        h.send(&option(OPT_EXPORT_NAME, b"nvme0n1"));
        let out = h.take();
        assert_eq!(out.len(), 10 + padding);
        assert_eq!(be64(&out, 0), 16 * MIB);
        assert_eq!(
            be16(&out, 8),
            WRITABLE | TX_SEND_FLUSH | TX_SEND_FUA | TX_SEND_TRIM
        );
        assert!(out[10..].iter().all(|&b| b == 0));
        assert_eq!(h.events, [Ev::Export(2)]);
        assert!(h.conn.in_transmission());
        assert_eq!(h.conn.block_sizes().minimum, 4096);
    }
}

#[test]
fn export_name_unknown_or_bad_closes() {
    let mut h = Harness::negotiated(3);
    h.send(&option(OPT_EXPORT_NAME, b"nope"));
    assert_eq!(h.error, Some(NbdError::UnknownExport));
    assert!(h.take().is_empty());
    let mut h = Harness::negotiated(3);
    h.send(&option(OPT_EXPORT_NAME, &[0xff, 0xfe]));
    assert_eq!(h.error, Some(NbdError::BadExportName));
    let mut h = Harness::negotiated(3);
    h.send(&option(OPT_EXPORT_NAME, &vec![b'a'; OPTION_DATA_MAX + 1]));
    assert_eq!(
        h.error,
        Some(NbdError::OptionTooLong {
            option: OPT_EXPORT_NAME,
            len: OPTION_DATA_MAX as u32 + 1
        })
    );
}

#[test]
fn go_sends_export_and_block_size_then_transmits() {
    let mut h = Harness::negotiated(3);
    h.send(&option(OPT_GO, &info_data("vda", &[INFO_BLOCK_SIZE])));
    let r = parse_option_replies(&h.take());
    assert_eq!(r.len(), 3, "{r:?}");
    assert!(r.iter().all(|(opt, ..)| *opt == OPT_GO));
    assert_eq!((r[0].1, be16(&r[0].2, 0)), (REP_INFO, INFO_EXPORT));
    assert_eq!(r[0].2.len(), 12);
    assert_eq!(be64(&r[0].2, 2), 64 * MIB);
    assert_eq!(
        be16(&r[0].2, 10),
        WRITABLE | TX_SEND_FLUSH | TX_SEND_FUA | TX_SEND_TRIM
    );
    assert_eq!((r[1].1, be16(&r[1].2, 0)), (REP_INFO, INFO_BLOCK_SIZE));
    assert_eq!(r[1].2.len(), 14);
    assert_eq!(
        (be32(&r[1].2, 2), be32(&r[1].2, 6), be32(&r[1].2, 10)),
        (512, 4096, 1 << 25)
    );
    assert_eq!((r[2].1, r[2].2.len()), (REP_ACK, 0));
    assert_eq!(h.events, [Ev::Export(1)]);
    assert!(h.conn.in_transmission());
    assert_eq!(h.conn.export().map(|e| e.handle), Some(1));
}

#[test]
fn go_name_and_description_when_asked_and_read_only_flags() {
    let mut h = Harness::negotiated(3);
    h.send(&option(
        OPT_GO,
        &info_data("vda", &[INFO_NAME, 77, INFO_DESCRIPTION]),
    ));
    let r = parse_option_replies(&h.take());
    let items: Vec<u16> = r
        .iter()
        .filter(|x| x.1 == REP_INFO)
        .map(|x| be16(&x.2, 0))
        .collect();
    assert_eq!(
        items,
        [INFO_EXPORT, INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]
    );
    assert_eq!(&r[2].2[2..], b"vda");
    assert_eq!(&r[3].2[2..], b"virtio disk");

    let mut h = Harness::negotiated(3);
    h.send(&option(OPT_INFO, &info_data("snap1", &[INFO_DESCRIPTION])));
    let r = parse_option_replies(&h.take());
    assert_eq!(r.len(), 3, "no description for this export");
    assert_eq!(
        be16(&r[0].2, 10),
        TX_HAS_FLAGS
            | TX_SEND_CACHE
            | TX_CAN_MULTI_CONN
            | TX_READ_ONLY
            | TX_SEND_FLUSH
            | TX_SEND_FUA
    );
    let mut h = Harness::negotiated(3);
    h.send(&option(OPT_INFO, &info_data("plain", &[])));
    let r = parse_option_replies(&h.take());
    assert_eq!(
        be16(&r[0].2, 10),
        TX_HAS_FLAGS | TX_SEND_CACHE | TX_SEND_WRITE_ZEROES
    );
}

#[test]
fn info_does_not_end_the_handshake_and_go_follows() {
    let mut h = Harness::negotiated(3);
    h.send(&option(OPT_INFO, &info_data("vda", &[INFO_BLOCK_SIZE])));
    let info = parse_option_replies(&h.take());
    assert_eq!(info.last().unwrap().1, REP_ACK);
    assert!(!h.conn.in_transmission());
    assert!(h.events.is_empty());
    h.send(&option(OPT_GO, &info_data("vda", &[INFO_BLOCK_SIZE])));
    let go = parse_option_replies(&h.take());
    // Same information for the same parameters (spec: INFO then GO).
    let strip =
        |v: &[(u32, u32, Vec<u8>)]| v.iter().map(|x| (x.1, x.2.clone())).collect::<Vec<_>>();
    assert_eq!(strip(&info), strip(&go));
    assert!(h.conn.in_transmission());
}

#[test]
fn go_unknown_export_then_retry() {
    let mut h = Harness::negotiated(3);
    h.send(&option(OPT_GO, &info_data("nope", &[])));
    let r = parse_option_replies(&h.take());
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].1, REP_ERR_UNKNOWN);
    assert!(!h.conn.in_transmission());
    h.send(&option(OPT_GO, &info_data("", &[])));
    assert_eq!(
        parse_option_replies(&h.take())[0].1,
        REP_ERR_UNKNOWN,
        "no default export"
    );
    h.send(&option(OPT_GO, &info_data("snap1", &[])));
    assert_eq!(parse_option_replies(&h.take()).last().unwrap().1, REP_ACK);
    assert_eq!(h.events, [Ev::Export(3)]);
}

#[test]
fn go_malformed_data_is_invalid() {
    let good = info_data("vda", &[INFO_NAME]);
    let mut cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0, 0, 0, 0, 0],
        {
            let mut d = good.clone();
            d[3] = 200; // name longer than the data
            d
        },
        {
            let mut d = good.clone();
            d.push(0); // trailing byte
            d
        },
        {
            let mut d = good.clone();
            d.pop(); // half a request
            d
        },
        {
            let mut d = good.clone();
            let n = d.len();
            d[n - 3] = 2; // request count does not match the data
            d
        },
        info_data("\u{0}\u{ff}", &[])
            .into_iter()
            .map(|b| if b == 0xc3 { 0xff } else { b })
            .collect(),
    ];
    cases.push(vec![0xff; 6]);
    for (i, data) in cases.iter().enumerate() {
        for opt in [OPT_INFO, OPT_GO] {
            let mut h = Harness::negotiated(3);
            h.send(&option(opt, data));
            let r = parse_option_replies(&h.take());
            assert_eq!(r.len(), 1, "case {i}");
            assert_eq!((r[0].0, r[0].1), (opt, REP_ERR_INVALID), "case {i}");
            assert!(!r[0].2.is_empty(), "error replies carry a message");
        }
    }
    let mut h = Harness::negotiated(3);
    h.send(&option(OPT_GO, &good));
    assert!(h.conn.in_transmission());
}

#[test]
fn list_names_every_export_even_past_the_stage() {
    let mut h = Harness::negotiated(3);
    h.catalog.exports = (0..100)
        .map(|i| (format!("{i:060}"), info(i, MIB, 512)))
        .collect();
    h.send(&option(OPT_LIST, &[]));
    let r = parse_option_replies(&h.take());
    assert_eq!(r.len(), 101);
    for (i, (opt, kind, data)) in r[..100].iter().enumerate() {
        assert_eq!((*opt, *kind), (OPT_LIST, REP_SERVER));
        assert_eq!(be32(data, 0), 60);
        assert_eq!(&data[4..], format!("{i:060}").as_bytes());
    }
    assert_eq!((r[100].1, r[100].2.len()), (REP_ACK, 0));
    // The handshake goes on.
    h.send(&option(OPT_GO, &info_data(&format!("{:060}", 42), &[])));
    assert_eq!(h.events, [Ev::Export(42)]);
}

#[test]
fn list_with_data_is_invalid_and_empty_catalog_lists_nothing() {
    let mut h = Harness::negotiated(3);
    h.send(&option(OPT_LIST, b"x"));
    let r = parse_option_replies(&h.take());
    assert_eq!((r.len(), r[0].1), (1, REP_ERR_INVALID));
    h.catalog.exports.clear();
    h.send(&option(OPT_LIST, &[]));
    let r = parse_option_replies(&h.take());
    assert_eq!((r.len(), r[0].1), (1, REP_ACK));
}

#[test]
fn abort_acks_and_finishes() {
    for data in [vec![], vec![1, 2, 3], vec![0; OPTION_DATA_MAX + 10]] {
        let mut h = Harness::negotiated(3);
        h.send(&option(OPT_ABORT, &data));
        let r = parse_option_replies(&h.take());
        assert_eq!(r, [(OPT_ABORT, REP_ACK, vec![])]);
        assert_eq!(h.events, [Ev::Disconnect]);
        assert!(h.conn.is_finished());
        // Whatever the client still sends is ignored.
        assert_eq!(h.send(&option(OPT_GO, &info_data("vda", &[]))), 0);
        assert!(h.take().is_empty());
        assert_eq!(h.error, None);
    }
}

#[test]
fn unsupported_options_get_err_unsup() {
    let mut h = Harness::negotiated(3);
    for opt in [OPT_STARTTLS, 0, 4, 11, 999, u32::MAX] {
        h.send(&option(opt, b""));
        let r = parse_option_replies(&h.take());
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].0, r[0].1), (opt, REP_ERR_UNSUP), "option {opt}");
    }
    // Unknown option with data, and too long to buffer: skipped, still UNSUP.
    h.send(&option(1234, &[7; 100]));
    h.send(&option(1234, &vec![7; OPTION_DATA_MAX * 3]));
    let r = parse_option_replies(&h.take());
    assert_eq!(
        r.iter().map(|x| x.1).collect::<Vec<_>>(),
        [REP_ERR_UNSUP; 2]
    );
    // A known option too long to buffer: TOO_BIG, and the handshake goes on.
    let mut long = info_data(&"v".repeat(OPTION_DATA_MAX), &[]);
    long.truncate(OPTION_DATA_MAX + 5);
    h.send(&option(OPT_GO, &long));
    let r = parse_option_replies(&h.take());
    assert_eq!((r.len(), r[0].1), (1, REP_ERR_TOO_BIG));
    h.send(&option(OPT_GO, &info_data("vda", &[])));
    assert!(h.conn.in_transmission());
    assert_eq!(h.error, None);
}

#[test]
fn absurd_option_lengths_close_without_reading() {
    let mut h = Harness::negotiated(3);
    let mut header = option(OPT_INFO, &[]);
    header[12..16].copy_from_slice(&(OPTION_SKIP_MAX + 1).to_be_bytes());
    h.send(&header);
    assert_eq!(
        h.error,
        Some(NbdError::OptionTooLong {
            option: OPT_INFO,
            len: OPTION_SKIP_MAX + 1
        })
    );
    let mut h = Harness::negotiated(3);
    let mut bad = option(OPT_GO, &[]);
    bad[0] = b'X';
    h.send(&bad);
    assert!(matches!(h.error, Some(NbdError::BadOptionMagic(_))));
    assert!(h.error.unwrap().to_string().contains("IHAVEOPT"));
}

// --- transmission ------------------------------------------------------------------------

fn read_lengths(cookies: &[(u64, u32)]) -> HashMap<u64, u32> {
    cookies.iter().copied().collect()
}

#[test]
fn read_returns_data_with_cookie() {
    let mut h = Harness::serving("vda");
    h.send(&request(0, CMD_READ, 0xdead_beef_0000_0001, 4096, 8192));
    assert_eq!(h.events, [Ev::Read(0, 4096, 8192)]);
    let r = parse_simple_replies(&h.take(), &read_lengths(&[(0xdead_beef_0000_0001, 8192)]));
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].0, r[0].1), (0, 0xdead_beef_0000_0001));
    let expected: Vec<u8> = (4096..4096 + 8192).map(disk_byte).collect();
    assert_eq!(r[0].2, expected);
    assert_eq!(h.conn.in_flight(), 0);
}

#[test]
fn read_error_sends_no_data() {
    let mut h = Harness::serving("vda");
    h.auto = false;
    h.send(&request(0, CMD_READ, 5, 0, 512));
    h.complete(0, Err(Errno::Io));
    assert_eq!(one_reply(&mut h), (Errno::Io as u32, 5));
    assert_eq!(h.conn.in_flight(), 0);
}

#[test]
fn write_passes_payload_in_pieces() {
    for chunk in [0, 1, 7, 28, 1000] {
        let mut h = Harness::serving("vda");
        h.chunk = chunk;
        let payload: Vec<u8> = (0..4096u32).map(|i| (i * 13) as u8).collect();
        let mut msg = request(CMD_FLAG_FUA, CMD_WRITE, 9, 512 * 3, 4096);
        msg.extend_from_slice(&payload);
        msg.extend_from_slice(&request(0, CMD_WRITE, 10, 0, 512));
        msg.extend_from_slice(&[0xaa; 512]);
        assert_eq!(h.send(&msg), 0);
        assert_eq!(
            h.events,
            [
                Ev::Write(0, 1536, 4096, true, payload.clone()),
                Ev::Write(0, 0, 512, false, vec![0xaa; 512])
            ],
            "chunk {chunk}"
        );
        let r = parse_simple_replies(&h.take(), &HashMap::new());
        assert_eq!(
            r.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(),
            [(0, 9), (0, 10)]
        );
    }
}

#[test]
fn payload_pending_lets_the_glue_take_part_of_the_input() {
    let mut h = Harness::serving("vda");
    let mut msg = request(0, CMD_WRITE, 1, 0, 1024);
    msg.extend_from_slice(&[5; 1024]);
    let r = h.conn.receive(&msg, &h.catalog).unwrap();
    assert_eq!(r.consumed, REQUEST_LEN);
    assert_eq!(h.conn.payload_pending(), Some((0, 0, 1024)));
    // The glue has room for 100 bytes only.
    let r = h.conn.receive(&msg[28..128], &h.catalog).unwrap();
    assert_eq!(r.consumed, 100);
    assert!(matches!(
        r.event,
        Some(Event::WriteData {
            at: 0,
            last: false,
            ..
        })
    ));
    assert_eq!(h.conn.payload_pending(), Some((0, 100, 1024)));
    let r = h.conn.receive(&msg[128..], &h.catalog).unwrap();
    assert!(
        matches!(r.event, Some(Event::WriteData { at: 100, last: true, data, .. }) if data.len() == 924)
    );
    assert_eq!(h.conn.payload_pending(), None);
}

#[test]
fn flush_trim_and_disconnect() {
    let mut h = Harness::serving("vda");
    h.auto = false;
    let mut msg = request(0, CMD_FLUSH, 1, 0, 0);
    msg.extend(request(CMD_FLAG_FUA, CMD_TRIM, 2, 1 << 20, 1 << 24));
    msg.extend(request(0, CMD_DISC, 3, 0, 0));
    msg.extend(request(0, CMD_READ, 4, 0, 512)); // after DISC: ignored
    assert_eq!(h.send(&msg), 0);
    assert_eq!(
        h.events,
        [
            Ev::Flush(0),
            Ev::Trim(1, 1 << 20, 1 << 24, true),
            Ev::Disconnect
        ]
    );
    assert!(!h.conn.is_finished(), "two requests still in flight");
    h.complete(1, Ok(()));
    h.complete(0, Ok(()));
    let r = parse_simple_replies(&h.take(), &HashMap::new());
    assert_eq!(
        r.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(),
        [(0, 2), (0, 1)],
        "replies in completion order"
    );
    assert!(h.conn.is_finished());
}

#[test]
fn bad_requests_get_errors_and_the_session_goes_on() {
    const EINVAL: u32 = Errno::Inval as u32;
    let size = 64 * MIB;
    let cases: &[(&str, u16, u16, u64, u32, u32)] = &[
        ("read past end", 0, CMD_READ, size - 512, 1024, EINVAL),
        ("read at end", 0, CMD_READ, size, 512, EINVAL),
        (
            "read offset overflow",
            0,
            CMD_READ,
            u64::MAX - 511,
            512,
            EINVAL,
        ),
        ("read length 0", 0, CMD_READ, 0, 0, EINVAL),
        ("read misaligned offset", 0, CMD_READ, 100, 512, EINVAL),
        ("read misaligned length", 0, CMD_READ, 0, 513, EINVAL),
        (
            "read over max payload",
            0,
            CMD_READ,
            0,
            (1 << 25) + 512,
            EINVAL,
        ),
        ("read unknown flag", 1 << 2, CMD_READ, 0, 512, EINVAL),
        ("flush with length", 0, CMD_FLUSH, 0, 512, EINVAL),
        ("flush with offset", 0, CMD_FLUSH, 512, 0, EINVAL),
        ("trim past end", 0, CMD_TRIM, size, 512, EINVAL),
        ("trim length 0", 0, CMD_TRIM, 0, 0, EINVAL),
        ("trim misaligned", 0, CMD_TRIM, 1, 512, EINVAL),
        ("cache past end", 0, CMD_CACHE, size, 512, EINVAL),
        ("cache misaligned", 0, CMD_CACHE, 0, 100, EINVAL),
        ("cache length 0", 0, CMD_CACHE, 0, 0, EINVAL),
        ("cache with FUA and NO_HOLE", 3, CMD_CACHE, 0, 512, EINVAL),
        (
            "write zeroes past end",
            0,
            CMD_WRITE_ZEROES,
            size,
            512,
            Errno::NoSpc as u32,
        ),
        ("write zeroes length 0", 0, CMD_WRITE_ZEROES, 0, 0, EINVAL),
        (
            "write zeroes misaligned",
            0,
            CMD_WRITE_ZEROES,
            0,
            513,
            EINVAL,
        ),
        (
            "write zeroes with DF",
            1 << 2,
            CMD_WRITE_ZEROES,
            0,
            512,
            EINVAL,
        ),
        ("trim with NO_HOLE", 1 << 1, CMD_TRIM, 0, 512, EINVAL),
        ("block status", 0, 7, 0, 512, EINVAL),
        ("unknown command", 0, 0xffff, 0, 0, EINVAL),
    ];
    let mut h = Harness::serving("vda");
    for (i, &(what, flags, command, offset, len, errno)) in cases.iter().enumerate() {
        h.send(&request(flags, command, i as u64, offset, len));
        assert_eq!(one_reply(&mut h), (errno, i as u64), "{what}");
    }
    assert!(h.events.is_empty(), "nothing reached the volume layer");
    assert_eq!(h.conn.in_flight(), 0);
    h.send(&request(0, CMD_READ, 99, size - 512, 512));
    assert_eq!(h.events, [Ev::Read(0, size - 512, 512)]);
}

#[test]
fn bad_writes_drop_their_payload() {
    let size = 64 * MIB;
    let cases: &[(&str, &str, u16, u64, u32, Errno)] = &[
        ("past end", "vda", 0, size - 512, 1024, Errno::NoSpc),
        ("at end", "vda", 0, size, 512, Errno::NoSpc),
        ("misaligned", "vda", 0, 3, 512, Errno::Inval),
        ("misaligned 4k", "nvme0n1", 0, 512, 4096, Errno::Inval),
        ("length 0", "vda", 0, 0, 0, Errno::Inval),
        (
            "over max payload",
            "vda",
            0,
            0,
            (1 << 20) + 512,
            Errno::Inval,
        ),
        ("unknown flag", "vda", 1 << 1, 0, 512, Errno::Inval),
        (
            "fua not offered",
            "plain",
            CMD_FLAG_FUA,
            0,
            512,
            Errno::Inval,
        ),
        ("read-only", "snap1", 0, 0, 512, Errno::Perm),
    ];
    for &(what, export, flags, offset, len, errno) in cases {
        let max = if what == "over max payload" {
            1 << 20
        } else {
            1 << 25
        };
        let mut h = Harness::with(ConnectionConfig { max_payload: max });
        h.take();
        h.send(&3u32.to_be_bytes());
        h.send(&option(OPT_GO, &info_data(export, &[])));
        h.take();
        h.events.clear();
        let mut msg = request(flags, CMD_WRITE, 7, offset, len);
        msg.extend(vec![0x55; len as usize]);
        msg.extend(request(0, CMD_READ, 8, 0, 4096));
        assert_eq!(h.send(&msg), 0, "{what}");
        let r = parse_simple_replies(&h.take(), &read_lengths(&[(8, 4096)]));
        assert_eq!(r.len(), 2, "{what}");
        assert_eq!((r[0].0, r[0].1), (errno as u32, 7), "{what}");
        assert_eq!(
            (r[1].0, r[1].1),
            (0, 8),
            "{what}: the next request is parsed"
        );
        assert!(matches!(h.events[..], [Ev::Read(_, 0, 4096)]), "{what}");
    }
}

#[test]
fn commands_the_export_does_not_offer() {
    let mut h = Harness::serving("plain");
    h.send(&request(0, CMD_FLUSH, 1, 0, 0));
    assert_eq!(one_reply(&mut h), (Errno::Inval as u32, 1));
    h.send(&request(0, CMD_TRIM, 2, 0, 512));
    assert_eq!(one_reply(&mut h), (Errno::Inval as u32, 2));
    h.send(&request(CMD_FLAG_FUA, CMD_READ, 3, 0, 512));
    assert_eq!(one_reply(&mut h), (Errno::Inval as u32, 3));
    let mut h = Harness::serving("snap1");
    h.send(&request(0, CMD_TRIM, 4, 0, 512));
    assert_eq!(one_reply(&mut h), (Errno::Perm as u32, 4));
    h.send(&request(0, CMD_FLUSH, 5, 0, 0));
    assert_eq!(
        one_reply(&mut h),
        (0, 5),
        "flush is fine on a read-only export"
    );
    h.send(&request(CMD_FLAG_FUA, CMD_READ, 6, 0, 512));
    assert_eq!(
        h.events,
        [Ev::Flush(0), Ev::Read(0, 0, 512)],
        "FUA accepted on reads"
    );
    assert!(h.events.iter().all(|e| !matches!(e, Ev::Trim(..))));
}

#[test]
fn huge_writes_and_bad_magic_close() {
    let mut h = Harness::serving("vda");
    h.send(&request(0, CMD_WRITE, 1, 0, (1 << 25) + 512));
    assert_eq!(h.error, Some(NbdError::WriteTooLarge((1 << 25) + 512)));
    assert!(h.conn.is_closed() && h.conn.is_finished());
    let mut h = Harness::serving("vda");
    let mut bad = request(0, CMD_READ, 1, 0, 512);
    bad[3] ^= 1;
    h.send(&bad);
    assert_eq!(h.error, Some(NbdError::BadRequestMagic(0x2560_9512)));
}

#[test]
fn full_slot_table_pushes_back_until_a_completion() {
    let mut h = Harness::serving("vda");
    h.auto = false;
    let mut msg = Vec::new();
    for i in 0..MAX_IN_FLIGHT as u64 + 5 {
        msg.extend(request(0, CMD_READ, 100 + i, i * 512, 512));
    }
    let left = h.send(&msg);
    assert_eq!(left, 5 * REQUEST_LEN);
    assert_eq!(h.events.len(), MAX_IN_FLIGHT);
    assert_eq!(h.conn.in_flight(), MAX_IN_FLIGHT);
    // Complete in reverse: replies come in completion order, with the right cookie and data.
    h.complete(31, Ok(()));
    h.complete(2, Err(Errno::Io));
    let lengths: HashMap<u64, u32> = (100..140).map(|c| (c, 512)).collect();
    let r = parse_simple_replies(&h.take(), &lengths);
    assert_eq!(r.len(), 2);
    assert_eq!((r[0].0, r[0].1), (0, 131));
    assert_eq!(
        r[0].2,
        (31 * 512..32 * 512).map(disk_byte).collect::<Vec<_>>()
    );
    assert_eq!((r[1].0, r[1].1, r[1].2.len()), (5, 102, 0));
    let tail = &msg[msg.len() - left..];
    assert_eq!(
        h.send(tail),
        3 * REQUEST_LEN,
        "two slots freed, two requests taken"
    );
    assert_eq!(h.events.len(), MAX_IN_FLIGHT + 2);
    assert!(matches!(h.events[MAX_IN_FLIGHT], Ev::Read(slot, _, _) if slot == 2 || slot == 31));
}

#[test]
fn early_write_error_drops_the_rest_of_the_payload() {
    let mut h = Harness::serving("vda");
    h.auto = false;
    let mut msg = request(0, CMD_WRITE, 1, 0, 2048);
    msg.extend([1; 1024]);
    h.send(&msg);
    h.complete(0, Err(Errno::Io));
    assert!(h.take().is_empty(), "no reply before the payload is in");
    assert_eq!(h.conn.payload_pending(), None, "the glue gets no more data");
    h.send(&[1; 1024]);
    assert_eq!(one_reply(&mut h), (Errno::Io as u32, 1));
    assert!(matches!(&h.events[..], [Ev::Write(0, 0, 2048, false, d)] if d.len() == 1024));
    assert_eq!(h.conn.in_flight(), 0);
}

#[test]
fn bad_completions_are_refused() {
    let mut h = Harness::serving("vda");
    h.auto = false;
    assert_eq!(h.conn.complete(0, Ok(())), Err(NbdError::BadCompletion(0)));
    assert_eq!(
        h.conn.complete(999, Ok(())),
        Err(NbdError::BadCompletion(999))
    );
    h.send(&request(0, CMD_READ, 1, 0, 512));
    h.complete(0, Ok(()));
    assert_eq!(h.conn.complete(0, Ok(())), Err(NbdError::BadCompletion(0)));
    // A locally answered request is not the glue's to complete.
    h.send(&request(0, 77, 1, 0, 0));
    assert!(h.conn.complete(0, Ok(())).is_err());
}

/// Events without slot numbers (which slot a request gets depends on when replies went out).
fn unslotted(events: &[Ev]) -> Vec<Ev> {
    events
        .iter()
        .map(|e| match e.clone() {
            Ev::Read(_, o, l) => Ev::Read(0, o, l),
            Ev::Write(_, o, l, f, d) => Ev::Write(0, o, l, f, d),
            Ev::Flush(_) => Ev::Flush(0),
            Ev::Trim(_, o, l, f) => Ev::Trim(0, o, l, f),
            e => e,
        })
        .collect()
}

#[test]
fn byte_at_a_time_and_slow_socket_give_the_same_stream() {
    let mut script = 3u32.to_be_bytes().to_vec();
    script.extend(option(OPT_LIST, &[]));
    script.extend(option(OPT_STRUCTURED_REPLY, &[]));
    script.extend(option(
        OPT_GO,
        &info_data("vda", &[INFO_BLOCK_SIZE, INFO_NAME]),
    ));
    script.extend(request(0, CMD_READ, 1, 0, 4096));
    script.extend(request(0, CMD_WRITE, 2, 512, 1024));
    script.extend([9; 1024]);
    script.extend(request(0, CMD_FLUSH, 3, 0, 0));
    script.extend(request(0, CMD_DISC, 4, 0, 0));
    let whole = {
        let mut h = Harness::new();
        h.send(&script);
        (h.out, unslotted(&h.events))
    };
    let mut h = Harness::new();
    h.chunk = 1;
    h.send(&script);
    assert_eq!((h.out.clone(), unslotted(&h.events)), whole);
    assert!(h.conn.is_finished());
    // A socket that takes 3 bytes at a time.
    let mut h = Harness::new();
    let mut out = h.take();
    let mut pos = 0;
    loop {
        let mut progressed = false;
        if pos < script.len() {
            let r = h.conn.receive(&script[pos..], &h.catalog).unwrap();
            pos += r.consumed;
            progressed |= r.consumed > 0 || r.event.is_some();
            if let Some(e) = r.event {
                h.handle(e);
            }
        }
        match h.conn.poll_transmit(&h.catalog) {
            Transmit::Bytes(b) => {
                let n = b.len().min(3);
                out.extend_from_slice(&b[..n]);
                h.conn.transmitted(n);
                progressed = true;
            }
            Transmit::ReadData { slot, at, len } => {
                let n = len.min(3);
                let base = h.reads[&slot] + u64::from(at);
                out.extend((0..u64::from(n)).map(|i| disk_byte(base + i)));
                h.conn.transmitted(n as usize);
                progressed = true;
            }
            Transmit::Idle => {}
        }
        if !progressed {
            break;
        }
    }
    assert_eq!((out, unslotted(&h.events)), whole);
    assert!(h.conn.is_finished());
}

#[test]
fn errors_print_one_line() {
    for e in [
        NbdError::BadClientFlags(4),
        NbdError::BadOptionMagic(1),
        NbdError::OptionTooLong { option: 7, len: 9 },
        NbdError::UnknownExport,
        NbdError::BadExportName,
        NbdError::BadRequestMagic(1),
        NbdError::WriteTooLarge(1 << 30),
        NbdError::BadCompletion(3),
        NbdError::Closed,
    ] {
        let s = e.to_string();
        assert!(!s.is_empty() && !s.contains('\n'), "{s}");
    }
}

// --- property test -----------------------------------------------------------------------

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// Pieces a stream is built from: mostly well-formed messages with arbitrary fields, so
    /// that the fuzzer gets past the magics, plus raw junk.
    #[derive(Clone, Debug)]
    enum Piece {
        Junk(Vec<u8>),
        Option(u32, Vec<u8>),
        Go(u32, String, Vec<u16>),
        Request(u16, u16, u64, u64, u32, u16),
    }

    /// A handshake-phase piece: options of every kind, rarely junk.
    fn handshake_piece() -> impl Strategy<Value = Piece> {
        let option_code = prop_oneof![0u32..12, any::<u32>()];
        prop_oneof![
            1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Piece::Junk),
            10 => (option_code, proptest::collection::vec(any::<u8>(), 0..40))
                .prop_map(|(o, d)| Piece::Option(o, d)),
            10 => go_piece(Just(OPT_INFO)),
        ]
    }

    fn go_piece(code: impl Strategy<Value = u32>) -> impl Strategy<Value = Piece> {
        (
            code,
            prop_oneof![
                3 => Just("vda".to_string()),
                2 => Just("nvme0n1".to_string()),
                2 => Just("snap1".to_string()),
                2 => Just("plain".to_string()),
                1 => "[a-z]{0,4}"
            ],
            proptest::collection::vec(0u16..5, 0..4),
        )
            .prop_map(|(o, n, r)| Piece::Go(o, n, r))
    }

    /// A transmission-phase piece: requests with mostly plausible fields, rarely junk.
    fn request_piece() -> impl Strategy<Value = Piece> {
        let command = prop_oneof![
            8 => Just(CMD_READ),
            8 => Just(CMD_WRITE),
            2 => Just(CMD_FLUSH),
            2 => Just(CMD_TRIM),
            1 => Just(CMD_DISC),
            1 => any::<u16>()
        ];
        let flags = prop_oneof![4 => Just(0u16), 2 => Just(CMD_FLAG_FUA), 1 => any::<u16>()];
        let offset = prop_oneof![
            8 => (0u64..256).prop_map(|b| b * 512),
            1 => any::<u64>(),
            1 => Just(64 * MIB - 512),
            1 => Just(16 * MIB - 4096)
        ];
        let len = prop_oneof![
            8 => (1u32..32).prop_map(|b| b * 512),
            1 => Just(0u32),
            1 => any::<u32>(),
            1 => 0u32..2000
        ];
        prop_oneof![
            1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Piece::Junk),
            30 => (flags, command, any::<u64>(), offset, len, prop_oneof![16 => Just(u16::MAX), 1 => 0u16..600])
                .prop_map(|(f, c, k, o, l, p)| Piece::Request(f, c, k, o, l, p)),
        ]
    }

    fn encode(pieces: &[Piece]) -> Vec<u8> {
        let mut s = Vec::new();
        for p in pieces {
            match p {
                Piece::Junk(b) => s.extend(b),
                Piece::Option(o, d) => s.extend(option(*o, d)),
                Piece::Go(o, n, _) if *o == OPT_EXPORT_NAME => s.extend(option(*o, n.as_bytes())),
                Piece::Go(o, n, r) => s.extend(option(*o, &info_data(n, r))),
                // A request; a write is followed by its payload (`p` = MAX) or by up to
                // `p` bytes of it (the stream then runs out of step).
                Piece::Request(f, c, k, o, l, p) => {
                    s.extend(request(*f, *c, *k, *o, *l));
                    if *c == CMD_WRITE {
                        let n = if *p == u16::MAX {
                            (*l).min(1 << 16)
                        } else {
                            u32::from(*p).min(*l)
                        };
                        s.extend((0..n).map(|i| i as u8));
                    }
                }
            }
        }
        s
    }

    proptest! {
        // 100,000 cases (about 10 s in release on one core).
        #![proptest_config(ProptestConfig { cases: 100_000, failure_persistence: None, ..ProptestConfig::default() })]

        /// Arbitrary streams, split arbitrarily, with completions in arbitrary order and
        /// a socket of arbitrary speed: no panic, no out-of-range request reaches the glue,
        /// write data adds up, the slot table and the output stay bounded.
        #[test]
        fn arbitrary_streams_100k(
            flags in prop_oneof![8 => Just(3u32), 2 => Just(1u32), 1 => any::<u32>()],
            handshake in proptest::collection::vec(handshake_piece(), 0..4),
            go in proptest::option::weighted(
                0.9,
                go_piece(prop_oneof![Just(OPT_GO), Just(OPT_INFO), Just(OPT_EXPORT_NAME)])
            ),
            requests in proptest::collection::vec(request_piece(), 0..20),
            cuts in proptest::collection::vec(1usize..200, 1..8),
            complete_order in proptest::collection::vec(any::<u8>(), 0..16),
            send_step in 1usize..5000,
        ) {
            let mut stream = flags.to_be_bytes().to_vec();
            stream.extend(encode(&handshake));
            stream.extend(encode(go.as_slice()));
            stream.extend(encode(&requests));
            let cat = catalog();
            let mut conn = Box::new(Connection::new(ConnectionConfig { max_payload: 1 << 20 }));
            let mut out_bytes = 0usize;
            let mut pending: Vec<u16> = Vec::new();
            let mut reads: HashMap<u16, u32> = HashMap::new();
            let mut writes: HashMap<u16, (u32, u32)> = HashMap::new(); // slot → (len, got)
            let mut pos = 0;
            let mut cut = 0;
            let mut steps = 0;
            let mut closed = false;
            let size_of = |h: u64| cat.exports.iter().find(|e| e.1.handle == h).map(|e| e.1.size);
            let mut size = 0u64;
            // Enough steps for the stream fed a byte at a time, and then some.
            let budget = 200_000 + 2 * stream.len();
            while steps < budget {
                steps += 1;
                let mut progressed = false;
                if !closed && pos < stream.len() {
                    let end = (pos + cuts[cut % cuts.len()]).min(stream.len());
                    cut += 1;
                    match conn.receive(&stream[pos..end], &cat) {
                        Err(_) => closed = true,
                        Ok(r) => {
                            prop_assert!(r.consumed <= end - pos);
                            pos += r.consumed;
                            progressed |= r.consumed > 0 || r.event.is_some();
                            match r.event {
                                Some(Event::Export(e)) => size = size_of(e.handle).unwrap(),
                                Some(Event::Read { slot, offset, len }) => {
                                    prop_assert!(len > 0 && len <= 1 << 20);
                                    prop_assert!(offset.checked_add(u64::from(len)).is_some_and(|e| e <= size));
                                    reads.insert(slot, len);
                                    pending.push(slot);
                                }
                                Some(Event::Write { slot, offset, len, .. }) => {
                                    prop_assert!(len > 0 && len <= 1 << 20);
                                    prop_assert!(offset.checked_add(u64::from(len)).is_some_and(|e| e <= size));
                                    writes.insert(slot, (len, 0));
                                }
                                Some(Event::WriteData { slot, at, data, last }) => {
                                    let w = writes.get_mut(&slot).unwrap();
                                    prop_assert_eq!(at, w.1);
                                    w.1 += data.len() as u32;
                                    prop_assert!(w.1 <= w.0);
                                    prop_assert_eq!(last, w.1 == w.0);
                                    if last {
                                        pending.push(slot);
                                    }
                                }
                                Some(Event::WriteZeroes { slot, offset, len, .. }) => {
                                    prop_assert!(len > 0);
                                    prop_assert!(offset.checked_add(u64::from(len)).is_some_and(|e| e <= size));
                                    pending.push(slot);
                                }
                                Some(Event::Flush { slot }) | Some(Event::Trim { slot, .. }) => {
                                    pending.push(slot)
                                }
                                Some(Event::Disconnect) | None => {}
                            }
                        }
                    }
                }
                // Complete one pending request, picked by the script.
                if !pending.is_empty() {
                    let pick = complete_order.get(steps % 16).copied().unwrap_or(0) as usize;
                    let slot = pending.remove(pick % pending.len());
                    let result = if pick.is_multiple_of(5) { Err(Errno::Io) } else { Ok(()) };
                    prop_assert!(conn.complete(slot, result).is_ok());
                    writes.remove(&slot);
                    progressed = true;
                }
                prop_assert!(conn.in_flight() <= MAX_IN_FLIGHT);
                match conn.poll_transmit(&cat) {
                    Transmit::Bytes(b) => {
                        prop_assert!(!b.is_empty() && b.len() <= 2048);
                        let n = b.len().min(send_step);
                        out_bytes += n;
                        conn.transmitted(n);
                        progressed = true;
                    }
                    Transmit::ReadData { slot, at, len } => {
                        prop_assert!(at + len <= reads[&slot]);
                        let n = (len as usize).min(send_step * 256 + 4096);
                        out_bytes += n;
                        if conn.transmitted(n).is_some() {
                            reads.remove(&slot);
                        }
                        progressed = true;
                    }
                    Transmit::Idle => {}
                }
                if !progressed && (closed || pos == stream.len()) {
                    break;
                }
            }
            prop_assert!(steps < budget, "no livelock");
            // Output is bounded by what was asked: greeting, ≤ 1 KiB per option or list
            // entry, a header per request, and read data.
            let read_data: usize = 24 * (1 << 20);
            prop_assert!(out_bytes <= 18 + stream.len() / 16 * 1024 + 4 * 1024 + read_data);
            // Everything answered, except a write whose payload the stream cut short.
            prop_assert!(closed || conn.in_flight() <= 1, "in flight: {}", conn.in_flight());
        }
    }
}

// --- structured replies ------------------------------------------------------------------

/// A harness in transmission on `export` after `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
fn structured(export: &str) -> Harness {
    let mut h = Harness::negotiated(3);
    h.send(&option(OPT_STRUCTURED_REPLY, &[]));
    // The acknowledgement, byte for byte.
    let mut ack = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    ack.extend(OPT_STRUCTURED_REPLY.to_be_bytes());
    ack.extend(REP_ACK.to_be_bytes());
    ack.extend(0u32.to_be_bytes());
    assert_eq!(h.take(), ack);
    assert!(h.conn.structured());
    h.send(&option(OPT_GO, &info_data(export, &[])));
    let r = parse_option_replies(&h.take());
    assert_eq!(r.last().map(|r| r.1), Some(REP_ACK));
    assert!(be16(&r[0].2, 10) & TX_SEND_DF != 0, "DF offered");
    h.events.clear();
    h
}

/// A structured reply chunk header: magic, flags (DONE), type, cookie, length.
fn chunk(kind: u16, cookie: u64, len: u32) -> Vec<u8> {
    let mut m = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    m.extend(REPLY_FLAG_DONE.to_be_bytes());
    m.extend(kind.to_be_bytes());
    m.extend(cookie.to_be_bytes());
    m.extend(len.to_be_bytes());
    m
}

/// A structured error chunk, byte for byte.
fn error_chunk(cookie: u64, errno: Errno, message: &str, at: Option<u64>) -> Vec<u8> {
    let kind = if at.is_some() {
        REPLY_TYPE_ERROR_OFFSET
    } else {
        REPLY_TYPE_ERROR
    };
    let extra = if at.is_some() { 8 } else { 0 };
    let mut m = chunk(kind, cookie, (6 + message.len() + extra) as u32);
    m.extend((errno as u32).to_be_bytes());
    m.extend((message.len() as u16).to_be_bytes());
    m.extend(message.as_bytes());
    if let Some(at) = at {
        m.extend(at.to_be_bytes());
    }
    m
}

#[test]
fn structured_reads_are_one_offset_data_chunk() {
    let mut h = structured("vda");
    h.send(&request(0, CMD_READ, 0x1122, 4096, 8192));
    let mut want = chunk(REPLY_TYPE_OFFSET_DATA, 0x1122, 8 + 8192);
    want.extend(4096u64.to_be_bytes());
    want.extend((4096..4096 + 8192).map(disk_byte));
    assert_eq!(h.take(), want);
    // DF is accepted on reads (a read is never fragmented).
    h.send(&request(CMD_FLAG_DF, CMD_READ, 9, 512, 512));
    let mut want = chunk(REPLY_TYPE_OFFSET_DATA, 9, 8 + 512);
    want.extend(512u64.to_be_bytes());
    want.extend((512..1024).map(disk_byte));
    assert_eq!(h.take(), want);
    assert_eq!(h.conn.in_flight(), 0);
}

#[test]
fn structured_successes_without_data_are_type_none() {
    let mut h = structured("vda");
    let mut msg = request(CMD_FLAG_FUA, CMD_WRITE, 3, 0, 512);
    msg.extend([1; 512]);
    h.send(&msg);
    assert_eq!(h.take(), chunk(REPLY_TYPE_NONE, 3, 0));
    for (command, len) in [(CMD_FLUSH, 0), (CMD_TRIM, 512), (CMD_WRITE_ZEROES, 4096)] {
        h.send(&request(0, command, 4, 0, len));
        assert_eq!(h.take(), chunk(REPLY_TYPE_NONE, 4, 0), "command {command}");
    }
    h.send(&request(0, CMD_CACHE, 5, 0, 1 << 20));
    assert_eq!(h.take(), chunk(REPLY_TYPE_NONE, 5, 0));
}

#[test]
fn structured_errors_carry_errno_message_and_offset() {
    let size = 64 * MIB;
    let mut h = structured("vda");
    // Refused while parsing: ERROR with the errno and a message.
    h.send(&request(0, CMD_READ, 1, size, 512));
    assert_eq!(
        h.take(),
        error_chunk(1, Errno::Inval, "invalid request", None)
    );
    h.send(&request(0, CMD_WRITE_ZEROES, 2, size, 512));
    assert_eq!(
        h.take(),
        error_chunk(2, Errno::NoSpc, "past the end of the export", None)
    );
    // A read the glue failed at a known byte: ERROR_OFFSET.
    h.auto = false;
    h.send(&request(0, CMD_READ, 3, 8192, 8192));
    h.conn
        .complete_at(0, Err(Errno::Io), Some(8192 + 4096))
        .unwrap();
    h.pump();
    assert_eq!(
        h.take(),
        error_chunk(3, Errno::Io, "I/O error", Some(8192 + 4096))
    );
    // An offset outside the read is not sent; nor one for a write.
    h.send(&request(0, CMD_READ, 4, 8192, 512));
    h.conn.complete_at(0, Err(Errno::Io), Some(0)).unwrap();
    h.pump();
    assert_eq!(h.take(), error_chunk(4, Errno::Io, "I/O error", None));
    let mut msg = request(0, CMD_WRITE, 5, 0, 512);
    msg.extend([0; 512]);
    h.send(&msg);
    h.conn.complete_at(0, Err(Errno::Io), Some(0)).unwrap();
    h.pump();
    assert_eq!(h.take(), error_chunk(5, Errno::Io, "I/O error", None));
    // A read-only export.
    let mut h = structured("snap1");
    h.send(&request(0, CMD_WRITE_ZEROES, 6, 0, 512));
    assert_eq!(
        h.take(),
        error_chunk(6, Errno::Perm, "read-only export", None)
    );
}

#[test]
fn structured_reply_with_data_is_invalid_and_replies_stay_simple() {
    let mut h = Harness::negotiated(3);
    h.send(&option(OPT_STRUCTURED_REPLY, &[0; 4]));
    let r = parse_option_replies(&h.take());
    assert_eq!((r.len(), r[0].1), (1, REP_ERR_INVALID));
    assert!(!h.conn.structured());
    h.send(&option(OPT_GO, &info_data("vda", &[])));
    let r = parse_option_replies(&h.take());
    assert_eq!(
        be16(&r[0].2, 10) & TX_SEND_DF,
        0,
        "no DF without structured"
    );
    h.send(&request(0, CMD_READ, 7, 0, 512));
    let r = parse_simple_replies(&h.take(), &read_lengths(&[(7, 512)]));
    assert_eq!((r[0].0, r[0].1, r[0].2.len()), (0, 7, 512));
    // DF is a flag of structured replies only.
    h.send(&request(CMD_FLAG_DF, CMD_READ, 8, 0, 512));
    assert_eq!(one_reply(&mut h), (Errno::Inval as u32, 8));
}

#[test]
fn a_client_that_never_asks_gets_simple_replies_for_every_command() {
    let mut h = Harness::serving("vda");
    assert!(!h.conn.structured());
    h.send(&request(0, CMD_WRITE_ZEROES, 1, 0, 4096));
    assert_eq!(h.events, [Ev::Zero(0, 0, 4096, false)]);
    assert_eq!(one_reply(&mut h), (0, 1));
    h.send(&request(
        CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
        CMD_WRITE_ZEROES,
        2,
        512,
        512,
    ));
    assert_eq!(h.events[1], Ev::Zero(0, 512, 512, true));
    assert_eq!(one_reply(&mut h), (0, 2));
    h.send(&request(0, CMD_CACHE, 3, 0, 512));
    assert_eq!(one_reply(&mut h), (0, 3));
    assert_eq!(
        h.events.len(),
        2,
        "cache is answered without the volume layer"
    );
    h.send(&request(0, CMD_READ, 4, size_of_vda() - 512, 1024));
    let mut want = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    want.extend((Errno::Inval as u32).to_be_bytes());
    want.extend(4u64.to_be_bytes());
    assert_eq!(h.take(), want);
}

fn size_of_vda() -> u64 {
    64 * MIB
}

#[test]
fn write_zeroes_lengths_are_not_held_to_the_payload_limit() {
    let mut h = Harness::with(ConnectionConfig { max_payload: 4096 });
    h.take();
    h.send(&3u32.to_be_bytes());
    h.send(&option(OPT_GO, &info_data("vda", &[])));
    h.take();
    h.events.clear();
    h.send(&request(0, CMD_WRITE_ZEROES, 1, 0, 32 * MIB as u32));
    assert_eq!(h.events, [Ev::Zero(0, 0, 32 * MIB as u32, false)]);
    assert_eq!(one_reply(&mut h), (0, 1));
    // Writes are.
    let mut msg = request(0, CMD_WRITE, 2, 0, 8192);
    msg.extend([0; 8192]);
    h.send(&msg);
    assert_eq!(one_reply(&mut h), (Errno::Inval as u32, 2));
}

// --- block status ------------------------------------------------------------------------

/// `NBD_OPT_LIST/SET_META_CONTEXT` data: export name, queries.
fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend(export.as_bytes());
    d.extend((queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend((q.len() as u32).to_be_bytes());
        d.extend(q.as_bytes());
    }
    d
}

/// (context id, name) of each META_CONTEXT reply, and the last reply's type.
fn meta_replies(bytes: &[u8], option: u32) -> (Vec<(u32, String)>, u32) {
    let r = parse_option_replies(bytes);
    assert!(r.iter().all(|x| x.0 == option));
    let contexts = r
        .iter()
        .filter(|x| x.1 == REP_META_CONTEXT)
        .map(|x| (be32(&x.2, 0), String::from_utf8(x.2[4..].to_vec()).unwrap()))
        .collect();
    (contexts, r.last().unwrap().1)
}

/// A structured harness past SET_META_CONTEXT with `queries`, serving `export`.
fn with_contexts(export: &str, queries: &[&str]) -> (Harness, Vec<(u32, String)>) {
    let mut h = Harness::negotiated(3);
    h.send(&option(OPT_STRUCTURED_REPLY, &[]));
    h.take();
    h.send(&option(OPT_SET_META_CONTEXT, &meta_data(export, queries)));
    let (contexts, last) = meta_replies(&h.take(), OPT_SET_META_CONTEXT);
    assert_eq!(last, REP_ACK);
    h.send(&option(OPT_GO, &info_data(export, &[])));
    h.take();
    h.events.clear();
    (h, contexts)
}

/// A block status chunk, byte for byte.
fn status_chunk(cookie: u64, done: bool, id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut m = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    m.extend((if done { REPLY_FLAG_DONE } else { 0 }).to_be_bytes());
    m.extend(REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
    m.extend(cookie.to_be_bytes());
    m.extend((4 + 8 * extents.len() as u32).to_be_bytes());
    m.extend(id.to_be_bytes());
    for (len, flags) in extents {
        m.extend(len.to_be_bytes());
        m.extend(flags.to_be_bytes());
    }
    m
}

#[test]
fn meta_contexts_need_structured_replies_and_a_known_export() {
    let mut h = Harness::negotiated(3);
    h.send(&option(
        OPT_SET_META_CONTEXT,
        &meta_data("vda", &["base:allocation"]),
    ));
    assert_eq!(
        meta_replies(&h.take(), OPT_SET_META_CONTEXT),
        (vec![], REP_ERR_INVALID)
    );
    // Listing does not choose anything: allowed before.
    h.send(&option(
        OPT_LIST_META_CONTEXT,
        &meta_data("vda", &["base:"]),
    ));
    assert_eq!(
        meta_replies(&h.take(), OPT_LIST_META_CONTEXT),
        (vec![(0, "base:allocation".to_string())], REP_ACK)
    );
    h.send(&option(OPT_STRUCTURED_REPLY, &[]));
    h.take();
    h.send(&option(
        OPT_SET_META_CONTEXT,
        &meta_data("nope", &["base:allocation"]),
    ));
    assert_eq!(
        meta_replies(&h.take(), OPT_SET_META_CONTEXT),
        (vec![], REP_ERR_UNKNOWN)
    );
    // Malformed: a query longer than the data, trailing bytes, no query count.
    let mut bad = meta_data("vda", &["base:allocation"]);
    bad.truncate(bad.len() - 1);
    let mut trailing = meta_data("vda", &[]);
    trailing.push(0);
    for data in [bad, trailing, vec![0, 0, 0, 3, b'v', b'd', b'a']] {
        h.send(&option(OPT_SET_META_CONTEXT, &data));
        assert_eq!(
            meta_replies(&h.take(), OPT_SET_META_CONTEXT),
            (vec![], REP_ERR_INVALID)
        );
    }
    assert_eq!(h.error, None);
}

#[test]
fn list_meta_context_names_every_context_of_the_export() {
    let mut h = Harness::negotiated(3);
    h.send(&option(OPT_STRUCTURED_REPLY, &[]));
    h.take();
    let list = |h: &mut Harness, export: &str, queries: &[&str]| {
        h.send(&option(OPT_LIST_META_CONTEXT, &meta_data(export, queries)));
        let (contexts, last) = meta_replies(&h.take(), OPT_LIST_META_CONTEXT);
        assert_eq!(last, REP_ACK);
        contexts
    };
    let named = |names: &[&str]| -> Vec<(u32, String)> {
        names.iter().map(|n| (0, n.to_string())).collect()
    };
    assert_eq!(
        list(&mut h, "vda", &[]),
        named(&["base:allocation", "snapfw:changed:s1", "snapfw:changed:s2"])
    );
    assert_eq!(list(&mut h, "vda", &["base:"]), named(&["base:allocation"]));
    assert_eq!(
        list(&mut h, "vda", &["snapfw:"]),
        named(&["snapfw:changed:s1", "snapfw:changed:s2"])
    );
    assert_eq!(
        list(
            &mut h,
            "vda",
            &[
                "snapfw:changed:s2",
                "qemu:dirty-bitmap:x",
                "snapfw:changed:zz"
            ]
        ),
        named(&["snapfw:changed:s2"])
    );
    // A snapshot offers its own name only; a plain export base:allocation only.
    assert_eq!(
        list(&mut h, "snap1", &[]),
        named(&["base:allocation", "snapfw:changed:snap1"])
    );
    assert_eq!(list(&mut h, "snap1", &["snapfw:changed:s1"]), named(&[]));
    assert_eq!(list(&mut h, "plain", &[]), named(&["base:allocation"]));
    // The handshake goes on.
    h.send(&option(OPT_GO, &info_data("vda", &[])));
    assert!(h.conn.in_transmission());
}

#[test]
fn set_meta_context_chooses_known_contexts_with_ids() {
    let (_, contexts) = with_contexts(
        "vda",
        &[
            "snapfw:changed:s1",
            "base:",
            "base:allocation",
            "snapfw:changed:nope",
            "snapfw:changed:s1",
            "snapfw:",
        ],
    );
    assert_eq!(
        contexts,
        vec![
            (1, "snapfw:changed:s1".to_string()),
            (2, "base:allocation".to_string())
        ]
    );
    // At most MAX_META at once.
    let (_, contexts) = with_contexts(
        "vda",
        &["base:allocation", "snapfw:changed:s1", "snapfw:changed:s2"],
    );
    assert_eq!(contexts.len(), 3);
}

#[test]
fn block_status_reports_allocation_and_changed_chunks_byte_for_byte() {
    let (mut h, _) = with_contexts("vda", &["base:allocation", "snapfw:changed:s1"]);
    h.send(&request(0, CMD_BLOCK_STATUS, 0x77, 0, 32768));
    let mut want = status_chunk(0x77, false, 1, &[(32768, 0)]);
    want.extend(status_chunk(
        0x77,
        true,
        2,
        &[(4096, 0), (8192, 1), (8192, 0), (4096, 1), (8192, 0)],
    ));
    assert_eq!(h.take(), want);
    assert!(h.events.is_empty(), "answered without the volume layer");
    // From inside a chunk, ending inside one.
    h.send(&request(0, CMD_BLOCK_STATUS, 2, 3584, 1024));
    let mut want = status_chunk(2, false, 1, &[(1024, 0)]);
    want.extend(status_chunk(2, true, 2, &[(512, 0), (512, 1)]));
    assert_eq!(h.take(), want);
    // REQ_ONE: one extent each.
    h.send(&request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 3, 4096, 65536));
    let mut want = status_chunk(3, false, 1, &[(65536, 0)]);
    want.extend(status_chunk(3, true, 2, &[(8192, 1)]));
    assert_eq!(h.take(), want);
    // Refusals: past the end, misaligned, length 0, unknown flag.
    let size = 64 * MIB;
    for (flags, offset, len) in [
        (0, size, 512),
        (0, 0, 100),
        (0, 0, 0),
        (CMD_FLAG_DF, 0, 512),
    ] {
        h.send(&request(flags, CMD_BLOCK_STATUS, 4, offset, len));
        assert_eq!(
            h.take(),
            error_chunk(4, Errno::Inval, "invalid request", None)
        );
    }
}

#[test]
fn block_status_covers_at_most_max_extents_and_a_bounded_scan() {
    // snap1 changed every other chunk: 200 chunks asked, MAX_EXTENTS given.
    let (mut h, _) = with_contexts("snap1", &["snapfw:changed:snap1"]);
    h.send(&request(0, CMD_BLOCK_STATUS, 5, 0, 200 * 4096));
    let extents: Vec<(u32, u32)> = (0..MAX_EXTENTS)
        .map(|i| (4096, (i % 2 == 0) as u32))
        .collect();
    assert_eq!(h.take(), status_chunk(5, true, 1, &extents));
    // A range with nothing changed: one extent, held to MAX_SCAN_CHUNKS chunks.
    let (mut h, _) = with_contexts("vda", &["snapfw:changed:s2"]);
    h.send(&request(0, CMD_BLOCK_STATUS, 6, 0, 32 * MIB as u32));
    // s2 is gone (the catalog has no chunks for key 13): one error, nothing else.
    assert_eq!(h.take(), error_chunk(6, Errno::Io, "I/O error", None));
    // A 1 TiB view of vda's handle (the same snapshot s1): 4 GiB asked from 8 MiB on,
    // where nothing changed; the reply covers MAX_SCAN_CHUNKS chunks.
    let mut h = Harness::negotiated(3);
    h.catalog
        .exports
        .push(("big".into(), info(1, 1 << 40, 512)));
    h.send(&option(OPT_STRUCTURED_REPLY, &[]));
    h.send(&option(
        OPT_SET_META_CONTEXT,
        &meta_data("big", &["snapfw:changed:s1"]),
    ));
    h.send(&option(OPT_GO, &info_data("big", &[])));
    h.take();
    h.send(&request(0, CMD_BLOCK_STATUS, 7, 8 * MIB, u32::MAX - 511));
    let scanned = (MAX_SCAN_CHUNKS * 4096) as u32;
    assert_eq!(h.take(), status_chunk(7, true, 1, &[(scanned, 0)]));
}

#[test]
fn block_status_needs_contexts_for_this_export() {
    // Never set.
    let mut h = structured("vda");
    h.send(&request(0, CMD_BLOCK_STATUS, 1, 0, 512));
    assert_eq!(
        h.take(),
        error_chunk(1, Errno::Inval, "invalid request", None)
    );
    // Set for snap1, then GO on vda: cleared.
    let mut h = Harness::negotiated(3);
    h.send(&option(OPT_STRUCTURED_REPLY, &[]));
    h.send(&option(
        OPT_SET_META_CONTEXT,
        &meta_data("snap1", &["base:allocation"]),
    ));
    h.send(&option(OPT_GO, &info_data("vda", &[])));
    h.take();
    h.send(&request(0, CMD_BLOCK_STATUS, 2, 0, 512));
    assert_eq!(
        h.take(),
        error_chunk(2, Errno::Inval, "invalid request", None)
    );
    // SET with no queries chooses none.
    let (mut h, contexts) = with_contexts("vda", &[]);
    assert!(contexts.is_empty());
    h.send(&request(0, CMD_BLOCK_STATUS, 3, 0, 512));
    assert_eq!(
        h.take(),
        error_chunk(3, Errno::Inval, "invalid request", None)
    );
}
