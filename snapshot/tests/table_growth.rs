//! A table that cannot grow (the heap is exhausted, simulated with `table::FAIL_GROWTH`):
//! the snapshot is invalidated, as dm-snapshot does on `-ENOMEM`, every origin write goes
//! through, nothing panics, and the store on disk says invalid. Its own test binary, because
//! the fault switch is process-wide.

use std::sync::atomic::Ordering;

use snapshot::sim::{Order, SimDisk, World, DATA_BIT};
use snapshot::table::{FAIL_GROWTH, SEGMENT_RUNS};
use snapshot::*;

#[test]
fn a_table_that_cannot_grow_invalidates_its_snapshot_and_origin_writes_go_on() {
    let origin_sectors = 1 << 16;
    let mut ec = EngineConfig::new(origin_sectors);
    ec.copy_buffer_sectors = 64;
    let mut w = World::new(
        Engine::new(ec).unwrap(),
        SimDisk::new(origin_sectors, |s| DATA_BIT | s),
        Order::InOrder,
        1,
    );
    let cfg = SnapshotConfig {
        chunk_sectors: 4,
        cow_sectors: 4 * 8192,
        cow_block_sectors: 1,
        cow_fua: true,
        writable: false,
        table_runs: 8192,
        binding: None,
    };
    w.engine.quiesce_origin();
    w.settle(1000);
    let id = w.engine.create_snapshot(&cfg).unwrap();
    w.cows[id.0 as usize] = Some(SimDisk::new(cfg.cow_sectors, |_| 0));
    w.settle(1000);
    w.engine.resume_origin();
    // Every other chunk: one run per exception. The first segment (allocated at create)
    // holds them without growing.
    let mut tag = 0;
    for c in 0..SEGMENT_RUNS as u64 {
        tag += 1;
        w.write_origin(tag, c * 8, 4).unwrap();
        w.settle(1000);
    }
    w.settle(100_000);
    assert!(matches!(w.engine.status(id), Some(Status::Usage(_))));
    assert_eq!(w.engine.table_memory(id).unwrap().2, SEGMENT_RUNS as u64);
    FAIL_GROWTH.store(true, Ordering::Relaxed);
    for c in SEGMENT_RUNS as u64..SEGMENT_RUNS as u64 + 16 {
        tag += 1;
        w.write_origin(tag, c * 8, 4).unwrap();
        w.settle(1000);
    }
    w.settle(100_000);
    FAIL_GROWTH.store(false, Ordering::Relaxed);
    assert!(
        w.events.contains(&Event::Invalidated {
            snap: id,
            reason: InvalidReason::OutOfMemory
        }),
        "{:?}",
        w.events
    );
    assert_eq!(w.engine.status(id), Some(Status::Invalid));
    // Every origin write completed without error, and the origin holds it.
    for t in 1..=tag {
        let c = w
            .take_completion(t)
            .unwrap_or_else(|| panic!("write {t} never completed"));
        assert_eq!(c.result, Ok(()), "write {t}");
    }
    // Snapshot reads fail rather than return the new origin data.
    w.submit(
        VolumeRequest {
            tag: 1 << 40,
            volume: Volume::Snapshot(id),
            op: VolumeOp::Read,
            sector: SEGMENT_RUNS as u64 * 8,
            sectors: 4,
        },
        vec![0; 4],
    )
    .unwrap();
    w.settle(1000);
    let r = w.take_completion(1 << 40).unwrap();
    assert!(r.result.is_err(), "{r:?}");
    // The store on disk says invalid: a reboot does not bring a wrong snapshot back.
    let cow = w.cows[id.0 as usize].as_ref().unwrap();
    let header = w.contents.image_bytes(&cow.durable[..1]);
    assert_eq!(Header::decode(&header).map(|h| h.valid), Some(0));
}
