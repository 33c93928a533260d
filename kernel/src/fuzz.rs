//! Bodies of the fuzz targets in `tests/fuzz/` (cargo fuzz) that exercise the kernel's pure
//! logic: the console (line editor, command lines, argument parsers) and the kernel command
//! line (the NBD session byte stream's body is `nbd::fuzz`). The fuzz targets call these functions, and so does
//! `tests/tests/fuzz_corpus.rs`, which replays every file of each target's corpus
//! (`tests/fuzz/corpus/TARGET/`) on the stable toolchain: `cargo test -p tests --test fuzz_corpus`.
//!
//! Built with the `fuzz` feature (the fuzz crate and the `tests` crate turn it on); not part
//! of the appliance.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::cmdline::CmdLine;
use crate::console::args::{parse_byte, parse_duration, parse_size, parse_u32, parse_u64};
use crate::console::editor::{EditorEvent, LineEditor, LINE_CAPACITY};
use crate::shell::commands::{help_one, parse_line};

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
