//! A store whose exception table the heap cannot hold (simulated with `table::FAIL_GROWTH`)
//! is refused with `LoadError::OutOfMemory`, not a panic, and the next load works. Its own
//! test binary, because the fault switch is process-wide.

use std::sync::atomic::Ordering;

use snapshot::format::{Geometry, Header, Record};
use snapshot::table::FAIL_GROWTH;
use snapshot::{LoadError, LoadParams, Loader};

#[test]
fn a_table_the_heap_cannot_hold_refuses_the_store() {
    // 4 KiB chunks: 256 records per area; 3 areas of records, then the terminating area.
    let g = Geometry::new(8).unwrap();
    let chunks = 4 * 257 + 2;
    let mut dev = vec![0u8; chunks * 4096];
    Header::new(8).encode(&mut dev);
    let mut new = 2;
    for i in 0..3 * 256u64 {
        let at = (g.area_chunk(i / 256) * 4096) as usize;
        assert!(Record {
            old_chunk: 7 * i,
            new_chunk: new
        }
        .encode(&mut dev[at..at + 4096], (i % 256) as usize));
        new = g.next_data_chunk(new);
    }
    let params = LoadParams {
        cow_sectors: chunks as u64 * 8,
        cow_block_sectors: 1,
        origin_sectors: 1 << 30,
        origin_block_sectors: 1,
        table_runs: usize::MAX,
    };
    let load = || {
        Loader::load_with(params, |r| {
            let at = (r.sector * 512) as usize;
            dev[at..at + r.sectors as usize * 512].to_vec()
        })
    };
    FAIL_GROWTH.store(true, Ordering::Relaxed);
    let refused = load();
    FAIL_GROWTH.store(false, Ordering::Relaxed);
    assert_eq!(refused.unwrap_err(), LoadError::OutOfMemory);
    let store = load().unwrap();
    assert_eq!(store.table.len(), 3 * 256);
    assert_eq!(store.table.lookup(7 * 300), Some(2 + 300 + 1));
}
