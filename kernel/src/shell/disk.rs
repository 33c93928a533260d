//! The disk commands: `devices`, and `read`/`write`/`checksum`/`flush`/`bench`, which check
//! their arguments against the device and start a task of the main loop.

use core::fmt::Write;

use alloc::boxed::Box;
use drivers::info::{DeviceInfo, DeviceState};

use crate::console::args::{parse_byte, parse_duration, parse_size, parse_u64, ArgError, Args};
use crate::console::output::Out;
use crate::devices::{Storage, Target};
use crate::json;
use crate::time;
use volume::tasks::{
    BenchLimit, BenchMode, BenchSpec, BenchTask, FlushTask, Pattern, RangeTask, Task, WriteSpec,
};

/// Most blocks `read` prints.
const READ_MAX_BLOCKS: u64 = 8;

/// A command's failure: one line for the operator.
type CmdResult<T> = Result<T, alloc::string::String>;

fn arg_err(e: ArgError) -> alloc::string::String {
    alloc::format!("{e}")
}

fn disk_index(st: &Storage, name: &str) -> CmdResult<Target> {
    st.resolve(name).ok_or_else(|| {
        let shown: alloc::string::String = name
            .chars()
            .take(24)
            .map(|c| if c.is_ascii_graphic() { c } else { '?' })
            .collect();
        if st.failed.iter().any(|f| f.name.as_str() == name) {
            alloc::format!("device '{shown}' failed to initialise (see 'devices')")
        } else {
            alloc::format!("no device or snapshot '{shown}' (see 'devices' and 'snapshot list')")
        }
    })
}

/// Refuses writes that would corrupt a COW store: to a device that holds one.
fn check_writable(st: &Storage, target: Target) -> CmdResult<()> {
    if let Some(h) = st.held(st.disk_of(target)) {
        return Err(alloc::format!("{} is {}", st.target_name(target), h.why()));
    }
    if st.geometry(target).read_only {
        return Err(alloc::format!("{} is read-only", st.target_name(target)));
    }
    if let Target::Device(d) = target {
        if let Some(snap) = st.cow_user(d) {
            return Err(alloc::format!(
                "{} holds the COW store of snapshot '{snap}'; writing it would corrupt the snapshot",
                st.name(d)
            ));
        }
    }
    Ok(())
}

/// Checks `[lba, lba+count)` against the device.
fn check_range(st: &Storage, disk: Target, lba: u64, count: u64) -> CmdResult<()> {
    let capacity = st.geometry(disk).capacity_blocks;
    let name = st.target_name(disk);
    if count == 0 {
        return Err("COUNT must be at least 1".into());
    }
    if lba >= capacity {
        return Err(alloc::format!(
            "LBA {lba} is past the end of {} ({capacity} blocks)",
            name
        ));
    }
    if count > capacity - lba {
        return Err(alloc::format!(
            "range {lba}+{count} runs past the end of {} ({capacity} blocks)",
            name
        ));
    }
    Ok(())
}

/// Runs a disk command; returns the task to start, if any.
pub fn run(
    id: super::commands::CommandId,
    args: &Args,
    out: &mut Out,
    st: &mut Storage,
    testing: bool,
) -> Option<Box<dyn Task>> {
    use super::commands::CommandId;
    let now = time::uptime_ns();
    let result: CmdResult<Option<Box<dyn Task>>> = (|| match id {
        CommandId::Devices => {
            devices(st, args.flag("json"), out);
            Ok(None)
        }
        CommandId::Read => {
            let disk = disk_index(st, args.arg("DEV").unwrap_or(""))?;
            let lba = args.arg_as("LBA", parse_u64).map_err(arg_err)?;
            let count = match args.arg("COUNT") {
                Some(c) => parse_u64(c, "COUNT").map_err(arg_err)?,
                None => 1,
            };
            if count > READ_MAX_BLOCKS {
                return Err(alloc::format!(
                    "read shows at most {READ_MAX_BLOCKS} blocks; use checksum for larger ranges"
                ));
            }
            if lba.checked_add(count).is_none() {
                return Err(alloc::format!("range {lba}+{count} overflows"));
            }
            if args.flag("unchecked") {
                // Test builds only: let the device judge the range (NVMe names its answer).
                if !testing {
                    return Err(
                        "--unchecked is only available with 'testing' on the command line".into(),
                    );
                }
            } else {
                check_range(st, disk, lba, count)?;
            }
            Ok(Some(
                Box::new(RangeTask::read(st, disk, lba, count, now)) as Box<dyn Task>
            ))
        }
        CommandId::Write => {
            let disk = disk_index(st, args.arg("DEV").unwrap_or(""))?;
            let lba = args.arg_as("LBA", parse_u64).map_err(arg_err)?;
            let count = args.arg_as("COUNT", parse_u64).map_err(arg_err)?;
            let pattern = match (
                args.value_as("byte", parse_byte).map_err(arg_err)?,
                args.value_as("seed", parse_u64).map_err(arg_err)?,
            ) {
                (Some(b), None) => Pattern::Byte(b),
                (None, Some(s)) => Pattern::Seed(s),
                _ => return Err("write takes exactly one of --byte 0xNN or --seed N".into()),
            };
            let g = st.geometry(disk);
            check_writable(st, disk)?;
            let transfer_bytes = args.value_as("bs", parse_size).map_err(arg_err)?;
            if let Some(bs) = transfer_bytes {
                let block = u64::from(g.block_size.max(1));
                let max = (st.pools[st.disk_of(disk)].buffer_size() as u64)
                    .min(u64::from(g.max_transfer_bytes));
                if bs == 0 || bs % block != 0 || bs > max {
                    return Err(alloc::format!(
                        "--bs {bs} must be a multiple of {block} bytes up to {max}"
                    ));
                }
            }
            let fua = args.flag("fua");
            if fua && !g.fua && g.volatile_write_cache {
                return Err(alloc::format!(
                    "{} does not support FUA writes",
                    st.target_name(disk)
                ));
            }
            check_range(st, disk, lba, count)?;
            let flush_every = args
                .value_as("flush-every", parse_u64)
                .map_err(arg_err)?
                .unwrap_or(0);
            if args.value("flush-every").is_some() && flush_every == 0 {
                return Err("--flush-every must be at least 1 block".into());
            }
            let spec = WriteSpec {
                flush_every,
                pattern,
                transfer_bytes,
                fua,
            };
            Ok(Some(
                Box::new(RangeTask::write(st, disk, lba, count, spec, now)) as Box<dyn Task>,
            ))
        }
        CommandId::Checksum => {
            let disk = disk_index(st, args.arg("DEV").unwrap_or(""))?;
            let capacity = st.geometry(disk).capacity_blocks;
            let (lba, count) = match (args.arg("LBA"), args.arg("COUNT")) {
                (None, _) => (0, capacity),
                (Some(_), None) => {
                    return Err("checksum takes both LBA and COUNT, or neither".into())
                }
                (Some(l), Some(c)) => (
                    parse_u64(l, "LBA").map_err(arg_err)?,
                    parse_u64(c, "COUNT").map_err(arg_err)?,
                ),
            };
            check_range(st, disk, lba, count)?;
            Ok(Some(
                Box::new(RangeTask::checksum(st, disk, lba, count, now)) as Box<dyn Task>,
            ))
        }
        CommandId::Flush => {
            let disk = disk_index(st, args.arg("DEV").unwrap_or(""))?;
            Ok(Some(
                Box::new(FlushTask::new(st, disk, now)) as Box<dyn Task>
            ))
        }
        CommandId::Bench => bench(st, args, now).map(Some),
        _ => Ok(None),
    })();
    match result {
        Ok(task) => task,
        Err(message) => {
            out.error(format_args!("{message}"));
            None
        }
    }
}

fn bench(st: &Storage, args: &Args, now: u64) -> CmdResult<Box<dyn Task>> {
    let disk = disk_index(st, args.arg("DEV").unwrap_or(""))?;
    let mode = match args.value("rw") {
        Some("read") => BenchMode::Read,
        Some("write") => BenchMode::Write,
        Some("randread") => BenchMode::RandRead,
        Some("randwrite") => BenchMode::RandWrite,
        Some(other) => {
            let shown: alloc::string::String = other.chars().take(24).collect();
            return Err(alloc::format!(
                "invalid --rw '{shown}' (use read, write, randread or randwrite)"
            ));
        }
        None => return Err("bench needs --rw read|write|randread|randwrite".into()),
    };
    let g = st.geometry(disk);
    if mode == BenchMode::Write || mode == BenchMode::RandWrite {
        check_writable(st, disk)?;
    }
    let bs = args
        .value_as("bs", parse_size)
        .map_err(arg_err)?
        .unwrap_or(4096);
    let block = u64::from(g.block_size.max(1));
    let max = (st.pools[st.disk_of(disk)].buffer_size() as u64)
        .min(u64::from(g.max_transfer_bytes).max(block));
    if bs == 0 || bs % block != 0 {
        return Err(alloc::format!(
            "--bs {bs} is not a multiple of the {block}-byte block size"
        ));
    }
    if bs > max {
        return Err(alloc::format!(
            "--bs {bs} is larger than the largest transfer ({max} bytes)"
        ));
    }
    if bs / block > g.capacity_blocks {
        return Err("--bs is larger than the device".into());
    }
    let qd = args
        .value_as("qd", parse_u64)
        .map_err(arg_err)?
        .unwrap_or(32);
    let max_qd = u64::from(g.queue_depth.max(1)).min(st.pools[st.disk_of(disk)].total() as u64);
    if qd == 0 || qd > max_qd {
        return Err(alloc::format!("--qd must be 1..={max_qd} for this device"));
    }
    let limit = match (
        args.value_as("time", parse_duration).map_err(arg_err)?,
        args.value_as("ios", parse_u64).map_err(arg_err)?,
    ) {
        (Some(_), Some(_)) => return Err("give --time or --ios, not both".into()),
        (Some(t), None) if t.as_nanos() == 0 => return Err("--time must be positive".into()),
        (Some(t), None) => BenchLimit::Time(t.as_nanos().min(u64::MAX as u128) as u64),
        (None, Some(0)) => return Err("--ios must be at least 1".into()),
        (None, Some(n)) => BenchLimit::Ios(n),
        (None, None) => BenchLimit::Time(10_000_000_000),
    };
    let seed = args
        .value_as("seed", parse_u64)
        .map_err(arg_err)?
        .unwrap_or(1);
    let capacity = g.capacity_blocks * block;
    let size = args
        .value_as("size", parse_size)
        .map_err(arg_err)?
        .unwrap_or(capacity);
    if size < bs || size > capacity || size % block != 0 {
        return Err(alloc::format!(
            "--size must be a multiple of {block} bytes from --bs up to {capacity}"
        ));
    }
    let fsync = match args.value_as("fsync", parse_u64).map_err(arg_err)? {
        None => None,
        Some(_) if !mode.writes() => {
            return Err("--fsync applies to write and randwrite only".into())
        }
        Some(0) => return Err("--fsync must be at least 1".into()),
        Some(n) => Some(n),
    };
    let spec = BenchSpec {
        fsync,
        mode,
        bs,
        qd: qd as usize,
        limit,
        seed,
        blocks: size / block,
        random_map: !args.flag("norandommap"),
    };
    Ok(Box::new(BenchTask::new(st, disk, spec, now)))
}

fn state_name(info: &DeviceInfo) -> &str {
    match &info.state {
        DeviceState::Online => "online",
        DeviceState::Failed(r) => r.as_str(),
        DeviceState::InitFailed(r) => r.as_str(),
    }
}

fn devices(st: &Storage, json_out: bool, out: &mut Out) {
    let infos = st.devices.iter().map(|d| d.info());
    if json_out {
        let text = json::object_string(|o| {
            o.array("devices", |a| {
                for i in infos.clone().chain(st.failed.iter().copied()) {
                    a.object(|d| device_json(d, &i));
                }
            });
            o.array("controllers", |a| {
                for c in st.controllers.iter().filter_map(|c| c.controller_info()) {
                    a.object(|o| controller_json(o, &c));
                }
            });
        });
        let _ = writeln!(out, "{text}");
        return;
    }
    let _ = writeln!(
        out,
        "{:<8} {:<11} {:<20} {:>12} {:>6} {:>9} {:<13} {:<12} I/O (reads/writes/flushes/errors/interrupts)",
        "NAME",
        "DRIVER",
        "SERIAL",
        "SIZE",
        "BLOCK",
        "QUEUES",
        "CACHE",
        "VECTORS",
    );
    for i in infos {
        let Some(g) = i.geometry else { continue };
        let mut vectors = drivers::info::FixedString::<32>::new();
        for (n, v) in i.vectors().iter().enumerate() {
            let _ = write!(vectors, "{}{v:#x}", if n > 0 { "," } else { "" });
        }
        let s = &i.stats;
        let _ = writeln!(
            out,
            "{:<8} {:<11} {:<20} {:>8} MiB {:>6} {:>3}x{:<5} {:<13} {:<12} {}/{}/{}/{}/{}",
            i.name.as_str(),
            i.driver,
            if i.serial.is_empty() {
                "-"
            } else {
                i.serial.as_str()
            },
            g.capacity_bytes() >> 20,
            g.block_size,
            g.queue_count,
            g.queue_depth,
            g.cache_mode(),
            vectors.as_str(),
            s.reads,
            s.writes,
            s.flushes,
            s.errors,
            s.interrupts
        );
    }
    for c in st.controllers.iter().filter_map(|c| c.controller_info()) {
        let _ = writeln!(out, "{c}");
    }
    for f in &st.failed {
        let _ = writeln!(
            out,
            "{:<8} {:<11} failed to initialise: {}",
            f.name.as_str(),
            f.driver,
            state_name(f)
        );
    }
}

fn device_json(d: &mut json::ObjectWriter<'_>, i: &DeviceInfo) {
    d.str("name", i.name.as_str());
    d.str("driver", i.driver);
    match i.pci {
        Some(p) => d.str("pci", &alloc::format!("{p}")),
        None => d.null("pci"),
    };
    d.str("model", i.model.as_str());
    d.str("serial", i.serial.as_str());
    if let Some(ns) = &i.namespace {
        d.u64("nsid", u64::from(ns.nsid));
        match &ns.nguid {
            Some(g) => d.str("nguid", &alloc::format!("{}", drivers::info::Hex(g))),
            None => d.null("nguid"),
        };
        match &ns.eui64 {
            Some(e) => d.str("eui64", &alloc::format!("{}", drivers::info::Hex(e))),
            None => d.null("eui64"),
        };
    }
    d.str("state", i.state.name());
    if !matches!(i.state, DeviceState::Online) {
        d.str("reason", state_name(i));
    }
    if let Some(g) = i.geometry {
        d.u64("block_size", u64::from(g.block_size));
        d.u64("capacity_blocks", g.capacity_blocks);
        d.u64("capacity_bytes", g.capacity_bytes());
        d.u64("max_transfer_bytes", u64::from(g.max_transfer_bytes));
        d.u64("queues", u64::from(g.queue_count));
        d.u64("queue_depth", u64::from(g.queue_depth));
        d.bool("volatile_write_cache", g.volatile_write_cache);
        d.bool("fua", g.fua);
        d.bool("discard", g.discard);
    }
    d.array("msix_vectors", |a| {
        for v in i.vectors() {
            a.u64(u64::from(*v));
        }
    });
    let s = i.stats;
    d.object("stats", |o| {
        o.u64("reads", s.reads);
        o.u64("writes", s.writes);
        o.u64("flushes", s.flushes);
        o.u64("errors", s.errors);
        o.u64("bytes_read", s.bytes_read);
        o.u64("bytes_written", s.bytes_written);
        o.u64("interrupts", s.interrupts);
    });
}

fn controller_json(o: &mut json::ObjectWriter<'_>, c: &drivers::nvme::ControllerInfo) {
    o.str("name", c.name.as_str());
    match c.pci {
        Some(p) => o.str("pci", &alloc::format!("{p}")),
        None => o.null("pci"),
    };
    o.str("model", c.model.as_str());
    o.str("serial", c.serial.as_str());
    o.str("firmware", c.firmware.as_str());
    let (major, minor, tertiary) = c.version;
    o.str("version", &alloc::format!("{major}.{minor}.{tertiary}"));
    o.u64("queue_pairs", u64::from(c.queue_pairs));
    o.u64("queue_entries", u64::from(c.queue_entries));
    o.opt_u64("mdts_bytes", c.mdts_bytes);
    o.str(
        "write_cache",
        match c.write_cache {
            drivers::nvme::WriteCache::Absent => "none",
            drivers::nvme::WriteCache::Enabled => "write-back",
            drivers::nvme::WriteCache::Disabled => "disabled",
        },
    );
    o.bool("deallocate", c.deallocate);
    o.u64("namespaces", u64::from(c.namespaces));
    o.str("state", c.state.name());
}
