//! The operator's console on COM1: the main loop feeds received bytes to the line editor,
//! runs finished lines as commands, and prints log lines above the prompt.
//!
//! `commands` (the vocabulary and argument checking) is pure and host-tested; the rest runs
//! on the appliance.

pub mod commands;

#[cfg(target_os = "none")]
mod builtin;
#[cfg(target_os = "none")]
mod output;

#[cfg(target_os = "none")]
pub use output::{print_above_prompt, Out};

#[cfg(target_os = "none")]
pub use run_loop::run;

#[cfg(target_os = "none")]
mod run_loop {
    use crate::console::editor::{EditorEvent, LineEditor, LINE_CAPACITY};
    use crate::{executor, power, serial};

    use super::commands::parse_line;
    use super::output::{with_editor, Out};

    /// The console prompt.
    pub const PROMPT: &str = "snapfw> ";

    /// Bytes no terminal sends while typing text: everything >= 0x80, NUL, and control
    /// characters the editor has no key for.
    fn is_garbage(byte: u8) -> bool {
        byte >= 0x80
            || matches!(byte, 0x00 | 0x07 | 0x09 | 0x0f | 0x11..=0x14 | 0x16 | 0x18..=0x1a | 0x1c..=0x1f)
    }

    /// The main loop: console input, then idle until the next interrupt.
    pub fn run() -> ! {
        output::install_editor({
            let mut e = LineEditor::new();
            e.set_prompt(PROMPT);
            e
        });
        with_editor(|e, out| e.redraw(out));
        let mut garbage = 0usize;
        loop {
            executor::take_pending();
            while let Some(byte) = serial::read_byte() {
                if is_garbage(byte) {
                    garbage += 1;
                }
                let event = with_editor(|e, out| e.feed(byte, out)).flatten();
                let Some(event) = event else { continue };
                let mut o = Out;
                match event {
                    EditorEvent::Line(_) if garbage > 0 => o.error(format_args!(
                        "the line held {garbage} byte(s) that are not text; ignored"
                    )),
                    EditorEvent::Line(line) => execute(&line),
                    EditorEvent::Overflow => o.error(format_args!(
                        "line too long (at most {LINE_CAPACITY} characters); ignored"
                    )),
                    EditorEvent::Cancelled => {}
                }
                garbage = 0;
                with_editor(|e, out| e.redraw(out));
            }
            executor::idle();
        }
    }

    fn execute(line: &str) {
        let mut out = Out;
        match parse_line(line, power::testing()) {
            Ok(None) => {}
            Ok(Some(parsed)) => match parsed.args() {
                Ok(args) => super::builtin::run(parsed.info.id, &args, &mut out),
                Err(e) => out.error(format_args!("{e}")),
            },
            Err(e) => out.error(format_args!("{e}")),
        }
    }

    use super::output;
}
