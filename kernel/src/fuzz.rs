//! Bodies of the fuzz targets in `tests/fuzz/` (cargo fuzz) that exercise the kernel's pure
//! logic: the NBD session byte stream, the console (line editor, command lines, argument
//! parsers) and the kernel command line. The fuzz targets call these functions, and so does
//! `tests/tests/fuzz_corpus.rs`, which replays every file of each target's corpus
//! (`tests/fuzz/corpus/TARGET/`) on the stable toolchain: `cargo test -p tests --test fuzz_corpus`.
//!
//! Built with the `fuzz` feature (the fuzz crate and the `tests` crate turn it on); not part
//! of the appliance.

use alloc::boxed::Box;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::cmdline::CmdLine;
use crate::console::args::{parse_byte, parse_duration, parse_size, parse_u32, parse_u64};
use crate::console::editor::{EditorEvent, LineEditor, LINE_CAPACITY};
use crate::nbd::fake::{Fake, CHUNK, DISK};
use crate::nbd::proto::IHAVEOPT;
use crate::nbd::session::Session;
use crate::nbd::session::MAX_CHUNKS;
use crate::nbd::ConnectionConfig;
use crate::shell::commands::{help_one, parse_line};

/// Bytes of the settings block in front of an `nbd_session` input.
pub const NBD_SETTINGS_BYTES: usize = 17;

/// `nbd_session`: a client's byte stream into a [`Session`] over the fake backend
/// ([`crate::nbd::fake`]: a 256 KiB disk, export `d`), with device completions in an order,
/// input cut in pieces and a socket window the input chooses.
///
/// Input: a settings block, then the client's bytes:
/// - byte 0: bit 0 puts [`crate::nbd::fake::go_handshake`] in front of the client's bytes, bit 1 makes writes
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
        input = crate::nbd::fake::go_handshake();
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

/// Checks that an error line for the operator is one short line without control characters
/// (they could move the cursor or clear the operator's screen).
fn one_clean_line(message: &str) {
    assert!(
        !message.chars().any(char::is_control),
        "control character in {message:?}"
    );
    assert!(message.len() <= 1024, "a {}-byte error line", message.len());
}

/// Runs a line as the console does up to the command (`parse_line`, then the typed parsers
/// the commands apply to their arguments), checking every error message.
fn console_line(line: &str) {
    for testing in [false, true] {
        match parse_line(line, testing) {
            Ok(None) => {}
            Ok(Some(parsed)) => {
                // parse_line checked the arguments already: the command's own call succeeds.
                let args = parsed.args().expect("arguments checked twice differ");
                let mut values: Vec<&str> = args.positional().to_vec();
                for option in parsed.info.spec.options {
                    if let Some(v) = args.value(option.name) {
                        values.push(v);
                    }
                }
                for v in values {
                    for r in [
                        parse_u64(v, "N").map(|n| n.to_string()),
                        parse_u32(v, "N").map(|n| n.to_string()),
                        parse_size(v, "--bs").map(|n| n.to_string()),
                        parse_duration(v, "--time").map(|d| alloc::format!("{d:?}")),
                        parse_byte(v, "--byte").map(|b| b.to_string()),
                    ] {
                        if let Err(e) = r {
                            one_clean_line(&e.to_string());
                        }
                    }
                }
                let _ = help_one(parsed.info.name, testing).expect("help for a command found");
            }
            Err(e) => one_clean_line(&e.to_string()),
        }
    }
}

/// `console`: bytes from the serial line into the line editor, each finished line through
/// the command parser and the argument parsers; and the input itself as one line (the
/// parsers are reached only through the editor, which keeps printable ASCII, but need not
/// rely on it).
///
/// Checks: nothing panics; lines are printable ASCII within [`LINE_CAPACITY`]; the editor's
/// output for a byte is bounded; a line the parser accepts has arguments the command's own
/// check accepts too; every error message is one line without control characters.
pub fn console(data: &[u8]) {
    let mut editor = LineEditor::new();
    if let Some(&w) = data.first() {
        editor.set_width(usize::from(w));
    }
    for &b in data {
        let mut out = 0usize;
        let event = editor.feed(b, &mut |bytes| out += bytes.len());
        // A redraw of the whole line with its prompt, cursor moves and a clear at most.
        assert!(
            out <= 8 * LINE_CAPACITY + 256,
            "{out} bytes echoed for one byte"
        );
        match event {
            Some(EditorEvent::Line(line)) => {
                assert!(line.len() <= LINE_CAPACITY);
                assert!(line.bytes().all(|c| (0x20..0x7f).contains(&c)), "{line:?}");
                console_line(&line);
            }
            Some(EditorEvent::Cancelled | EditorEvent::Overflow) | None => {}
        }
    }
    console_line(&String::from_utf8_lossy(data));
}

/// `cmdline`: the kernel command line as the boot loader passes it.
///
/// Checks: parsing never panics and never fails; every option after the image name is
/// either applied, or listed as unknown or malformed, with one warning line each.
pub fn cmdline(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    let c = CmdLine::parse(&raw);
    assert_eq!(c.raw, raw);
    let tokens = raw.split_ascii_whitespace().count();
    let image = usize::from(c.image.is_some());
    assert!(c.unknown.len() + c.errors.len() + image <= tokens);
    let warnings: Vec<String> = c.warnings().collect();
    assert_eq!(warnings.len(), c.unknown.len() + c.errors.len());
    for w in &warnings {
        assert!(!w.contains('\n'), "{w:?}");
    }
}

/// Seed inputs of `nbd_session`: reads, writes, flushes and trims after the handshake, in
/// several buffer, queue and chopping settings, a failing write, bad requests.
pub fn nbd_session_seeds() -> Vec<Vec<u8>> {
    use crate::nbd::fake::request;
    use crate::nbd::proto::{CMD_DISC, CMD_FLAG_FUA, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE};
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

/// Seed inputs of `console`: typed lines with edits and escape sequences, and commands.
pub fn console_seeds() -> Vec<Vec<u8>> {
    [
        &b"\x50snapshot create s1 vda vdb --chunk 64k --writable\r"[..],
        b"\x50write vda 0x10 8 --byte 0x55\rread vda 16 2\r",
        b"\x50bench vda --rw randwrite --bs 4k --qd 32 --time 10s --fsync 8\r",
        b"\x50checksum \"s 1\" 0 100\rflush vda\r\x1b[A\r",
        b"\x50snap\x1b[Dshot list --json\x7f\x7f\x7f\x7f\x7f\x7f\r\x03help snapshot\r",
        b"\x50log level debug\rversion --json=1\rread vda -- -5\r",
        b"\x28\x1b[1;5Cnbd --json\x1b[H\x1b[3~\x1bOF\r",
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect()
}

/// Seed inputs of `cmdline`.
pub fn cmdline_seeds() -> Vec<Vec<u8>> {
    [
        &b"/boot/snapfw.elf console=ttyS0,115200n8 loglevel=debug testing"[..],
        b"console=ttyS1 ip=10.0.2.15/24,10.0.2.2 nbd.port=10809 nbd.allow=10.0.0.0/8,192.168.1.7",
        b"snapfw ip=dhcp nbd.allow= loglevel=loud console=ttyS9,1 nbd.port=0 foo=bar testing=2",
        b"x ip=off nbd.allow=0.0.0.0/0 nbd.port=65535 console=ttyS3,9600",
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect()
}
