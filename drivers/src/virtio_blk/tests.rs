//! End-to-end tests of the virtio-blk driver against the fake device in `fake.rs`.

use super::fake_queue::{FakeBlk, FakeTransport, FakeVectors, Shared};
use super::regs::{self, config, BlkFeatures};
use super::{VectorAssignment, VirtioBlk, VirtioBlkConfig, VirtioBlkError};
use crate::block::{BlockDevice, BlockError, BlockRequest, BufferPool, Completion, PollOutcome};
use crate::hal::fake::{FakeDma, FakeVirtioHal};
use crate::info::{disk_name, DeviceState};
use crate::virtio::SetupError;
use virtio_drivers::transport::DeviceStatus;

type Blk = VirtioBlk<FakeVirtioHal, FakeTransport>;

const BASIC: u64 =
    BlkFeatures::VERSION_1.bits() | BlkFeatures::FLUSH.bits() | BlkFeatures::SEG_MAX.bits();

fn assignment() -> VectorAssignment {
    VectorAssignment {
        config_entry: Some(0),
        queue_entry: Some(1),
        cpu_vectors: [Some(0x30), Some(0x31)],
    }
}

fn try_make(
    features: u64,
    config: VirtioBlkConfig,
    setup: impl FnOnce(&mut FakeBlk),
) -> (Result<Blk, VirtioBlkError>, Shared) {
    let fake = FakeBlk::new(2048, features);
    setup(&mut fake.borrow_mut());
    let blk = Blk::new(
        disk_name("vd", 0),
        None,
        FakeTransport(fake.clone()),
        Some(FakeVectors(fake.clone())),
        assignment(),
        config,
    );
    (blk, fake)
}

/// A device whose GET_ID has been answered and consumed.
fn make(features: u64, config: VirtioBlkConfig) -> (Blk, Shared) {
    let (blk, fake) = try_make(features, config, |_| {});
    let mut blk = blk.unwrap();
    assert_eq!(
        fake.borrow_mut().complete_all(false),
        1,
        "GET_ID queued at init"
    );
    assert_eq!(drain(&mut blk, 10).0.len(), 0, "GET_ID is internal");
    (blk, fake)
}

fn drain(blk: &mut Blk, budget: usize) -> (Vec<Completion>, PollOutcome) {
    let mut out = Vec::new();
    let outcome = blk.poll_completions(budget, &mut |c| out.push(c));
    (out, outcome)
}

fn pool() -> BufferPool {
    BufferPool::new::<FakeDma>(0, 8, 8192).unwrap()
}

#[test]
fn init_negotiates_features_vectors_and_geometry() {
    let features = BASIC
        | BlkFeatures::BLK_SIZE.bits()
        | BlkFeatures::CONFIG_WCE.bits()
        | BlkFeatures::DISCARD.bits()
        | BlkFeatures::RING_EVENT_IDX.bits()
        | 1 << 28; // INDIRECT_DESC: not accepted
    let (blk, fake) = try_make(features, VirtioBlkConfig::default(), |f| {
        f.set_config32(config::BLK_SIZE, 4096);
        f.config[config::WRITEBACK] = 1;
        f.set_config32(config::MAX_DISCARD_SECTORS, 1024);
    });
    let blk = blk.unwrap();
    let f = fake.borrow();
    assert_eq!(
        f.driver_features,
        features & !(1 << 28) & !BlkFeatures::RING_EVENT_IDX.bits()
    );
    assert!(f
        .status
        .contains(DeviceStatus::DRIVER_OK | DeviceStatus::FEATURES_OK));
    assert_eq!((f.config_vector, f.queue_vector), (0, 1));
    assert_eq!(f.queue.unwrap().0, 256);
    let g = blk.geometry();
    assert_eq!((g.block_size, g.capacity_blocks), (4096, 2048 * 512 / 4096));
    assert_eq!((g.queue_count, g.queue_depth), (1, 85));
    assert!(g.volatile_write_cache && g.discard && !g.fua && !g.read_only);
    assert_eq!(g.max_discard_blocks, 1024 / 8);
    assert_eq!(g.max_transfer_bytes, 128 * 1024);
    assert_eq!(blk.in_flight(), 1, "GET_ID in flight");
}

#[test]
fn write_through_and_read_only_modes() {
    let (blk, _) = try_make(
        BASIC | BlkFeatures::CONFIG_WCE.bits() | BlkFeatures::RO.bits(),
        VirtioBlkConfig::default(),
        |f| {
            f.config[config::WRITEBACK] = 0;
        },
    );
    let g = blk.unwrap().geometry();
    assert!(!g.volatile_write_cache && g.read_only);
    let (blk, _) = try_make(
        BlkFeatures::VERSION_1.bits(),
        VirtioBlkConfig::default(),
        |_| {},
    );
    assert!(
        !blk.unwrap().geometry().volatile_write_cache,
        "no FLUSH: no volatile cache"
    );
}

#[test]
fn serial_comes_from_get_id() {
    let (blk, fake) = try_make(BASIC, VirtioBlkConfig::default(), |_| {});
    let mut blk = blk.unwrap();
    assert_eq!(blk.serial(), "");
    fake.borrow_mut().complete_all(false);
    drain(&mut blk, 4);
    assert_eq!(blk.serial(), "FAKE-SERIAL-0001");
    assert!(blk
        .info()
        .to_string()
        .contains("serial=\"FAKE-SERIAL-0001\""));
    assert_eq!(blk.info().vectors(), &[0x30, 0x31]);
}

#[test]
fn write_then_read_back_never_inline() {
    let (mut blk, fake) = make(BASIC, VirtioBlkConfig::default());
    let mut pool = pool();
    let mut buf = pool.acquire().unwrap();
    buf.set_len(1024).unwrap();
    buf.as_mut_slice()
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = i as u8);
    blk.submit(BlockRequest::write(7, 10, buf, false)).unwrap();
    assert!(fake.borrow().notifications >= 2);
    assert_eq!(
        drain(&mut blk, 8).0.len(),
        0,
        "nothing completes before the device does"
    );

    fake.borrow_mut().complete_all(false);
    let (done, outcome) = drain(&mut blk, 8);
    assert_eq!(
        outcome,
        PollOutcome {
            completed: 1,
            more: false
        }
    );
    assert_eq!((done[0].tag, done[0].result), (7, Ok(())));
    assert_eq!(fake.borrow().disk[10 * 512 + 5], 5);

    let mut buf = done.into_iter().next().unwrap().buffer.unwrap();
    buf.as_mut_slice().fill(0);
    blk.submit(BlockRequest::read(8, 10, buf)).unwrap();
    fake.borrow_mut().complete_all(false);
    let (done, _) = drain(&mut blk, 8);
    let data = done[0].buffer.as_ref().unwrap().as_slice();
    assert!(data.iter().enumerate().all(|(i, &b)| b == i as u8));
    let s = blk.stats();
    assert_eq!(
        (s.reads, s.writes, s.bytes_read, s.bytes_written, s.errors),
        (1, 1, 1024, 1024, 0)
    );
}

#[test]
fn out_of_order_completions_match_by_token() {
    let (mut blk, fake) = make(BASIC, VirtioBlkConfig::default());
    for lba in 0..4u64 {
        fake.borrow_mut().disk[(lba * 512) as usize] = 0xa0 + lba as u8;
    }
    let mut pool = pool();
    for lba in 0..4u64 {
        let mut buf = pool.acquire().unwrap();
        buf.set_len(512).unwrap();
        blk.submit(BlockRequest::read(100 + lba, lba, buf)).unwrap();
    }
    assert_eq!(fake.borrow_mut().complete_all(true), 4);
    let (done, _) = drain(&mut blk, 16);
    assert_eq!(
        done.iter().map(|c| c.tag).collect::<Vec<_>>(),
        vec![103, 102, 101, 100]
    );
    for c in &done {
        assert_eq!(
            c.buffer.as_ref().unwrap().as_slice()[0],
            0xa0 + (c.tag - 100) as u8
        );
    }
}

#[test]
fn full_queue_is_back_pressure() {
    let config = VirtioBlkConfig {
        max_depth: 2,
        ..VirtioBlkConfig::default()
    };
    let (mut blk, fake) = make(BASIC, config);
    assert_eq!(blk.geometry().queue_depth, 2);
    let mut pool = pool();
    for tag in 0..2 {
        blk.submit(BlockRequest::read(tag, 0, pool.acquire().unwrap()))
            .unwrap();
    }
    let rejected = blk
        .submit(BlockRequest::read(2, 0, pool.acquire().unwrap()))
        .unwrap_err();
    assert_eq!(rejected.error, BlockError::QueueFull);
    assert!(rejected.request.buffer.is_some(), "the buffer comes back");
    assert_eq!(blk.stats().queue_full, 1);
    fake.borrow_mut().complete_all(false);
    assert_eq!(drain(&mut blk, 1).0.len(), 1);
    blk.submit(rejected.request).unwrap();
    assert_eq!(blk.in_flight(), 2);
}

#[test]
fn budget_limits_each_poll() {
    let (mut blk, fake) = make(BASIC, VirtioBlkConfig::default());
    for tag in 0..5 {
        blk.submit(BlockRequest::flush(tag)).unwrap();
    }
    fake.borrow_mut().complete_all(false);
    let (done, outcome) = drain(&mut blk, 2);
    assert_eq!((done.len(), outcome.more), (2, true));
    let (done, outcome) = drain(&mut blk, 10);
    assert_eq!((done.len(), outcome.more), (3, false));
    assert_eq!(fake.borrow().flushes, 5, "flushes go through the queue");
}

#[test]
fn flush_without_flush_feature_completes_on_next_poll() {
    let (mut blk, fake) = make(BlkFeatures::VERSION_1.bits(), VirtioBlkConfig::default());
    blk.submit(BlockRequest::flush(1)).unwrap();
    assert_eq!(blk.in_flight(), 1);
    let (done, _) = drain(&mut blk, 4);
    assert_eq!((done[0].tag, done[0].result), (1, Ok(())));
    assert_eq!(fake.borrow().flushes, 0);
}

#[test]
fn device_status_codes_become_errors() {
    let (mut blk, fake) = make(BASIC, VirtioBlkConfig::default());
    fake.borrow_mut().fail_status = vec![regs::S_IOERR, regs::S_UNSUPP, 0x77];
    for tag in 0..3 {
        blk.submit(BlockRequest::flush(tag)).unwrap();
    }
    fake.borrow_mut().complete_all(false);
    let (done, _) = drain(&mut blk, 4);
    let results: Vec<_> = done.iter().map(|c| c.result).collect();
    assert_eq!(
        results,
        vec![
            Err(BlockError::Io),
            Err(BlockError::DeviceUnsupported),
            Err(BlockError::Io)
        ]
    );
    assert_eq!(blk.stats().errors, 3);
}

#[test]
fn discard_reaches_the_device() {
    let (mut blk, fake) = make(
        BASIC | BlkFeatures::DISCARD.bits(),
        VirtioBlkConfig::default(),
    );
    // max_discard_sectors is 0 in this fake's config: discard is not usable.
    assert!(!blk.geometry().discard);
    let rejected = blk.submit(BlockRequest::discard(1, 0, 1)).unwrap_err();
    assert_eq!(rejected.error, BlockError::Unsupported);

    let (blk2, fake2) = try_make(
        BASIC | BlkFeatures::DISCARD.bits(),
        VirtioBlkConfig::default(),
        |f| {
            f.set_config32(config::MAX_DISCARD_SECTORS, 64);
            f.disk.fill(0xee);
        },
    );
    let mut blk2 = blk2.unwrap();
    fake2.borrow_mut().complete_all(false);
    drain(&mut blk2, 4);
    blk2.submit(BlockRequest::discard(5, 4, 8)).unwrap();
    fake2.borrow_mut().complete_all(false);
    assert_eq!(drain(&mut blk2, 4).0[0].result, Ok(()));
    let disk = &fake2.borrow().disk;
    assert!(disk[4 * 512..12 * 512].iter().all(|&b| b == 0));
    assert_eq!((disk[4 * 512 - 1], disk[12 * 512]), (0xee, 0xee));
    drop(fake);
}

#[test]
fn unknown_token_fails_device_and_returns_buffers() {
    let (mut blk, fake) = make(BASIC, VirtioBlkConfig::default());
    let mut pool = pool();
    blk.submit(BlockRequest::read(1, 0, pool.acquire().unwrap()))
        .unwrap();
    blk.submit(BlockRequest::write(2, 0, pool.acquire().unwrap(), false))
        .unwrap();
    fake.borrow_mut().push_used(200, 0);
    let (done, _) = drain(&mut blk, 10);
    assert_eq!(done.len(), 2);
    assert!(done
        .iter()
        .all(|c| c.result == Err(BlockError::DeviceFailed) && c.buffer.is_some()));
    assert!(matches!(blk.info().state, DeviceState::Failed(_)));
    assert!(fake.borrow().resets >= 2, "device reset so it stops DMA");
    assert_eq!(blk.in_flight(), 0);
    let rejected = blk.submit(BlockRequest::flush(3)).unwrap_err();
    assert_eq!(rejected.error, BlockError::DeviceFailed);
    assert!(blk
        .info()
        .to_string()
        .contains("failed: used ring returned unknown token 200"));
}

#[test]
fn refused_vector_fails_init_and_resets() {
    let (blk, fake) = try_make(BASIC, VirtioBlkConfig::default(), |f| {
        f.refuse_queue_vector = true
    });
    assert_eq!(
        blk.unwrap_err(),
        VirtioBlkError::Setup(SetupError::VectorRefused {
            queue: Some(0),
            entry: 1
        })
    );
    assert!(fake.borrow().status.is_empty());
}

#[test]
fn refused_features_and_legacy_devices_fail_init() {
    let (blk, _) = try_make(BASIC, VirtioBlkConfig::default(), |f| {
        f.refuse_features = true
    });
    assert_eq!(blk.unwrap_err(), VirtioBlkError::FeaturesRejected);
    let (blk, _) = try_make(
        BlkFeatures::FLUSH.bits(),
        VirtioBlkConfig::default(),
        |_| {},
    );
    assert_eq!(blk.unwrap_err(), VirtioBlkError::LegacyDevice);
}

#[test]
fn smaller_device_queues_are_used() {
    let (blk, fake) = try_make(BASIC, VirtioBlkConfig::default(), |f| {
        f.max_queue_size = 100
    });
    let blk = blk.unwrap();
    assert_eq!(fake.borrow().queue.unwrap().0, 64);
    assert_eq!(blk.geometry().queue_depth, 21);
    let (blk, _) = try_make(BASIC, VirtioBlkConfig::default(), |f| f.max_queue_size = 4);
    assert_eq!(blk.unwrap_err(), VirtioBlkError::QueueTooSmall(4));
}

#[test]
fn size_max_bounds_transfers() {
    let (blk, _) = try_make(
        BASIC | BlkFeatures::SIZE_MAX.bits(),
        VirtioBlkConfig::default(),
        |f| {
            f.set_config32(config::SIZE_MAX, 65536 + 100);
        },
    );
    let blk = blk.unwrap();
    assert_eq!(blk.geometry().max_transfer_bytes, 65536);
    let mut pool = BufferPool::new::<FakeDma>(1, 1, 128 * 1024).unwrap();
    let mut blk = blk;
    let rejected = blk
        .submit(BlockRequest::read(1, 0, pool.acquire().unwrap()))
        .unwrap_err();
    assert!(matches!(rejected.error, BlockError::TooLarge { .. }));
}

#[test]
fn device_needing_reset_fails_on_config_interrupt() {
    let (mut blk, fake) = make(BASIC, VirtioBlkConfig::default());
    let mut pool = pool();
    blk.submit(BlockRequest::read(1, 0, pool.acquire().unwrap()))
        .unwrap();
    let status = fake.borrow().status;
    fake.borrow_mut().status = status | DeviceStatus::DEVICE_NEEDS_RESET;
    blk.interrupt(crate::msix::InterruptOwner::CONFIG_QUEUE);
    assert!(matches!(blk.info().state, DeviceState::Failed(_)));
    let (done, _) = drain(&mut blk, 4);
    assert_eq!(done[0].result, Err(BlockError::DeviceFailed));
    assert!(done[0].buffer.is_some());
}

#[test]
fn a_capacity_that_grows_is_taken_and_one_that_shrinks_is_not() {
    let (mut blk, fake) = make(BASIC, VirtioBlkConfig::default());
    let before = blk.geometry().capacity_blocks;
    let set = |sectors: u64| fake.borrow_mut().config[..8].copy_from_slice(&sectors.to_le_bytes());
    set(before * 2 + 8);
    blk.interrupt(crate::msix::InterruptOwner::CONFIG_QUEUE);
    assert_eq!(blk.geometry().capacity_blocks, before * 2 + 8);
    assert_eq!(blk.info().geometry.unwrap().capacity_blocks, before * 2 + 8);
    set(before);
    blk.interrupt(crate::msix::InterruptOwner::CONFIG_QUEUE);
    assert_eq!(
        blk.geometry().capacity_blocks,
        before * 2 + 8,
        "a shrink is not applied"
    );
    assert!(matches!(blk.info().state, DeviceState::Online));
}

/// A device that stops answering: requests in flight and no completion for the timeout
/// fail the device, and every request comes back (`DeviceFailed`) with its buffer. A
/// device that answers slowly but keeps answering is left alone, and an idle one too.
#[test]
fn a_device_that_stops_answering_fails_after_the_timeout() {
    use super::device::REQUEST_TIMEOUT_NS as T;
    let (mut blk, fake) = make(BASIC, VirtioBlkConfig::default());
    let mut pool = pool();
    assert!(!blk.check_timeouts(0), "idle");
    assert!(!blk.check_timeouts(10 * T), "idle for long");
    blk.submit(BlockRequest::read(1, 0, pool.acquire().unwrap()))
        .unwrap();
    blk.submit(BlockRequest::read(2, 8, pool.acquire().unwrap()))
        .unwrap();
    let t0 = 10 * T + 1;
    assert!(!blk.check_timeouts(t0));
    // One completes before the timeout: progress, the clock starts again.
    {
        let mut f = fake.borrow_mut();
        f.fetch();
        let head = f.pending.remove(0);
        f.complete(head);
    }
    let (done, _) = drain(&mut blk, 4);
    assert_eq!(done.len(), 1);
    assert!(!blk.check_timeouts(t0 + T - 1));
    assert!(
        !blk.check_timeouts(t0 + 2 * T - 2),
        "not yet: the last progress was later"
    );
    assert!(matches!(blk.info().state, DeviceState::Online));
    // Nothing more arrives.
    assert!(blk.check_timeouts(t0 + 2 * T));
    assert!(matches!(blk.info().state, DeviceState::Failed(_)));
    let (done, _) = drain(&mut blk, 4);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].result, Err(BlockError::DeviceFailed));
    assert!(done[0].buffer.is_some(), "the buffer comes back");
    assert!(!blk.check_timeouts(t0 + 5 * T), "failed once");
}

#[test]
fn interrupts_are_counted() {
    let (mut blk, _) = make(BASIC, VirtioBlkConfig::default());
    blk.interrupt(0);
    blk.interrupt(crate::msix::InterruptOwner::CONFIG_QUEUE);
    assert_eq!(blk.stats().interrupts, 2);
    assert!(blk.take_config_changed());
    assert!(!blk.take_config_changed());
}

/// Random mixes of reads, writes and flushes, completed by the device in random batches and
/// orders, against a model of the disk: every read sees the model's data, every buffer comes
/// back, nothing is lost or duplicated, and full queues are only ever back-pressure.
#[test]
fn random_workload_matches_model() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rng = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let config = VirtioBlkConfig {
        max_queue_size: 32,
        ..VirtioBlkConfig::default()
    };
    let (mut blk, fake) = make(BASIC, config);
    assert_eq!(blk.geometry().queue_depth, 10);
    let mut pool = BufferPool::new::<FakeDma>(0, 16, 4096).unwrap();
    let blocks = blk.geometry().capacity_blocks;
    let mut model = vec![0u8; fake.borrow().disk.len()];
    // tag -> (is_read, lba, expected data for reads)
    let mut outstanding: std::collections::HashMap<u64, (bool, u64, usize)> = Default::default();
    let mut next_tag = 0u64;
    let mut completed = 0usize;

    for _ in 0..3000 {
        match rng() % 4 {
            0 | 1 => {
                let Some(mut buf) = pool.acquire() else {
                    continue;
                };
                let sectors = 1 + (rng() % 8) as usize;
                buf.set_len(sectors * 512).unwrap();
                let lba = rng() % (blocks - sectors as u64);
                // Only one write per region at a time, and no read of a region being written,
                // so the model is order-independent.
                let overlaps = outstanding
                    .values()
                    .any(|&(_, l, n)| lba < l + n as u64 && l < lba + sectors as u64);
                if overlaps {
                    pool.release(buf).unwrap();
                    continue;
                }
                let is_read = rng() % 2 == 0;
                if !is_read {
                    let fill = rng() as u8;
                    buf.as_mut_slice().fill(fill);
                    let start = lba as usize * 512;
                    model[start..start + sectors * 512].fill(fill);
                }
                let request = if is_read {
                    BlockRequest::read(next_tag, lba, buf)
                } else {
                    BlockRequest::write(next_tag, lba, buf, false)
                };
                match blk.submit(request) {
                    Ok(()) => {
                        outstanding.insert(next_tag, (is_read, lba, sectors));
                        next_tag += 1;
                    }
                    Err(rejected) => {
                        assert_eq!(rejected.error, BlockError::QueueFull);
                        if !is_read {
                            // Undo the model update: the write never happened.
                            let start = lba as usize * 512;
                            let current = &fake.borrow().disk[start..start + sectors * 512];
                            model[start..start + sectors * 512].copy_from_slice(current);
                        }
                        pool.release(rejected.request.buffer.unwrap()).unwrap();
                    }
                }
            }
            2 => {
                let mut f = fake.borrow_mut();
                f.fetch();
                let n = f.pending.len();
                if n > 0 {
                    let take = 1 + (rng() as usize % n);
                    let mut batch: Vec<u16> = f.pending.drain(..take).collect();
                    if rng() % 2 == 0 {
                        batch.reverse();
                    }
                    for head in batch {
                        f.complete(head);
                    }
                }
            }
            _ => {
                let budget = 1 + (rng() % 4) as usize;
                let (done, _) = drain(&mut blk, budget);
                for c in done {
                    let (is_read, lba, sectors) =
                        outstanding.remove(&c.tag).expect("known tag, once");
                    assert_eq!(c.result, Ok(()));
                    let buf = c.buffer.unwrap();
                    if is_read {
                        let start = lba as usize * 512;
                        assert_eq!(
                            buf.as_slice(),
                            &model[start..start + sectors * 512],
                            "tag {}",
                            c.tag
                        );
                    }
                    pool.release(buf).unwrap();
                    completed += 1;
                }
            }
        }
    }
    // Drain everything.
    while !outstanding.is_empty() {
        fake.borrow_mut().complete_all(false);
        let (done, _) = drain(&mut blk, 64);
        for c in done {
            outstanding.remove(&c.tag).expect("known tag");
            pool.release(c.buffer.unwrap()).unwrap();
            completed += 1;
        }
    }
    assert_eq!(fake.borrow().disk, model);
    assert_eq!(pool.available(), 16, "every buffer came back");
    assert_eq!(blk.in_flight(), 0);
    assert!(completed > 300, "the workload did something ({completed})");
    assert_eq!(blk.stats().errors, 0);
    assert!(blk.stats().queue_full > 0, "back-pressure was exercised");
}

#[test]
fn plugged_submissions_share_one_notification() {
    let (mut blk, fake) = make(BASIC, VirtioBlkConfig::default());
    let mut pool = pool();
    let before = fake.borrow().notifications;
    blk.plug();
    for tag in 0..3u64 {
        let mut buf = pool.acquire().unwrap();
        buf.set_len(512).unwrap();
        blk.submit(BlockRequest::write(tag, tag, buf, false))
            .unwrap();
    }
    assert_eq!(
        fake.borrow().notifications,
        before,
        "held back while plugged"
    );
    blk.unplug();
    assert_eq!(fake.borrow().notifications, before + 1, "one for the burst");
    blk.unplug();
    assert_eq!(
        fake.borrow().notifications,
        before + 1,
        "nothing more to send"
    );
    fake.borrow_mut().complete_all(false);
    let (done, _) = drain(&mut blk, 8);
    assert_eq!(done.len(), 3);
    // Unplugged again: each submission notifies at once.
    let mut buf = pool.acquire().unwrap();
    buf.set_len(512).unwrap();
    blk.submit(BlockRequest::write(9, 9, buf, false)).unwrap();
    assert_eq!(fake.borrow().notifications, before + 2);
}
