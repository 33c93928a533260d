//! The body of the `nbd_session` fuzz target in `tests/fuzz/` (cargo fuzz): a client's byte
//! stream into a [`Session`] over the fake backend. The fuzz target calls [`nbd_session`],
//! and so does `tests/tests/fuzz_corpus.rs`, which replays every file of its corpus
//! (`tests/fuzz/corpus/nbd_session/`) on the stable toolchain.
//!
//! Built with the `fuzz` feature (the fuzz crate and the `tests` crate turn it on); not part
//! of the appliance.

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::fake::{Fake, CHUNK, DISK};
use crate::proto::IHAVEOPT;
use crate::session::{Session, MAX_CHUNKS};
use crate::ConnectionConfig;

/// Bytes of the settings block in front of an `nbd_session` input.
pub const NBD_SETTINGS_BYTES: usize = 17;

/// `nbd_session`: a client's byte stream into a [`Session`] over the fake backend
/// ([`crate::fake`]: a 256 KiB disk, export `d`), with device completions in an order,
/// input cut in pieces and a socket window the input chooses.
///
/// Input: a settings block, then the client's bytes:
/// - byte 0: bit 0 puts [`crate::fake::go_handshake`] in front of the client's bytes, bit 1 makes writes
///   touching byte `4 * (bytes 15..17)` of the disk fail;
/// - byte 1: pool buffers, 16 + (b % 25); byte 2: queue depth, 1 + (b % 10);
/// - bytes 3..5, 5..7: input piece and socket window in bytes, 1 + `u16` little-endian;
/// - bytes 7..15: which in-flight device request completes next, turn by turn.
///
/// Checks (besides the fake's: no tag in use twice, no buffer released twice, every device
/// request on the disk): the session never panics, takes all of the client's bytes unless it
/// closes the connection, and once the device has finished everything it holds no device
/// request and gives every buffer back.
pub fn nbd_session(data: &[u8]) {
    let mut s = [0u8; NBD_SETTINGS_BYTES];
    let n = data.len().min(NBD_SETTINGS_BYTES);
    s[..n].copy_from_slice(&data[..n]);
    let mut input = Vec::new();
    if s[0] & 1 != 0 {
        input = crate::fake::go_handshake();
    }
    input.extend_from_slice(&data[n..]);
    let mut fake = Fake::new(16 + usize::from(s[1] % 25), 1 + usize::from(s[2] % 10));
    if s[0] & 2 != 0 {
        fake.bad_byte = Some(4 * u64::from(u16::from_le_bytes([s[15], s[16]])));
    }
    let chop = 1 + usize::from(u16::from_le_bytes([s[3], s[4]]));
    let window = 1 + usize::from(u16::from_le_bytes([s[5], s[6]]));
    let picks = &s[7..15];
    let mut session = Box::new(Session::new(fake.connection, ConnectionConfig::default()));
    let mut pos = 0;
    let mut dead = false;
    let mut sent = 0usize;
    // What the session may send: the greeting, at most 1 KiB per 16 bytes of options (a
    // list reply), a reply header per 28-byte request plus a read's data.
    let max_out =
        18 + 1024 * (input.len() / 16 + 1) + (input.len() / 28 + 1) * (16 + MAX_CHUNKS * CHUNK);
    // Every turn takes input, completes a device request or sends something until the
    // session is done: the input a byte at a time and the output `window` bytes at a time
    // bound it.
    let budget = 20_000 + 64 * input.len() + 2 * max_out / window;
    let mut turn = 0;
    loop {
        assert!(turn < budget, "no progress after {turn} turns");
        assert!(
            sent <= max_out,
            "{sent} bytes sent for {} bytes of input",
            input.len()
        );
        let mut progress = false;
        if !dead && pos < input.len() {
            let piece = &input[pos..input.len().min(pos + chop)];
            match session.on_receive(&mut fake, piece) {
                Ok(taken) => {
                    assert!(taken <= piece.len());
                    pos += taken;
                    progress |= taken > 0;
                }
                Err(_) => dead = true,
            }
        }
        session.step(&mut fake);
        let pick = usize::from(picks[turn % picks.len()]);
        // Now and then the device is slow; it always catches up.
        if pick % 3 != 0 || turn % 4 == 0 {
            progress |= fake.complete_one(&mut session, pick);
        }
        if !dead {
            let before = sent;
            let result = session.on_transmit(&mut fake, &mut |b| {
                let n = b.len().min(window);
                sent += n;
                n
            });
            dead |= result.is_err();
            progress |= sent > before;
        }
        turn += 1;
        let input_done = dead || pos == input.len();
        if input_done && !progress && fake.in_flight.is_empty() {
            break;
        }
    }
    assert!(
        dead || pos == input.len(),
        "the session stopped taking input at byte {pos} of {} with nothing in flight",
        input.len()
    );
    // The client goes away: the device finishes what it holds, the session gives back
    // every buffer.
    session.kill();
    while fake.complete_one(&mut session, 0) {}
    assert_eq!(
        session.in_device(),
        0,
        "device requests outlive their completions"
    );
    session.release_all(&mut fake);
    assert_eq!(fake.free.len(), fake.total, "pool buffers lost");
    assert!(session.can_free());
    assert_eq!(fake.disk.len(), DISK);
}

/// Seed inputs of `nbd_session`: reads, writes, flushes and trims after the handshake, in
/// several buffer, queue and chopping settings, a failing write, bad requests.
pub fn nbd_session_seeds() -> Vec<Vec<u8>> {
    use crate::fake::request;
    use crate::proto::{CMD_DISC, CMD_FLAG_FUA, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE};
    let settings = |flags: u8, buffers: u8, depth: u8, chop: u16, window: u16| {
        let mut s = alloc::vec![flags, buffers, depth];
        s.extend_from_slice(&chop.to_le_bytes());
        s.extend_from_slice(&window.to_le_bytes());
        s.extend_from_slice(&[1, 2, 4, 5, 7, 0, 3, 8]);
        s.extend_from_slice(&20u16.to_le_bytes());
        s
    };
    let mut stream = Vec::new();
    let payload: Vec<u8> = (0..12_288u32).map(|i| (i * 7) as u8).collect();
    stream.extend(request(0, CMD_WRITE, 1, 8192, 12_288));
    stream.extend_from_slice(&payload);
    stream.extend(request(0, CMD_READ, 2, 4096, 65_536));
    stream.extend(request(CMD_FLAG_FUA, CMD_WRITE, 3, 0, 512));
    stream.extend_from_slice(&payload[..512]);
    stream.extend(request(0, CMD_FLUSH, 4, 0, 0));
    stream.extend(request(0, CMD_TRIM, 5, 0, 4096));
    stream.extend(request(0, CMD_TRIM, 6, 0, 128 * 1024));
    stream.extend(request(0, CMD_READ, 7, DISK as u64, 4096));
    stream.extend(request(0, CMD_READ, 8, 0, 0));
    stream.extend(request(0, 9, 9, 0, 512));
    stream.extend(request(0, CMD_DISC, 10, 0, 0));
    let mut out = Vec::new();
    for (flags, buffers, depth, chop, window) in [
        (1, 0, 7, 65_535, 65_535),
        (1, 3, 0, 100, 700),
        (3, 24, 4, 3000, 5000),
        (1, 9, 2, 16, 32),
    ] {
        let mut input = settings(flags, buffers, depth, chop, window);
        input.extend_from_slice(&stream);
        out.push(input);
    }
    // A handshake with options of its own (NBD_OPT_LIST, then GO without block sizes).
    let mut own = settings(0, 0, 3, 64, 64);
    own.extend_from_slice(&3u32.to_be_bytes());
    for (option, data) in [(3u32, &b""[..]), (7, &[0, 0, 0, 1, b'd', 0, 0][..])] {
        own.extend_from_slice(&IHAVEOPT.to_be_bytes());
        own.extend_from_slice(&option.to_be_bytes());
        own.extend_from_slice(&(data.len() as u32).to_be_bytes());
        own.extend_from_slice(data);
    }
    own.extend(request(0, CMD_READ, 1, 0, 4096));
    out.push(own);
    out
}
