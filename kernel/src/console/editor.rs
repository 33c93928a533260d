//! The line editor: turns the bytes an operator's terminal sends into command lines, and tells
//! the terminal what to draw.
//!
//! The UART driver hands every received byte to [`LineEditor::feed`], which edits a fixed
//! 256-byte line buffer and writes VT100/ANSI output (echo, cursor moves, redraws) through the
//! `out` callback. When a line is finished `feed` returns an [`EditorEvent`]; the console runs
//! the command, prints its output, and calls [`LineEditor::redraw`] to show a fresh prompt.
//!
//! The line is kept on one terminal row: when prompt and line do not fit in the terminal width
//! (80 columns unless [`LineEditor::set_width`] says otherwise), the row scrolls horizontally to
//! keep the cursor visible, as linenoise's single-line mode does. Because of that the prompt row
//! can always be erased with `CR` + `ESC [ K`, so log lines that arrive while the operator types
//! are printed above the prompt ([`LineEditor::print_above`]) and the prompt is redrawn.
//!
//! Keys (readline/Emacs names):
//!
//! | keys                                             | action                           |
//! |--------------------------------------------------|----------------------------------|
//! | printable ASCII                                  | insert at the cursor             |
//! | CR, LF (CR LF counts once)                       | finish the line                  |
//! | Backspace (0x7f, 0x08)                           | delete before the cursor         |
//! | Delete (`ESC [ 3 ~`), Ctrl-D                     | delete at the cursor             |
//! | Left/Right (`ESC [ D`/`C`, `ESC O D`/`C`), Ctrl-B/F | move one character           |
//! | Ctrl-Left/Right (`ESC [ 1 ; 5 D`/`C`), Alt-B/F   | move one word                    |
//! | Home (`ESC [ H`, `ESC [ 1 ~`, `ESC [ 7 ~`, `ESC O H`), Ctrl-A | start of line       |
//! | End (`ESC [ F`, `ESC [ 4 ~`, `ESC [ 8 ~`, `ESC O F`), Ctrl-E  | end of line         |
//! | Up/Down (`ESC [ A`/`B`, `ESC O A`/`B`), Ctrl-P/N | history                          |
//! | Ctrl-U / Ctrl-K / Ctrl-W                         | kill line / to end / word before |
//! | Ctrl-L                                           | clear the screen, redraw         |
//! | Ctrl-C                                           | abandon the line (echoes `^C`)   |
//!
//! Anything else (other control bytes, bytes >= 0x80, unknown or overlong escape sequences) is
//! ignored. No input can make the editor panic or leave it stuck inside an escape sequence: the
//! escape parser gives up after [`MAX_ESCAPE_LEN`] bytes or at any byte that cannot belong to a
//! sequence.
use alloc::collections::VecDeque;
use alloc::string::String;

/// Bytes a line can hold. Typing past this is refused and the line is reported as
/// [`EditorEvent::Overflow`] when Enter is pressed.
pub const LINE_CAPACITY: usize = 256;

/// Lines kept in the history ring.
pub const HISTORY_CAPACITY: usize = 32;

/// Bytes after `ESC [` after which an unfinished escape sequence is abandoned.
pub const MAX_ESCAPE_LEN: usize = 8;

/// Terminal width assumed until [`LineEditor::set_width`] is called.
pub const DEFAULT_WIDTH: usize = 80;

/// Largest terminal width accepted by [`LineEditor::set_width`].
const MAX_WIDTH: usize = 1024;

/// What a finished line turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EditorEvent {
    /// Enter was pressed: the line (printable ASCII, possibly empty).
    Line(String),
    /// Ctrl-C: the line was abandoned.
    Cancelled,
    /// Enter was pressed on a line that had grown past [`LINE_CAPACITY`]; the line was
    /// discarded. The console prints one error line.
    Overflow,
}

/// Where the escape-sequence parser is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Escape {
    /// Not in a sequence.
    Idle,
    /// After `ESC`.
    Esc,
    /// After `ESC [`: up to two numeric parameters; `odd` marks private or intermediate bytes
    /// (such sequences are consumed but ignored).
    Csi {
        len: u8,
        params: [u16; 2],
        count: u8,
        odd: bool,
    },
    /// After `ESC O` (SS3: keypad/application-mode keys).
    Ss3,
}

/// What an escape sequence (or a control key) asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    Left,
    Right,
    WordLeft,
    WordRight,
    Home,
    End,
    Up,
    Down,
    Delete,
}

/// The line being typed when the operator went up into the history.
#[derive(Clone, Copy, Debug)]
struct SavedLine {
    buf: [u8; LINE_CAPACITY],
    len: usize,
    overflowed: bool,
}

/// A line editor with history for a VT100/ANSI terminal. See the module documentation.
#[derive(Clone, Debug)]
pub struct LineEditor {
    buf: [u8; LINE_CAPACITY],
    /// Bytes in `buf`; `cursor <= len <= LINE_CAPACITY`.
    len: usize,
    /// Insertion point, 0..=len.
    cursor: usize,
    /// A byte was refused because the buffer was full.
    overflowed: bool,
    escape: Escape,
    /// The previous byte was CR (so a LF now is the second half of CR LF).
    after_cr: bool,
    /// Oldest first.
    history: VecDeque<String>,
    /// The history entry shown, counted from the newest (0); `None` when editing a new line.
    browsing: Option<usize>,
    saved: Option<SavedLine>,
    prompt: String,
    /// Columns the prompt takes (escape sequences in it take none).
    prompt_width: usize,
    width: usize,
    /// The prompt is on screen, so edits are echoed. Set by `redraw`, cleared by events.
    visible: bool,
}

impl Default for LineEditor {
    fn default() -> Self {
        LineEditor::new()
    }
}

impl LineEditor {
    /// An empty editor with the prompt `"> "`. Nothing is shown until [`LineEditor::redraw`].
    pub fn new() -> LineEditor {
        let mut editor = LineEditor {
            buf: [0; LINE_CAPACITY],
            len: 0,
            cursor: 0,
            overflowed: false,
            escape: Escape::Idle,
            after_cr: false,
            history: VecDeque::with_capacity(HISTORY_CAPACITY),
            browsing: None,
            saved: None,
            prompt: String::new(),
            prompt_width: 0,
            width: DEFAULT_WIDTH,
            visible: false,
        };
        editor.set_prompt("> ");
        editor
    }

    /// Sets the prompt shown before the line (takes effect at the next redraw). It may contain
    /// ANSI escape sequences (e.g. colours); they are not counted as columns.
    pub fn set_prompt(&mut self, prompt: &str) {
        self.prompt = String::from(prompt);
        self.prompt_width = display_width(prompt);
    }

    /// Sets the terminal width in columns (clamped to 2..=1024); takes effect at the next redraw.
    pub fn set_width(&mut self, columns: usize) {
        self.width = columns.clamp(2, MAX_WIDTH);
    }

    /// The line typed so far.
    pub fn line(&self) -> &str {
        // The buffer only ever holds printable ASCII, so this cannot fail.
        core::str::from_utf8(self.buf.get(..self.len).unwrap_or(&[])).unwrap_or("")
    }

    /// The cursor position in the line (0..=len).
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// Whether the prompt is on screen (between [`LineEditor::redraw`] and the next event or
    /// [`LineEditor::hide`]).
    pub fn is_visible(&self) -> bool {
        self.visible
    }

    /// The history, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &str> + '_ {
        self.history.iter().map(String::as_str)
    }

    /// Shows the prompt and the line on the current terminal row (from its first column) and
    /// turns echo on. Call it after handling an event and after anything else has printed.
    pub fn redraw(&mut self, out: &mut dyn FnMut(&[u8])) {
        self.visible = true;
        self.render(out);
    }

    /// Erases the prompt row, leaving the cursor at its first column (only if the prompt is
    /// shown). The editor still thinks the prompt is on screen: print, then [`redraw`].
    ///
    /// [`redraw`]: LineEditor::redraw
    pub fn clear_line(&self, out: &mut dyn FnMut(&[u8])) {
        if self.visible {
            out(b"\r\x1b[K");
        }
    }

    /// Erases the prompt row and turns echo off until the next [`LineEditor::redraw`] (e.g.
    /// while a long task shows its progress line). Typed bytes are still edited.
    pub fn hide(&mut self, out: &mut dyn FnMut(&[u8])) {
        self.clear_line(out);
        self.visible = false;
    }

    /// Prints `text` (one or more lines, e.g. a log message) above the prompt: erases the prompt
    /// row, prints `text` ending it with CR LF if it does not end with a newline, and redraws
    /// the prompt and line if they were shown.
    pub fn print_above(&self, text: &[u8], out: &mut dyn FnMut(&[u8])) {
        self.clear_line(out);
        out(text);
        if !text.ends_with(b"\n") {
            out(b"\r\n");
        }
        if self.visible {
            self.render(out);
        }
    }

    /// Handles one byte from the terminal, echoing through `out`; returns an event when the
    /// line is finished or abandoned.
    pub fn feed(&mut self, byte: u8, out: &mut dyn FnMut(&[u8])) -> Option<EditorEvent> {
        let after_cr = core::mem::replace(&mut self.after_cr, byte == b'\r');
        if self.escape != Escape::Idle {
            if byte >= 0x80 {
                // Not part of any sequence we know: drop both.
                self.escape = Escape::Idle;
                return None;
            }
            if (0x20..0x7f).contains(&byte) {
                self.escape_byte(byte, out);
                return None;
            }
            // A control byte ends the sequence and counts as itself (ESC ESC restarts one).
            self.escape = Escape::Idle;
        }
        match byte {
            0x20..=0x7e => {
                self.insert(byte, out);
                None
            }
            b'\r' => Some(self.finish(out)),
            b'\n' if after_cr => None,
            b'\n' => Some(self.finish(out)),
            0x03 => Some(self.cancel(out)),
            0x7f | 0x08 => {
                self.backspace(out);
                None
            }
            0x1b => {
                self.escape = Escape::Esc;
                None
            }
            0x01 => self.key(Key::Home, out),
            0x02 => self.key(Key::Left, out),
            0x04 => self.key(Key::Delete, out),
            0x05 => self.key(Key::End, out),
            0x06 => self.key(Key::Right, out),
            0x0e => self.key(Key::Down, out),
            0x10 => self.key(Key::Up, out),
            0x0b => {
                self.len = self.cursor;
                self.refresh(out);
                None
            }
            0x0c => {
                if self.visible {
                    out(b"\x1b[2J\x1b[H");
                    self.render(out);
                }
                None
            }
            0x15 => {
                self.len = 0;
                self.cursor = 0;
                self.overflowed = false;
                self.refresh(out);
                None
            }
            0x17 => {
                let start = self.word_start();
                self.delete_range(start, self.cursor);
                self.refresh(out);
                None
            }
            // NUL (telnet sends CR NUL), Tab and the other control bytes, and bytes >= 0x80
            // (8-bit controls, UTF-8) are ignored.
            _ => None,
        }
    }

    /// Continues an escape sequence with a byte in 0x20..0x7f.
    fn escape_byte(&mut self, byte: u8, out: &mut dyn FnMut(&[u8])) {
        let key = match self.escape {
            Escape::Idle => None,
            Escape::Esc => match byte {
                b'[' => {
                    self.escape = Escape::Csi {
                        len: 0,
                        params: [0; 2],
                        count: 1,
                        odd: false,
                    };
                    return;
                }
                b'O' => {
                    self.escape = Escape::Ss3;
                    return;
                }
                b'b' | b'B' => Some(Key::WordLeft),
                b'f' | b'F' => Some(Key::WordRight),
                // Other Alt-<key> combinations: ignore.
                _ => None,
            },
            Escape::Ss3 => match byte {
                b'A' => Some(Key::Up),
                b'B' => Some(Key::Down),
                b'C' => Some(Key::Right),
                b'D' => Some(Key::Left),
                b'H' => Some(Key::Home),
                b'F' => Some(Key::End),
                _ => None,
            },
            Escape::Csi {
                len,
                mut params,
                mut count,
                mut odd,
            } => {
                if usize::from(len) >= MAX_ESCAPE_LEN {
                    // Overlong: give up; this byte is dropped with the sequence.
                    self.escape = Escape::Idle;
                    return;
                }
                match byte {
                    b'0'..=b'9' => {
                        let slot = usize::from(count) - 1;
                        if let Some(p) = params.get_mut(slot) {
                            *p = p.saturating_mul(10).saturating_add(u16::from(byte - b'0'));
                        }
                    }
                    b';' => count = count.saturating_add(1),
                    // Private parameter bytes (`<=>?`) and intermediate bytes (0x20..0x2f).
                    0x3a..=0x3f | 0x20..=0x2f => odd = true,
                    // A final byte (0x40..0x7e) ends the sequence.
                    _ => {
                        self.escape = Escape::Idle;
                        if odd || count > 2 {
                            return;
                        }
                        let key = csi_key(byte, params, count);
                        if let Some(key) = key {
                            self.key(key, out);
                        }
                        return;
                    }
                }
                self.escape = Escape::Csi {
                    len: len.saturating_add(1),
                    params,
                    count,
                    odd,
                };
                return;
            }
        };
        self.escape = Escape::Idle;
        if let Some(key) = key {
            self.key(key, out);
        }
    }

    /// Performs a cursor, history or delete key.
    fn key(&mut self, key: Key, out: &mut dyn FnMut(&[u8])) -> Option<EditorEvent> {
        let old_start = self.window().0;
        match key {
            Key::Left if self.cursor > 0 => {
                self.cursor -= 1;
                if self.window().0 == old_start {
                    self.emit(out, b"\x1b[D");
                } else {
                    self.refresh(out);
                }
            }
            Key::Right if self.cursor < self.len => {
                self.cursor += 1;
                if self.window().0 == old_start {
                    self.emit(out, b"\x1b[C");
                } else {
                    self.refresh(out);
                }
            }
            Key::WordLeft => {
                self.cursor = self.word_start();
                self.refresh(out);
            }
            Key::WordRight => {
                self.cursor = self.word_end();
                self.refresh(out);
            }
            Key::Home => {
                self.cursor = 0;
                self.refresh(out);
            }
            Key::End => {
                self.cursor = self.len;
                self.refresh(out);
            }
            Key::Delete if self.cursor < self.len => {
                self.delete_range(self.cursor, self.cursor + 1);
                self.refresh(out);
            }
            Key::Up => self.history_up(out),
            Key::Down => self.history_down(out),
            _ => {}
        }
        None
    }

    /// Inserts a printable byte at the cursor, or notes the overflow if the line is full.
    fn insert(&mut self, byte: u8, out: &mut dyn FnMut(&[u8])) {
        if self.len >= LINE_CAPACITY {
            if !self.overflowed {
                self.overflowed = true;
                self.emit(out, b"\x07");
            }
            return;
        }
        let old_start = self.window().0;
        if let Some(tail) = self.buf.get_mut(self.cursor..=self.len) {
            tail.rotate_right(1);
            if let Some(first) = tail.first_mut() {
                *first = byte;
            }
        }
        self.len += 1;
        self.cursor += 1;
        if self.cursor == self.len && self.window().0 == old_start {
            self.emit(out, &[byte]);
        } else {
            self.refresh(out);
        }
    }

    /// Deletes the byte before the cursor.
    fn backspace(&mut self, out: &mut dyn FnMut(&[u8])) {
        if self.cursor == 0 {
            return;
        }
        let old_start = self.window().0;
        let at_end = self.cursor == self.len;
        self.delete_range(self.cursor - 1, self.cursor);
        if at_end && self.window().0 == old_start {
            self.emit(out, b"\x08\x1b[K");
        } else {
            self.refresh(out);
        }
    }

    /// Removes `buf[start..end]`, moving the cursor to `start` if it was inside or after it.
    fn delete_range(&mut self, start: usize, end: usize) {
        let end = end.min(self.len);
        let start = start.min(end);
        if let Some(tail) = self.buf.get_mut(start..self.len) {
            tail.rotate_left(end - start);
        }
        self.len -= end - start;
        if self.cursor >= end {
            self.cursor -= end - start;
        } else if self.cursor > start {
            self.cursor = start;
        }
    }

    /// Where the word before the cursor starts (skipping spaces before it first).
    fn word_start(&self) -> usize {
        let line = self.buf.get(..self.cursor).unwrap_or(&[]);
        let end = line.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
        line.get(..end)
            .and_then(|word| word.iter().rposition(|&b| b == b' '))
            .map_or(0, |i| i + 1)
    }

    /// Where the word at or after the cursor ends.
    fn word_end(&self) -> usize {
        let rest = self.buf.get(self.cursor..self.len).unwrap_or(&[]);
        let start = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
        let len = rest
            .get(start..)
            .and_then(|word| word.iter().position(|&b| b == b' '))
            .map_or(rest.len(), |i| start + i);
        self.cursor + len
    }

    /// Enter: hands over the line (or reports the overflow) and starts a new one.
    fn finish(&mut self, out: &mut dyn FnMut(&[u8])) -> EditorEvent {
        self.emit(out, b"\r\n");
        let event = if self.overflowed {
            EditorEvent::Overflow
        } else {
            let line = String::from(self.line());
            self.remember(&line);
            EditorEvent::Line(line)
        };
        self.reset();
        event
    }

    /// Ctrl-C: abandons the line.
    fn cancel(&mut self, out: &mut dyn FnMut(&[u8])) -> EditorEvent {
        // Echo `^C` at the cursor, stepping back if it would reach the last column.
        let column = self.prompt_width + (self.cursor - self.window().0);
        let room = self.width.saturating_sub(1).saturating_sub(column);
        if room >= 2 {
            self.emit(out, b"^C");
        } else if column >= 2 - room {
            if self.visible {
                write_csi(out, 2 - room, b'D');
            }
            self.emit(out, b"^C");
        }
        self.emit(out, b"\r\n");
        self.reset();
        EditorEvent::Cancelled
    }

    /// Starts a new, empty, not yet shown line.
    fn reset(&mut self) {
        self.len = 0;
        self.cursor = 0;
        self.overflowed = false;
        self.browsing = None;
        self.saved = None;
        self.visible = false;
    }

    /// Adds a finished line to the history: not blank lines, not a repeat of the newest entry.
    fn remember(&mut self, line: &str) {
        if line.trim().is_empty() || self.history.back().is_some_and(|last| last == line) {
            return;
        }
        if self.history.len() >= HISTORY_CAPACITY {
            self.history.pop_front();
        }
        self.history.push_back(String::from(line));
    }

    /// Up: shows the next older history entry, saving the line being typed first.
    fn history_up(&mut self, out: &mut dyn FnMut(&[u8])) {
        let next = match self.browsing {
            None => 0,
            Some(n) => n + 1,
        };
        if next >= self.history.len() {
            return;
        }
        if self.browsing.is_none() {
            self.saved = Some(SavedLine {
                buf: self.buf,
                len: self.len,
                overflowed: self.overflowed,
            });
        }
        self.browsing = Some(next);
        self.load_history(next);
        self.refresh(out);
    }

    /// Down: shows the next newer history entry, or the saved line after the newest one.
    fn history_down(&mut self, out: &mut dyn FnMut(&[u8])) {
        match self.browsing {
            None => return,
            Some(0) => {
                self.browsing = None;
                if let Some(saved) = self.saved.take() {
                    self.buf = saved.buf;
                    self.len = saved.len.min(LINE_CAPACITY);
                    self.overflowed = saved.overflowed;
                } else {
                    self.len = 0;
                    self.overflowed = false;
                }
                self.cursor = self.len;
            }
            Some(n) => {
                self.browsing = Some(n - 1);
                self.load_history(n - 1);
            }
        }
        self.refresh(out);
    }

    /// Copies history entry `n` (0 = newest) into the line, cursor at the end.
    fn load_history(&mut self, n: usize) {
        let entry = self
            .history
            .len()
            .checked_sub(n + 1)
            .and_then(|i| self.history.get(i))
            .map_or(&[][..], |s| s.as_bytes());
        let len = entry.len().min(LINE_CAPACITY);
        if let (Some(dst), Some(src)) = (self.buf.get_mut(..len), entry.get(..len)) {
            dst.copy_from_slice(src);
        }
        self.len = len;
        self.cursor = len;
        self.overflowed = false;
    }

    /// The part of the line on screen: `(start, end)` such that the cursor stays visible and
    /// the last terminal column is never written (so the terminal never wraps).
    fn window(&self) -> (usize, usize) {
        let columns = self
            .width
            .saturating_sub(1)
            .saturating_sub(self.prompt_width)
            .max(1);
        let start = self.cursor.saturating_sub(columns - 1);
        let end = self.len.min(start + columns);
        (start, end)
    }

    /// Writes `bytes` if the prompt is shown.
    fn emit(&self, out: &mut dyn FnMut(&[u8]), bytes: &[u8]) {
        if self.visible {
            out(bytes);
        }
    }

    /// Redraws the row if the prompt is shown.
    fn refresh(&self, out: &mut dyn FnMut(&[u8])) {
        if self.visible {
            self.render(out);
        }
    }

    /// Draws prompt and visible part of the line from the row's first column, erases the rest
    /// of the row, and puts the terminal cursor at the editor's cursor.
    fn render(&self, out: &mut dyn FnMut(&[u8])) {
        let (start, end) = self.window();
        out(b"\r");
        out(self.prompt.as_bytes());
        out(self.buf.get(start..end).unwrap_or(&[]));
        out(b"\x1b[K\r");
        let column = self.prompt_width + (self.cursor - start);
        if column > 0 {
            write_csi(out, column, b'C');
        }
    }
}

/// Maps a complete CSI sequence (`ESC [ params final`) to a key.
fn csi_key(final_byte: u8, params: [u16; 2], count: u8) -> Option<Key> {
    let [first, modifier] = params;
    // Ctrl-Left/Right arrive as `ESC [ 1 ; 5 D`; other modifiers are treated as plain keys.
    let ctrl = count == 2 && modifier == 5;
    match (final_byte, first) {
        (b'A', _) => Some(Key::Up),
        (b'B', _) => Some(Key::Down),
        (b'C', _) if ctrl => Some(Key::WordRight),
        (b'D', _) if ctrl => Some(Key::WordLeft),
        (b'C', _) => Some(Key::Right),
        (b'D', _) => Some(Key::Left),
        (b'H', _) => Some(Key::Home),
        (b'F', _) => Some(Key::End),
        (b'~', 1 | 7) => Some(Key::Home),
        (b'~', 4 | 8) => Some(Key::End),
        (b'~', 3) => Some(Key::Delete),
        _ => None,
    }
}

/// Writes `ESC [ <n> <command>`.
fn write_csi(out: &mut dyn FnMut(&[u8]), n: usize, command: u8) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        if let Some(d) = digits.get_mut(i) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    out(b"\x1b[");
    out(digits.get(i..).unwrap_or(&[]));
    out(&[command]);
}

/// Columns `text` takes on a terminal: characters outside `ESC [ ... final` sequences.
fn display_width(text: &str) -> usize {
    let mut width = 0;
    let mut in_escape = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_escape {
            if ('\u{40}'..='\u{7e}').contains(&c) {
                in_escape = false;
            }
        } else if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                in_escape = true;
            }
        } else if !c.is_control() {
            width += 1;
        }
    }
    width
}

#[cfg(test)]
mod tests;
