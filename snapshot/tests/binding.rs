//! Rewriting a snapshot's binding (rename, writable flag, region) while I/O goes on:
//! [`Engine::rewrite_binding`] writes the header block again, and [`Event::BindingWritten`]
//! says when the new binding is durable. At every completion a crash image of the COW
//! device loads as a valid store whose binding is the old one or the new one, whole. A
//! failed write leaves the snapshot valid; an invalidation or deletion meanwhile wins.

use snapshot::format::{Binding, BoundedBytes, OriginId};
use snapshot::sim::{Order, SimDisk, World, DATA_BIT};
use snapshot::*;

const ORIGIN: u64 = 512;

fn binding(name: &str, flags: u32) -> Binding {
    Binding {
        name: BoundedBytes::new(name.as_bytes()).unwrap(),
        origin_serial: BoundedBytes::new(b"O").unwrap(),
        origin_sectors: ORIGIN,
        chunk_sectors: 8,
        created_unix_seconds: 1_893_553_445,
        region_start: 0,
        region_sectors: 0,
        flags,
        origin_id: OriginId::Serial,
    }
}

fn world(order: Order, seed: u64, fua: bool, cow_chunks: u64) -> (World, SnapId) {
    let mut ec = EngineConfig::new(ORIGIN);
    ec.copy_buffer_sectors = 64;
    let engine = Engine::new(ec).unwrap();
    let mut w = World::new(engine, SimDisk::new(ORIGIN, |s| DATA_BIT | s), order, seed);
    let cfg = SnapshotConfig {
        chunk_sectors: 8,
        cow_sectors: cow_chunks * 8,
        cow_block_sectors: 1,
        cow_fua: fua,
        writable: true,
        table_runs: cow_chunks as usize,
        binding: Some(binding("old", 0)),
    };
    w.engine.quiesce_origin();
    w.settle(1000);
    let id = w.engine.create_snapshot(&cfg).unwrap();
    w.cows[id.0 as usize] = Some(SimDisk::new(cfg.cow_sectors, |_| 0));
    w.settle(1000);
    w.engine.resume_origin();
    w.events.clear();
    (w, id)
}

/// Loads a COW image (a store for an origin of `origin` sectors).
fn load_store(w: &World, img: &[u64], origin: u64) -> LoadedStore {
    let params = LoadParams {
        cow_sectors: img.len() as u64,
        cow_block_sectors: 1,
        origin_sectors: origin,
        origin_block_sectors: 1,
        table_runs: img.len(),
    };
    Loader::load_with(params, |r| {
        let a = r.sector as usize;
        let b = (a + r.sectors as usize).min(img.len());
        w.contents.image_bytes(&img[a.min(b)..b])
    })
    .expect("the store loads")
}

/// Loads a COW image; its validity and binding.
fn load(w: &World, img: &[u64]) -> (bool, Result<Binding, BindingError>) {
    let l = load_store(w, img, ORIGIN);
    (l.valid, l.binding)
}

#[test]
fn a_rewritten_binding_is_old_or_new_in_every_crash_state_while_writes_go_on() {
    let mut states = 0;
    for (i, order) in [Order::InOrder, Order::Reversed, Order::Random]
        .into_iter()
        .enumerate()
    {
        for fua in [true, false] {
            let (mut w, id) = world(order, 30 + i as u64, fua, 48);
            for t in 0..12u64 {
                w.write_origin(100 + t, t * 24 % ORIGIN, 12).unwrap();
            }
            let new = binding("renamed", snapshot::format::BINDING_FLAG_WRITABLE);
            w.engine.rewrite_binding(id, &new).unwrap();
            assert_eq!(
                w.engine.rewrite_binding(id, &new),
                Err(EngineError::Busy),
                "one rewrite at a time"
            );
            let old = binding("old", 0);
            let mut seen_new = false;
            for step in 0..400u64 {
                let cow = w.cows[id.0 as usize].as_ref().unwrap();
                for mode in 0..3 {
                    let img = cow.crash_image(mode, step);
                    let (valid, b) = load(&w, &img);
                    assert!(valid, "{order:?} fua {fua} step {step}: store invalid");
                    let b = b.expect("a whole binding");
                    assert!(b == old || b == new, "a mixed binding: {b:?}");
                    seen_new |= b == new;
                    states += 1;
                }
                if !w.complete_one() {
                    break;
                }
            }
            assert!(
                w.events
                    .contains(&Event::BindingWritten { snap: id, ok: true }),
                "{order:?} fua {fua}: {:?}",
                w.events
            );
            assert!(seen_new);
            let cow = w.cows[id.0 as usize].as_ref().unwrap();
            assert_eq!(
                load(&w, &cow.durable).1,
                Ok(new.clone()),
                "durable after the event"
            );
            assert_eq!(w.engine.binding(id), Some(new));
            // Every origin write came back, and the snapshot is still whole and valid.
            assert_eq!(w.completed.len(), 12);
            assert!(w.completed.iter().all(|c| c.result.is_ok()));
            assert!(matches!(w.engine.status(id), Some(Status::Usage(_))));
        }
    }
    println!("binding rewrite crash states checked: {states}");
}

#[test]
fn a_failed_binding_write_leaves_the_snapshot_valid() {
    let (mut w, id) = world(Order::InOrder, 7, true, 48);
    // Fail the next COW write (the header block).
    let mut armed = true;
    w.fail = Some(Box::new(move |io: &Io| {
        let hit = armed && io.sector == 0 && matches!(io.op, IoOp::Write { .. });
        if hit {
            armed = false;
        }
        hit
    }));
    w.engine
        .rewrite_binding(id, &binding("renamed", 0))
        .unwrap();
    w.settle(1000);
    assert!(w.events.contains(&Event::BindingWritten {
        snap: id,
        ok: false
    }));
    assert!(!w
        .events
        .iter()
        .any(|e| matches!(e, Event::Invalidated { .. })));
    assert!(!w.engine.invalidation_failed(id));
    // Writes go on and are copied.
    w.write_origin(1, 0, 8).unwrap();
    w.settle(1000);
    assert!(w.completed.iter().all(|c| c.result.is_ok()));
    assert!(matches!(w.engine.status(id), Some(Status::Usage(_))));
    // Another rewrite may follow and lands.
    w.fail = None;
    w.events.clear();
    w.engine.rewrite_binding(id, &binding("again", 0)).unwrap();
    w.settle(1000);
    assert!(w
        .events
        .contains(&Event::BindingWritten { snap: id, ok: true }));
    let cow = w.cows[id.0 as usize].as_ref().unwrap();
    assert_eq!(load(&w, &cow.durable).1, Ok(binding("again", 0)));
}

#[test]
fn an_invalidation_during_a_rewrite_is_written_too() {
    for fua in [true, false] {
        // A store of 3 chunks (header, area, one data chunk): the second copy overflows it.
        let (mut w, id) = world(Order::InOrder, 9, fua, 3);
        w.engine
            .rewrite_binding(id, &binding("renamed", 0))
            .unwrap();
        w.write_origin(1, 0, 8).unwrap();
        w.write_origin(2, 64, 8).unwrap();
        w.settle(10_000);
        assert!(
            w.events
                .iter()
                .any(|e| matches!(e, Event::Invalidated { snap, .. } if *snap == id)),
            "{:?}",
            w.events
        );
        assert!(w
            .events
            .iter()
            .any(|e| matches!(e, Event::BindingWritten { snap, .. } if *snap == id)));
        let cow = w.cows[id.0 as usize].as_ref().unwrap();
        let (valid, _) = load(&w, &cow.durable);
        assert!(!valid, "fua {fua}: the invalidation is durable");
        assert!(!w.engine.invalidation_failed(id));
        assert!(w.completed.iter().all(|c| c.result.is_ok()));
    }
}

#[test]
fn deleting_during_a_rewrite_gives_the_rewrite_up() {
    let (mut w, id) = world(Order::InOrder, 11, false, 48);
    w.engine
        .rewrite_binding(id, &binding("renamed", 0))
        .unwrap();
    w.engine.quiesce_origin();
    w.engine.delete_snapshot(id).unwrap();
    w.settle(1000);
    assert!(w.events.contains(&Event::BindingWritten {
        snap: id,
        ok: false
    }));
    assert!(w.events.contains(&Event::SnapshotDeleted { snap: id }));
}

/// The header write of a rewrite is in flight when a failed copy invalidates the snapshot:
/// the invalidation changes the header after that write was sent, so the header is written
/// again, and the store ends invalid on disk.
#[test]
fn an_invalidation_while_the_binding_write_is_in_flight_is_written_after_it() {
    for fua in [true, false] {
        let (mut w, id) = world(Order::Reversed, 13, fua, 48);
        // Copies (data chunks of the store) fail; metadata writes work.
        w.fail = Some(Box::new(|io: &Io| {
            matches!(io.device, Device::Cow(_))
                && matches!(io.op, IoOp::Write { .. })
                && io.sector >= 16
        }));
        w.engine
            .rewrite_binding(id, &binding("renamed", 0))
            .unwrap();
        w.pump();
        assert_eq!(w.inflight(), 1, "the header write is in flight");
        w.write_origin(1, 0, 8).unwrap();
        w.settle(10_000);
        assert!(w
            .events
            .iter()
            .any(|e| matches!(e, Event::Invalidated { snap, .. } if *snap == id)));
        assert!(w
            .events
            .contains(&Event::BindingWritten { snap: id, ok: true }));
        let cow = w.cows[id.0 as usize].as_ref().unwrap();
        let (valid, b) = load(&w, &cow.durable);
        assert!(!valid, "fua {fua}: the invalidation reached the disk");
        assert_eq!(b, Ok(binding("renamed", 0)));
        assert!(!w.engine.invalidation_failed(id));
    }
}

/// Loads a COW image the way boot discovery does: the binding's region, else the whole
/// device.
fn load_as_found(w: &World, img: &[u64]) -> LoadedStore {
    let head = w.contents.image_bytes(&img[..1]);
    let sectors = match Binding::decode(&head) {
        Ok(b) if b.region_sectors > 0 => b.region_sectors as usize,
        _ => img.len(),
    };
    load_store(w, &img[..sectors.min(img.len())], ORIGIN_BIG)
}

const ORIGIN_BIG: u64 = 4096;

/// A store whose first area filled up to its old end (256 records of 4 KiB chunks: the
/// next area lay past the end, never zeroed; the COW device holds garbage there) is
/// extended: the next area is zeroed before the larger binding is written, writes then go
/// on into the new space. In every crash state the store loads as the binding says, valid,
/// and reads the snapshot.
#[test]
fn extending_a_full_area_zeroes_the_next_one_before_the_binding_grows() {
    let old_chunks = 2 + 256;
    let new_chunks = old_chunks + 1 + 64;
    let mut states = 0;
    for (i, order) in [Order::InOrder, Order::Random].into_iter().enumerate() {
        for fua in [true, false] {
            let mut ec = EngineConfig::new(ORIGIN_BIG);
            ec.copy_buffer_sectors = 64;
            let engine = Engine::new(ec).unwrap();
            let mut w = World::new(
                engine,
                SimDisk::new(ORIGIN_BIG, |s| DATA_BIT | s),
                order,
                50 + i as u64,
            );
            let region = |chunks: u64| Binding {
                region_sectors: chunks * 8,
                ..binding("grow", snapshot::format::BINDING_FLAG_WRITABLE)
            };
            let cfg = SnapshotConfig {
                chunk_sectors: 8,
                cow_sectors: old_chunks * 8,
                cow_block_sectors: 1,
                cow_fua: fua,
                writable: true,
                table_runs: new_chunks as usize,
                binding: Some(region(old_chunks)),
            };
            w.engine.quiesce_origin();
            w.settle(1000);
            let id = w.engine.create_snapshot(&cfg).unwrap();
            // The device is already the larger size; past the store it holds garbage.
            w.cows[id.0 as usize] = Some(SimDisk::new(new_chunks * 8, |s| 0x7000_0000 | s));
            w.settle(1000);
            w.engine.resume_origin();
            for c in 0..256u64 {
                w.write_origin(1000 + c, c * 8, 8).unwrap();
                if c % 32 == 31 {
                    w.settle(100_000);
                }
            }
            w.settle(100_000);
            assert!(w.completed.iter().all(|c| c.result.is_ok()));
            assert!(
                matches!(w.engine.status(id), Some(Status::Usage(_))),
                "still valid"
            );
            w.events.clear();
            assert_eq!(
                w.engine
                    .extend_snapshot(id, old_chunks * 8 + 4, &region(new_chunks), None),
                Err(EngineError::BadSize)
            );
            assert_eq!(
                w.engine
                    .extend_snapshot(id, old_chunks * 8, &region(new_chunks), None),
                Err(EngineError::BadSize)
            );
            w.engine
                .extend_snapshot(id, new_chunks * 8, &region(new_chunks), None)
                .unwrap();
            assert_eq!(
                w.engine.rewrite_binding(id, &binding("x", 0)),
                Err(EngineError::Busy)
            );
            // More writes into the new space while the extension runs and after.
            for c in 256..300u64 {
                w.write_origin(2000 + c, c * 8, 8).unwrap();
            }
            w.pump();
            for step in 0..4000u64 {
                let cow = w.cows[id.0 as usize].as_ref().unwrap();
                for mode in 0..3 {
                    let img = cow.crash_image(mode, step);
                    let l = load_as_found(&w, &img);
                    assert!(l.valid, "{order:?} fua {fua} step {step}");
                    // The snapshot reads the origin as it was at create.
                    for c in 0..300u64 {
                        if let Some(n) = l.table.lookup(c) {
                            let v = img[(n * 8) as usize];
                            assert_eq!(v, DATA_BIT | (c * 8), "chunk {c} in a crash state");
                        }
                    }
                    states += 1;
                }
                if !w.complete_one() {
                    break;
                }
            }
            w.settle(100_000);
            assert!(w
                .events
                .contains(&Event::BindingWritten { snap: id, ok: true }));
            assert!(
                w.completed.iter().all(|c| c.result.is_ok()),
                "{order:?} fua {fua}: the writes past the old end fit"
            );
            assert!(
                matches!(w.engine.status(id), Some(Status::Usage(_))),
                "still valid"
            );
            let cow = w.cows[id.0 as usize].as_ref().unwrap();
            let l = load_as_found(&w, &cow.durable);
            assert_eq!(
                l.table.len(),
                300,
                "every exception found after the extension"
            );
            assert_eq!(l.binding, Ok(region(new_chunks)));
        }
    }
    println!("extension crash states checked: {states}");
}

/// The auto-extend policy is kept in chunk 0: written with the binding, found by the
/// loader, kept by a later binding rewrite and by an attach after a reboot.
#[test]
fn the_autoextend_policy_survives_rewrites_and_reattach() {
    use snapshot::format::{AutoExtend, ExtendBy};
    let (mut w, id) = world(Order::InOrder, 17, false, 48);
    let p = AutoExtend {
        threshold: 70,
        by: ExtendBy::Percent(50),
    };
    w.engine.set_autoextend(id, Some(p)).unwrap();
    w.settle(1000);
    assert!(w
        .events
        .contains(&Event::BindingWritten { snap: id, ok: true }));
    assert_eq!(w.engine.autoextend(id), Some(p));
    w.engine
        .rewrite_binding(id, &binding("renamed", 0))
        .unwrap();
    w.settle(1000);
    let cow = w.cows[id.0 as usize].as_ref().unwrap();
    let img = cow.durable.clone();
    let load = |w: &World, img: &[u64]| load_store(w, img, ORIGIN);
    let l = load(&w, &img);
    assert_eq!(l.autoextend, Some(p));
    assert_eq!(l.binding, Ok(binding("renamed", 0)));
    // A reboot: a fresh engine attaches the store, then rewrites its binding again.
    let mut ec = EngineConfig::new(ORIGIN);
    ec.copy_buffer_sectors = 64;
    let mut w2 = World::new(
        Engine::new(ec).unwrap(),
        SimDisk::new(ORIGIN, |s| DATA_BIT | s),
        Order::InOrder,
        3,
    );
    w2.contents = w.contents.clone();
    let cfg = SnapshotConfig {
        chunk_sectors: 8,
        cow_sectors: img.len() as u64,
        cow_block_sectors: 1,
        cow_fua: false,
        writable: true,
        table_runs: img.len(),
        binding: Some(binding("renamed", 0)),
    };
    let id2 = w2.engine.attach_snapshot(l, &cfg).unwrap();
    w2.cows[id2.0 as usize] = Some(SimDisk::new(img.len() as u64, |x| img[x as usize]));
    assert_eq!(w2.engine.autoextend(id2), Some(p));
    w2.engine
        .rewrite_binding(id2, &binding("again", 0))
        .unwrap();
    w2.settle(1000);
    let img2 = w2.cows[id2.0 as usize].as_ref().unwrap().durable.clone();
    assert_eq!(load(&w2, &img2).autoextend, Some(p), "kept by the rewrite");
    w2.engine.set_autoextend(id2, None).unwrap();
    w2.settle(1000);
    let img3 = w2.cows[id2.0 as usize].as_ref().unwrap().durable.clone();
    assert_eq!(load(&w2, &img3).autoextend, None, "cleared");
}
