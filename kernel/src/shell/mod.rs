//! The operator's commands: the main loop (`main_loop.rs`) feeds console bytes to the line
//! editor and hands each finished line to [`execute`] with a [`Ctx`], the parts of the
//! appliance a command may use, lent by the main loop for that one call. Long-running
//! disk work comes back as a [`Job`] the main loop drives.
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
mod snap;
pub mod snapcmd;

#[cfg(target_os = "none")]
pub use appliance::{execute, Ctx, IoCounters, Job};

#[cfg(target_os = "none")]
mod appliance {
    use core::fmt::{self, Write};

    use alloc::boxed::Box;
    use drivers::block::{BufferPool, Completion};
    use volume::tasks::Task;

    use super::commands::parse_line;
    use crate::cmdline::CmdLine;
    use crate::console::output::Out;
    use crate::devices::Storage;
    use crate::nbd::selftest::NbdSelfTest;
    use crate::nbd::{Nbd, Server};
    use crate::net::Net;

    /// Counters of the I/O path's allocations, kept by the main loop and shown by `mem`.
    #[derive(Clone, Copy, Debug, Default)]
    pub struct IoCounters {
        /// Heap allocations made while disk tasks had I/O in flight (should stay 0).
        pub task_allocations: u64,
        /// Disk tasks run since boot.
        pub io_tasks: u64,
        /// Heap allocations made by NBD request handling once connections were accepted
        /// (should stay 0).
        pub nbd_allocations: u64,
    }

    /// What a command may use, lent by the main loop for one command.
    pub struct Ctx<'a> {
        /// The disks and volumes.
        pub storage: &'a mut Storage,
        /// The network, if there is one.
        pub net: Option<&'a mut Net>,
        /// The NBD server and its listener.
        pub nbd: &'a mut Nbd,
        /// The kernel command line.
        pub cmdline: &'a CmdLine,
        /// The I/O path's counters.
        pub counters: &'a IoCounters,
    }

    /// Long-running work a command started, driven by the main loop.
    pub enum Job {
        /// A volume task (it steps over the volumes).
        Task(Box<dyn Task>),
        /// `nbd-selftest` (it steps over the volumes and the NBD server).
        NbdSelfTest(Box<NbdSelfTest>),
    }

    impl Job {
        fn task(&self) -> &dyn Task {
            match self {
                Job::Task(t) => &**t,
                Job::NbdSelfTest(t) => &**t,
            }
        }

        fn task_mut(&mut self) -> &mut dyn Task {
            match self {
                Job::Task(t) => &mut **t,
                Job::NbdSelfTest(t) => &mut **t,
            }
        }

        /// One step over the volumes (and the NBD server, which `nbd-selftest` talks to).
        pub fn step(&mut self, st: &mut Storage, server: &mut Server, now: u64) {
            match self {
                Job::Task(t) => t.step(&mut st.vol, now),
                Job::NbdSelfTest(t) => t.drive(server, &mut st.vol),
            }
        }

        /// A completion of the job's own device I/O.
        pub fn complete(&mut self, pool: &mut BufferPool, completion: Completion, now: u64) {
            self.task_mut().complete(pool, completion, now);
        }

        /// Finished (its last request may still be in a device).
        pub fn done(&self) -> bool {
            self.task().done()
        }

        /// Ctrl-C.
        pub fn cancel(&mut self) {
            self.task_mut().cancel();
        }

        /// The progress line.
        pub fn progress(&self, out: &mut dyn Write, now: u64) -> fmt::Result {
            self.task().progress(out, now)
        }

        /// The final report.
        pub fn report(&mut self, out: &mut dyn Write, now: u64) -> fmt::Result {
            self.task_mut().report(out, now)
        }

        /// Lines to keep above the progress line.
        pub fn notice(&mut self, out: &mut dyn Write) -> fmt::Result {
            self.task_mut().notice(out)
        }

        /// Whether it is disk I/O whose allocations count as the I/O path's.
        pub fn io_path(&self) -> bool {
            self.task().io_path()
        }
    }

    /// Runs one console line with the parts in `ctx`; returns the job it started, if any.
    pub fn execute(line: &str, ctx: &mut Ctx<'_>) -> Option<Job> {
        let mut out = Out;
        match parse_line(line, ctx.cmdline.testing) {
            Ok(None) => None,
            Ok(Some(parsed)) => match parsed.args() {
                Ok(args) => super::builtin::run(parsed.info.id, &args, &mut out, ctx),
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
