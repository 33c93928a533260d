//! Host tests for the line editor. A tiny one-row VT100 model checks that what the editor
//! draws is what it holds.
use super::*;
use alloc::format;
use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;

/// A one-row terminal that understands exactly the sequences the editor may send and fails
/// the test on anything else.
struct Term {
    width: usize,
    /// The current row; `ESC [ K` truncates it at the cursor.
    row: Vec<u8>,
    col: usize,
    /// Rows finished with LF.
    lines: Vec<String>,
    bells: usize,
    /// Bytes of an escape sequence being received.
    escape: Option<Vec<u8>>,
}

impl Term {
    fn new(width: usize) -> Term {
        Term {
            width,
            row: Vec::new(),
            col: 0,
            lines: Vec::new(),
            bells: 0,
            escape: None,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.byte(b);
        }
    }

    fn byte(&mut self, b: u8) {
        if let Some(mut seq) = self.escape.take() {
            seq.push(b);
            if seq.len() == 1 {
                assert_eq!(b, b'[', "only CSI sequences are sent");
                self.escape = Some(seq);
                return;
            }
            if !(0x40..=0x7e).contains(&b) {
                assert!(b.is_ascii_digit(), "unexpected CSI byte {b:#x}");
                assert!(seq.len() < 24, "overlong CSI sent");
                self.escape = Some(seq);
                return;
            }
            let params = core::str::from_utf8(&seq[1..seq.len() - 1]).expect("ascii");
            let n: usize = if params.is_empty() {
                1
            } else {
                params.parse().expect("numeric parameter")
            };
            match b {
                b'K' => {
                    assert!(params.is_empty());
                    self.row.truncate(self.col);
                }
                b'C' => {
                    assert!(n > 0);
                    self.col = (self.col + n).min(self.width - 1);
                }
                b'D' => {
                    assert!(n > 0);
                    self.col = self.col.saturating_sub(n);
                }
                b'J' => {
                    assert_eq!(n, 2);
                    self.row.clear();
                    self.lines.clear();
                }
                b'H' => {
                    assert!(params.is_empty());
                    self.col = 0;
                }
                _ => panic!("unexpected CSI final {:?}", b as char),
            }
            return;
        }
        match b {
            0x1b => self.escape = Some(Vec::new()),
            b'\r' => self.col = 0,
            b'\n' => {
                self.lines
                    .push(String::from_utf8(core::mem::take(&mut self.row)).expect("ascii"));
                self.col = 0;
            }
            0x08 => self.col = self.col.saturating_sub(1),
            0x07 => self.bells += 1,
            0x20..=0x7e => {
                assert!(
                    self.col < self.width - 1,
                    "wrote into the last column: {:?} col {}",
                    String::from_utf8_lossy(&self.row),
                    self.col
                );
                while self.row.len() <= self.col {
                    self.row.push(b' ');
                }
                self.row[self.col] = b;
                self.col += 1;
            }
            _ => panic!("unexpected byte {b:#x} sent to the terminal"),
        }
    }

    fn row(&self) -> &str {
        core::str::from_utf8(&self.row).expect("ascii")
    }
}

/// An editor shown on a terminal.
struct Setup {
    ed: LineEditor,
    term: Term,
}

impl Setup {
    fn new() -> Setup {
        Setup::with_width(80)
    }

    fn with_width(width: usize) -> Setup {
        Setup::with_prompt(width, "> ")
    }

    fn with_prompt(width: usize, prompt: &str) -> Setup {
        let mut ed = LineEditor::new();
        ed.set_width(width);
        ed.set_prompt(prompt);
        let mut term = Term::new(width);
        ed.redraw(&mut |b| term.write(b));
        Setup { ed, term }
    }

    /// Feeds bytes; returns the events. Redraws the prompt after each event, as the console
    /// does, and checks the screen after every byte.
    fn feed(&mut self, bytes: &[u8]) -> Vec<EditorEvent> {
        let mut events = Vec::new();
        for &b in bytes {
            let term = &mut self.term;
            if let Some(event) = self.ed.feed(b, &mut |o| term.write(o)) {
                events.push(event);
                self.ed.redraw(&mut |o| term.write(o));
            }
            self.check();
        }
        events
    }

    fn type_line(&mut self, line: &str) -> EditorEvent {
        let mut events = self.feed(line.as_bytes());
        events.extend(self.feed(b"\r"));
        assert_eq!(events.len(), 1, "{events:?}");
        events.remove(0)
    }

    /// The screen shows the prompt and the window of the line, with the cursor in place.
    fn check(&self) {
        let ed = &self.ed;
        assert!(ed.cursor <= ed.len && ed.len <= LINE_CAPACITY);
        if let Escape::Csi { len, .. } = ed.escape {
            assert!(usize::from(len) <= MAX_ESCAPE_LEN);
        }
        if !ed.is_visible() {
            return;
        }
        let (start, end) = ed.window();
        let expected = format!("{}{}", ed.prompt, &ed.line()[start..end]);
        assert_eq!(self.term.row(), expected, "screen row");
        assert_eq!(
            self.term.col,
            ed.prompt_width + ed.cursor - start,
            "screen cursor"
        );
    }
}

fn line(s: &str) -> EditorEvent {
    EditorEvent::Line(s.to_string())
}

#[test]
fn typing_echoes_and_enter_returns_the_line() {
    let mut ed = LineEditor::new();
    let mut out = Vec::new();
    ed.redraw(&mut |b| out.extend_from_slice(b));
    assert_eq!(out, b"\r> \x1b[K\r\x1b[2C");
    out.clear();
    for &b in b"ls" {
        assert_eq!(ed.feed(b, &mut |b| out.extend_from_slice(b)), None);
    }
    assert_eq!(out, b"ls");
    assert_eq!(ed.line(), "ls");
    let event = ed.feed(b'\r', &mut |b| out.extend_from_slice(b));
    assert_eq!(event, Some(line("ls")));
    assert_eq!(out, b"ls\r\n");
    assert_eq!(ed.line(), "");
    assert!(!ed.is_visible());
}

#[test]
fn enter_variants() {
    let mut s = Setup::new();
    assert_eq!(
        s.feed(b"a\r\nb\nc\r\rd\n\ne\r\n"),
        vec![
            line("a"),
            line("b"),
            line("c"),
            line(""),
            line("d"),
            line(""),
            line("e"),
        ]
    );
    // CR NUL (telnet) is one Enter too.
    assert_eq!(s.feed(b"f\r\0"), vec![line("f")]);
    // A LF after CR only counts once: a LF later is a new Enter.
    assert_eq!(s.feed(b"\rx\n"), vec![line(""), line("x")]);
    assert_eq!(s.term.lines.last().map(String::as_str), Some("> x"));
}

#[test]
fn backspace_both_codes_and_at_start() {
    let mut s = Setup::new();
    s.feed(b"abcd\x7f\x08");
    assert_eq!(s.ed.line(), "ab");
    s.feed(b"\x7f\x7f\x7f\x08");
    assert_eq!(s.ed.line(), "");
    assert_eq!(s.ed.cursor(), 0);
    s.feed(b"xy\x1b[D\x7f");
    assert_eq!(s.ed.line(), "y");
    assert_eq!(s.ed.cursor(), 0);
}

#[test]
fn cursor_movement_and_insert_in_the_middle() {
    let mut s = Setup::new();
    s.feed(b"acd\x1b[D\x1b[D");
    assert_eq!(s.ed.cursor(), 1);
    s.feed(b"b");
    assert_eq!((s.ed.line(), s.ed.cursor()), ("abcd", 2));
    s.feed(b"\x1b[C\x1b[C\x1b[C\x1b[C");
    assert_eq!(s.ed.cursor(), 4);
    s.feed(b"\x02\x02\x06");
    assert_eq!(s.ed.cursor(), 3);
    s.feed(b"\x1bOD\x1bOC\x1bOD");
    assert_eq!(s.ed.cursor(), 2);
    assert_eq!(s.feed(b"\r"), vec![line("abcd")]);
}

#[test]
fn home_and_end_in_every_spelling() {
    let homes: [&[u8]; 5] = [b"\x1b[H", b"\x1b[1~", b"\x1b[7~", b"\x1bOH", b"\x01"];
    let ends: [&[u8]; 5] = [b"\x1b[F", b"\x1b[4~", b"\x1b[8~", b"\x1bOF", b"\x05"];
    for (home, end) in homes.iter().zip(ends.iter()) {
        let mut s = Setup::new();
        s.feed(b"hello");
        s.feed(home);
        assert_eq!(s.ed.cursor(), 0, "{home:?}");
        s.feed(b">");
        s.feed(end);
        assert_eq!(s.ed.cursor(), 6, "{end:?}");
        assert_eq!(s.ed.line(), ">hello");
    }
}

#[test]
fn delete_key_and_ctrl_d() {
    let mut s = Setup::new();
    s.feed(b"abc\x01\x1b[3~");
    assert_eq!((s.ed.line(), s.ed.cursor()), ("bc", 0));
    s.feed(b"\x04");
    assert_eq!(s.ed.line(), "c");
    s.feed(b"\x05\x1b[3~\x04");
    assert_eq!(s.ed.line(), "c");
}

#[test]
fn kill_keys_and_word_moves() {
    let mut s = Setup::new();
    s.feed(b"snap create vda");
    s.feed(b"\x17");
    assert_eq!(s.ed.line(), "snap create ");
    s.feed(b"\x17");
    assert_eq!(s.ed.line(), "snap ");
    s.feed(b"list  --json  ");
    s.feed(b"\x1bb");
    assert_eq!(s.ed.cursor(), "snap list  ".len());
    s.feed(b"\x1b[1;5D");
    assert_eq!(s.ed.cursor(), "snap ".len());
    s.feed(b"\x1b[1;5C");
    assert_eq!(s.ed.cursor(), "snap list".len());
    s.feed(b"\x1bf");
    assert_eq!(s.ed.cursor(), "snap list  --json".len());
    s.feed(b"\x0b");
    assert_eq!(s.ed.line(), "snap list  --json");
    s.feed(b"\x01\x0b");
    assert_eq!(s.ed.line(), "");
    s.feed(b"abc\x1b[D\x15");
    assert_eq!((s.ed.line(), s.ed.cursor()), ("", 0));
    // Ctrl-W with nothing before the cursor does nothing.
    s.feed(b"x\x01\x17");
    assert_eq!(s.ed.line(), "x");
}

#[test]
fn ctrl_c_cancels() {
    let mut s = Setup::new();
    assert_eq!(s.feed(b"bench vda\x03"), vec![EditorEvent::Cancelled]);
    assert_eq!(
        s.term.lines.last().map(String::as_str),
        Some("> bench vda^C")
    );
    assert_eq!(s.ed.line(), "");
    assert_eq!(s.ed.history().count(), 0);
    assert_eq!(s.feed(b"\x03"), vec![EditorEvent::Cancelled]);
}

#[test]
fn overflow_is_reported_once_at_enter() {
    let mut s = Setup::new();
    let long = vec![b'x'; LINE_CAPACITY + 50];
    assert_eq!(s.feed(&long), vec![]);
    assert_eq!(s.ed.line().len(), LINE_CAPACITY);
    assert_eq!(s.term.bells, 1);
    // Editing does not clear the overflow: characters were lost.
    s.feed(b"\x7f\x7f");
    assert_eq!(s.feed(b"\r"), vec![EditorEvent::Overflow]);
    assert_eq!(s.ed.history().count(), 0);
    assert_eq!(s.type_line("ok"), line("ok"));
    // Exactly the capacity fits.
    let full = "y".repeat(LINE_CAPACITY);
    assert_eq!(s.type_line(&full), line(&full));
    // Ctrl-U after an overflow starts afresh.
    s.feed(&long);
    s.feed(b"\x15");
    assert_eq!(s.type_line("z"), line("z"));
    // Ctrl-C also forgets it.
    s.feed(&long);
    s.feed(b"\x03");
    assert_eq!(s.type_line("w"), line("w"));
}

#[test]
fn history_up_down_restores_the_unfinished_line() {
    let mut s = Setup::new();
    for l in ["one", "two", "three"] {
        s.type_line(l);
    }
    s.feed(b"draft");
    s.feed(b"\x1b[A");
    assert_eq!(s.ed.line(), "three");
    s.feed(b"\x1b[A\x10");
    assert_eq!(s.ed.line(), "one");
    // Past the oldest entry: stays.
    s.feed(b"\x1b[A");
    assert_eq!(s.ed.line(), "one");
    s.feed(b"\x1b[B\x0e");
    assert_eq!(s.ed.line(), "three");
    s.feed(b"\x1bOB");
    assert_eq!((s.ed.line(), s.ed.cursor()), ("draft", 5));
    s.feed(b"\x1b[B");
    assert_eq!(s.ed.line(), "draft");
    // Editing a recalled line leaves the history alone.
    s.feed(b"\x15\x1b[A!");
    assert_eq!(s.feed(b"\r"), vec![line("three!")]);
    assert_eq!(
        s.ed.history().collect::<Vec<_>>(),
        ["one", "two", "three", "three!"]
    );
    // With no history, up and down do nothing.
    let mut s = Setup::new();
    s.feed(b"x\x1b[A\x1b[B");
    assert_eq!(s.ed.line(), "x");
}

#[test]
fn history_skips_blank_lines_and_repeats() {
    let mut s = Setup::new();
    for l in ["", "   ", "ls", "ls", "dev", "ls"] {
        s.type_line(l);
    }
    assert_eq!(s.ed.history().collect::<Vec<_>>(), ["ls", "dev", "ls"]);
}

#[test]
fn history_is_a_ring() {
    let mut s = Setup::new();
    for i in 0..HISTORY_CAPACITY + 10 {
        s.type_line(&format!("cmd {i}"));
    }
    let history: Vec<&str> = s.ed.history().collect();
    assert_eq!(history.len(), HISTORY_CAPACITY);
    assert_eq!(history[0], "cmd 10");
    assert_eq!(
        history[HISTORY_CAPACITY - 1],
        format!("cmd {}", HISTORY_CAPACITY + 9)
    );
    for _ in 0..HISTORY_CAPACITY + 5 {
        s.feed(b"\x1b[A");
    }
    assert_eq!(s.ed.line(), "cmd 10");
}

#[test]
fn overflowed_draft_survives_history_browsing() {
    let mut s = Setup::new();
    s.type_line("ls");
    s.feed(&[b'x'; LINE_CAPACITY + 1]);
    s.feed(b"\x1b[A");
    assert_eq!(s.ed.line(), "ls");
    s.feed(b"\x1b[B");
    assert_eq!(s.ed.line().len(), LINE_CAPACITY);
    assert_eq!(s.feed(b"\r"), vec![EditorEvent::Overflow]);
    // A recalled entry is not overflowed even if the draft was.
    s.feed(&[b'x'; LINE_CAPACITY + 1]);
    assert_eq!(s.feed(b"\x1b[A\r"), vec![line("ls")]);
}

#[test]
fn unknown_and_broken_escape_sequences_are_ignored() {
    let mut s = Setup::new();
    // Unknown finals, private parameters, intermediates, too many parameters, Alt-keys.
    s.feed(b"\x1b[Z\x1b[?25h\x1b[ q\x1b[1;2;3A\x1b[99~\x1bOZ\x1bx\x1b[200~");
    assert_eq!(s.ed.line(), "");
    // Overlong: abandoned after MAX_ESCAPE_LEN bytes, then normal typing resumes.
    s.feed(b"\x1b[123456789012345A");
    s.feed(b"ok");
    assert!(s.ed.line().ends_with("ok"));
    assert_eq!(s.ed.escape, Escape::Idle);
    // A control byte ends a sequence and still works.
    assert_eq!(s.feed(b"\x1b[1\x03"), vec![EditorEvent::Cancelled]);
    assert_eq!(s.feed(b"\x1b\r"), vec![line("")]);
    // ESC ESC [ D is a Left.
    s.feed(b"ab\x1b\x1b[D");
    assert_eq!(s.ed.cursor(), 1);
    // High bytes cancel a sequence and are dropped.
    s.feed(b"\x1b[\xff");
    assert_eq!(s.ed.escape, Escape::Idle);
    s.feed(b"\xc3\xa9\x80\x9b");
    assert_eq!(s.ed.line(), "ab");
    // Huge parameters saturate.
    s.feed(b"\x1b[9999999~");
    assert_eq!(s.ed.line(), "ab");
}

#[test]
fn other_control_bytes_are_ignored() {
    let mut s = Setup::new();
    for b in [
        0x00u8, 0x07, 0x09, 0x0f, 0x11, 0x12, 0x13, 0x14, 0x16, 0x18, 0x19, 0x1a, 0x1c, 0x1f,
    ] {
        s.feed(&[b]);
    }
    assert_eq!(s.ed.line(), "");
    assert_eq!(s.term.lines.len(), 0);
}

#[test]
fn long_lines_scroll_horizontally() {
    let mut s = Setup::with_width(20);
    let text: String = (0..60).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    s.feed(text.as_bytes());
    assert_eq!(s.ed.line(), text);
    // The row shows the tail with the cursor in the second-to-last column.
    assert_eq!(s.term.row().len(), 18);
    assert_eq!(s.term.col, 18);
    s.feed(b"\x01");
    assert_eq!(s.term.row(), format!("> {}", &text[..17]));
    assert_eq!(s.term.col, 2);
    for _ in 0..30 {
        s.feed(b"\x1b[C");
    }
    s.feed(b"\x7f\x7f\x1b[3~XY");
    s.feed(b"\x05");
    for _ in 0..40 {
        s.feed(b"\x7f");
    }
    assert_eq!(s.ed.line().len(), 19);
    let typed = s.ed.line().to_string();
    assert_eq!(s.type_line(""), line(&typed));
}

#[test]
fn tiny_width_and_long_prompt_do_not_break() {
    let mut s = Setup::with_prompt(2, "");
    s.feed(b"abc\x01\x1b[C\x7fz");
    assert_eq!(s.ed.line(), "zbc");
    let mut ed = LineEditor::new();
    ed.set_width(10);
    ed.set_prompt("a very long prompt> ");
    let mut out = Vec::new();
    ed.redraw(&mut |b| out.extend_from_slice(b));
    for &b in b"abcdef\x01\x05" {
        ed.feed(b, &mut |b| out.extend_from_slice(b));
    }
    assert_eq!(ed.line(), "abcdef");
    ed.set_width(0);
    ed.set_width(usize::MAX);
    ed.redraw(&mut |b| out.extend_from_slice(b));
}

#[test]
fn print_above_redraws_the_prompt() {
    let mut s = Setup::new();
    s.feed(b"snap li\x1b[D");
    let term = &mut s.term;
    s.ed.print_above(b"[WARN] vdb: COW store 90% full", &mut |b| term.write(b));
    s.ed.print_above(b"[INFO] two\r\n", &mut |b| term.write(b));
    assert_eq!(
        s.term.lines,
        ["[WARN] vdb: COW store 90% full", "[INFO] two"]
    );
    s.check();
    s.feed(b"s");
    assert_eq!(s.feed(b"\r"), vec![line("snap lsi")]);
}

#[test]
fn clear_line_then_redraw() {
    let mut s = Setup::new();
    s.feed(b"abc");
    let term = &mut s.term;
    s.ed.clear_line(&mut |b| term.write(b));
    assert_eq!(s.term.row(), "");
    let term = &mut s.term;
    term.write(b"log\r\n");
    s.ed.redraw(&mut |b| term.write(b));
    s.check();
}

#[test]
fn hidden_editor_is_silent_until_redraw() {
    let mut ed = LineEditor::new();
    let mut out = Vec::new();
    for &b in b"ab\x1b[Dc\x7f\x0c\x07\x15xyz\x1b[A" {
        ed.feed(b, &mut |b| out.extend_from_slice(b));
    }
    ed.clear_line(&mut |b| out.extend_from_slice(b));
    ed.print_above(b"log", &mut |b| out.extend_from_slice(b));
    assert_eq!(out, b"log\r\n");
    assert_eq!(ed.line(), "xyz");
    let mut term = Term::new(80);
    ed.redraw(&mut |b| term.write(b));
    assert_eq!(term.row(), "> xyz");
    ed.hide(&mut |b| term.write(b));
    assert_eq!(term.row(), "");
    assert!(!ed.is_visible());
    // Ctrl-C still reports while hidden (the console uses it to cancel a task).
    let mut out = Vec::new();
    assert_eq!(
        ed.feed(0x03, &mut |b| out.extend_from_slice(b)),
        Some(EditorEvent::Cancelled)
    );
    assert!(out.is_empty());
}

#[test]
fn ctrl_l_clears_and_redraws() {
    let mut s = Setup::new();
    s.type_line("x");
    s.feed(b"ab\x0c");
    assert!(s.term.lines.is_empty());
    assert_eq!(s.term.row(), "> ab");
}

#[test]
fn coloured_prompt_width() {
    assert_eq!(display_width("snapfw> "), 8);
    assert_eq!(display_width("\x1b[1;32msnapfw\x1b[0m> "), 8);
    assert_eq!(display_width("\x1b"), 0);
    assert_eq!(display_width("\x1b[1;3"), 0);
    let mut ed = LineEditor::new();
    ed.set_prompt("\x1b[1msnapfw\x1b[0m> ");
    let mut out = Vec::new();
    ed.redraw(&mut |b| out.extend_from_slice(b));
    assert!(out.ends_with(b"\x1b[8C"));
}

#[test]
fn csi_numbers() {
    let mut out = Vec::new();
    write_csi(&mut |b| out.extend_from_slice(b), 0, b'C');
    write_csi(&mut |b| out.extend_from_slice(b), 1234, b'D');
    write_csi(&mut |b| out.extend_from_slice(b), usize::MAX, b'C');
    assert_eq!(
        out,
        format!("\x1b[0C\x1b[1234D\x1b[{}C", usize::MAX).as_bytes()
    );
}

/// xorshift64: deterministic pseudo-random bytes without extra crates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn random_bytes_never_break_the_editor() {
    // Biased towards bytes that matter: escapes, their parameters, controls, Enter.
    const INTERESTING: &[u8] = b"\x1b\x1b\x1b[[[O;~0123456789ABCDFH\x7f\x08\x01\x02\x03\x04\x05\x06\x0b\x0c\x0e\x10\x15\x17\r\n ab";
    for (seed, width) in [
        (0x2545_f491_4f6c_dd1du64, 80usize),
        (0xdead_beef_cafe_f00d, 17),
    ] {
        let mut rng = Rng(seed);
        let mut s = Setup::with_width(width);
        let mut events = 0;
        for i in 0..100_000 {
            let r = rng.next();
            let byte = match r % 4 {
                0 => (r >> 8) as u8,
                1 => 0x20 + ((r >> 8) % 95) as u8,
                _ => INTERESTING[((r >> 8) % INTERESTING.len() as u64) as usize],
            };
            events += s.feed(&[byte]).len();
            if i % 997 == 0 {
                let term = &mut s.term;
                s.ed.print_above(b"log line", &mut |b| term.write(b));
                s.check();
            }
            if i % 5003 == 0 {
                // Now and then a long paste, to reach the overflow path.
                s.feed(&[b'p'; 300]);
            }
            assert!(s.ed.history().count() <= HISTORY_CAPACITY);
        }
        assert!(events > 100, "the stream should finish some lines");
        // Whatever came before, the editor still works.
        s.feed(b"\x03");
        assert_eq!(s.type_line("status"), line("status"));
    }
}
