//! Console output: command output with `\n` → `\r\n`, one-line errors, and log lines
//! printed above the prompt while the operator types. The line editor lives here, behind a
//! lock, because the log path ([`print_above_prompt`], from `logger.rs`, and from interrupt
//! context) must reach it; the main loop installs it and feeds it ([`with_editor`]).

use core::fmt;

use crate::arch::cpu;
use crate::console::editor::LineEditor;
use crate::serial;

static EDITOR: spin::Mutex<Option<LineEditor>> = spin::Mutex::new(None);

/// Installs the line editor (main loop start).
pub fn install_editor(editor: LineEditor) {
    *EDITOR.lock() = Some(editor);
}

/// Runs `f` on the editor with a serial writer; `None` before the console is up.
pub fn with_editor<R>(f: impl FnOnce(&mut LineEditor, &mut dyn FnMut(&[u8])) -> R) -> Option<R> {
    let mut guard = EDITOR.lock();
    let editor = guard.as_mut()?;
    Some(f(editor, &mut |bytes| serial::write_bytes(bytes)))
}

/// Prints one line above the prompt and redraws the prompt (or just prints it when the
/// prompt is not shown, e.g. while a command runs).
pub fn print_above_prompt(line: &[u8]) {
    // Logging never blocks on the console: if the editor is busy (we are inside it), print.
    let printed = cpu::without_interrupts(|| match EDITOR.try_lock() {
        Some(mut guard) => match guard.as_mut() {
            Some(editor) => {
                editor.print_above(line, &mut |bytes| serial::write_bytes(bytes));
                true
            }
            None => false,
        },
        None => false,
    });
    if !printed {
        serial::write_bytes(line);
        serial::write_bytes(b"\r\n");
    }
}

/// Command output: a `fmt::Write` that turns `\n` into `\r\n`.
pub struct Out;

impl Out {
    /// Prints one error line.
    pub fn error(&mut self, args: fmt::Arguments) {
        use fmt::Write;
        let _ = writeln!(self, "error: {args}");
    }
}

impl fmt::Write for Out {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s.as_bytes();
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            serial::write_bytes(&rest[..nl]);
            serial::write_bytes(b"\r\n");
            rest = &rest[nl + 1..];
        }
        serial::write_bytes(rest);
        Ok(())
    }
}
