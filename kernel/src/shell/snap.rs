//! `snapshot`: `list` and `status` print the snapshots; the subcommands that change
//! something are decided by [`super::snapcmd`] (host-tested), which starts their task.

use core::fmt::Write;

use alloc::boxed::Box;
use alloc::string::{String, ToString};

use super::snapcmd::{self, find_snap, shown, state_name, CmdResult, SUBCOMMANDS};
use crate::console::args::Args;
use crate::console::output::Out;
use crate::devices::{Storage, Target};
use crate::identity;
use crate::json;
use crate::time;
use volume::origin::{reason_text, Origin, Snap, UNMARKED_ALERT};
use volume::tasks::Task;

/// Runs a `snapshot` subcommand; creation and deletion come back as tasks.
pub fn run(args: &Args, out: &mut Out, st: &mut Storage) -> Option<Box<dyn Task>> {
    let result = match args.arg("SUBCOMMAND") {
        Some("list") => {
            list(st, args.flag("json"), out);
            Ok(None)
        }
        Some("status") => status(st, args, out).map(|_| None),
        Some(other) => {
            let now = time::uptime_ns();
            match snapcmd::decide(other, &mut st.vol, &st.failed, args, out, now) {
                Some(decided) => decided.map(Some),
                None => Err(alloc::format!(
                    "unknown snapshot subcommand '{}' ({SUBCOMMANDS})",
                    shown(other)
                )),
            }
        }
        None => Err(alloc::format!("snapshot needs a subcommand: {SUBCOMMANDS}")),
    };
    match result {
        Ok(task) => task,
        Err(message) => {
            out.error(format_args!("{message}"));
            None
        }
    }
}

/// Usage as dmsetup prints it, and the percentage of the store in use.
fn usage(o: &Origin, s: &Snap) -> (String, Option<(u64, u64)>) {
    match o.engine.status(s.id) {
        Some(snapshot::Status::Usage(u)) => (
            alloc::format!("{}", snapshot::Status::Usage(u)),
            Some((u.allocated_sectors, u.total_sectors)),
        ),
        Some(other) => (alloc::format!("{other}"), None),
        None => ("-".into(), None),
    }
}

fn percent(used: Option<(u64, u64)>) -> String {
    match used {
        Some((a, t)) if t > 0 => {
            let tenths = a * 1000 / t;
            alloc::format!("{}.{}%", tenths / 10, tenths % 10)
        }
        _ => "-".into(),
    }
}

fn list(st: &Storage, json_out: bool, out: &mut Out) {
    let snaps = st
        .origins
        .iter()
        .flat_map(|o| o.snaps.iter().map(move |s| (o, s)));
    if json_out {
        let text = json::object_string(|j| {
            j.array("unserved_stores", |a| {
                for u in &st.unserved {
                    a.object(|e| {
                        e.str("device", st.name(u.disk).as_str());
                        e.u64("start_sector", u.start);
                        e.str("why", &u.why);
                    });
                }
            });
            j.array("half_merged_origins", |a| {
                for h in &st.held {
                    a.object(|e| {
                        e.str("device", st.name(h.disk).as_str());
                        e.str("snapshot", &identity::escaped(h.marker.name.as_bytes()));
                        e.str("cow", &identity::escaped(h.marker.cow.as_bytes()));
                        e.u64("cow_start_sector", h.marker.region_start);
                        e.u64("saved_chunk", h.marker.saved_chunk);
                        e.str("why", &h.why());
                    });
                }
            });
            j.array("snapshots", |a| {
                for (o, s) in snaps.clone() {
                    let (status, used) = usage(o, s);
                    a.object(|e| {
                        e.str("name", &s.name);
                        e.str("origin", st.name(o.disk).as_str());
                        e.str("cow", st.name(s.cow_disk).as_str());
                        e.u64("cow_start_sector", s.cow_start);
                        e.u64("cow_sectors", s.cow_sectors);
                        e.u64("chunk_bytes", u64::from(s.chunk_sectors) * 512);
                        e.bool("writable", s.writable);
                        e.str("state", state_name(s));
                        e.str("status", &status);
                        match created(o, s) {
                            0 => {
                                e.null("created");
                            }
                            t => {
                                e.str("created", &alloc::format!("{}", crate::rtc::Iso8601(t)));
                            }
                        }
                        if let Some(r) = s.invalid {
                            e.str("invalid_reason", reason_text(r));
                            // False: the store could not be marked invalid on its device.
                            e.bool("store_marked_invalid", !o.engine.invalidation_failed(s.id));
                        }
                        if let Some(m) = o.merge_view(s.id, time::uptime_ns()) {
                            e.u64("merge_chunks_left", m.chunks_left);
                            e.u64("merge_chunks_total", m.chunks_total);
                            match (m.kb_per_s, m.eta_s) {
                                (Some(r), Some(eta)) => {
                                    e.u64("merge_kb_per_s", r);
                                    e.u64("merge_eta_s", eta);
                                }
                                _ => {
                                    e.null("merge_kb_per_s");
                                }
                            }
                        }
                        match used {
                            Some((a, t)) => {
                                e.u64("allocated_sectors", a);
                                e.u64("total_sectors", t);
                            }
                            None => {
                                e.null("allocated_sectors");
                            }
                        };
                    });
                }
            });
        });
        let _ = writeln!(out, "{text}");
        return;
    }
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:<22} {:>6} {:<9} {:<26} {:>6}  CREATED",
        "NAME", "ORIGIN", "COW", "CHUNK", "STATE", "USAGE (dmsetup)", "USE%"
    );
    let mut any = false;
    for (o, s) in snaps {
        any = true;
        let (status, used) = usage(o, s);
        let cow = if s.cow_start == 0
            && s.cow_sectors
                == st.devices[s.cow_disk].geometry().capacity_blocks
                    * u64::from(st.devices[s.cow_disk].geometry().block_size / 512)
        {
            st.name(s.cow_disk).as_str().to_string()
        } else {
            alloc::format!("{}:{}+{}", st.name(s.cow_disk), s.cow_start, s.cow_sectors)
        };
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:<22} {:>4}Ki {:<9} {:<26} {:>6}  {}",
            s.name,
            st.name(o.disk).as_str(),
            cow,
            s.chunk_sectors / 2,
            state_name(s),
            status,
            percent(used),
            crate::rtc::Created(created(o, s))
        );
    }
    if !any {
        let _ = writeln!(
            out,
            "(no snapshots; create one with 'snapshot create NAME ORIGIN COW')"
        );
    }
    for o in &st.origins {
        for s in &o.snaps {
            if o.engine.invalidation_failed(s.id) {
                let _ = writeln!(out, "{}: {UNMARKED_ALERT}", s.name);
            }
            if let Some(m) = o.merge_view(s.id, time::uptime_ns()) {
                let _ = writeln!(
                    out,
                    "merging {} into {}: {m}",
                    s.name,
                    st.name(o.disk).as_str()
                );
            }
        }
    }
    for h in &st.held {
        let _ = writeln!(out, "origin {}: {}", st.name(h.disk).as_str(), h.why());
    }
    for u in &st.unserved {
        if u.start == 0 {
            let _ = writeln!(out, "store on {}: {}", st.name(u.disk).as_str(), u.why);
        } else {
            let _ = writeln!(
                out,
                "store on {} at block {}: {}",
                st.name(u.disk).as_str(),
                u.start * 512 / u64::from(st.geometry(Target::Device(u.disk)).block_size.max(512)),
                u.why
            );
        }
    }
}

/// When the snapshot was taken (Unix seconds; 0: not recorded), from its store's binding.
fn created(o: &Origin, s: &Snap) -> u64 {
    o.engine.binding(s.id).map_or(0, |b| b.created_unix_seconds)
}

fn status(st: &Storage, args: &Args, out: &mut Out) -> CmdResult<()> {
    let (origin, s) = find_snap(st, args)?;
    let o = &st.origins[origin];
    let (status, used) = usage(o, s);
    let g = st.devices[o.disk].geometry();
    let sectors = g.capacity_blocks * u64::from(g.block_size / 512);
    let merge = o.merge_view(s.id, time::uptime_ns());
    let target = if merge.is_some() {
        "snapshot-merge"
    } else {
        "snapshot"
    };
    let _ = writeln!(out, "0 {sectors} {target} {status}");
    if let Some(m) = merge {
        let _ = writeln!(out, "  merging into {}: {m}", st.name(o.disk).as_str());
    }
    let _ = writeln!(
        out,
        "  state {}  used {}  chunk {} KiB  created {}",
        state_name(s),
        percent(used),
        s.chunk_sectors / 2,
        crate::rtc::Created(created(o, s))
    );
    let _ = writeln!(
        out,
        "  auto-extend {}",
        volume::snaptask::AutoText(o.engine.autoextend(s.id))
    );
    if let Some(reason) = s.invalid {
        let _ = writeln!(out, "  invalidated: {}", reason_text(reason));
    }
    if o.engine.invalidation_failed(s.id) {
        let _ = writeln!(
            out,
            "  {UNMARKED_ALERT}; origin writes refused so far: {}",
            o.engine.stats().origin_writes_refused
        );
    }
    if let Some((reserved, _, exceptions)) = o.engine.table_memory(s.id) {
        let per = reserved as u64 * 100 / exceptions.max(1);
        let _ = writeln!(
            out,
            "  exception table: {exceptions} exceptions, {} KiB ({}.{:02} bytes per exception)",
            reserved.div_ceil(1024),
            per / 100,
            per % 100
        );
    }
    let e = o.engine.stats();
    let per = e.records_committed * 100 / e.commits.max(1);
    let _ = writeln!(
        out,
        "  origin {}: {} writes, {} copy jobs, {} copy writes, {} commits, {}.{:02} records per commit, {} commit flushes ({} commits relied on an earlier commit's flush)",
        st.name(o.disk).as_str(),
        e.origin_writes,
        e.copy_jobs,
        e.copy_writes,
        e.commits,
        per / 100,
        per % 100,
        e.commit_flushes,
        e.commit_flushes_saved
    );
    if o.direct_ios > 0 {
        let _ = writeln!(
            out,
            "  {} requests went to the device at submission (fast path: copied chunks, reads)",
            o.direct_ios
        );
    }
    if o.merged_device_writes > 0 {
        let _ = writeln!(
            out,
            "  {} copy writes went down merged as {} device writes (consecutive COW chunks)",
            o.merged_copy_writes, o.merged_device_writes
        );
    }
    let ph = &e.phases;
    if ph.copy.count > 0 {
        // Engine ticks are microseconds here (`Volumes::poll`).
        let _ = writeln!(
            out,
            "  stages, mean us: copy {} (read {}, write {}), batch wait {}, commit {} (flush {}, area {}), origin write {}",
            ph.copy.mean(),
            ph.copy_read.mean(),
            ph.copy_write.mean(),
            ph.batch_wait.mean(),
            ph.commit.mean(),
            ph.commit_flush.mean(),
            ph.area_write.mean(),
            ph.origin_write.mean()
        );
    }
    // Engine ticks are microseconds (`Volumes::poll` ticks it with uptime / 1000).
    let (p99, max) = (e.hold_ticks.percentile(990), e.hold_ticks.max());
    let _ = writeln!(
        out,
        "  held writes {} (waited for copies and their commit): hold time p99 {}.{:03} ms, max {}.{:03} ms",
        e.held_writes,
        p99 / 1000,
        p99 % 1000,
        max / 1000,
        max % 1000
    );
    Ok(())
}
