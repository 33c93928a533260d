//! `nbd-selftest VOLUME` (testing only): a scripted NBD client inside the appliance, talking
//! to the real server (a loopback session, [`nbd::Server::accept_loopback`], fed byte
//! buffers), so the server and its kernel backend are exercised on real devices and real
//! completions before the network stack exists.
//!
//! Script, one request at a time: GO to VOLUME with a block-size request, WRITE 768 KiB of
//! `fill_seeded(seed 0x6e6264)` at 1 MiB (with FUA where offered), FLUSH, READ it back and compare, READ at
//! an offset that overflows (expects `NBD_EINVAL`), DISC. Each step prints one line.

use core::fmt::{self, Write};

use alloc::vec::Vec;
use drivers::block::{BufferPool, Completion};

use nbd::proto::*;
use nbd::NbdError;

use super::backend::StorageBackend;
use super::Server;
use crate::util::pattern::fill_seeded;
use volume::tasks::Task;
use volume::Volumes;

pub use super::selftest_spec::{LEN, OFFSET, SEED};

const STEPS: [&str; 5] = ["write", "flush", "read", "bad read", "disconnect"];

/// The running self-test.
pub struct NbdSelfTest {
    id: Option<u8>,
    /// Client bytes: handshake, then each request.
    script: Vec<u8>,
    /// Where each piece of the script ends.
    pieces: [usize; 6],
    /// Pieces released to the server (the next is released when the previous reply is in).
    released: usize,
    sent: usize,
    /// Server bytes (capacity fixed at creation).
    out: Vec<u8>,
    parsed: usize,
    lines: Lines,
    failed: bool,
    finished: bool,
    /// Ctrl-C: the connection is closed on the next [`NbdSelfTest::drive`].
    cancelled: bool,
    data: Vec<u8>,
}

impl NbdSelfTest {
    /// A self-test on `volume` (the connection is accepted now: allocation happens here).
    pub fn new(server: &mut Server, volume: &str) -> Result<Self, &'static str> {
        let id = server
            .accept_loopback()
            .map_err(|_| "no free NBD connection")?;
        let mut data = alloc::vec![0u8; LEN as usize];
        fill_seeded(&mut data, SEED, OFFSET);
        let mut script = Vec::with_capacity(LEN as usize + 512);
        let mut pieces = [0; 6];
        script.extend_from_slice(&3u32.to_be_bytes());
        script.extend_from_slice(&IHAVEOPT.to_be_bytes());
        script.extend_from_slice(&OPT_GO.to_be_bytes());
        script.extend_from_slice(&(4 + volume.len() as u32 + 4).to_be_bytes());
        script.extend_from_slice(&(volume.len() as u32).to_be_bytes());
        script.extend_from_slice(volume.as_bytes());
        script.extend_from_slice(&1u16.to_be_bytes());
        script.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        pieces[0] = script.len();
        // FUA is set once GO shows the export offers it.
        request(&mut script, 0, CMD_WRITE, 1, OFFSET, LEN);
        script.extend_from_slice(&data);
        pieces[1] = script.len();
        request(&mut script, 0, CMD_FLUSH, 2, 0, 0);
        pieces[2] = script.len();
        request(&mut script, 0, CMD_READ, 3, OFFSET, LEN);
        pieces[3] = script.len();
        request(&mut script, 0, CMD_READ, 4, u64::MAX - 4095, 4096);
        pieces[4] = script.len();
        request(&mut script, 0, CMD_DISC, 5, 0, 0);
        pieces[5] = script.len();
        Ok(NbdSelfTest {
            id: Some(id),
            script,
            pieces,
            released: 1,
            sent: 0,
            out: Vec::with_capacity(LEN as usize + 4096),
            parsed: 0,
            lines: Lines(Vec::with_capacity(1024)),
            failed: false,
            finished: false,
            cancelled: false,
            data,
        })
    }

    /// Parses what arrived; releases the next piece of the script after each reply.
    fn parse(&mut self) {
        loop {
            let rest = &self.out[self.parsed..];
            if self.released == 1 {
                // Handshake: greeting, then option replies up to the final one of GO.
                let mut at = if self.parsed == 0 { GREETING_LEN } else { 0 };
                if rest.len() < at {
                    return;
                }
                loop {
                    if rest.len() < at + 20 {
                        self.parsed += at;
                        return;
                    }
                    let kind = be32(rest, at + 12);
                    let len = be32(rest, at + 16) as usize;
                    if rest.len() < at + 20 + len {
                        self.parsed += at;
                        return;
                    }
                    if kind == REP_INFO && be16(rest, at + 20) == INFO_EXPORT {
                        // Use FUA on the write only where the export offers it.
                        let flags = be16(rest, at + 30);
                        if flags & TX_SEND_FUA != 0 {
                            let at = self.pieces[0] + 4;
                            self.script[at..at + 2].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
                        }
                        let fua = flags & TX_SEND_FUA != 0;
                        let read_only = flags & TX_READ_ONLY != 0;
                        let _ = writeln!(self.lines, "go: fua {fua}, read-only {read_only}");
                    }
                    if kind == REP_INFO && be16(rest, at + 20) == INFO_BLOCK_SIZE {
                        let (min, max) = (be32(rest, at + 22), be32(rest, at + 30));
                        let _ = writeln!(self.lines, "go: block sizes {min}..{max}");
                    }
                    at += 20 + len;
                    if kind == REP_ACK {
                        self.parsed += at;
                        let _ = writeln!(self.lines, "go: ok");
                        self.released = 2;
                        break;
                    }
                    if kind & (1 << 31) != 0 {
                        self.parsed += at;
                        let _ = writeln!(self.lines, "go: error {:#x}", kind);
                        self.failed = true;
                        self.finished = true;
                        return;
                    }
                }
                continue;
            }
            let step = self.released - 2;
            if step >= 4 || rest.len() < SIMPLE_REPLY_LEN {
                return;
            }
            let error = be32(rest, 4);
            let data_len = if step == 2 && error == 0 {
                LEN as usize
            } else {
                0
            };
            if rest.len() < SIMPLE_REPLY_LEN + data_len {
                return;
            }
            let cookie = be64(rest, 8);
            let good = match step {
                2 if error == 0 => rest[16..16 + data_len] == self.data[..],
                3 => error == Errno::Inval as u32,
                _ => error == 0,
            };
            self.parsed += SIMPLE_REPLY_LEN + data_len;
            let verdict = match (good, step) {
                (true, 2) => "ok, data matches",
                (true, _) => "ok",
                (false, 2) if error == 0 => "data differs",
                (false, _) => "unexpected result",
            };
            let _ = writeln!(
                self.lines,
                "{}: error {error} cookie {cookie}: {verdict}",
                STEPS[step]
            );
            self.failed |= !good;
            self.released += 1;
        }
    }
}

/// The report's lines, in a buffer of fixed capacity (text past it is dropped).
struct Lines(Vec<u8>);

impl Write for Lines {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.0.capacity() - self.0.len();
        self.0.extend_from_slice(&s.as_bytes()[..s.len().min(room)]);
        Ok(())
    }
}

fn request(script: &mut Vec<u8>, flags: u16, command: u16, cookie: u64, offset: u64, len: u32) {
    script.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    script.extend_from_slice(&flags.to_be_bytes());
    script.extend_from_slice(&command.to_be_bytes());
    script.extend_from_slice(&cookie.to_be_bytes());
    script.extend_from_slice(&offset.to_be_bytes());
    script.extend_from_slice(&len.to_be_bytes());
}

impl NbdSelfTest {
    /// One step of the script on the main loop's server (in place of [`Task::step`], which
    /// has no server to give).
    pub fn drive(&mut self, srv: &mut Server, st: &mut Volumes) {
        let Some(id) = self.id else { return };
        if self.cancelled {
            srv.closed(id);
            self.id = None;
            self.finished = true;
            return;
        }
        let limit = self.pieces[self.released.min(6) - 1];
        let out = &mut self.out;
        let script = &self.script;
        let sent = &mut self.sent;
        let result = (|| {
            let volumes = &mut StorageBackend(st);
            let taken = srv.receive(volumes, id, &script[*sent..limit])?;
            *sent += taken;
            srv.transmit(volumes, id, &mut |bytes| {
                let n = bytes.len().min(out.capacity() - out.len());
                out.extend_from_slice(&bytes[..n]);
                n
            })?;
            Ok::<bool, NbdError>(srv.should_close(id))
        })();
        match result {
            Ok(close) => {
                self.parse();
                if close || self.finished {
                    srv.closed(id);
                    self.id = None;
                    self.finished = true;
                }
            }
            Err(e) => {
                let _ = writeln!(self.lines, "connection closed: {e}");
                srv.closed(id);
                self.id = None;
                self.failed = true;
                self.finished = true;
            }
        }
    }
}

impl Task for NbdSelfTest {
    /// Nothing: the main loop calls [`NbdSelfTest::drive`] with its server instead.
    fn step(&mut self, _st: &mut Volumes, _now: u64) {}
    fn complete(&mut self, pool: &mut BufferPool, c: Completion, _now: u64) {
        // NBD I/O completes through the server; nothing of ours comes here.
        if let Some(b) = c.buffer {
            let _ = pool.release(b);
        }
    }
    fn done(&self) -> bool {
        self.finished
    }
    fn cancel(&mut self) {
        let _ = writeln!(self.lines, "cancelled");
        self.failed = true;
        self.cancelled = true;
        if self.id.is_none() {
            self.finished = true;
        }
    }
    fn progress(&self, out: &mut dyn Write, _now: u64) -> fmt::Result {
        write!(
            out,
            "nbd self-test: {} of {} bytes sent",
            self.sent,
            self.script.len()
        )
    }
    fn report(&mut self, out: &mut dyn Write, _now: u64) -> fmt::Result {
        out.write_str(core::str::from_utf8(&self.lines.0).unwrap_or("?\n"))?;
        let complete = self.released >= 6;
        if self.failed || !complete {
            writeln!(out, "error: nbd self-test failed")
        } else {
            writeln!(out, "nbd self-test: ok")
        }
    }
}
