//! The decisions of `snapshot` (host-built and host-tested): each subcommand that changes
//! something checks the operator's request against the devices and the snapshots that
//! exist, refuses it with one line, or picks the task that does the work. What `snapshot
//! list` and `status` print, and the console around it, is `snap.rs` (appliance only).

use core::fmt::Write;

use alloc::boxed::Box;
use alloc::string::{String, ToString};

use drivers::info::DeviceInfo;
use volume::origin::{Snap, SnapState};
use volume::snaptask::{
    CreateSpec, CreateTask, DeleteTask, ExtendTask, MergeTask, Rebind, RebindTask,
};
use volume::tasks::{self, Task};
use volume::{Target, Volumes};

use crate::console::args::{parse_size, parse_u64, Args};
use crate::identity::{self, DeviceId};

/// A command's failure: one line for the operator.
pub type CmdResult<T> = Result<T, String>;

/// The subcommands, for messages.
pub const SUBCOMMANDS: &str =
    "create, list, status, delete, attach, merge, rename, set, extend, autoextend, forget-merge";

/// A name as messages show it: at most 32 characters, nothing unprintable.
pub fn shown(s: &str) -> String {
    s.chars()
        .take(32)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// Decides a `snapshot` subcommand that starts a task (`create`, `delete`, `attach`,
/// `merge`, `forget-merge`, `rename`, `set`, `extend`, `autoextend`) on the volumes `st`
/// (`failed`: the devices that did not come up, whose names are taken) at `now`: the task to
/// start, or the one-line refusal. `None` for the other subcommands. `out` gets the lines
/// a decision prints (`forget-merge`).
pub fn decide(
    sub: &str,
    st: &mut Volumes,
    failed: &[DeviceInfo],
    args: &Args,
    out: &mut dyn Write,
    now: u64,
) -> Option<CmdResult<Box<dyn Task>>> {
    Some(match sub {
        "create" => create(st, failed, args, now),
        "delete" => delete(st, args),
        "attach" => attach(st, failed, args),
        "merge" => merge(st, args, now),
        "forget-merge" => forget_merge(st, args, out, now),
        "rename" => rename(st, failed, args),
        "set" => set(st, args),
        "extend" => extend(st, args),
        "autoextend" => autoextend(st, args),
        _ => return None,
    })
}

/// `DEV` or `DEV:START+LEN` (blocks of DEV).
fn parse_cow(st: &Volumes, text: &str) -> CmdResult<(usize, u64, u64)> {
    let (name, region) = match text.split_once(':') {
        Some((n, r)) => (n, Some(r)),
        None => (text, None),
    };
    let disk = st
        .find(name)
        .ok_or_else(|| alloc::format!("no device '{}' for the COW store", shown(name)))?;
    let g = st.devices[disk].geometry();
    let block_sectors = u64::from(g.block_size / 512).max(1);
    let (start, len) = match region {
        None => (0, g.capacity_blocks),
        Some(r) => {
            let (s, l) = r
                .split_once('+')
                .ok_or("a COW region is DEV:START+LEN (in blocks)")?;
            let s = parse_u64(s, "START").map_err(|e| e.to_string())?;
            let l = parse_u64(l, "LEN").map_err(|e| e.to_string())?;
            if l == 0 || s.checked_add(l).is_none_or(|end| end > g.capacity_blocks) {
                return Err(alloc::format!(
                    "region {s}+{l} is not inside {name} ({} blocks)",
                    g.capacity_blocks
                ));
            }
            (s, l)
        }
    };
    Ok((disk, start * block_sectors, len * block_sectors))
}

fn create(
    st: &mut Volumes,
    failed: &[DeviceInfo],
    args: &Args,
    now: u64,
) -> CmdResult<Box<dyn Task>> {
    let (Some(name), Some(origin_name), Some(cow_text)) =
        (args.arg("NAME"), args.arg("ORIGIN"), args.arg("COW"))
    else {
        return Err(
            "usage: snapshot create NAME ORIGIN COW[:START+LEN] [--chunk 4k] [--writable]".into(),
        );
    };
    check_name(st, failed, name)?;
    let origin = st
        .find(origin_name)
        .ok_or_else(|| alloc::format!("no device '{}' for the origin", shown(origin_name)))?;
    if let Some(user) = st.cow_user(origin) {
        return Err(alloc::format!(
            "{origin_name} holds the COW store of snapshot '{user}'; it cannot be an origin"
        ));
    }
    refuse_held(st, origin)?;
    let (cow_disk, cow_start, cow_sectors) = parse_cow(st, cow_text)?;
    refuse_held(st, cow_disk)?;
    if cow_disk == origin {
        return Err("the COW store must be on another device than the origin".into());
    }
    if let Some(u) = st.unserved.iter().find(|u| u.disk == cow_disk) {
        // Never overwrite a store found at boot (e.g. one Linux made) without being told.
        return Err(alloc::format!(
            "{} already holds a store ({}); attach it, or wipe its first block to reuse the device",
            st.name(cow_disk),
            u.why
        ));
    }
    if st
        .origins
        .iter()
        .any(|o| o.disk == cow_disk && !o.snaps.is_empty())
    {
        return Err(alloc::format!(
            "{} is the origin of snapshots; it cannot hold a COW store",
            st.name(cow_disk)
        ));
    }
    let overlaps = st.origins.iter().flat_map(|o| o.snaps.iter()).any(|s| {
        s.cow_disk == cow_disk
            && cow_start < s.cow_start + s.cow_sectors
            && s.cow_start < cow_start + cow_sectors
    });
    if overlaps {
        return Err("that COW region overlaps another snapshot's store".into());
    }
    let chunk_bytes = args
        .value_as("chunk", parse_size)
        .map_err(|e| e.to_string())?
        .unwrap_or(4096);
    let og = st.devices[origin].geometry();
    let cg = st.devices[cow_disk].geometry();
    let min = u64::from(og.block_size.max(cg.block_size)).max(4096);
    if !chunk_bytes.is_power_of_two() || !(min..=512 * 1024).contains(&chunk_bytes) {
        return Err(alloc::format!(
            "--chunk must be a power of two from {} KiB to 512 KiB",
            min / 1024
        ));
    }
    let chunk_sectors = (chunk_bytes / 512) as u32;
    if cow_sectors < 3 * u64::from(chunk_sectors) {
        return Err(alloc::format!(
            "the COW store needs at least 3 chunks (header, metadata area, one data chunk): {} KiB",
            3 * chunk_bytes / 1024
        ));
    }
    let infos: alloc::vec::Vec<_> = st.devices.iter().map(|d| d.info()).collect();
    let ids: alloc::vec::Vec<DeviceId> = infos.iter().map(DeviceId::of).collect();
    let note = (!identity::identifies(&ids, origin, cow_disk)).then(|| {
        alloc::format!(
            "note: {origin_name} cannot be told apart from the other disks (no serial number, or one another disk shares): after a reboot the store waits for 'snapshot attach {name} {origin_name} {}'",
            st.name(cow_disk)
        )
    });
    let origin_index = st.origin_for(origin).map_err(String::from)?;
    let spec = CreateSpec {
        name: name.to_string(),
        origin: origin_index,
        cow_disk,
        cow_start,
        cow_sectors,
        chunk_sectors,
        writable: args.flag("writable"),
        note,
    };
    Ok(Box::new(CreateTask::new(spec, now)))
}

/// `snapshot attach NAME ORIGIN COW [--no-write]`: adopt a store whose origin is not
/// attached by itself (one Linux made, or one whose origin is ambiguous). Without
/// `--no-write` the binding is written into the store, naming the origin by its own identity
/// when that is unambiguous, else by the PCI locations of the origin and the store's device.
fn attach(st: &mut Volumes, failed: &[DeviceInfo], args: &Args) -> CmdResult<Box<dyn Task>> {
    let (Some(name), Some(origin_name), Some(cow_name)) =
        (args.arg("NAME"), args.arg("ORIGIN"), args.arg("COW"))
    else {
        return Err("usage: snapshot attach NAME ORIGIN COW [--no-write]".into());
    };
    let write = !args.flag("no-write");
    check_name(st, failed, name)?;
    let origin = st
        .find(origin_name)
        .ok_or_else(|| alloc::format!("no device '{}' for the origin", shown(origin_name)))?;
    let cow = st.find(cow_name).ok_or_else(|| {
        alloc::format!(
            "no device '{}' for the COW store (whole devices only)",
            shown(cow_name)
        )
    })?;
    if cow == origin {
        return Err("the COW store must be on another device than the origin".into());
    }
    // (A half-merged origin may be the origin: attaching its store resumes the merge.)
    refuse_held(st, cow)?;
    if let Some(user) = st.cow_user(cow) {
        return Err(alloc::format!(
            "{cow_name} already holds the COW store of snapshot '{user}'"
        ));
    }
    if st.cow_user(origin).is_some() {
        return Err(alloc::format!(
            "{origin_name} holds a COW store; it cannot be an origin"
        ));
    }
    let infos: alloc::vec::Vec<_> = st.devices.iter().map(|d| d.info()).collect();
    let ids: alloc::vec::Vec<DeviceId> = infos.iter().map(DeviceId::of).collect();
    let origin_id = if identity::identifies(&ids, origin, cow) {
        identity::origin_id_of(&ids[origin])
    } else {
        match (ids[origin].pci, ids[cow].pci) {
            (Some(origin_pci), Some(cow_pci)) => snapshot::OriginId::Location {
                origin_pci,
                nsid: ids[origin].namespace.map_or(0, |n| n.nsid),
                cow_pci,
            },
            _ if !write => snapshot::OriginId::Serial,
            _ => {
                return Err(alloc::format!(
                    "{origin_name} has no identity of its own and no PCI location to bind to; attach with --no-write"
                ))
            }
        }
    };
    let info = &infos[origin];
    let g = st.devices[origin].geometry();
    let (Some(bname), Some(serial)) = (
        snapshot::BoundedBytes::new(name.as_bytes()),
        snapshot::BoundedBytes::new(info.serial.as_str().as_bytes()),
    ) else {
        return Err("name or serial too long".into());
    };
    let binding = snapshot::Binding {
        name: bname,
        origin_serial: serial,
        origin_sectors: g.capacity_blocks * u64::from(g.block_size / 512),
        chunk_sectors: 0,
        created_unix_seconds: 0,
        region_start: 0,
        region_sectors: 0,
        flags: 0,
        origin_id,
    };
    st.unserved.retain(|u| u.disk != cow);
    Ok(Box::new(volume::discover::DiscoverTask::adopt(
        cow, origin, binding, write,
    )))
}

fn check_name(st: &Volumes, failed: &[DeviceInfo], name: &str) -> CmdResult<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(alloc::format!(
            "invalid snapshot name '{}' (1-64 of A-Z a-z 0-9 - _ .)",
            shown(name)
        ));
    }
    if st.resolve(name).is_some() || failed.iter().any(|f| f.name.as_str() == name) {
        return Err(alloc::format!("the name '{name}' is already taken"));
    }
    Ok(())
}

pub(super) fn find_snap<'a>(st: &'a Volumes, args: &Args) -> CmdResult<(usize, &'a Snap)> {
    let name = args.arg("NAME").ok_or("which snapshot? (give its NAME)")?;
    st.origins
        .iter()
        .enumerate()
        .find_map(|(i, o)| o.snap(name).map(|s| (i, s)))
        .ok_or_else(|| alloc::format!("no snapshot '{}' (see 'snapshot list')", shown(name)))
}

fn delete(st: &mut Volumes, args: &Args) -> CmdResult<Box<dyn Task>> {
    let (origin, snap) = find_snap(st, args)?;
    if !matches!(snap.state, SnapState::Active | SnapState::Invalid) {
        return Err(alloc::format!(
            "snapshot {} is busy (being created, deleted or merged)",
            snap.name
        ));
    }
    Ok(Box::new(DeleteTask::new(
        snap.name.clone(),
        origin,
        snap.id,
    )))
}

/// Refuses a half-merged origin waiting for its store as the origin of a new snapshot or as
/// a COW device: either would build on (or destroy) an origin that is only right through
/// the missing store.
fn refuse_held(st: &Volumes, disk: usize) -> CmdResult<()> {
    match st.held(disk) {
        Some(h) => Err(alloc::format!("{} is {}", st.name(disk), h.why())),
        None => Ok(()),
    }
}

/// `snapshot forget-merge DEV`: the store of half-merged origin DEV is lost for good; make
/// DEV writable as it is. Its first block (the origin marker) is zeroed: the first chunk's
/// data was kept in the lost store.
fn forget_merge(
    st: &mut Volumes,
    args: &Args,
    out: &mut dyn Write,
    now: u64,
) -> CmdResult<Box<dyn Task>> {
    let Some(dev) = args.arg("NAME") else {
        return Err("usage: snapshot forget-merge DEV".into());
    };
    let disk = st
        .find(dev)
        .ok_or_else(|| alloc::format!("no device '{}'", shown(dev)))?;
    let Some(h) = st.held(disk).cloned() else {
        return Err(alloc::format!(
            "{} is not a half-merged origin waiting for its store",
            st.name(disk)
        ));
    };
    st.held.retain(|x| x.disk != disk);
    let _ = writeln!(
        out,
        "{}: giving up the merge from snapshot '{}'; the device is writable again, half-merged, and its first block is zeroed",
        st.name(disk),
        identity::escaped(h.marker.name.as_bytes())
    );
    let spec = tasks::WriteSpec {
        pattern: tasks::Pattern::Byte(0),
        transfer_bytes: None,
        fua: false,
        flush_every: 0,
    };
    Ok(Box::new(tasks::RangeTask::write(
        st,
        Target::Device(disk),
        0,
        1,
        spec,
        now,
    )))
}

/// A snapshot whose binding may be rewritten: active and valid, not busy.
fn rebindable<'a>(st: &'a Volumes, args: &Args) -> CmdResult<(usize, &'a Snap)> {
    let (origin, snap) = find_snap(st, args)?;
    match snap.state {
        SnapState::Active => Ok((origin, snap)),
        SnapState::Invalid => Err(alloc::format!(
            "snapshot {} is invalid ({}); delete it",
            snap.name,
            state_name(snap)
        )),
        _ => Err(alloc::format!(
            "snapshot {} is busy (being created, deleted or merged)",
            snap.name
        )),
    }
}

/// `snapshot rename OLD NEW`: the binding in the store is rewritten once; NBD exports
/// follow the new name for new connections.
fn rename(st: &mut Volumes, failed: &[DeviceInfo], args: &Args) -> CmdResult<Box<dyn Task>> {
    let Some(new) = args.arg("ORIGIN") else {
        return Err("usage: snapshot rename OLD NEW".into());
    };
    if args.arg("COW").is_some() {
        return Err("usage: snapshot rename OLD NEW".into());
    }
    let (origin, snap) = rebindable(st, args)?;
    let (old, id) = (snap.name.clone(), snap.id);
    check_name(st, failed, new)?;
    Ok(Box::new(RebindTask::new(
        old,
        origin,
        id,
        Rebind::Rename(new.to_string()),
    )))
}

/// `snapshot set NAME --readonly|--writable`: persisted in the binding; writes from the
/// console and NBD are refused (EPERM) from the next request on.
fn set(st: &mut Volumes, args: &Args) -> CmdResult<Box<dyn Task>> {
    let writable = match (args.flag("readonly"), args.flag("writable")) {
        (true, false) => false,
        (false, true) => true,
        _ => return Err("usage: snapshot set NAME --readonly|--writable".into()),
    };
    if args.arg("ORIGIN").is_some() {
        return Err("usage: snapshot set NAME --readonly|--writable".into());
    }
    let (origin, snap) = rebindable(st, args)?;
    if snap.writable == writable {
        return Err(alloc::format!(
            "snapshot {} is {} already",
            snap.name,
            if writable { "writable" } else { "read-only" }
        ));
    }
    rebind(origin, snap, Rebind::Writable(writable))
}

/// `snapshot autoextend NAME --threshold PCT --by PCT|SIZE` or `--off` (LVM's
/// `snapshot_autoextend_threshold` / `_percent`): persisted in the store.
fn autoextend(st: &mut Volumes, args: &Args) -> CmdResult<Box<dyn Task>> {
    const USAGE: &str = "usage: snapshot autoextend NAME --threshold PCT --by PCT|SIZE | --off";
    if args.arg("ORIGIN").is_some() {
        return Err(USAGE.into());
    }
    let policy = match (args.flag("off"), args.value("threshold"), args.value("by")) {
        (true, None, None) => None,
        (false, Some(t), Some(by)) => {
            let threshold = t
                .strip_suffix('%')
                .unwrap_or(t)
                .parse::<u8>()
                .ok()
                .filter(|t| (1..=99).contains(t))
                .ok_or_else(|| {
                    alloc::format!("--threshold {} must be 1 to 99 (percent)", shown(t))
                })?;
            let by = match by.strip_suffix('%') {
                Some(p) => snapshot::format::ExtendBy::Percent(
                    p.parse::<u16>()
                        .ok()
                        .filter(|p| (1..=1000).contains(p))
                        .ok_or_else(|| alloc::format!("--by {} must be 1% to 1000%", shown(by)))?,
                ),
                None => {
                    let bytes = parse_size(by, "--by").map_err(|e| e.to_string())?;
                    if bytes < 512 || bytes % 512 != 0 {
                        return Err(alloc::format!(
                            "--by {} must be a percentage (20%) or a size of whole sectors (64M)",
                            shown(by)
                        ));
                    }
                    snapshot::format::ExtendBy::Sectors(bytes / 512)
                }
            };
            Some(snapshot::format::AutoExtend { threshold, by })
        }
        _ => return Err(USAGE.into()),
    };
    let (origin, snap) = rebindable(st, args)?;
    rebind(origin, snap, Rebind::AutoExtend(policy))
}

/// The task that rewrites the binding of `snap` (of origin `origin`) with `change`.
fn rebind(origin: usize, snap: &Snap, change: Rebind) -> CmdResult<Box<dyn Task>> {
    Ok(Box::new(RebindTask::new(
        snap.name.clone(),
        origin,
        snap.id,
        change,
    )))
}

/// `snapshot extend NAME +SIZE|SIZE` (lvextend): grow the store into free space after it.
fn extend(st: &mut Volumes, args: &Args) -> CmdResult<Box<dyn Task>> {
    const USAGE: &str = "usage: snapshot extend NAME +SIZE|SIZE (e.g. +64M, 1G)";
    let Some(text) = args.arg("ORIGIN") else {
        return Err(USAGE.into());
    };
    if args.arg("COW").is_some() {
        return Err(USAGE.into());
    }
    let (origin, snap) = rebindable(st, args)?;
    let (grow, size_text) = match text.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let bytes = parse_size(size_text, "SIZE").map_err(|e| e.to_string())?;
    let sectors = bytes / 512;
    if bytes % 512 != 0 {
        return Err(alloc::format!(
            "SIZE {text} is not a whole number of sectors"
        ));
    }
    let new = if grow {
        snap.cow_sectors
            .checked_add(sectors)
            .ok_or("SIZE too large")?
    } else {
        sectors
    };
    let chunk = u64::from(snap.chunk_sectors);
    if new < snap.cow_sectors {
        return Err(alloc::format!(
            "snapshot {} has {} MiB; a store cannot shrink",
            snap.name,
            snap.cow_sectors / 2048
        ));
    }
    if new == snap.cow_sectors {
        return Err(alloc::format!(
            "snapshot {} has {} MiB already",
            snap.name,
            snap.cow_sectors / 2048
        ));
    }
    if !new.is_multiple_of(chunk) {
        return Err(alloc::format!(
            "the new size must be a multiple of the chunk size ({} KiB)",
            chunk / 2
        ));
    }
    let free = st.free_after(snap.cow_disk, snap.cow_start, snap.cow_sectors);
    if new - snap.cow_sectors > free {
        return Err(alloc::format!(
            "no room on {} after the store of {}: {} MiB free, {} MiB more asked",
            st.name(snap.cow_disk),
            snap.name,
            free / 2048,
            (new - snap.cow_sectors) / 2048
        ));
    }
    Ok(Box::new(ExtendTask::new(
        snap.name.clone(),
        origin,
        snap.id,
        snap.cow_disk,
        snap.cow_start,
        new,
    )))
}

/// `snapshot merge NAME`: roll the origin back to the snapshot (lvconvert --merge).
fn merge(st: &mut Volumes, args: &Args, now: u64) -> CmdResult<Box<dyn Task>> {
    let (origin, snap) = find_snap(st, args)?;
    match snap.state {
        SnapState::Active => {}
        SnapState::Invalid => {
            return Err(alloc::format!(
                "snapshot {} is invalid ({}); it cannot be merged",
                snap.name,
                state_name(snap)
            ))
        }
        SnapState::Merging | SnapState::MergeFailed => {
            return Err(alloc::format!(
                "snapshot {} is already being merged (see 'snapshot status {}')",
                snap.name,
                snap.name
            ))
        }
        _ => {
            return Err(alloc::format!(
                "snapshot {} is busy (being created or deleted)",
                snap.name
            ))
        }
    }
    let o = &st.origins[origin];
    if let Some(other) = o
        .snaps
        .iter()
        .find(|s| matches!(s.state, SnapState::Merging | SnapState::MergeFailed))
    {
        return Err(alloc::format!(
            "snapshot {} of the same origin is being merged; one merge at a time",
            other.name
        ));
    }
    let (name, id, origin_name) = (
        snap.name.clone(),
        snap.id,
        st.name(o.disk).as_str().to_string(),
    );
    // What the origin marker will name, should the store go missing mid-merge.
    st.label_merge(origin, id);
    // The merge's metadata area slots are allocated here, by the command: the merge job
    // (I/O path) allocates nothing.
    st.origins[origin].engine.reserve_merge(id);
    Ok(Box::new(MergeTask::new(name, origin, origin_name, id, now)))
}

pub(super) fn state_name(s: &Snap) -> &'static str {
    match s.state {
        SnapState::Creating => "creating",
        SnapState::Active => "active",
        SnapState::Invalid
            if matches!(
                s.invalid,
                Some(snapshot::InvalidReason::CowFull | snapshot::InvalidReason::TableFull)
            ) =>
        {
            "overflow"
        }
        SnapState::Invalid => "invalid",
        SnapState::Failed => "failed",
        SnapState::Deleting | SnapState::Deleted => "deleting",
        SnapState::Merging => "merging",
        SnapState::MergeFailed => "merge-failed",
    }
}

#[cfg(test)]
#[path = "snapcmd_tests.rs"]
mod tests;
