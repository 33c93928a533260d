//! The commands of the kernel core: help, version, uptime, mem, cmdline, log, reboot,
//! poweroff, and the test-only crash command.

use core::fmt::Write;

use alloc::boxed::Box;
use alloc::string::String;

use super::commands::{help_all, help_one, CommandId};
use super::{Ctx, IoCounters, Job};
use crate::cmdline::CmdLine;
use crate::console::args::Args;
use crate::console::output::Out;
use crate::{build_info, json, memory, power, time};

/// Runs a checked command with the parts of the appliance it needs; long disk work comes
/// back as a job for the main loop.
pub fn run(id: CommandId, args: &Args, out: &mut Out, ctx: &mut Ctx<'_>) -> Option<Job> {
    let json = args.flag("json");
    match id {
        CommandId::Devices
        | CommandId::Read
        | CommandId::Write
        | CommandId::Checksum
        | CommandId::Flush
        | CommandId::Bench => {
            return super::disk::run(id, args, out, ctx.storage, ctx.cmdline.testing).map(Job::Task)
        }
        CommandId::Snapshot => return super::snap::run(args, out, ctx.storage).map(Job::Task),
        CommandId::Net => super::net::run(args, out, ctx.net.as_deref_mut(), ctx.cmdline.testing),
        CommandId::Nbd => super::nbd::run(args, out, ctx.storage, ctx.nbd, ctx.net.as_deref()),
        CommandId::NbdSelfTest => {
            let volume = args.arg("VOLUME").unwrap_or("");
            return match crate::nbd::selftest::NbdSelfTest::new(&mut ctx.nbd.server, volume) {
                Ok(task) => Some(Job::NbdSelfTest(Box::new(task))),
                Err(e) => {
                    out.error(format_args!("nbd-selftest: {e}"));
                    None
                }
            };
        }
        CommandId::Help => match args.arg("COMMAND") {
            None => {
                let _ = out.write_str(&help_all(ctx.cmdline.testing));
            }
            Some(name) => match help_one(name, ctx.cmdline.testing) {
                Ok(text) => {
                    let _ = out.write_str(&text);
                }
                Err(e) => out.error(format_args!("{e}")),
            },
        },
        CommandId::Version => version(json, out),
        CommandId::Uptime => uptime(json, out),
        CommandId::Date => date(json, out),
        CommandId::Mem => mem(json, out, ctx.counters),
        CommandId::Prof => prof(args, out),
        CommandId::Cmdline => cmdline(json, out, ctx.cmdline),
        CommandId::Log => log_level(args, out),
        CommandId::Reboot => {
            let _ = writeln!(out, "rebooting");
            power::reboot();
        }
        CommandId::Poweroff => {
            let _ = writeln!(out, "powering off");
            power::poweroff();
            out.error(format_args!(
                "ACPI power-off did not take effect; the machine is still on"
            ));
        }
        CommandId::Crash => crash(args, out),
    }
    None
}

fn print_json(out: &mut Out, text: String) {
    let _ = writeln!(out, "{text}");
}

fn version(json_out: bool, out: &mut Out) {
    let name = env!("CARGO_PKG_NAME");
    let version = env!("CARGO_PKG_VERSION");
    if json_out {
        print_json(
            out,
            json::object_string(|o| {
                o.str("name", "snapfw");
                o.str("crate", name);
                o.str("version", version);
                o.str("commit", build_info::GIT_COMMIT);
                o.str("profile", build_info::PROFILE);
            }),
        );
    } else {
        let _ = writeln!(
            out,
            "snapfw {version} (commit {}, {} build)",
            build_info::GIT_COMMIT,
            build_info::PROFILE
        );
    }
}

fn date(json_out: bool, out: &mut Out) {
    let Some(now) = crate::rtc::now() else {
        out.error(format_args!(
            "no wall-clock time: the real-time clock gave no valid date at boot"
        ));
        return;
    };
    let iso = alloc::format!("{}", crate::rtc::Iso8601(now));
    if json_out {
        print_json(
            out,
            json::object_string(|o| {
                o.str("utc", &iso);
                o.u64("unix_seconds", now);
            }),
        );
    } else {
        let _ = writeln!(out, "{iso}");
    }
}

fn uptime(json_out: bool, out: &mut Out) {
    let ns = time::uptime_ns();
    let ticks = crate::arch::apic::ticks();
    if json_out {
        print_json(
            out,
            json::object_string(|o| {
                o.u64("uptime_ns", ns);
                o.u64("uptime_ms", ns / 1_000_000);
                o.u64("timer_ticks", ticks);
            }),
        );
    } else {
        let s = ns / 1_000_000_000;
        let _ = writeln!(
            out,
            "up {}d {:02}:{:02}:{:02}.{:03} ({}.{:03} s, {} timer ticks)",
            s / 86400,
            (s / 3600) % 24,
            (s / 60) % 60,
            s % 60,
            (ns / 1_000_000) % 1000,
            s,
            (ns / 1_000_000) % 1000,
            ticks
        );
    }
}

/// `12.3 MiB` style, as `devices` shows sizes.
fn size(bytes: u64) -> String {
    alloc::format!("{}", drivers::info::Size(bytes))
}

fn mem(json_out: bool, out: &mut Out, counters: &IoCounters) {
    let m = memory::stats();
    let frame = crate::frames::FRAME_SIZE;
    if json_out {
        print_json(
            out,
            json::object_string(|o| {
                o.object("heap", |h| {
                    h.u64("total", m.heap_total);
                    h.u64("used", m.heap_used);
                    h.u64("free", m.heap_total - m.heap_used);
                    h.u64("arenas", m.heap_arenas as u64);
                    h.u64("failed_allocations", m.heap_failed);
                });
                o.object("memory", |mm| {
                    mm.u64("usable", m.map.usable);
                    mm.u64("above_4g", m.map.above_4g);
                    mm.u64("ranges", m.map.ranges as u64);
                    mm.u64("unused", m.map.unused);
                    mm.u64("dma_reserve", m.dma_reserve);
                });
                o.object("frames", |f| {
                    f.u64("size", frame);
                    f.u64("total", m.frames_total);
                    f.u64("used", m.frames_total - m.frames_free);
                    f.u64("free", m.frames_free);
                });
                o.u64("allocations", m.allocations);
                o.u64("frees", m.frees);
                o.u64(
                    "io_path_allocations",
                    counters.task_allocations + counters.nbd_allocations,
                );
                o.u64("nbd_allocations", counters.nbd_allocations);
                o.u64(
                    "table_growth_allocations",
                    snapshot::table::growth_allocations(),
                );
                o.u64("io_tasks", counters.io_tasks);
            }),
        );
    } else {
        let _ = writeln!(
            out,
            "memory: total {:>10}  above 4 GiB {:>10}  ({} usable ranges{})",
            size(m.map.usable),
            size(m.map.above_4g),
            m.map.ranges,
            if m.map.unused > 0 {
                alloc::format!("; {} not used", size(m.map.unused))
            } else {
                alloc::string::String::new()
            }
        );
        let _ = writeln!(
            out,
            "heap:   total {:>10}  used {:>10}  free {:>10}  ({} arenas; grows into free frames but the last {} kept for DMA)",
            size(m.heap_total),
            size(m.heap_used),
            size(m.heap_total - m.heap_used),
            m.heap_arenas,
            size(m.dma_reserve)
        );
        if m.heap_failed > 0 {
            let _ = writeln!(
                out,
                "heap allocations refused for want of memory: {}",
                m.heap_failed
            );
        }
        let _ = writeln!(
            out,
            "frames: total {:>10}  used {:>10}  free {:>10}  ({} frames of 4 KiB)",
            size(m.frames_total * frame),
            size((m.frames_total - m.frames_free) * frame),
            size(m.frames_free * frame),
            m.frames_total
        );
        let _ = writeln!(
            out,
            "heap allocations since boot: {} ({} frees)",
            m.allocations, m.frees
        );
        let _ = writeln!(
            out,
            "heap allocations on the I/O path: {} (during {} disk tasks; {} serving NBD)",
            counters.task_allocations + counters.nbd_allocations,
            counters.io_tasks,
            counters.nbd_allocations
        );
        let _ = writeln!(
            out,
            "exception table growth: {} allocations (counted apart from the I/O path's)",
            snapshot::table::growth_allocations()
        );
    }
}

fn cmdline(json_out: bool, out: &mut Out, c: &CmdLine) {
    let level = log::max_level();
    if json_out {
        print_json(
            out,
            json::object_string(|o| {
                o.str("raw", &c.raw);
                o.opt_str("image", c.image.as_deref());
                match &c.console {
                    Some(con) => o.object("console", |k| {
                        k.str("device", &alloc::format!("ttyS{}", con.port));
                        k.u64("baud", con.baud_or_default() as u64);
                    }),
                    None => o.null("console"),
                };
                o.str("loglevel", level.as_str());
                o.bool("testing", c.testing);
                o.array("unknown", |a| {
                    for u in &c.unknown {
                        a.str(u);
                    }
                });
            }),
        );
    } else {
        let _ = writeln!(out, "{}", c.raw);
        for warning in c.warnings() {
            let _ = writeln!(out, "  warning: {warning}");
        }
    }
}

fn prof(args: &Args, out: &mut Out) {
    use crate::arch::prof;
    use crate::console::args::parse_u64;
    let action = args.arg("ACTION").unwrap_or("");
    let number = |name: &str, default: u64, range: core::ops::RangeInclusive<u64>| match args
        .value_as(name, parse_u64)
    {
        Ok(None) => Ok(default),
        Ok(Some(v)) if range.contains(&v) => Ok(v),
        Ok(Some(v)) => Err(alloc::format!(
            "--{name} {v} is out of range ({} to {})",
            range.start(),
            range.end()
        )),
        Err(e) => Err(alloc::format!("{e}")),
    };
    let now = time::uptime_ns();
    match action {
        "start" => match number("hz", 4000, crate::arch::apic::TICK_HZ..=prof::MAX_HZ) {
            Ok(hz) => match prof::start(hz, now) {
                Ok(rate) => {
                    let _ = writeln!(
                        out,
                        "profiling at {rate} samples/s (up to {} kept); 'prof stop' ends it",
                        prof::CAPACITY
                    );
                }
                Err(e) => out.error(format_args!("prof: {e}")),
            },
            Err(e) => out.error(format_args!("prof: {e}")),
        },
        "stop" => {
            prof::stop(now);
            prof_status(out, &prof::status(now));
        }
        "show" => match number("top", 40, 1..=1000) {
            Ok(top) => {
                let st = prof::status(now);
                prof_status(out, &st);
                if st.running {
                    let _ = writeln!(
                        out,
                        "(still running: 'prof stop' first for a steady report)"
                    );
                }
                let Some(mut samples) = prof::samples() else {
                    out.error(format_args!("prof: no heap to sort the samples"));
                    return;
                };
                let total = samples.len().max(1) as u64;
                let Some(hot) = crate::util::profile::hottest(&mut samples, top as usize) else {
                    out.error(format_args!("prof: no heap to count the samples"));
                    return;
                };
                let _ = writeln!(out, "  address             samples  share of busy");
                for (rip, n) in hot {
                    let _ = writeln!(
                        out,
                        "  {rip:#018x} {n:>8}  {:>5.1}%",
                        100.0 * f64::from(n) / total as f64
                    );
                }
            }
            Err(e) => out.error(format_args!("prof: {e}")),
        },
        other => out.error(format_args!(
            "unknown prof action '{}' (usage: prof start [--hz N] | stop | show [--top N])",
            other.chars().take(32).collect::<String>()
        )),
    }
}

fn prof_status(out: &mut Out, st: &crate::arch::prof::Status) {
    let all = (st.busy + st.halted).max(1);
    let _ = writeln!(
        out,
        "prof: {}, {} samples/s, {}.{:03} s: {} busy, {} halted ({:.1}% halted){}",
        if st.running { "running" } else { "stopped" },
        st.hz,
        st.ns / 1_000_000_000,
        st.ns / 1_000_000 % 1000,
        st.busy,
        st.halted,
        100.0 * st.halted as f64 / all as f64,
        if st.dropped > 0 {
            alloc::format!(", {} busy samples not kept (buffer full)", st.dropped)
        } else {
            String::new()
        }
    );
}

fn log_level(args: &Args, out: &mut Out) {
    if args.arg("level") != Some("level") {
        out.error(format_args!(
            "unknown log subcommand (usage: log level [LEVEL])"
        ));
        return;
    }
    match args.arg("LEVEL") {
        None => {
            let _ = writeln!(
                out,
                "log level: {} ({} lines dropped since boot: the serial console was behind)",
                log::max_level().as_str().to_ascii_lowercase(),
                crate::logger::dropped_lines()
            );
        }
        Some(name) => match name.parse::<log::LevelFilter>() {
            Ok(level) if level != log::LevelFilter::Off => {
                log::set_max_level(level);
                let _ = writeln!(out, "log level: {}", level.as_str().to_ascii_lowercase());
            }
            _ => out.error(format_args!(
                "invalid log level '{}' (use error, warn, info, debug or trace)",
                name.chars().take(32).collect::<String>()
            )),
        },
    }
}

fn crash(args: &Args, out: &mut Out) {
    match args.arg("KIND") {
        Some("fault") => {
            let _ = writeln!(out, "raising a page fault at 0xdead0000000");
            let v = crate::arch::cpu::read_unmapped(0x0dea_d000_0000);
            let _ = writeln!(out, "unexpectedly read {v:#x}");
        }
        Some("panic") => panic!("deliberate panic from the console (crash panic)"),
        _ => out.error(format_args!("crash takes 'fault' or 'panic'")),
    }
}
