//! A fake NVMe controller for host tests: registers that react like a controller's (CC.EN →
//! CSTS.RDY after a configurable number of reads, CFS injection, shutdown), doorbells that
//! execute commands straight out of the driver's queues in (fake-DMA) host memory, a few RAM
//! namespaces, PRP walking with the spec's alignment rules, and knobs for holding commands
//! (to complete them late or out of order), injecting statuses, and posting bogus entries.

use super::cmd::{self, Command, CompletionEntry, IDENTIFY_SIZE, SQE_SIZE};
use super::controller::VectorSetup;
use super::queue::phys;
use super::regs::{self, cc, csts, RegisterAccess};
use super::status::StatusField;
use super::NvmeError;
use crate::msix::{InterruptOwner, VectorRegistry};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// MSI-X vector routing for `attach` in tests: a table of `size` entries, CPU vectors from
/// `registry`, every vector taken recorded (so a test can give them back).
pub struct TestVectors {
    pub registry: &'static VectorRegistry,
    pub size: u16,
    /// (MSI-X entry, CPU vector) of each routed entry.
    pub routed: Vec<(u16, u8)>,
    /// Software wake-up vectors.
    pub software: Vec<u8>,
}

impl TestVectors {
    pub fn new(registry: &'static VectorRegistry, size: u16) -> Self {
        Self {
            registry,
            size,
            routed: Vec::new(),
            software: Vec::new(),
        }
    }

    /// Gives every vector taken back to the registry.
    pub fn release(&self) {
        for &v in self.routed.iter().map(|(_, v)| v).chain(&self.software) {
            let _ = self.registry.release(v);
        }
    }
}

impl VectorSetup for TestVectors {
    fn table_size(&self) -> u16 {
        self.size
    }
    fn route(&mut self, entry: u16, owner: InterruptOwner) -> Result<u8, NvmeError> {
        let v = self.registry.allocate(owner)?;
        self.routed.push((entry, v));
        Ok(v)
    }
    fn software(&mut self, owner: InterruptOwner) -> Result<u8, NvmeError> {
        let v = self.registry.allocate(owner)?;
        self.software.push(v);
        Ok(v)
    }
}

/// A namespace of the fake.
#[derive(Clone, Debug)]
pub struct FakeNamespace {
    pub nsid: u32,
    pub lba_shift: u8,
    pub blocks: u64,
    pub metadata: u16,
    pub write_protected: bool,
    /// `NGUID` and `EUI64` reported by Identify Namespace (all zero: not reported, as QEMU
    /// 7.2's `nvme-ns` without `eui64=`).
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    pub data: Vec<u8>,
}

impl FakeNamespace {
    pub fn new(nsid: u32, lba_shift: u8, blocks: u64) -> Self {
        Self {
            nsid,
            lba_shift,
            blocks,
            metadata: 0,
            write_protected: false,
            nguid: [0; 16],
            eui64: [0; 8],
            data: vec![0; (blocks << lba_shift) as usize],
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Sq {
    phys: u64,
    entries: u16,
    head: u16,
    cqid: u16,
}

#[derive(Clone, Copy, Debug)]
struct Cq {
    phys: u64,
    entries: u16,
    tail: u16,
    phase: bool,
    vector: u16,
}

/// Everything the fake knows; tests poke at it through [`FakeController::state`].
#[derive(Debug)]
pub struct FakeState {
    pub cap: u64,
    pub vs: u32,
    pub cc: u32,
    pub csts: u32,
    pub aqa: u32,
    pub asq: u64,
    pub acq: u64,
    /// CSTS reads before RDY follows CC.EN.
    pub ready_delay: u32,
    countdown: u32,
    /// RDY never follows EN.
    pub stuck: bool,
    /// Set CFS when the controller is enabled.
    pub fatal_on_enable: bool,
    /// Register space size.
    pub size: usize,
    sqs: BTreeMap<u16, Sq>,
    cqs: BTreeMap<u16, Cq>,
    pub namespaces: Vec<FakeNamespace>,
    pub mdts: u8,
    pub oncs: u16,
    pub vwc_present: bool,
    pub vwc_enabled: bool,
    pub version: u32,
    pub max_queue_pairs: u16,
    /// I/O commands are held instead of executed.
    pub hold: bool,
    pub held: Vec<(u16, Command)>,
    /// The next command with this opcode on an I/O queue completes with (SCT, SC).
    pub inject: Option<(u8, u8, u8)>,
    /// Admin opcode that fails with (SCT, SC).
    pub admin_fail: Option<(u8, u8, u8)>,
    /// Every command executed, with its submission queue.
    pub executed: Vec<(u16, Command)>,
    /// MSI-X entries raised.
    pub interrupts: Vec<u16>,
    pub flushes: u32,
    pub deallocated: Vec<(u64, u32)>,
}

/// The fake controller (cheap to clone: all clones share state).
#[derive(Clone, Debug)]
pub struct FakeController {
    state: Arc<Mutex<FakeState>>,
}

impl FakeController {
    /// A controller with `namespaces`, MQES 1023, TO 1 (500 ms), 4 KiB pages only, NVMe 1.4.
    pub fn new(namespaces: Vec<FakeNamespace>) -> Self {
        let cap = 1023 | 1 << 16 | 1 << 24 | 1u64 << 37;
        Self {
            state: Arc::new(Mutex::new(FakeState {
                cap,
                vs: 0x0001_0400,
                cc: 0,
                csts: 0,
                aqa: 0,
                asq: 0,
                acq: 0,
                ready_delay: 2,
                countdown: 0,
                stuck: false,
                fatal_on_enable: false,
                size: 0x4000,
                sqs: BTreeMap::new(),
                cqs: BTreeMap::new(),
                namespaces,
                mdts: 5,
                oncs: 1 << 2,
                vwc_present: true,
                vwc_enabled: true,
                version: 0x0001_0400,
                max_queue_pairs: 64,
                hold: false,
                held: Vec::new(),
                inject: None,
                admin_fail: None,
                executed: Vec::new(),
                interrupts: Vec::new(),
                flushes: 0,
                deallocated: Vec::new(),
            })),
        }
    }

    /// The shared state.
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().expect("fake state")
    }

    /// Executes the held commands, in reverse order of submission (out of order).
    pub fn release_reversed(&self) {
        let mut s = self.state();
        let held = std::mem::take(&mut s.held);
        for (sqid, command) in held.into_iter().rev() {
            s.execute(sqid, command);
        }
    }

    /// Executes held command number `index` (modulo; none if nothing is held).
    pub fn release_one(&self, index: usize) {
        let mut s = self.state();
        if s.held.is_empty() {
            return;
        }
        let n = s.held.len();
        let (sqid, command) = s.held.remove(index % n);
        s.execute(sqid, command);
    }

    /// Posts an arbitrary entry on completion queue `cqid` (if it exists), with the phase
    /// tag of the queue's current pass, or the other one if `stale`.
    pub fn post_entry(&self, cqid: u16, entry: CompletionEntry, stale: bool) {
        self.state().write_entry(cqid, entry, stale);
    }

    /// Posts a completion for a command ID nobody submitted.
    pub fn post_bogus(&self, qid: u16, cid: u16) {
        let mut s = self.state();
        s.post(qid, qid, cid, 0, StatusField(0));
    }
}

impl RegisterAccess for FakeController {
    fn read32(&self, offset: usize) -> u32 {
        let mut s = self.state();
        match offset {
            regs::CAP => s.cap as u32,
            o if o == regs::CAP + 4 => (s.cap >> 32) as u32,
            regs::VS => s.vs,
            regs::CC => s.cc,
            regs::CSTS if s.csts == u32::MAX => u32::MAX,
            regs::CSTS => {
                let want_ready = s.cc & cc::EN != 0;
                let ready = s.csts & csts::RDY != 0;
                if want_ready != ready && !s.stuck {
                    if s.countdown == 0 {
                        s.csts ^= csts::RDY;
                    } else {
                        s.countdown -= 1;
                    }
                }
                s.csts
            }
            regs::AQA => s.aqa,
            _ => 0,
        }
    }

    fn write32(&self, offset: usize, value: u32) {
        let mut s = self.state();
        match offset {
            regs::CC => {
                let was = s.cc;
                s.cc = value;
                if (was ^ value) & cc::EN != 0 {
                    s.countdown = s.ready_delay;
                    if value & cc::EN != 0 {
                        if s.fatal_on_enable {
                            s.csts |= csts::CFS;
                        }
                        let entries = ((s.aqa & 0xfff) + 1) as u16;
                        let cq_entries = (((s.aqa >> 16) & 0xfff) + 1) as u16;
                        let (asq, acq) = (s.asq, s.acq);
                        s.sqs.insert(
                            0,
                            Sq {
                                phys: asq,
                                entries,
                                head: 0,
                                cqid: 0,
                            },
                        );
                        s.cqs.insert(
                            0,
                            Cq {
                                phys: acq,
                                entries: cq_entries,
                                tail: 0,
                                phase: true,
                                vector: 0,
                            },
                        );
                    } else {
                        // Reset: every queue is gone, held commands are dropped.
                        s.sqs.clear();
                        s.cqs.clear();
                        s.held.clear();
                    }
                }
                if value & cc::SHN_MASK != 0 {
                    s.csts = (s.csts & !csts::SHST_MASK) | csts::SHST_COMPLETE;
                }
            }
            regs::AQA => s.aqa = value,
            regs::ASQ => s.asq = (s.asq & !0xffff_ffff) | u64::from(value),
            o if o == regs::ASQ + 4 => s.asq = (s.asq & 0xffff_ffff) | u64::from(value) << 32,
            regs::ACQ => s.acq = (s.acq & !0xffff_ffff) | u64::from(value),
            o if o == regs::ACQ + 4 => s.acq = (s.acq & 0xffff_ffff) | u64::from(value) << 32,
            o if o >= regs::DOORBELLS => {
                let index = (o - regs::DOORBELLS) / 4;
                let qid = (index / 2) as u16;
                if index.is_multiple_of(2) {
                    s.ring(qid, value as u16);
                }
            }
            _ => {}
        }
    }

    fn size(&self) -> usize {
        self.state().size
    }
}

fn ok() -> StatusField {
    StatusField(0)
}

fn status(sct: u8, sc: u8) -> StatusField {
    StatusField(u16::from(sct) << 8 | u16::from(sc))
}

impl FakeState {
    fn ring(&mut self, sqid: u16, tail: u16) {
        let Some(mut sq) = self.sqs.get(&sqid).copied() else {
            return;
        };
        while sq.head != tail {
            let mut raw = [0u8; SQE_SIZE];
            phys::read(sq.phys + u64::from(sq.head) * SQE_SIZE as u64, &mut raw);
            sq.head = (sq.head + 1) % sq.entries;
            if let Some(q) = self.sqs.get_mut(&sqid) {
                q.head = sq.head;
            }
            let command = Command::from_bytes(&raw);
            if self.hold && sqid != 0 {
                self.held.push((sqid, command));
            } else {
                self.execute(sqid, command);
            }
        }
    }

    fn post(&mut self, sqid: u16, cqid: u16, cid: u16, result: u32, status: StatusField) {
        let sq_head = self.sqs.get(&sqid).map_or(0, |q| q.head);
        let entry = CompletionEntry {
            result,
            sq_head,
            sq_id: sqid,
            cid,
            phase: false,
            status,
        };
        self.write_entry(cqid, entry, false);
    }

    /// Writes `entry` at the tail of completion queue `cqid` (if it exists) with the phase
    /// tag of the queue's current pass, or the other one if `stale`, and raises its vector.
    fn write_entry(&mut self, cqid: u16, mut entry: CompletionEntry, stale: bool) {
        let Some(cq) = self.cqs.get_mut(&cqid) else {
            return;
        };
        entry.phase = cq.phase != stale;
        let mut bytes = [0u8; 16];
        for (c, d) in bytes.chunks_exact_mut(4).zip(entry.to_dwords()) {
            c.copy_from_slice(&d.to_le_bytes());
        }
        phys::write(cq.phys + u64::from(cq.tail) * 16, &bytes);
        cq.tail += 1;
        if cq.tail == cq.entries {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
        let vector = cq.vector;
        self.interrupts.push(vector);
    }

    fn execute(&mut self, sqid: u16, command: Command) {
        self.executed.push((sqid, command));
        let cqid = self.sqs.get(&sqid).map_or(sqid, |q| q.cqid);
        let (result, st) = if sqid == 0 {
            self.admin(&command)
        } else {
            (0, self.io(&command))
        };
        self.post(sqid, cqid, command.cid(), result, st);
    }

    fn admin(&mut self, c: &Command) -> (u32, StatusField) {
        if let Some((opcode, sct, sc)) = self.admin_fail {
            if opcode == c.opcode() {
                return (0, status(sct, sc));
            }
        }
        match c.opcode() {
            cmd::ADMIN_IDENTIFY => {
                let mut page = [0u8; IDENTIFY_SIZE];
                match c.cdw(10) as u8 {
                    cmd::CNS_CONTROLLER => {
                        page[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
                        page[4..24].copy_from_slice(b"FAKE0001            ");
                        page[24..64].copy_from_slice(b"snapfw fake NVMe                        ");
                        page[64..72].copy_from_slice(b"1.0     ");
                        page[77] = self.mdts;
                        page[80..84].copy_from_slice(&self.version.to_le_bytes());
                        page[512] = 0x66;
                        page[513] = 0x44;
                        let nn = self.namespaces.iter().map(|n| n.nsid).max().unwrap_or(0);
                        page[516..520].copy_from_slice(&nn.to_le_bytes());
                        page[520..522].copy_from_slice(&self.oncs.to_le_bytes());
                        page[525] = u8::from(self.vwc_present);
                    }
                    cmd::CNS_ACTIVE_NAMESPACES => {
                        let mut ids: Vec<u32> = self
                            .namespaces
                            .iter()
                            .map(|n| n.nsid)
                            .filter(|&id| id > c.nsid())
                            .collect();
                        ids.sort();
                        for (i, id) in ids.iter().enumerate() {
                            page[4 * i..4 * i + 4].copy_from_slice(&id.to_le_bytes());
                        }
                    }
                    cmd::CNS_NAMESPACE => {
                        let Some(ns) = self.namespaces.iter().find(|n| n.nsid == c.nsid()) else {
                            return (0, status(0, 0x0b));
                        };
                        page[0..8].copy_from_slice(&ns.blocks.to_le_bytes());
                        page[8..16].copy_from_slice(&ns.blocks.to_le_bytes());
                        page[26] = 0;
                        let lbaf = u32::from(ns.lba_shift) << 16 | u32::from(ns.metadata);
                        page[128..132].copy_from_slice(&lbaf.to_le_bytes());
                        page[99] = u8::from(ns.write_protected);
                        page[104..120].copy_from_slice(&ns.nguid);
                        page[120..128].copy_from_slice(&ns.eui64);
                    }
                    _ => return (0, status(0, 0x02)),
                }
                phys::write(c.prp1(), &page);
                (0, ok())
            }
            cmd::ADMIN_SET_FEATURES => match c.cdw(10) as u8 {
                cmd::FEATURE_NUMBER_OF_QUEUES => {
                    let n = u32::from(self.max_queue_pairs - 1);
                    let nsq = (c.cdw(11) & 0xffff).min(n);
                    let ncq = (c.cdw(11) >> 16).min(n);
                    (ncq << 16 | nsq, ok())
                }
                cmd::FEATURE_VOLATILE_WRITE_CACHE => {
                    self.vwc_enabled = c.cdw(11) & 1 != 0;
                    (0, ok())
                }
                _ => (0, status(0, 0x02)),
            },
            cmd::ADMIN_GET_FEATURES => match c.cdw(10) as u8 {
                cmd::FEATURE_VOLATILE_WRITE_CACHE => (u32::from(self.vwc_enabled), ok()),
                _ => (0, status(0, 0x02)),
            },
            cmd::ADMIN_CREATE_CQ => {
                let qid = c.cdw(10) as u16;
                let entries = (c.cdw(10) >> 16) as u16 + 1;
                if qid == 0 || self.cqs.contains_key(&qid) {
                    return (0, status(1, 0x01));
                }
                self.cqs.insert(
                    qid,
                    Cq {
                        phys: c.prp1(),
                        entries,
                        tail: 0,
                        phase: true,
                        vector: (c.cdw(11) >> 16) as u16,
                    },
                );
                (0, ok())
            }
            cmd::ADMIN_CREATE_SQ => {
                let qid = c.cdw(10) as u16;
                let entries = (c.cdw(10) >> 16) as u16 + 1;
                let cqid = (c.cdw(11) >> 16) as u16;
                if !self.cqs.contains_key(&cqid) {
                    return (0, status(1, 0x00));
                }
                self.sqs.insert(
                    qid,
                    Sq {
                        phys: c.prp1(),
                        entries,
                        head: 0,
                        cqid,
                    },
                );
                (0, ok())
            }
            cmd::ADMIN_DELETE_SQ => {
                self.sqs.remove(&(c.cdw(10) as u16));
                (0, ok())
            }
            cmd::ADMIN_DELETE_CQ => {
                self.cqs.remove(&(c.cdw(10) as u16));
                (0, ok())
            }
            _ => (0, status(0, 0x01)),
        }
    }

    /// The pages of a PRP-described transfer, checking the spec's rules.
    fn pages(&self, c: &Command, len: usize) -> Option<Vec<(u64, usize)>> {
        const PAGE: u64 = 4096;
        let prp1 = c.prp1();
        if !prp1.is_multiple_of(4) {
            return None;
        }
        let first = (PAGE - prp1 % PAGE).min(len as u64) as usize;
        let mut out = vec![(prp1, first)];
        let mut left = len - first;
        let count = left.div_ceil(PAGE as usize);
        if count == 1 {
            if !c.prp2().is_multiple_of(PAGE) {
                return None;
            }
            out.push((c.prp2(), left));
        } else if count > 1 {
            let mut list = c.prp2();
            let mut slot = 0u64;
            let mut done = 0;
            while done < count {
                let mut raw = [0u8; 8];
                phys::read(list + slot * 8, &mut raw);
                let entry = u64::from_le_bytes(raw);
                if slot == 511 && count - done > 1 {
                    list = entry;
                    slot = 0;
                    continue;
                }
                if entry % PAGE != 0 {
                    return None;
                }
                let take = left.min(PAGE as usize);
                out.push((entry, take));
                left -= take;
                done += 1;
                slot += 1;
            }
        }
        Some(out)
    }

    fn io(&mut self, c: &Command) -> StatusField {
        if let Some((opcode, sct, sc)) = self.inject {
            if opcode == c.opcode() {
                self.inject = None;
                return status(sct, sc);
            }
        }
        let pages_for = |s: &Self, len| s.pages(c, len);
        let Some(index) = self.namespaces.iter().position(|n| n.nsid == c.nsid()) else {
            return status(0, 0x0b);
        };
        match c.opcode() {
            cmd::NVM_READ | cmd::NVM_WRITE => {
                let lba = u64::from(c.cdw(10)) | u64::from(c.cdw(11)) << 32;
                let blocks = u64::from(c.cdw(12) & 0xffff) + 1;
                let ns = &self.namespaces[index];
                if lba + blocks > ns.blocks {
                    return status(0, 0x80);
                }
                let shift = ns.lba_shift;
                let len = (blocks << shift) as usize;
                let Some(pages) = pages_for(self, len) else {
                    return status(0, 0x13);
                };
                let ns = &mut self.namespaces[index];
                let mut at = (lba << shift) as usize;
                for (address, bytes) in pages {
                    if c.opcode() == cmd::NVM_READ {
                        phys::write(address, &ns.data[at..at + bytes]);
                    } else {
                        phys::read(address, &mut ns.data[at..at + bytes]);
                    }
                    at += bytes;
                }
                ok()
            }
            cmd::NVM_FLUSH => {
                self.flushes += 1;
                ok()
            }
            cmd::NVM_DATASET_MANAGEMENT => {
                let mut range = [0u8; 16];
                phys::read(c.prp1(), &mut range);
                let blocks = u32::from_le_bytes([range[4], range[5], range[6], range[7]]);
                let lba = u64::from_le_bytes(range[8..16].try_into().unwrap_or([0; 8]));
                let ns = &mut self.namespaces[index];
                let shift = ns.lba_shift;
                let start = (lba << shift) as usize;
                let end = ((lba + u64::from(blocks)) << shift) as usize;
                if end > ns.data.len() {
                    return status(0, 0x80);
                }
                ns.data[start..end].fill(0);
                self.deallocated.push((lba, blocks));
                ok()
            }
            _ => status(0, 0x01),
        }
    }
}
