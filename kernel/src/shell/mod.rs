//! The operator's console on COM1: the main loop feeds received bytes to the line editor,
//! runs finished lines as commands, drives the long-running disk task (if any) with the
//! device completions, and prints log lines above the prompt.
//!
//! `commands` (the vocabulary and argument checking) is pure and host-tested; the rest runs
//! on the appliance.

pub mod commands;

#[cfg(target_os = "none")]
mod builtin;
#[cfg(target_os = "none")]
mod disk;
#[cfg(target_os = "none")]
mod nbd;
#[cfg(target_os = "none")]
mod net;
#[cfg(target_os = "none")]
mod output;
#[cfg(target_os = "none")]
mod snap;

#[cfg(target_os = "none")]
pub use output::{print_above_prompt, Out};

#[cfg(target_os = "none")]
pub use run_loop::{io_allocations, io_tasks, run};

#[cfg(target_os = "none")]
mod run_loop {
    use core::fmt::Write;
    use core::sync::atomic::{AtomicU64, Ordering};

    use alloc::boxed::Box;

    use super::commands::parse_line;
    use super::output::{self, with_editor, Out};
    use crate::console::editor::{EditorEvent, LineEditor, LINE_CAPACITY};
    use crate::nbd;
    use crate::ring::ByteRing;
    use crate::storage::tasks::Task;
    use crate::{executor, memory, power, serial, storage, time};
    use drivers::info::FixedString;

    /// The console prompt.
    pub const PROMPT: &str = "snapfw> ";
    /// How often a task's progress line is refreshed.
    const PROGRESS_NS: u64 = 500_000_000;

    static IO_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
    static IO_TASKS: AtomicU64 = AtomicU64::new(0);

    /// Heap allocations made while disk tasks had I/O in flight (should stay 0).
    pub fn io_allocations() -> u64 {
        IO_ALLOCATIONS.load(Ordering::Relaxed)
    }

    /// Disk tasks run since boot.
    pub fn io_tasks() -> u64 {
        IO_TASKS.load(Ordering::Relaxed)
    }

    /// Bytes no terminal sends while typing text: everything >= 0x80, NUL, and control
    /// characters the editor has no key for.
    fn is_garbage(byte: u8) -> bool {
        byte >= 0x80
            || matches!(byte, 0x00 | 0x07 | 0x09 | 0x0f | 0x11..=0x14 | 0x16 | 0x18..=0x1a | 0x1c..=0x1f)
    }

    struct Running {
        task: Box<dyn Task>,
        allocations_at_start: u64,
        next_progress: u64,
        progress_shown: bool,
    }

    /// The main loop: device completions, the running task, console input; then idle until
    /// the next interrupt.
    pub fn run() -> ! {
        output::install_editor({
            let mut e = LineEditor::new();
            e.set_prompt(PROMPT);
            e
        });
        let mut garbage = 0usize;
        // The first task finds the snapshot stores on the disks; the prompt follows it.
        let mut running: Option<Running> = Some(Running {
            task: alloc::boxed::Box::new(crate::storage::discover::DiscoverTask::new()),
            allocations_at_start: memory::allocation_count(),
            next_progress: time::uptime_ns() + PROGRESS_NS,
            progress_shown: false,
        });
        // The NBD server: sessions come from its TCP listener inside `net::poll`, which
        // starts once the first task (discovery) has found the snapshots, so that clients
        // see every export; completions and resubmissions run here every iteration.
        let nbd_config = nbd::config_from_cmdline(crate::start::cmdline());
        nbd::init(nbd_config);
        let mut nbd_listening = false;
        let mut typeahead = ByteRing::<256>::new();
        let mut typeahead_dropped = false;
        loop {
            executor::take_pending();
            let now = time::uptime_ns();
            let (more, ios_in_flight) = storage::with(|st| {
                let more = storage::poll(
                    st,
                    now,
                    &mut |pool, completion| match running.as_mut() {
                        Some(r) => r.task.complete(pool, completion, now),
                        None => {
                            if let Some(b) = completion.buffer {
                                let _ = pool.release(b);
                            }
                        }
                    },
                    &mut |pool, completion| {
                        let before = memory::allocation_count();
                        nbd::backend::complete(pool, completion);
                        nbd::tcp::count_allocations(before);
                    },
                );
                // What the NBD sessions and the task submit goes out with one notification
                // per device.
                storage::plug(st);
                let before = memory::allocation_count();
                nbd::with(|server| server.step(&mut nbd::backend::StorageBackend(st)));
                nbd::tcp::count_allocations(before);
                let more = storage::housekeeping(st, now) || more;
                if let Some(r) = running.as_mut() {
                    r.task.step(st, now);
                }
                let more = storage::issue_volumes(st) || more;
                storage::unplug(st);
                (more, st.task_ios)
            });
            if more {
                executor::wake();
            }
            if crate::net::poll(now) {
                executor::wake();
            }
            if let Some(r) = running.as_mut() {
                // Lines a task wants kept (e.g. what is durable), before its report.
                let mut notice = FixedString::<160>::new();
                let _ = r.task.notice(&mut notice);
                if !notice.as_str().is_empty() {
                    serial::write_bytes(b"\r\x1b[K");
                    serial::write_bytes(notice.as_str().as_bytes());
                    serial::write_bytes(b"\r\n");
                    r.progress_shown = false;
                }
            }
            if let Some(r) = running.as_mut() {
                // A task ends when it says so and its last request has come back: a late
                // completion must not reach the next task.
                if r.task.done() && ios_in_flight == 0 {
                    if r.task.io_path() {
                        let allocations =
                            memory::allocation_count().saturating_sub(r.allocations_at_start);
                        IO_ALLOCATIONS.fetch_add(allocations, Ordering::Relaxed);
                    }
                    let mut out = Out;
                    if r.progress_shown {
                        serial::write_bytes(b"\r\x1b[K");
                    }
                    let _ = r.task.report(&mut out, time::uptime_ns());
                    running = None;
                    if !nbd_listening {
                        // Discovery is done (the first task): every export is known. Before
                        // the prompt is drawn, so the log line does not land after it.
                        nbd_listening = true;
                        start_nbd(nbd_config.port);
                    }
                    if core::mem::take(&mut typeahead_dropped) {
                        out.error(format_args!(
                            "keys typed while the command ran were dropped"
                        ));
                        while typeahead.pop().is_some() {}
                    }
                    with_editor(|e, out| e.redraw(out));
                } else if now >= r.next_progress {
                    let mut line = FixedString::<160>::new();
                    let _ = r.task.progress(&mut line, now);
                    serial::write_bytes(b"\r\x1b[K");
                    serial::write_bytes(line.as_str().as_bytes());
                    r.progress_shown = true;
                    r.next_progress = now + PROGRESS_NS;
                }
            }
            loop {
                // Keys typed while a task ran are edited first, as if typed at the prompt.
                let byte = match running {
                    None => typeahead.pop().or_else(serial::read_byte),
                    Some(_) => serial::read_byte(),
                };
                let Some(byte) = byte else { break };
                if let Some(r) = running.as_mut() {
                    // While a task runs the editor is not fed (finishing a line allocates):
                    // Ctrl-C cancels, other keys wait in a fixed ring until the task ends.
                    if byte == 0x03 {
                        r.task.cancel();
                    } else if !typeahead.push(byte) {
                        typeahead_dropped = true;
                    }
                    continue;
                }
                if is_garbage(byte) {
                    garbage += 1;
                }
                let event = with_editor(|e, out| e.feed(byte, out)).flatten();
                let Some(event) = event else { continue };
                let mut o = Out;
                if let Some(r) = running.as_mut() {
                    // While a task runs only Ctrl-C matters; other lines are refused.
                    match event {
                        EditorEvent::Cancelled => r.task.cancel(),
                        _ => {
                            serial::write_bytes(b"\r\x1b[K");
                            o.error(format_args!(
                                "busy: a command is running (Ctrl-C cancels it)"
                            ));
                        }
                    }
                    garbage = 0;
                    continue;
                }
                match event {
                    EditorEvent::Line(_) if garbage > 0 => o.error(format_args!(
                        "the line held {garbage} byte(s) that are not text; ignored"
                    )),
                    EditorEvent::Line(line) => {
                        if let Some(task) = execute(&line) {
                            if task.io_path() {
                                IO_TASKS.fetch_add(1, Ordering::Relaxed);
                            }
                            let now = time::uptime_ns();
                            running = Some(Running {
                                task,
                                allocations_at_start: memory::allocation_count(),
                                next_progress: now + PROGRESS_NS,
                                progress_shown: false,
                            });
                            executor::wake(); // start issuing at once
                        }
                    }
                    EditorEvent::Overflow => o.error(format_args!(
                        "line too long (at most {LINE_CAPACITY} characters); ignored"
                    )),
                    EditorEvent::Cancelled => {}
                }
                garbage = 0;
                if running.is_none() {
                    with_editor(|e, out| e.redraw(out));
                }
            }
            executor::idle();
        }
    }

    /// Opens the NBD server's TCP port (when there is a network).
    fn start_nbd(port: u16) {
        match crate::net::with(|n| n.start_nbd(port)) {
            None => log::info!("nbd: no network; not serving"),
            Some(Err(e)) => log::error!("nbd: cannot listen on TCP port {port}: {e}"),
            Some(Ok(())) => {
                log::info!("nbd: serving every volume on TCP port {port}")
            }
        }
    }

    fn execute(line: &str) -> Option<Box<dyn Task>> {
        let mut out = Out;
        match parse_line(line, power::testing()) {
            Ok(None) => None,
            Ok(Some(parsed)) => match parsed.args() {
                Ok(args) => super::builtin::run(parsed.info.id, &args, &mut out),
                Err(e) => {
                    let _ = writeln!(out, "error: {e}");
                    None
                }
            },
            Err(e) => {
                let _ = writeln!(out, "error: {e}");
                None
            }
        }
    }
}
