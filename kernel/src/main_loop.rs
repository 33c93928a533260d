//! The main loop: one loop on one CPU that owns the appliance's parts as values (the disks
//! and volumes, the network, the NBD server, the console's job and typeahead) and runs one
//! ordered round per turn:
//!
//! 1. completions → engines: the disks' completion path (`devices::poll`, which is
//!    `Volumes::poll`): each completion goes back through the port of the client that
//!    issued it (`volume::port`: an engine, the NBD server, the running job), then the
//!    engines issue and deliver;
//! 2. from here to 4 every device is plugged: what is submitted goes out with one
//!    notification per device;
//! 3. NBD receive: the network's ingress (`Net::receive`, peers screened by the server's
//!    allow-list at their SYN), the server's connections, the bytes each received, then
//!    `Server::step`, the one place NBD device I/O is submitted;
//! 4. tasks: housekeeping (auto-extend, NVMe deadlines) and the running job's step; then
//!    issue (`Volumes::issue_volumes`) and unplug;
//! 5. NBD send: the replies into the sockets, then the network's egress (`Net::send`);
//! 6. console: the job's notices, progress or report, then the bytes typed;
//! 7. idle: `hlt` until an interrupt, unless a step said work remains.
//!
//! Interrupt handlers only record which vector fired and wake the loop (`executor`); those
//! flags, the line editor the log path prints above (`console::output`) and the logger's
//! gate are the only shared state. A console command gets the parts it needs lent for
//! that one call (`shell::Ctx`).

use alloc::boxed::Box;
use drivers::block::{BufferPool, Completion};
use drivers::info::FixedString;
use volume::Ports;

use crate::cmdline::CmdLine;
use crate::console::editor::{EditorEvent, LineEditor, LINE_CAPACITY};
use crate::console::output::{self, with_editor, Out};
use crate::devices::{self, Storage};
use crate::nbd::backend::{self as nbd_backend, StorageBackend};
use crate::nbd::tcp::NbdService;
use crate::nbd::{Nbd, Server, ServerConfig};
use crate::net::Net;
use crate::ring::ByteRing;
use crate::shell::{self, Ctx, IoCounters, Job};
use crate::{executor, memory, serial, time};

/// The console prompt.
pub const PROMPT: &str = "snapfw> ";
/// How often a job's progress line is refreshed.
const PROGRESS_NS: u64 = 500_000_000;

/// Bytes no terminal sends while typing text: everything >= 0x80, NUL, and control
/// characters the editor has no key for.
fn is_garbage(byte: u8) -> bool {
    byte >= 0x80
        || matches!(byte, 0x00 | 0x07 | 0x09 | 0x0f | 0x11..=0x14 | 0x16 | 0x18..=0x1a | 0x1c..=0x1f)
}

/// The job a command (or boot) started.
struct Running {
    job: Job,
    allocations_at_start: u64,
    next_progress: u64,
    progress_shown: bool,
}

impl Running {
    fn new(job: Job, now: u64) -> Running {
        Running {
            job,
            allocations_at_start: memory::allocation_count(),
            next_progress: now + PROGRESS_NS,
            progress_shown: false,
        }
    }
}

/// The console's input state.
struct Console {
    /// Bytes of the current line that are not text.
    garbage: usize,
    /// Keys typed while a job ran, edited once it ends.
    typeahead: ByteRing<256>,
    typeahead_dropped: bool,
}

/// Everything the appliance runs, owned by the loop.
pub struct MainLoop {
    storage: Storage,
    net: Option<Net>,
    nbd: Nbd,
    cmdline: CmdLine,
    counters: IoCounters,
    running: Option<Running>,
    console: Console,
    /// The NBD listener was opened (or there was nothing to open it on).
    nbd_started: bool,
}

impl MainLoop {
    /// The loop over what boot brought up. Its first job is discovery: it reads every disk
    /// for COW stores and brings their snapshots back before the prompt and the NBD
    /// listener start, so that clients see every export.
    pub fn new(storage: Storage, net: Option<Net>, cmdline: CmdLine, nbd: ServerConfig) -> Self {
        let discover = Job::Task(Box::new(volume::discover::DiscoverTask::new()));
        MainLoop {
            storage,
            net,
            nbd: Nbd {
                server: Server::new(nbd),
                listener: None,
            },
            cmdline,
            counters: IoCounters::default(),
            running: Some(Running::new(discover, time::uptime_ns())),
            console: Console {
                garbage: 0,
                typeahead: ByteRing::new(),
                typeahead_dropped: false,
            },
            nbd_started: false,
        }
    }

    /// Runs forever.
    pub fn run(mut self) -> ! {
        output::install_editor({
            let mut e = LineEditor::new();
            e.set_prompt(PROMPT);
            e
        });
        loop {
            executor::take_pending();
            let now = time::uptime_ns();
            if self.io_round(now) {
                executor::wake();
            }
            self.job_output(now);
            self.console_input();
            executor::idle();
        }
    }

    /// Steps 1 to 5 of the round. Returns true when work remains (run again before
    /// halting).
    fn io_round(&mut self, now: u64) -> bool {
        let MainLoop {
            storage,
            net,
            nbd,
            counters,
            running,
            ..
        } = self;
        let Nbd { server, listener } = nbd;
        // 1. Completions → engines.
        let mut nbd_completed = false;
        let mut more = {
            let mut to_job = |pool: &mut BufferPool, c: Completion| match running.as_mut() {
                Some(r) => r.job.complete(pool, c, now),
                None => {
                    if let Some(b) = c.buffer {
                        let _ = pool.release(b);
                    }
                }
            };
            let mut to_nbd = |pool: &mut BufferPool, c: Completion| {
                nbd_completed = true;
                let before = memory::allocation_count();
                nbd_backend::complete(server, pool, c);
                counters.nbd_allocations += memory::allocation_count().saturating_sub(before);
            };
            let mut ports = Ports {
                task: &mut to_job,
                nbd: &mut to_nbd,
            };
            devices::poll(storage, now, &mut ports)
        };
        // 2. Plugged from here to the issue.
        storage.vol.plug();
        // 3. NBD receive. A completion may have made a reply ready or freed buffers for
        // input held back: the network runs its round then.
        let round = match net.as_mut() {
            Some(net) => {
                let nbd_listener = listener.map(|l| l.listener());
                let began = net.receive(now, nbd_completed, &mut |l, peer, local| {
                    Some(l) == nbd_listener && server.screen(peer, local, now)
                });
                if let (true, Some(l)) = (began, *listener) {
                    let mut sockets = l.sockets(net);
                    server.poll_connections(&mut sockets, now);
                    let before = memory::allocation_count();
                    server.poll_receive(&mut sockets, &mut StorageBackend(&mut storage.vol), now);
                    counters.nbd_allocations += memory::allocation_count().saturating_sub(before);
                }
                began
            }
            None => false,
        };
        let before = memory::allocation_count();
        server.step(&mut StorageBackend(&mut storage.vol));
        counters.nbd_allocations += memory::allocation_count().saturating_sub(before);
        // 4. Tasks, then issue.
        more |= devices::housekeeping(storage, now);
        if let Some(r) = running.as_mut() {
            r.job.step(storage, server, now);
        }
        more |= devices::issue_volumes(storage);
        storage.vol.unplug();
        // 5. NBD send, then the network's egress.
        if let Some(net) = net.as_mut() {
            if let (true, Some(l)) = (round, *listener) {
                let before = memory::allocation_count();
                let mut sockets = l.sockets(net);
                server.poll_send(&mut sockets, &mut StorageBackend(&mut storage.vol), now);
                counters.nbd_allocations += memory::allocation_count().saturating_sub(before);
            }
            let deadline = listener.and_then(|_| server.next_deadline());
            more |= net.send(now, deadline);
        }
        more
    }

    /// Step 6, the job's side: its notices, then its report when it is done (and the NBD
    /// listener after the first job, discovery), or its progress line.
    fn job_output(&mut self, now: u64) {
        let Some(r) = self.running.as_mut() else {
            return;
        };
        // Lines a job wants kept (e.g. what is durable), before its report.
        let mut notice = FixedString::<160>::new();
        let _ = r.job.notice(&mut notice);
        if !notice.as_str().is_empty() {
            serial::write_bytes(b"\r\x1b[K");
            serial::write_bytes(notice.as_str().as_bytes());
            serial::write_bytes(b"\r\n");
            r.progress_shown = false;
        }
        // A job ends when it says so and its last request has come back: a late completion
        // must not reach the next job.
        if r.job.done() && self.storage.task_ios == 0 {
            if r.job.io_path() {
                self.counters.task_allocations +=
                    memory::allocation_count().saturating_sub(r.allocations_at_start);
            }
            let mut out = Out;
            if r.progress_shown {
                serial::write_bytes(b"\r\x1b[K");
            }
            let _ = r.job.report(&mut out, time::uptime_ns());
            self.running = None;
            if !self.nbd_started {
                // Discovery is done (the first job): every export is known. Before the
                // prompt is drawn, so the log line does not land after it.
                self.nbd_started = true;
                self.start_nbd();
            }
            if core::mem::take(&mut self.console.typeahead_dropped) {
                out.error(format_args!(
                    "keys typed while the command ran were dropped"
                ));
                while self.console.typeahead.pop().is_some() {}
            }
            with_editor(|e, out| e.redraw(out));
        } else if now >= r.next_progress {
            let mut line = FixedString::<160>::new();
            let _ = r.job.progress(&mut line, now);
            serial::write_bytes(b"\r\x1b[K");
            serial::write_bytes(line.as_str().as_bytes());
            r.progress_shown = true;
            r.next_progress = now + PROGRESS_NS;
        }
    }

    /// Opens the NBD server's TCP port (when there is a network).
    fn start_nbd(&mut self) {
        let port = self.nbd.server.config().port;
        match self.net.as_mut().map(|n| NbdService::listen(n, port)) {
            None => log::info!("nbd: no network; not serving"),
            Some(Err(e)) => log::error!("nbd: cannot listen on TCP port {port}: {e}"),
            Some(Ok(listener)) => {
                self.nbd.listener = Some(listener);
                executor::wake();
                log::info!("nbd: serving every volume on TCP port {port}")
            }
        }
    }

    /// Step 6, the operator's side: console bytes to the line editor; a finished line runs
    /// a command with the parts it needs lent to it.
    fn console_input(&mut self) {
        loop {
            // Keys typed while a job ran are edited first, as if typed at the prompt.
            let byte = match self.running {
                None => self.console.typeahead.pop().or_else(serial::read_byte),
                Some(_) => serial::read_byte(),
            };
            let Some(byte) = byte else { break };
            if let Some(r) = self.running.as_mut() {
                // While a job runs the editor is not fed (finishing a line allocates):
                // Ctrl-C cancels, other keys wait in a fixed ring until the job ends.
                if byte == 0x03 {
                    r.job.cancel();
                } else if !self.console.typeahead.push(byte) {
                    self.console.typeahead_dropped = true;
                }
                continue;
            }
            if is_garbage(byte) {
                self.console.garbage += 1;
            }
            let event = with_editor(|e, out| e.feed(byte, out)).flatten();
            let Some(event) = event else { continue };
            let mut o = Out;
            let garbage = core::mem::take(&mut self.console.garbage);
            match event {
                EditorEvent::Line(_) if garbage > 0 => o.error(format_args!(
                    "the line held {garbage} byte(s) that are not text; ignored"
                )),
                EditorEvent::Line(line) => {
                    let mut ctx = Ctx {
                        storage: &mut self.storage,
                        net: self.net.as_mut(),
                        nbd: &mut self.nbd,
                        cmdline: &self.cmdline,
                        counters: &self.counters,
                    };
                    if let Some(job) = shell::execute(&line, &mut ctx) {
                        if job.io_path() {
                            self.counters.io_tasks += 1;
                        }
                        self.running = Some(Running::new(job, time::uptime_ns()));
                        executor::wake(); // start issuing at once
                    }
                }
                EditorEvent::Overflow => o.error(format_args!(
                    "line too long (at most {LINE_CAPACITY} characters); ignored"
                )),
                EditorEvent::Cancelled => {}
            }
            if self.running.is_none() {
                with_editor(|e, out| e.redraw(out));
            }
        }
    }
}
