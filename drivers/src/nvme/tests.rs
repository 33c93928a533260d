//! The driver against the fake controller: bring-up (including CSTS.CFS and timeouts),
//! attach, the I/O path (PRPs, MDTS splitting, FUA, flush, deallocate), completion routing
//! between namespaces that share a queue, queue wrap with out-of-order completion, and failure
//! (command timeout, fatal status, unknown command ID).

use super::controller::{attach, AttachParams, WriteCache};
use super::fake::{FakeController, FakeNamespace, TestVectors};
use super::init::{AdminQueues, BringUp, State};
use super::regs::{self, Capabilities, RegisterAccess};
use super::{cmd, Attached, Clock, NvmeConfig, NvmeError, Status, WAKE_QUEUE};
use crate::block::{BlockDevice, BlockError, BlockRequest, BufferPool, Completion, DmaBuf};
use crate::hal::fake::FakeDma;
use crate::info::{DeviceName, DeviceState, NamespaceIdentity};
use crate::msix::{InterruptOwner, VectorRegistry};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A clock that advances 1 ms every time it is read, plus a handle to jump it.
fn clock() -> (Clock, Arc<AtomicU64>) {
    let now = Arc::new(AtomicU64::new(0));
    let reader = now.clone();
    let f: Clock = Box::leak(Box::new(move || {
        reader.fetch_add(1_000_000, Ordering::Relaxed)
    }));
    (f, now)
}

fn registry() -> &'static VectorRegistry {
    Box::leak(Box::new(VectorRegistry::new()))
}

struct Rig {
    fake: FakeController,
    attached: Attached<FakeController>,
    registry: &'static VectorRegistry,
    routed: Vec<(u16, u8)>,
    now: Arc<AtomicU64>,
}

fn rig_with(fake: FakeController, config: NvmeConfig, table: u16) -> Result<Rig, NvmeError> {
    let (clock, now) = clock();
    let registry = registry();
    let mut vectors = TestVectors::new(registry, table);
    let attached = attach::<_, FakeDma>(
        fake.clone(),
        AttachParams {
            name: DeviceName::from_str_truncated("nvme0"),
            pci: None,
            first_device_index: 10,
            config,
            clock,
            registry,
            vectors: &mut vectors,
        },
    )?;
    Ok(Rig {
        fake,
        attached,
        registry,
        routed: vectors.routed,
        now,
    })
}

fn rig(namespaces: Vec<FakeNamespace>) -> Rig {
    rig_with(FakeController::new(namespaces), NvmeConfig::default(), 16).expect("attach")
}

fn poll_all(device: &mut dyn BlockDevice) -> Vec<Completion> {
    let mut out = Vec::new();
    for _ in 0..100 {
        let outcome = device.poll_completions(64, &mut |c| out.push(c));
        if !outcome.more && outcome.completed == 0 {
            break;
        }
    }
    out
}

fn admin_queues() -> AdminQueues {
    AdminQueues {
        sq_phys: 0x10_0000,
        cq_phys: 0x20_0000,
        entries: 32,
    }
}

// ---- bring-up ----------------------------------------------------------------------------

#[test]
fn bring_up_walks_the_named_states() {
    let fake = FakeController::new(vec![]);
    {
        // Firmware left the controller enabled and ready.
        let mut s = fake.state();
        s.cc = 1;
        s.csts = 1;
        s.ready_delay = 2;
    }
    let cap = Capabilities(fake.read64(regs::CAP));
    let mut bring_up = BringUp::new(cap, admin_queues()).unwrap();
    let mut seen = vec![bring_up.state().name()];
    let mut now = 0;
    loop {
        let state = bring_up.step(&fake, now);
        if seen.last() != Some(&state.name()) {
            seen.push(state.name());
        }
        if matches!(state, State::Ready | State::Failed(_)) {
            break;
        }
        now += 1_000_000;
    }
    assert_eq!(
        seen,
        ["Disable", "WaitNotReady", "WaitReady", "Ready"],
        "Configure and Enable take no time"
    );
    let s = fake.state();
    assert_eq!(s.aqa, 31 << 16 | 31);
    assert_eq!((s.asq, s.acq), (0x10_0000, 0x20_0000));
    // EN, CSS NVM, MPS 0 (4 KiB), round robin, IOSQES 6, IOCQES 4.
    assert_eq!(s.cc, 1 | 6 << 16 | 4 << 20);
    assert_eq!(BringUp::enable_value(), s.cc);
}

#[test]
fn bring_up_reports_fatal_status() {
    let fake = FakeController::new(vec![]);
    fake.state().fatal_on_enable = true;
    let cap = Capabilities(fake.read64(regs::CAP));
    let (clock, _) = clock();
    let error = BringUp::new(cap, admin_queues())
        .unwrap()
        .run(&fake, clock)
        .unwrap_err();
    assert_eq!(
        error,
        NvmeError::ControllerFatal {
            during: "WaitReady"
        }
    );
    assert_eq!(
        error.to_string(),
        "controller fatal status (CSTS.CFS) during WaitReady"
    );
    // CFS already set before we start: caught in the first state.
    let fake = FakeController::new(vec![]);
    fake.state().csts = 2;
    let error = BringUp::new(cap, admin_queues())
        .unwrap()
        .run(&fake, clock)
        .unwrap_err();
    assert_eq!(error, NvmeError::ControllerFatal { during: "Disable" });
}

#[test]
fn bring_up_times_out_after_cap_to() {
    let fake = FakeController::new(vec![]);
    fake.state().stuck = true;
    let cap = Capabilities(fake.read64(regs::CAP));
    assert_eq!(cap.timeout_ns(), 500_000_000);
    let (clock, now) = clock();
    let error = BringUp::new(cap, admin_queues())
        .unwrap()
        .run(&fake, clock)
        .unwrap_err();
    assert_eq!(
        error,
        NvmeError::Timeout {
            during: "WaitReady",
            waited_ms: 500
        }
    );
    let elapsed = now.load(Ordering::Relaxed);
    assert!((500_000_000..520_000_000).contains(&elapsed), "{elapsed}");

    // Stuck ready while disabling: the first wait times out.
    let fake = FakeController::new(vec![]);
    {
        let mut s = fake.state();
        s.cc = 1;
        s.csts = 1;
        s.stuck = true;
    }
    let error = BringUp::new(cap, admin_queues())
        .unwrap()
        .run(&fake, clock)
        .unwrap_err();
    assert!(matches!(
        error,
        NvmeError::Timeout {
            during: "WaitNotReady",
            ..
        }
    ));

    // A function that reads all ones is not there.
    let fake = FakeController::new(vec![]);
    fake.state().csts = u32::MAX;
    let mut b = BringUp::new(cap, admin_queues()).unwrap();
    assert_eq!(
        b.step(&fake, 0),
        State::Failed(NvmeError::NotResponding { during: "Disable" })
    );
}

#[test]
fn bring_up_checks_capabilities() {
    // MPSMIN 8 KiB: our 4 KiB pages are not allowed.
    let cap = Capabilities(1023 | 1u64 << 37 | 1u64 << 48 | 2u64 << 52);
    assert_eq!(
        BringUp::new(cap, admin_queues()).unwrap_err(),
        NvmeError::UnsupportedPageSize {
            min: 8192,
            max: 16384
        }
    );
    let no_nvm = Capabilities(1023);
    assert_eq!(
        BringUp::new(no_nvm, admin_queues()).unwrap_err(),
        NvmeError::NoNvmCommandSet
    );
    let tiny = Capabilities(15 | 1u64 << 37);
    assert!(matches!(
        BringUp::new(tiny, admin_queues()),
        Err(NvmeError::QueueTooLarge {
            entries: 32,
            max: 16
        })
    ));
}

// ---- attach ------------------------------------------------------------------------------

#[test]
fn attach_names_namespaces_and_routes_vectors() {
    let mut meta = FakeNamespace::new(3, 9, 64);
    meta.metadata = 8;
    let rig = rig(vec![
        FakeNamespace::new(1, 9, 4096),
        FakeNamespace::new(2, 12, 1024),
        meta,
    ]);
    let names: Vec<String> = rig
        .attached
        .namespaces
        .iter()
        .map(|n| n.info().name.to_string())
        .collect();
    assert_eq!(names, ["nvme0n1", "nvme0n2"]);
    assert_eq!(rig.attached.failed.len(), 1);
    assert_eq!(rig.attached.failed[0].name.as_str(), "nvme0n3");
    assert!(matches!(
        rig.attached.failed[0].state,
        DeviceState::InitFailed(_)
    ));

    let g = rig.attached.namespaces[1].geometry();
    assert_eq!((g.block_size, g.capacity_blocks), (4096, 1024));
    assert_eq!(g.max_transfer_bytes, 128 * 1024);
    assert!(g.volatile_write_cache && g.fua && g.discard);
    assert_eq!(g.queue_depth, 64);

    // Admin on entry 0 owned by the first namespace's device index; pair q on entry q.
    let owners: Vec<(u16, InterruptOwner)> = rig
        .routed
        .iter()
        .map(|&(entry, v)| (entry, rig.registry.owner(v).unwrap()))
        .collect();
    assert_eq!(
        owners,
        [
            (
                0,
                InterruptOwner {
                    device: 10,
                    queue: InterruptOwner::CONFIG_QUEUE
                }
            ),
            (
                1,
                InterruptOwner {
                    device: 10,
                    queue: 1
                }
            ),
            (
                2,
                InterruptOwner {
                    device: 11,
                    queue: 2
                }
            ),
        ]
    );
    let info = rig.attached.controller.controller_info().unwrap();
    assert_eq!((info.queue_pairs, info.namespaces), (2, 2));
    assert_eq!(info.write_cache, WriteCache::Enabled);
    let line = info.to_string();
    assert!(line.contains("model=\"snapfw fake NVMe\""), "{line}");
    assert!(line.contains("serial=\"FAKE0001\""), "{line}");
    assert!(
        line.contains("fw=\"1.0\" nvme=1.4.0 queues=2x256 mdts=128KiB vwc=write-back"),
        "{line}"
    );
    let ns_line = rig.attached.namespaces[0].info().to_string();
    assert!(ns_line.starts_with("nvme0n1  nvme"), "{ns_line}");
    assert!(ns_line.contains("serial=\"FAKE0001\" nsid=1 "), "{ns_line}");
}

#[test]
fn namespaces_report_their_own_identity() {
    // Namespace 1 without identifiers (QEMU 7.2's default), 2 with an EUI-64, 3 with both.
    let mut eui = FakeNamespace::new(2, 9, 64);
    eui.eui64 = [0x52, 0x54, 0, 0, 0, 0, 0, 2];
    let mut both = FakeNamespace::new(3, 9, 64);
    both.eui64 = [9; 8];
    both.nguid = [0x11; 16];
    let rig = rig(vec![FakeNamespace::new(1, 9, 64), eui, both]);
    let ids: Vec<_> = rig
        .attached
        .namespaces
        .iter()
        .map(|n| n.info().namespace.unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            NamespaceIdentity {
                nsid: 1,
                nguid: None,
                eui64: None
            },
            NamespaceIdentity {
                nsid: 2,
                nguid: None,
                eui64: Some([0x52, 0x54, 0, 0, 0, 0, 0, 2])
            },
            NamespaceIdentity {
                nsid: 3,
                nguid: Some([0x11; 16]),
                eui64: Some([9; 8])
            },
        ]
    );
    // All three share the controller's serial; only the namespace identity tells them apart.
    for n in &rig.attached.namespaces {
        assert_eq!(n.info().serial.as_str(), "FAKE0001");
    }
    let line = rig.attached.namespaces[1].info().to_string();
    assert!(line.contains(" nsid=2 eui64=5254000000000002 "), "{line}");
    let line = rig.attached.namespaces[2].info().to_string();
    assert!(
        line.contains(" nsid=3 nguid=11111111111111111111111111111111 eui64=0909090909090909 "),
        "{line}"
    );
}

#[test]
fn attach_reports_admin_failures_and_leaves_the_controller_disabled() {
    let fake = FakeController::new(vec![FakeNamespace::new(1, 9, 64)]);
    fake.state().admin_fail = Some((cmd::ADMIN_CREATE_SQ, 1, 0x02));
    let error = rig_with(fake.clone(), NvmeConfig::default(), 4)
        .err()
        .unwrap();
    assert_eq!(
        error.to_string(),
        "Create I/O Submission Queue failed: Invalid Queue Size"
    );
    assert_eq!(fake.state().cc & 1, 0, "disabled after failure");

    let empty = FakeController::new(vec![]);
    assert_eq!(
        rig_with(empty, NvmeConfig::default(), 4).err(),
        Some(NvmeError::NoNamespaces)
    );
}

#[test]
fn write_cache_detection_and_control() {
    let fake = FakeController::new(vec![FakeNamespace::new(1, 9, 64)]);
    fake.state().vwc_present = false;
    let rig = rig_with(fake, NvmeConfig::default(), 4).unwrap();
    assert!(!rig.attached.namespaces[0].geometry().volatile_write_cache);
    assert_eq!(
        rig.attached
            .controller
            .controller_info()
            .unwrap()
            .write_cache,
        WriteCache::Absent
    );

    let fake = FakeController::new(vec![FakeNamespace::new(1, 9, 64)]);
    let config = NvmeConfig {
        write_cache: Some(false),
        ..NvmeConfig::default()
    };
    let rig = rig_with(fake.clone(), config, 4).unwrap();
    assert!(!fake.state().vwc_enabled);
    assert!(!rig.attached.namespaces[0].geometry().volatile_write_cache);
}

// ---- I/O ---------------------------------------------------------------------------------

fn buffer(pool: &mut BufferPool, len: usize, fill: u8) -> DmaBuf {
    let mut b = pool.acquire().unwrap();
    b.set_len(len).unwrap();
    b.as_mut_slice().fill(fill);
    b
}

#[test]
fn read_write_flush_fua_and_deallocate() {
    let mut rig = rig(vec![FakeNamespace::new(1, 9, 4096)]);
    let ns = &mut rig.attached.namespaces[0];
    let mut pool = BufferPool::new::<FakeDma>(0, 4, 128 * 1024).unwrap();
    let mut pattern = buffer(&mut pool, 128 * 1024, 0);
    for (i, b) in pattern.as_mut_slice().iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    ns.submit(BlockRequest::write(1, 100, pattern, true))
        .unwrap();
    ns.submit(BlockRequest::flush(2)).unwrap();
    assert_eq!(ns.in_flight(), 2);
    let done = poll_all(ns);
    assert_eq!(
        done.iter().map(|c| (c.tag, c.result)).collect::<Vec<_>>(),
        [(1, Ok(())), (2, Ok(()))]
    );
    let mut buffers: Vec<DmaBuf> = done.into_iter().filter_map(|c| c.buffer).collect();
    {
        let s = rig.fake.state();
        let writes: Vec<_> = s
            .executed
            .iter()
            .filter(|(q, c)| *q == 1 && c.opcode() == cmd::NVM_WRITE)
            .collect();
        assert_eq!(writes.len(), 1, "128 KiB in one command (MDTS 5 = 128 KiB)");
        assert_ne!(writes[0].1.cdw(12) & cmd::FUA, 0, "FUA bit set");
        assert_eq!(s.flushes, 1);
        let data = &s.namespaces[0].data[100 * 512..100 * 512 + 128 * 1024];
        assert!(data
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i * 7 % 251) as u8));
    }
    let read = buffers.pop().unwrap();
    ns.submit(BlockRequest::read(3, 100, read)).unwrap();
    let done = poll_all(ns);
    let read = done.into_iter().next().unwrap();
    assert_eq!(read.result, Ok(()));
    let data = read.buffer.unwrap();
    assert!(data
        .as_slice()
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (i * 7 % 251) as u8));

    ns.submit(BlockRequest::discard(4, 100, 8)).unwrap();
    assert_eq!(poll_all(ns)[0].result, Ok(()));
    assert_eq!(rig.fake.state().deallocated, [(100, 8)]);
    let stats = ns.stats();
    assert_eq!(
        (stats.reads, stats.writes, stats.flushes, stats.discards),
        (1, 1, 1, 1)
    );
    assert_eq!(stats.bytes_read, 128 * 1024);
}

#[test]
fn buffers_mid_page_two_pages_and_lists() {
    let mut rig = rig(vec![FakeNamespace::new(1, 9, 4096)]);
    let ns = &mut rig.attached.namespaces[0];
    // 1536-byte buffers share pages, so some start mid-page (PRP1 with an offset); 8 KiB
    // buffers use PRP2 as a page pointer; 12 KiB buffers need a PRP list.
    let mut small = BufferPool::new::<FakeDma>(0, 4, 1536).unwrap();
    let mut two = BufferPool::new::<FakeDma>(1, 2, 8192).unwrap();
    let mut three = BufferPool::new::<FakeDma>(2, 2, 12288).unwrap();
    let mut expected = Vec::new();
    let mut lba = 0u64;
    let mut tag = 0u64;
    let mut mid_page = 0;
    for (pool, len) in [
        (&mut small, 1536usize),
        (&mut two, 8192),
        (&mut three, 12288),
    ] {
        while let Some(mut b) = pool.acquire() {
            tag += 1;
            b.as_mut_slice().fill(tag as u8);
            if b.phys() % 4096 != 0 {
                mid_page += 1;
            }
            expected.push((lba, len, tag as u8));
            ns.submit(BlockRequest::write(tag, lba, b, false)).unwrap();
            lba += (len / 512) as u64 + 1;
        }
    }
    assert!(mid_page > 0, "some buffer starts mid-page");
    let done = poll_all(ns);
    assert_eq!(done.len(), 8);
    assert!(done.iter().all(|c| c.result == Ok(())));
    let s = rig.fake.state();
    for (lba, len, fill) in expected {
        let at = lba as usize * 512;
        assert!(
            s.namespaces[0].data[at..at + len]
                .iter()
                .all(|&b| b == fill),
            "lba {lba}"
        );
    }
    let prp2: Vec<u64> = s
        .executed
        .iter()
        .filter(|(q, _)| *q == 1)
        .map(|(_, c)| c.prp2())
        .collect();
    assert_eq!(prp2[..4], [0, 0, 0, 0], "one page: no PRP2");
    assert!(prp2[4..6].iter().all(|&p| p != 0 && p % 4096 == 0));
}

#[test]
fn requests_beyond_mdts_are_split() {
    let fake = FakeController::new(vec![FakeNamespace::new(1, 9, 4096)]);
    fake.state().mdts = 1; // 8 KiB
    let mut rig = rig_with(fake, NvmeConfig::default(), 4).unwrap();
    let ns = &mut rig.attached.namespaces[0];
    assert_eq!(ns.geometry().max_transfer_bytes, 128 * 1024);
    let mut pool = BufferPool::new::<FakeDma>(0, 1, 128 * 1024).unwrap();
    let mut b = buffer(&mut pool, 128 * 1024, 0);
    for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
        *x = (i / 512) as u8;
    }
    ns.submit(BlockRequest::write(9, 8, b, false)).unwrap();
    let done = poll_all(ns);
    assert_eq!(done.len(), 1, "one completion for the whole request");
    assert_eq!(done[0].result, Ok(()));
    let s = rig.fake.state();
    let writes: Vec<_> = s.executed.iter().filter(|(q, _)| *q != 0).collect();
    assert_eq!(writes.len(), 16);
    for (k, (_, c)) in writes.iter().enumerate() {
        assert_eq!(c.cdw(10), 8 + 16 * k as u32, "SLBA of piece {k}");
        assert_eq!(c.cdw(12) & 0xffff, 15, "16 blocks per piece");
    }
    let data = &s.namespaces[0].data[8 * 512..8 * 512 + 128 * 1024];
    assert!(data.iter().enumerate().all(|(i, &x)| x == (i / 512) as u8));
}

#[test]
fn device_statuses_come_back_by_name() {
    let mut rig = rig(vec![FakeNamespace::new(1, 9, 64)]);
    let controller = rig.attached.controller.clone();
    let ns = &mut rig.attached.namespaces[0];
    let mut pool = BufferPool::new::<FakeDma>(0, 2, 4096).unwrap();
    rig.fake.state().inject = Some((cmd::NVM_READ, 0, 0x80));
    ns.submit(BlockRequest::read(1, 0, buffer(&mut pool, 4096, 0)))
        .unwrap();
    let done = poll_all(ns);
    assert_eq!(
        done[0].result,
        Err(BlockError::DeviceStatus("LBA Out of Range"))
    );
    let status = controller.last_status(0).unwrap();
    assert_eq!(status, Status::LbaOutOfRange);
    assert_eq!(status.to_string(), "LBA Out of Range");

    rig.fake.state().inject = Some((cmd::NVM_WRITE, 2, 0x80));
    ns.submit(BlockRequest::write(2, 0, buffer(&mut pool, 4096, 0), false))
        .unwrap();
    assert_eq!(
        poll_all(ns)[0].result,
        Err(BlockError::DeviceStatus("Write Fault"))
    );
    assert_eq!(controller.last_status(0), Some(Status::WriteFault));
    assert_eq!(ns.stats().errors, 2);
    // Ranges are the controller's to check: past the end, it answers by name.
    let b = done.into_iter().next().unwrap().buffer.unwrap();
    ns.submit(BlockRequest::read(3, 60, b)).unwrap();
    let done = poll_all(ns);
    assert_eq!(
        done[0].result,
        Err(BlockError::DeviceStatus("LBA Out of Range"))
    );
    assert_eq!(ns.stats().errors, 3);
    // What the driver can check itself (alignment) never reaches the device.
    let mut b = done.into_iter().next().unwrap().buffer.unwrap();
    b.set_len(100).unwrap();
    let rejected = ns.submit(BlockRequest::read(4, 0, b)).unwrap_err();
    assert!(matches!(rejected.error, BlockError::Misaligned { .. }));
}

#[test]
fn deallocate_needs_oncs() {
    let fake = FakeController::new(vec![FakeNamespace::new(1, 9, 64)]);
    fake.state().oncs = 0;
    let mut rig = rig_with(fake, NvmeConfig::default(), 4).unwrap();
    let ns = &mut rig.attached.namespaces[0];
    assert!(!ns.geometry().discard);
    let rejected = ns.submit(BlockRequest::discard(1, 0, 8)).unwrap_err();
    assert_eq!(rejected.error, BlockError::Unsupported);
}

#[test]
fn back_pressure_at_depth() {
    let config = NvmeConfig {
        max_depth: 4,
        ..NvmeConfig::default()
    };
    let fake = FakeController::new(vec![FakeNamespace::new(1, 9, 64)]);
    fake.state().hold = true;
    let mut rig = rig_with(fake, config, 4).unwrap();
    let ns = &mut rig.attached.namespaces[0];
    for tag in 0..4 {
        ns.submit(BlockRequest::flush(tag)).unwrap();
    }
    let rejected = ns.submit(BlockRequest::flush(9)).unwrap_err();
    assert_eq!(rejected.error, BlockError::QueueFull);
    assert_eq!(ns.stats().queue_full, 1);
    rig.fake.release_reversed();
    let tags: Vec<u64> = poll_all(ns).iter().map(|c| c.tag).collect();
    assert_eq!(tags, [3, 2, 1, 0], "completion order is the device's");
    ns.submit(BlockRequest::flush(9)).unwrap();
}

#[test]
fn queues_wrap_with_out_of_order_completions() {
    let config = NvmeConfig {
        io_queue_entries: 8,
        max_depth: 5,
        ..NvmeConfig::default()
    };
    let fake = FakeController::new(vec![FakeNamespace::new(1, 9, 256)]);
    let mut rig = rig_with(fake, config, 4).unwrap();
    let ns = &mut rig.attached.namespaces[0];
    let mut pool = BufferPool::new::<FakeDma>(0, 5, 1024).unwrap();
    let mut tag = 0u64;
    let mut completed = 0;
    // 40 rounds of up to 5 requests through rings of 8: the completion queue wraps ~25 times.
    for round in 0..40u64 {
        rig.fake.state().hold = round % 2 == 0;
        let mut submitted = Vec::new();
        while let Some(b) = pool.acquire() {
            let mut b = b;
            b.set_len(1024).unwrap();
            b.as_mut_slice().fill(tag as u8);
            ns.submit(BlockRequest::write(tag, (tag % 128) * 2, b, false))
                .unwrap();
            submitted.push(tag);
            tag += 1;
        }
        rig.fake.release_reversed();
        let done = poll_all(ns);
        assert_eq!(done.len(), submitted.len(), "round {round}");
        for c in done {
            assert_eq!(c.result, Ok(()));
            pool.release(c.buffer.unwrap()).unwrap();
            completed += 1;
        }
    }
    assert_eq!(completed, 200);
    assert_eq!(ns.in_flight(), 0);
    let s = rig.fake.state();
    // Each 1 KiB write covers 2 blocks at (tag % 128) * 2; the last writer of each slot wins.
    for slot in 0..128u64 {
        let last = (0..200u64).filter(|t| t % 128 == slot).max().unwrap();
        let at = (slot * 2 * 512) as usize;
        assert!(s.namespaces[0].data[at..at + 1024]
            .iter()
            .all(|&b| b == last as u8));
    }
}

#[test]
fn shared_completion_queue_routes_to_each_namespace() {
    let config = NvmeConfig {
        max_io_queues: 1,
        ..NvmeConfig::default()
    };
    let fake = FakeController::new(vec![
        FakeNamespace::new(1, 9, 64),
        FakeNamespace::new(2, 9, 64),
        FakeNamespace::new(3, 9, 64),
    ]);
    let mut rig = rig_with(fake, config, 16).unwrap();
    rig.fake.state().interrupts.clear();
    let (first, rest) = rig.attached.namespaces.split_at_mut(1);
    let n1 = &mut first[0];
    n1.submit(BlockRequest::flush(1)).unwrap();
    rest[0].submit(BlockRequest::flush(2)).unwrap();
    rest[1].submit(BlockRequest::flush(3)).unwrap();
    // All three completed on queue 1, whose vector belongs to nvme0n1 (device 10).
    assert!(rig.fake.state().interrupts.iter().all(|&iv| iv == 1));
    let mut got = Vec::new();
    let outcome = n1.poll_completions(64, &mut |c| got.push(c.tag));
    assert_eq!(got, [1]);
    assert!(outcome.more, "woke other namespaces: run the loop again");
    let mut woken = Vec::new();
    rig.registry.take_pending(|owner| woken.push(owner));
    woken.sort_by_key(|o| o.device);
    assert_eq!(
        woken,
        [
            InterruptOwner {
                device: 11,
                queue: WAKE_QUEUE
            },
            InterruptOwner {
                device: 12,
                queue: WAKE_QUEUE
            },
        ]
    );
    for (ns, tag) in rest.iter_mut().zip([2, 3]) {
        ns.interrupt(WAKE_QUEUE);
        let done = poll_all(ns);
        assert_eq!(done.iter().map(|c| c.tag).collect::<Vec<_>>(), [tag]);
        assert_eq!(ns.stats().interrupts, 0, "wake-ups are not interrupts");
    }
}

// ---- failure -----------------------------------------------------------------------------

#[test]
fn command_timeout_fails_the_controller_and_its_requests() {
    let fake = FakeController::new(vec![
        FakeNamespace::new(1, 9, 64),
        FakeNamespace::new(2, 9, 64),
    ]);
    fake.state().hold = true;
    let mut rig = rig_with(fake, NvmeConfig::default(), 4).unwrap();
    let mut pool = BufferPool::new::<FakeDma>(0, 2, 4096).unwrap();
    let (a, b) = rig.attached.namespaces.split_at_mut(1);
    a[0].submit(BlockRequest::write(1, 0, buffer(&mut pool, 4096, 1), false))
        .unwrap();
    b[0].submit(BlockRequest::read(2, 0, buffer(&mut pool, 4096, 0)))
        .unwrap();
    assert!(poll_all(&mut a[0]).is_empty(), "held: nothing yet");
    assert!(!rig.attached.controller.check_timeouts());
    // 31 s later: past the 30 s deadline.
    rig.now.fetch_add(31_000_000_000, Ordering::Relaxed);
    assert!(rig.attached.controller.check_timeouts());
    assert_eq!(rig.fake.state().cc & 1, 0, "controller disabled");
    let done_a = poll_all(&mut a[0]);
    let done_b = poll_all(&mut b[0]);
    assert_eq!(done_a.len() + done_b.len(), 2);
    for c in done_a.iter().chain(&done_b) {
        assert_eq!(c.result, Err(BlockError::DeviceFailed));
        assert!(c.buffer.is_some(), "buffers come back");
    }
    let info = a[0].info();
    match info.state {
        DeviceState::Failed(why) => {
            assert!(
                why.as_str()
                    .contains("Write (command 0, queue 1) timed out after 30000 ms"),
                "{why}"
            )
        }
        other => panic!("{other:?}"),
    }
    let rejected = a[0].submit(BlockRequest::flush(3)).unwrap_err();
    assert_eq!(rejected.error, BlockError::DeviceFailed);
}

#[test]
fn fatal_status_at_run_time_fails_the_controller() {
    let fake = FakeController::new(vec![FakeNamespace::new(1, 9, 64)]);
    let mut rig = rig_with(fake, NvmeConfig::default(), 4).unwrap();
    rig.fake.state().hold = true;
    let ns = &mut rig.attached.namespaces[0];
    ns.submit(BlockRequest::flush(1)).unwrap();
    rig.fake.state().csts |= 2;
    rig.now.fetch_add(1_000_000_000, Ordering::Relaxed);
    let done = poll_all(ns);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].result, Err(BlockError::DeviceFailed));
    assert!(
        matches!(ns.info().state, DeviceState::Failed(why) if why.as_str().contains("CSTS.CFS"))
    );
}

#[test]
fn unknown_command_id_fails_the_controller() {
    let fake = FakeController::new(vec![FakeNamespace::new(1, 9, 64)]);
    let mut rig = rig_with(fake, NvmeConfig::default(), 4).unwrap();
    rig.fake.state().hold = true;
    let ns = &mut rig.attached.namespaces[0];
    ns.submit(BlockRequest::flush(1)).unwrap();
    rig.fake.post_bogus(1, 77);
    let done = poll_all(ns);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].result, Err(BlockError::DeviceFailed));
    assert!(matches!(ns.info().state,
        DeviceState::Failed(why) if why.as_str().contains("unknown command ID 77 on queue 1")));
}

#[test]
fn shutdown_deletes_queues_and_sets_shn() {
    let rig = rig(vec![FakeNamespace::new(1, 9, 64)]);
    assert!(rig.attached.controller.shutdown());
    let s = rig.fake.state();
    assert_eq!(s.cc & regs::cc::SHN_MASK, regs::cc::SHN_NORMAL);
    let deletes = s
        .executed
        .iter()
        .filter(|(q, c)| {
            *q == 0 && matches!(c.opcode(), cmd::ADMIN_DELETE_SQ | cmd::ADMIN_DELETE_CQ)
        })
        .count();
    assert_eq!(deletes, 2);
}

#[test]
fn splitting_counts_blocks_of_the_namespace_format() {
    let fake = FakeController::new(vec![FakeNamespace::new(1, 12, 256)]);
    fake.state().mdts = 1; // 8 KiB: two 4 KiB blocks per command
    let mut rig = rig_with(fake, NvmeConfig::default(), 4).unwrap();
    let ns = &mut rig.attached.namespaces[0];
    let mut pool = BufferPool::new::<FakeDma>(0, 1, 40 * 1024).unwrap();
    ns.submit(BlockRequest::write(
        1,
        3,
        buffer(&mut pool, 40 * 1024, 0x5a),
        true,
    ))
    .unwrap();
    assert_eq!(poll_all(ns)[0].result, Ok(()));
    let s = rig.fake.state();
    let pieces: Vec<(u32, u32)> = s
        .executed
        .iter()
        .filter(|(q, _)| *q == 1)
        .map(|(_, c)| (c.cdw(10), c.cdw(12)))
        .collect();
    let fua = cmd::FUA;
    assert_eq!(
        pieces,
        [
            (3, 1 | fua),
            (5, 1 | fua),
            (7, 1 | fua),
            (9, 1 | fua),
            (11, 1 | fua)
        ]
    );
    assert!(s.namespaces[0].data[3 * 4096..13 * 4096]
        .iter()
        .all(|&b| b == 0x5a));
}

#[test]
fn probe_refuses_what_it_cannot_drive() {
    use super::probe::{probe, ProbeContext};
    use crate::hal::fake::FakeMapper;
    use crate::hal::{ConfigAccess, PciAddress};
    use crate::pci::fake::{FakeFunction, FakePci};
    use crate::pci::{enumerate, ScanMode};

    // BAR0: 16 KiB of host memory, aligned to its size so BAR sizing round-trips.
    let backing = vec![0u8; 0x8000];
    let bar = (backing.as_ptr() as u64 + 0x3fff) & !0x3fff;
    let pci = FakePci::new();
    let mut nvme = FakeFunction::endpoint(0x1b36, 0x0010, 0x01, 0x08);
    nvme.set8(0x09, 0x02); // programming interface: NVMe
    nvme.bar_mem64(0, bar, 0x4000, false);
    pci.insert(PciAddress::new(0, 4, 0), nvme);
    pci.insert(
        PciAddress::new(0, 5, 0),
        FakeFunction::endpoint(0x1af4, 0x1042, 0x01, 0x00),
    );
    let functions = enumerate(&pci, ScanMode::FollowBridges);
    let (clock, _) = clock();
    let ctx = ProbeContext {
        cfg: &pci,
        mapper: &FakeMapper,
        registry: registry(),
        apic_id: 0,
        clock,
    };
    assert!(super::is_nvme(&functions[0]) && !super::is_nvme(&functions[1]));
    let failure = probe::<FakeDma, _, _>(&ctx, &functions[0], 0, 0, NvmeConfig::default())
        .err()
        .unwrap();
    assert_eq!(failure.error, NvmeError::NoMsix);
    assert_eq!(failure.info.name.as_str(), "nvme0");
    assert!(failure
        .info
        .to_string()
        .ends_with("init-failed: no MSI-X capability"));
    assert_eq!(
        pci.read16(PciAddress::new(0, 4, 0), crate::pci::regs::COMMAND),
        0,
        "the refused controller is disabled again"
    );
    let failure = probe::<FakeDma, _, _>(&ctx, &functions[1], 1, 0, NvmeConfig::default())
        .err()
        .unwrap();
    assert_eq!(failure.error, NvmeError::NotNvme);
    drop(backing);
}

#[test]
fn plugged_namespaces_ring_the_doorbell_once_unplugged() {
    let mut rig = rig(vec![FakeNamespace::new(1, 9, 4096)]);
    let ns = &mut rig.attached.namespaces[0];
    let mut pool = BufferPool::new::<FakeDma>(0, 4, 4096).unwrap();
    ns.plug();
    for tag in 1..=2u64 {
        let b = buffer(&mut pool, 4096, tag as u8);
        ns.submit(BlockRequest::write(tag, tag * 8, b, false))
            .unwrap();
    }
    // The fake runs commands when their doorbell is written: nothing yet.
    assert!(poll_all(ns).is_empty(), "no doorbell while plugged");
    ns.unplug();
    let done = poll_all(ns);
    assert_eq!(
        done.iter().map(|c| (c.tag, c.result)).collect::<Vec<_>>(),
        [(1, Ok(())), (2, Ok(()))]
    );
}
