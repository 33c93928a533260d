//! The controller: everything its namespaces share.
//!
//! - [`attach`]: bring-up ([`BringUp`]), then admin commands polled with a deadline each
//!   (boot time only): Identify Controller, Active Namespace ID list, Identify Namespace,
//!   Set Features Number of Queues, Get/Set Features Volatile Write Cache, MSI-X routing,
//!   Create I/O Completion/Submission Queue per pair.
//! - The I/O path ([`Controller::submit`], [`Controller::service`]): a request becomes one or
//!   more commands (split at MDTS) on its namespace's queue pair; each command takes a slot of
//!   the pair's fixed in-flight table, whose index is the command ID. Completions are drained
//!   from every completion queue into per-namespace rings sized at init, so completions for
//!   namespace *k* come out of namespace *k*'s `poll_completions` whichever namespace's poll
//!   drained them. No allocation, no waiting.
//! - Failure: a command past its deadline, `CSTS.CFS`, `CSTS` all ones or a completion for an
//!   unknown command ID marks the controller failed with a reason, disables it (`CC.EN` = 0,
//!   which aborts everything), and — once `CSTS.RDY` drops or `CAP.TO` passes, so the
//!   controller no longer touches their buffers — completes every outstanding request with
//!   [`BlockError::DeviceFailed`].

use super::cmd::{
    self, active_namespaces, Command, CompletionEntry, IdentifyController, IdentifyNamespace,
    IDENTIFY_SIZE,
};
use super::init::{AdminQueues, BringUp, IOCQES, IOSQES};
use super::namespace::{split, NvmeController, NvmeNamespace};
use super::prp::{self, list_pages_needed};
use super::queue::{CompletionQueue, DataPage, ListPool, SubmissionQueue};
use super::regs::{self, cc, csts, Capabilities, Doorbells, RegisterAccess};
use super::status::Status;
use super::{Clock, NvmeConfig, NvmeError, WAKE_QUEUE};
use crate::block::{
    validate_transfer, BlockError, BlockRequest, BlockStats, Completion, Geometry, Operation,
    Rejected, SlotTable,
};
use crate::hal::{DmaAllocator, PciAddress, PAGE_SIZE};
use crate::info::{
    reason, DeviceInfo, DeviceName, DeviceState, FixedString, NamespaceIdentity, Reason,
};
use crate::msix::{InterruptOwner, VectorRegistry};
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::fmt;
use log::{error, info, warn};

/// Most commands one request is split into; larger requests are refused at the geometry
/// (`max_transfer_bytes` is lowered to fit).
pub const MAX_PIECES: usize = 32;
/// Most NSIDs read from the Active Namespace ID list (one page).
const MAX_LISTED_NAMESPACES: usize = IDENTIFY_SIZE / 4;

/// How the driver gets interrupt vectors at init (the probe implements it on the MSI-X table;
/// host tests on the registry alone).
pub trait VectorSetup {
    /// Entries in the function's MSI-X table.
    fn table_size(&self) -> u16;
    /// Allocates a CPU vector for `owner`, routes MSI-X table `entry` to it, unmasks the
    /// entry, and returns the CPU vector.
    fn route(&mut self, entry: u16, owner: InterruptOwner) -> Result<u8, NvmeError>;
    /// Allocates a CPU vector for `owner` that no table entry targets (a software wake-up).
    fn software(&mut self, owner: InterruptOwner) -> Result<u8, NvmeError>;
}

/// What [`attach`] needs besides the registers.
pub struct AttachParams<'a> {
    /// Controller name, e.g. `nvme0`; namespaces are `nvme0n<NSID>`.
    pub name: DeviceName,
    /// PCI location, for the console.
    pub pci: Option<PciAddress>,
    /// Device index of the first usable namespace; the others follow in order.
    pub first_device_index: u16,
    /// Settings.
    pub config: NvmeConfig,
    /// Monotonic nanoseconds.
    pub clock: Clock,
    /// Where wake-ups are posted (the registry the vectors come from).
    pub registry: &'static VectorRegistry,
    /// Vector allocation and MSI-X routing.
    pub vectors: &'a mut dyn VectorSetup,
}

/// State of the volatile write cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteCache {
    /// No volatile write cache (`VWC` bit 0 clear): completed writes are durable.
    Absent,
    /// Present and enabled: writes are durable after Flush or with FUA.
    Enabled,
    /// Present but disabled.
    Disabled,
}

/// The controller as the console's `devices` command shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControllerInfo {
    /// `nvme0`.
    pub name: DeviceName,
    /// PCI location.
    pub pci: Option<PciAddress>,
    /// Model number.
    pub model: FixedString<40>,
    /// Serial number.
    pub serial: FixedString<20>,
    /// Firmware revision.
    pub firmware: FixedString<8>,
    /// NVMe version (major, minor, tertiary) from `VS`.
    pub version: (u16, u8, u8),
    /// I/O queue pairs in use.
    pub queue_pairs: u16,
    /// Entries per I/O queue.
    pub queue_entries: u16,
    /// MDTS in bytes (`None`: no limit).
    pub mdts_bytes: Option<u64>,
    /// Volatile write cache.
    pub write_cache: WriteCache,
    /// Dataset Management (deallocate) supported.
    pub deallocate: bool,
    /// Usable namespaces.
    pub namespaces: u16,
    /// CPU vector of the admin queue.
    pub admin_vector: Option<u8>,
    /// Online or failed (with the reason).
    pub state: DeviceState,
}

impl fmt::Display for ControllerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<8} nvme      ", self.name)?;
        if let Some(pci) = self.pci {
            write!(f, " {pci}")?;
        }
        let (major, minor, tertiary) = self.version;
        write!(
            f,
            " model=\"{}\" serial=\"{}\" fw=\"{}\" nvme={major}.{minor}.{tertiary} queues={}x{}",
            self.model, self.serial, self.firmware, self.queue_pairs, self.queue_entries
        )?;
        match self.mdts_bytes {
            Some(bytes) => write!(f, " mdts={}KiB", bytes / 1024)?,
            None => write!(f, " mdts=unlimited")?,
        }
        let cache = match self.write_cache {
            WriteCache::Absent => "none",
            WriteCache::Enabled => "write-back",
            WriteCache::Disabled => "disabled",
        };
        write!(f, " vwc={cache}")?;
        if self.deallocate {
            write!(f, " deallocate")?;
        }
        write!(f, " namespaces={}", self.namespaces)?;
        write!(f, " {}", self.state)
    }
}

/// One command in flight.
#[derive(Debug)]
struct InFlight {
    /// Slot of the request in the pair's request table.
    request: u16,
    /// Complete by this time or the controller is failed.
    deadline: u64,
    /// For messages.
    opcode: u8,
}

/// One request in flight (one or more commands).
#[derive(Debug)]
struct Pending {
    /// Index of the namespace.
    namespace: usize,
    /// The request (with its buffer) until it completes.
    request: BlockRequest,
    /// Commands not yet completed.
    outstanding: u16,
    /// The first failure among its commands.
    error: Option<BlockError>,
}

/// An I/O submission/completion queue pair and what is in flight on it.
#[derive(Debug)]
struct QueuePair {
    sq: SubmissionQueue,
    cq: CompletionQueue,
    commands: SlotTable<InFlight>,
    requests: SlotTable<Pending>,
    lists: ListPool,
    cpu_vector: Option<u8>,
    /// Entries pushed while the controller was plugged; the doorbell is not rung yet.
    doorbell_pending: bool,
}

/// A namespace's share of the controller.
#[derive(Debug)]
struct Namespace {
    nsid: u32,
    /// NSID, NGUID and EUI-64 as Identify Namespace reported them.
    identity: NamespaceIdentity,
    device_index: u16,
    name: DeviceName,
    geometry: Geometry,
    pair: usize,
    /// Completed requests not yet handed out (capacity = depth, fixed at init).
    ready: VecDeque<Completion>,
    /// Requests submitted and not yet in `ready`.
    pending: usize,
    stats: BlockStats,
    wake_vector: Option<u8>,
    last_status: Option<Status>,
}

/// The admin queue pair (polled: used at init and shutdown only).
#[derive(Debug)]
struct Admin {
    sq: SubmissionQueue,
    cq: CompletionQueue,
    page: DataPage,
    next_cid: u16,
}

/// A running controller. Shared by its namespaces (see `namespace`).
pub struct Controller<R> {
    regs: R,
    name: DeviceName,
    pci: Option<PciAddress>,
    cap: Capabilities,
    version: u32,
    identity: IdentifyController,
    admin: Admin,
    pairs: Vec<QueuePair>,
    namespaces: Vec<Namespace>,
    clock: Clock,
    registry: &'static VectorRegistry,
    admin_vector: Option<u8>,
    config: NvmeConfig,
    write_cache: WriteCache,
    /// Bytes per command (MDTS and the pool buffer size).
    max_command_bytes: usize,
    state: DeviceState,
    next_check: u64,
    /// After a failure: when to give up waiting for `CSTS.RDY` = 0 and abort requests.
    abort_at: Option<u64>,
    io_entries: u16,
    /// Namespaces that hold back doorbells (see [`Controller::plug`]).
    plugged: u16,
}

impl<R> fmt::Debug for Controller<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Controller")
            .field("name", &self.name)
            .field("pairs", &self.pairs.len())
            .field("namespaces", &self.namespaces.len())
            .field("state", &self.state)
            .finish()
    }
}

/// The result of [`attach`].
pub struct Attached<R> {
    /// The kernel's handle on the controller.
    pub controller: NvmeController<R>,
    /// One block device per usable namespace; namespace *i* has device index
    /// `first_device_index + i`.
    pub namespaces: Vec<NvmeNamespace<R>>,
    /// Namespaces that could not be used (unsupported format), for the console.
    pub failed: Vec<DeviceInfo>,
}

fn opcode_name(opcode: u8) -> &'static str {
    match opcode {
        cmd::NVM_READ => "Read",
        cmd::NVM_WRITE => "Write",
        cmd::NVM_FLUSH => "Flush",
        cmd::NVM_DATASET_MANAGEMENT => "Dataset Management",
        _ => "command",
    }
}

/// Brings up the controller behind `regs` and everything up to the namespaces' queues.
/// Boot time only: it polls the admin queue with a deadline per command. On failure the
/// controller is left disabled; the caller releases the vectors it handed out.
pub fn attach<R: RegisterAccess, A: DmaAllocator>(
    regs: R,
    params: AttachParams<'_>,
) -> Result<Attached<R>, NvmeError> {
    let config = params.config;
    let cap = Capabilities(regs.read64(regs::CAP));
    if regs.read32(regs::CSTS) == u32::MAX {
        return Err(NvmeError::NotResponding { during: "probe" });
    }
    let doorbells = Doorbells::new(cap);
    if !doorbells.fit(0, regs.size()) {
        return Err(NvmeError::DoorbellsOutsideBar);
    }
    let mqes = cap.max_queue_entries().min(4096) as u16;
    let admin_entries = config.admin_queue_entries.clamp(2, mqes.max(2));
    let admin = Admin {
        sq: SubmissionQueue::new::<A>(0, admin_entries, doorbells)?,
        cq: CompletionQueue::new::<A>(0, admin_entries, doorbells)?,
        page: DataPage::new::<A>()?,
        next_cid: 0,
    };
    let mut bring_up = BringUp::new(
        cap,
        AdminQueues {
            sq_phys: admin.sq.phys(),
            cq_phys: admin.cq.phys(),
            entries: admin_entries,
        },
    )?;
    bring_up.run(&regs, params.clock)?;
    let version = regs.read32(regs::VS);

    let mut controller = Controller {
        regs,
        name: params.name,
        pci: params.pci,
        cap,
        version,
        identity: IdentifyController::parse(&[0; IDENTIFY_SIZE]),
        admin,
        pairs: Vec::new(),
        namespaces: Vec::new(),
        clock: params.clock,
        registry: params.registry,
        admin_vector: None,
        config,
        write_cache: WriteCache::Absent,
        max_command_bytes: 0,
        state: DeviceState::Online,
        next_check: 0,
        abort_at: None,
        io_entries: 0,
        plugged: 0,
    };
    let result = controller.configure::<A>(params.vectors, params.first_device_index);
    match result {
        Ok(failed) => {
            let (controller, namespaces) = split(controller);
            Ok(Attached {
                controller,
                namespaces,
                failed,
            })
        }
        Err(e) => {
            controller.disable();
            Err(e)
        }
    }
}

impl<R: RegisterAccess> Controller<R> {
    fn now(&self) -> u64 {
        (self.clock)()
    }

    /// Runs one admin command to completion, polling with the admin deadline.
    fn admin_sync(&mut self, mut command: Command, what: &'static str) -> Result<u32, NvmeError> {
        let cid = self.admin.next_cid;
        self.admin.next_cid = self.admin.next_cid.wrapping_add(1);
        command.set_cid(cid);
        if self.admin.sq.push(&command).is_err() {
            return Err(NvmeError::CommandTimeout { what });
        }
        self.admin.sq.ring_doorbell(&self.regs);
        let deadline = self.now().saturating_add(self.config.admin_timeout_ns);
        loop {
            if let Some(entry) = self.admin.cq.peek() {
                self.admin.cq.advance();
                self.admin.cq.ring_doorbell(&self.regs);
                self.admin.sq.update_head(entry.sq_head);
                if entry.cid != cid {
                    warn!(
                        "{}: stray admin completion (command {})",
                        self.name, entry.cid
                    );
                    continue;
                }
                return match entry.status.status() {
                    None => Ok(entry.result),
                    Some(status) => Err(NvmeError::Command { what, status }),
                };
            }
            let status = self.regs.read32(regs::CSTS);
            if status == u32::MAX {
                return Err(NvmeError::NotResponding { during: what });
            }
            if status & csts::CFS != 0 {
                return Err(NvmeError::ControllerFatal { during: what });
            }
            if self.now() >= deadline {
                return Err(NvmeError::CommandTimeout { what });
            }
            core::hint::spin_loop();
        }
    }

    fn identify(
        &mut self,
        cns: u8,
        nsid: u32,
        what: &'static str,
        out: &mut [u8; IDENTIFY_SIZE],
    ) -> Result<(), NvmeError> {
        self.admin.page.clear();
        let page = self.admin.page.phys();
        self.admin_sync(Command::identify(cns, nsid, page), what)?;
        self.admin.page.read(out);
        Ok(())
    }

    /// Everything after bring-up; returns the namespaces that could not be used.
    fn configure<A: DmaAllocator>(
        &mut self,
        vectors: &mut dyn VectorSetup,
        first_index: u16,
    ) -> Result<Vec<DeviceInfo>, NvmeError> {
        let mut page = [0u8; IDENTIFY_SIZE];
        self.identify(cmd::CNS_CONTROLLER, 0, "Identify Controller", &mut page)?;
        let identity = IdentifyController::parse(&page);
        self.identity = identity;
        // SQES/CQES: bits 3:0 required (minimum), 7:4 maximum entry size exponents.
        let fits = |field: u8, want: u32| {
            let (min, max) = (u32::from(field & 0xf), u32::from(field >> 4));
            field == 0 || (min <= want && (max == 0 || want <= max))
        };
        if !fits(identity.sqes, IOSQES) || !fits(identity.cqes, IOCQES) {
            return Err(NvmeError::UnsupportedEntrySize);
        }
        let min_page_shift = self.cap.page_size_min_shift();
        let mdts = identity
            .max_transfer_bytes(min_page_shift)
            .map_or(usize::MAX, |b| b as usize);
        // Pieces are 4-byte aligned page runs; keep them whole pages so every piece after the
        // first starts page aligned.
        let max_command = mdts.min(self.config.max_transfer_bytes as usize);
        self.max_command_bytes = if max_command >= PAGE_SIZE {
            max_command & !(PAGE_SIZE - 1)
        } else {
            max_command
        };
        info!(
            "{}: \"{}\" serial \"{}\" firmware \"{}\", {} namespace(s), MDTS {}",
            self.name,
            identity.model,
            identity.serial,
            identity.firmware,
            identity.namespace_count,
            identity.mdts
        );

        // Active namespaces (CNS 02h exists from NVMe 1.1 on; before that, 1..=NN).
        let mut nsids = [0u32; MAX_LISTED_NAMESPACES];
        let mut count = 0;
        let limit = (self.config.max_namespaces as usize).min(MAX_LISTED_NAMESPACES);
        if self.version >= 0x0001_0100 {
            self.identify(
                cmd::CNS_ACTIVE_NAMESPACES,
                0,
                "Identify Active Namespace ID list",
                &mut page,
            )?;
            for nsid in active_namespaces(&page).take(limit) {
                nsids[count] = nsid;
                count += 1;
            }
        } else {
            for nsid in 1..=identity.namespace_count.min(limit as u32) {
                nsids[count] = nsid;
                count += 1;
            }
        }

        let mut failed = Vec::new();
        let mut usable: Vec<(u32, IdentifyNamespace, u32)> = Vec::new();
        for &nsid in &nsids[..count] {
            self.identify(cmd::CNS_NAMESPACE, nsid, "Identify Namespace", &mut page)?;
            let ns = IdentifyNamespace::parse(&page);
            let name = namespace_name(&self.name, nsid);
            let why = match ns.block_size() {
                _ if ns.size == 0 => Some(reason(format_args!("inactive (size 0)"))),
                None => Some(reason(format_args!(
                    "unsupported LBA format (LBADS {})",
                    ns.lba_shift
                ))),
                Some(_) if ns.metadata_size != 0 => Some(reason(format_args!(
                    "LBA format with {} metadata bytes not supported",
                    ns.metadata_size
                ))),
                Some(bs) if (bs as usize) > self.max_command_bytes => {
                    Some(reason(format_args!("{bs}-byte blocks exceed MDTS")))
                }
                Some(bs) => {
                    usable.push((nsid, ns, bs));
                    None
                }
            };
            if let Some(why) = why {
                warn!("{name}: not used: {why}");
                let mut info = DeviceInfo::init_failed(name, "nvme", self.pci, why);
                info.model = identity.model;
                info.serial = identity.serial;
                failed.push(info);
            }
        }
        if usable.is_empty() {
            return Err(NvmeError::NoNamespaces);
        }

        // Queue pairs: one per namespace when the controller, the MSI-X table and the
        // doorbells allow; namespaces share otherwise.
        let table = vectors.table_size();
        let doorbells = Doorbells::new(self.cap);
        let mut want = (usable.len() as u16)
            .min(self.config.max_io_queues.max(1))
            .min(if table >= 2 { table - 1 } else { 1 });
        while want > 1 && !doorbells.fit(want, self.regs.size()) {
            want -= 1;
        }
        if !doorbells.fit(want, self.regs.size()) {
            return Err(NvmeError::DoorbellsOutsideBar);
        }
        let granted = self.admin_sync(
            Command::set_number_of_queues(want, want),
            "Set Features (Number of Queues)",
        )?;
        let pairs = want
            .min((granted & 0xffff) as u16 + 1)
            .min((granted >> 16) as u16 + 1);
        if pairs == 0 {
            return Err(NvmeError::NoIoQueues);
        }

        // Volatile write cache.
        self.write_cache = if identity.volatile_write_cache_present() {
            if let Some(enable) = self.config.write_cache {
                self.admin_sync(
                    Command::set_volatile_write_cache(enable),
                    "Set Features (Volatile Write Cache)",
                )?;
            }
            match self.admin_sync(
                Command::get_features(cmd::FEATURE_VOLATILE_WRITE_CACHE),
                "Get Features (Volatile Write Cache)",
            ) {
                Ok(value) if value & 1 == 0 => WriteCache::Disabled,
                Ok(_) => WriteCache::Enabled,
                Err(e) => {
                    // Assume the worst for durability: the layers above will flush.
                    warn!("{}: {e}; assuming the write cache is on", self.name);
                    WriteCache::Enabled
                }
            }
        } else {
            WriteCache::Absent
        };

        // Geometry shared by the namespaces' queues.
        let mqes = self.cap.max_queue_entries().min(4096) as u16;
        let entries = self.config.io_queue_entries.clamp(2, mqes.max(2));
        let max_transfer =
            (self.config.max_transfer_bytes as usize).min(MAX_PIECES * self.max_command_bytes);
        let pieces = max_transfer.div_ceil(self.max_command_bytes).max(1);
        let depth = (usize::from(self.config.max_depth.max(1)))
            .min((usize::from(entries) - 1) / pieces)
            .max(1);
        let commands = (depth * pieces).min(usize::from(entries) - 1);
        // Worst case: a piece starting 4 bytes before a page boundary.
        let per_command =
            list_pages_needed((PAGE_SIZE - 4) as u64, self.max_command_bytes, PAGE_SIZE).max(1);
        self.io_entries = entries;

        // Vectors: admin on entry 0, pair q on entry q.
        if table >= 2 {
            let owner = InterruptOwner {
                device: first_index,
                queue: InterruptOwner::CONFIG_QUEUE,
            };
            self.admin_vector = Some(vectors.route(0, owner)?);
        }
        for p in 0..pairs {
            let qid = p + 1;
            let entry = if table >= 2 { qid } else { 0 };
            // The first namespace using the pair owns its vector.
            let owner = InterruptOwner {
                device: first_index + p,
                queue: qid,
            };
            let cpu_vector = vectors.route(entry, owner)?;
            let pair = QueuePair {
                sq: SubmissionQueue::new::<A>(qid, entries, doorbells)?,
                cq: CompletionQueue::new::<A>(qid, entries, doorbells)?,
                commands: SlotTable::new(commands as u16),
                requests: SlotTable::new(depth as u16),
                lists: ListPool::new::<A>(commands, per_command)?,
                cpu_vector: Some(cpu_vector),
                doorbell_pending: false,
            };
            let create_cq = Command::create_cq(qid, entries, pair.cq.phys(), entry);
            let create_sq = Command::create_sq(qid, entries, pair.sq.phys(), qid);
            self.admin_sync(create_cq, "Create I/O Completion Queue")?;
            if let Err(e) = self.admin_sync(create_sq, "Create I/O Submission Queue") {
                let _ = self.admin_sync(Command::delete_cq(qid), "Delete I/O Completion Queue");
                self.delete_io_queues();
                return Err(e);
            }
            self.pairs.push(pair);
        }

        let vwc = self.write_cache == WriteCache::Enabled;
        let discard = identity.supports_dataset_management();
        for (i, (nsid, ns, block_size)) in usable.into_iter().enumerate() {
            let device_index = first_index + i as u16;
            let pair = i % usize::from(pairs);
            let wake_vector = if i < usize::from(pairs) {
                self.pairs[pair].cpu_vector
            } else {
                Some(vectors.software(InterruptOwner {
                    device: device_index,
                    queue: WAKE_QUEUE,
                })?)
            };
            let max_transfer_bytes = (max_transfer as u32) - (max_transfer as u32 % block_size);
            let geometry = Geometry {
                block_size,
                capacity_blocks: ns.size,
                max_transfer_bytes,
                queue_count: 1,
                queue_depth: depth as u16,
                volatile_write_cache: vwc,
                fua: true,
                discard,
                max_discard_blocks: if discard { u32::MAX } else { 0 },
                read_only: ns.write_protected,
            };
            let name = namespace_name(&self.name, nsid);
            info!(
                "{name}: {} blocks of {block_size} bytes, queue pair {}, depth {depth}{}",
                ns.size,
                pair + 1,
                if ns.write_protected {
                    ", write protected"
                } else {
                    ""
                }
            );
            self.namespaces.push(Namespace {
                nsid,
                identity: NamespaceIdentity::new(nsid, ns.nguid, ns.eui64),
                device_index,
                name,
                geometry,
                pair,
                ready: VecDeque::with_capacity(depth),
                pending: 0,
                stats: BlockStats::default(),
                wake_vector,
                last_status: None,
            });
        }
        Ok(failed)
    }

    /// Deletes every created I/O queue pair (best effort, admin polled).
    fn delete_io_queues(&mut self) {
        for p in (0..self.pairs.len()).rev() {
            let qid = p as u16 + 1;
            let _ = self.admin_sync(Command::delete_sq(qid), "Delete I/O Submission Queue");
            let _ = self.admin_sync(Command::delete_cq(qid), "Delete I/O Completion Queue");
        }
    }

    /// Clears `CC.EN`: the controller resets and aborts every command.
    fn disable(&mut self) {
        let config = self.regs.read32(regs::CC);
        if config != u32::MAX {
            self.regs.write32(regs::CC, config & !cc::EN);
        }
    }

    /// Number of usable namespaces.
    pub fn namespace_count(&self) -> usize {
        self.namespaces.len()
    }

    /// Device index of namespace `index`.
    pub fn device_index(&self, index: usize) -> Option<u16> {
        self.namespaces.get(index).map(|n| n.device_index)
    }

    /// NSID of namespace `index`.
    pub fn nsid(&self, index: usize) -> Option<u32> {
        self.namespaces.get(index).map(|n| n.nsid)
    }

    /// Geometry of namespace `index`.
    pub fn geometry(&self, index: usize) -> Option<Geometry> {
        self.namespaces.get(index).map(|n| n.geometry)
    }

    /// The last NVMe error status a request of namespace `index` completed with.
    pub fn last_status(&self, index: usize) -> Option<Status> {
        self.namespaces.get(index).and_then(|n| n.last_status)
    }

    /// Whether the controller has failed.
    pub fn is_failed(&self) -> bool {
        matches!(self.state, DeviceState::Failed(_))
    }

    /// The console description of the controller.
    pub fn controller_info(&self) -> ControllerInfo {
        let vs = self.version;
        ControllerInfo {
            name: self.name,
            pci: self.pci,
            model: self.identity.model,
            serial: self.identity.serial,
            firmware: self.identity.firmware,
            version: ((vs >> 16) as u16, (vs >> 8) as u8, vs as u8),
            queue_pairs: self.pairs.len() as u16,
            queue_entries: self.io_entries,
            mdts_bytes: self
                .identity
                .max_transfer_bytes(self.cap.page_size_min_shift()),
            write_cache: self.write_cache,
            deallocate: self.identity.supports_dataset_management(),
            namespaces: self.namespaces.len() as u16,
            admin_vector: self.admin_vector,
            state: self.state,
        }
    }

    /// The console description of namespace `index`.
    pub fn namespace_info(&self, index: usize) -> Option<DeviceInfo> {
        let ns = self.namespaces.get(index)?;
        let mut info = DeviceInfo::new(ns.name, "nvme");
        info.pci = self.pci;
        info.model = self.identity.model;
        info.serial = self.identity.serial;
        info.namespace = Some(ns.identity);
        info.geometry = Some(ns.geometry);
        let mut vectors = [0u8; 2];
        let mut n = 0;
        for v in [
            self.pairs.get(ns.pair).and_then(|p| p.cpu_vector),
            self.admin_vector,
        ]
        .into_iter()
        .flatten()
        {
            vectors[n] = v;
            n += 1;
        }
        info.set_vectors(&vectors[..n]);
        info.stats = ns.stats;
        info.in_flight = ns.pending + ns.ready.len();
        info.state = self.state;
        Some(info)
    }

    /// Counters of namespace `index`.
    pub fn stats(&self, index: usize) -> BlockStats {
        self.namespaces
            .get(index)
            .map(|n| n.stats)
            .unwrap_or_default()
    }

    /// Requests of namespace `index` submitted and not yet handed back.
    pub fn in_flight(&self, index: usize) -> usize {
        self.namespaces
            .get(index)
            .map_or(0, |n| n.pending + n.ready.len())
    }

    /// Counts an interrupt for namespace `index` (software wake-ups are not counted).
    pub fn note_interrupt(&mut self, index: usize, queue: u16) {
        if queue == WAKE_QUEUE {
            return;
        }
        if let Some(ns) = self.namespaces.get_mut(index) {
            ns.stats.interrupts += 1;
        }
    }

    /// Queues `request` for namespace `index`. Never completes inline.
    pub fn submit(&mut self, index: usize, request: BlockRequest) -> Result<(), Rejected> {
        let reject = |error, request| Err(Rejected { error, request });
        if !matches!(self.state, DeviceState::Online) {
            return reject(BlockError::DeviceFailed, request);
        }
        let Some(ns) = self.namespaces.get_mut(index) else {
            return reject(BlockError::DeviceFailed, request);
        };
        // The controller checks ranges itself and names the error ("LBA Out of Range").
        if let Err(error) = validate_transfer(&ns.geometry, &request) {
            return reject(error, request);
        }
        if ns.pending + ns.ready.len() >= usize::from(ns.geometry.queue_depth) {
            ns.stats.queue_full += 1;
            return reject(BlockError::QueueFull, request);
        }
        let block_size = ns.geometry.block_size as usize;
        let nsid = ns.nsid;
        let (phys, len) = request
            .buffer
            .as_ref()
            .map_or((0, 0), |b| (b.phys(), b.len()));
        if request.buffer.is_some() && phys % 4 != 0 {
            return reject(
                BlockError::Misaligned {
                    bytes: len,
                    block_size: ns.geometry.block_size,
                },
                request,
            );
        }
        // Pieces of whole blocks within MDTS and the 16-bit block count.
        let limit = self.max_command_bytes.min(65536 * block_size);
        let piece_bytes = (limit - limit % block_size).max(block_size);
        let pieces = match request.op {
            Operation::Read | Operation::Write { .. } => len.div_ceil(piece_bytes),
            Operation::Flush | Operation::Discard { .. } => 1,
        };
        let Some(pair) = self.pairs.get_mut(ns.pair) else {
            return reject(BlockError::DeviceFailed, request);
        };
        let free_commands = pair.commands.capacity() - pair.commands.len();
        if pieces > MAX_PIECES
            || pair.requests.is_full()
            || free_commands < pieces
            || usize::from(pair.sq.free()) < pieces
        {
            ns.stats.queue_full += 1;
            return reject(BlockError::QueueFull, request);
        }
        let deadline = (self.clock)().saturating_add(self.config.io_timeout_ns);
        let (op, lba) = (request.op, request.lba);
        let request_slot = match pair.requests.insert(Pending {
            namespace: index,
            request,
            outstanding: pieces as u16,
            error: None,
        }) {
            Ok(slot) => slot,
            Err(pending) => return reject(BlockError::QueueFull, pending.request),
        };

        // Phase 1: command slots, PRPs and entries; nothing is visible to the controller yet.
        let mut built = [Command::default(); MAX_PIECES];
        let mut failure = None;
        for (k, slot) in built.iter_mut().enumerate().take(pieces) {
            let mut command = match op {
                Operation::Read | Operation::Write { .. } => {
                    let offset = k * piece_bytes;
                    let bytes = piece_bytes.min(len - offset);
                    let fua = matches!(op, Operation::Write { fua: true });
                    Command::read_write(
                        matches!(op, Operation::Write { .. }),
                        nsid,
                        lba + (offset / block_size) as u64,
                        (bytes / block_size) as u32,
                        fua,
                    )
                }
                Operation::Flush => Command::flush(nsid),
                Operation::Discard { .. } => Command::new(cmd::NVM_DATASET_MANAGEMENT, nsid),
            };
            let cid = match pair.commands.insert(InFlight {
                request: request_slot,
                deadline,
                opcode: command.opcode(),
            }) {
                Ok(cid) => cid,
                Err(_) => {
                    failure = Some(BlockError::QueueFull);
                    break;
                }
            };
            let mut lists = pair.lists.for_command(cid);
            match op {
                Operation::Read | Operation::Write { .. } => {
                    let offset = k * piece_bytes;
                    let bytes = piece_bytes.min(len - offset);
                    match prp::build(phys + offset as u64, bytes, PAGE_SIZE, &mut lists) {
                        Ok(prps) => command.set_prps(prps.prp1, prps.prp2),
                        Err(e) => {
                            error!("{}: cannot describe buffer: {e:?}", self.name);
                            failure = Some(BlockError::Io);
                        }
                    }
                }
                Operation::Discard { blocks } => match lists.store(&cmd::dsm_range(lba, blocks)) {
                    Some(range) => command = Command::deallocate(nsid, range),
                    None => failure = Some(BlockError::Io),
                },
                Operation::Flush => {}
            }
            command.set_cid(cid);
            *slot = command;
            if failure.is_some() {
                break;
            }
        }
        if let Some(error) = failure {
            for command in &built[..pieces] {
                if let Some(entry) = pair.commands.get(command.cid()) {
                    if entry.request == request_slot {
                        pair.commands.remove(command.cid());
                    }
                }
            }
            return match pair.requests.remove(request_slot) {
                Some(pending) => reject(error, pending.request),
                // Cannot happen: we inserted it above and hold `&mut self`.
                None => Ok(()),
            };
        }
        // Phase 2: into the ring (room checked above), one doorbell write.
        for command in &built[..pieces] {
            if pair.sq.push(command).is_err() {
                // Cannot happen: free slots were checked; the entry is lost, so its command
                // will time out and fail the controller rather than hang.
                error!("{}: submission queue unexpectedly full", self.name);
            }
        }
        if self.plugged > 0 {
            pair.doorbell_pending = true;
        } else {
            pair.sq.ring_doorbell(&self.regs);
        }
        ns.pending += 1;
        Ok(())
    }

    /// Holds back submission doorbells until the matching [`Controller::unplug`]: a burst
    /// of commands then costs one doorbell write (one VM exit) per queue.
    pub fn plug(&mut self) {
        self.plugged = self.plugged.saturating_add(1);
    }

    /// Rings the doorbells held back since the first [`Controller::plug`] once every plug
    /// is matched.
    pub fn unplug(&mut self) {
        self.plugged = self.plugged.saturating_sub(1);
        if self.plugged > 0 {
            return;
        }
        for pair in &mut self.pairs {
            if core::mem::take(&mut pair.doorbell_pending) {
                pair.sq.ring_doorbell(&self.regs);
            }
        }
    }

    /// Does the controller's share of a poll, at time `now`: deadline and fatal-status checks
    /// (rate limited), the abort after a failure, and draining every completion queue into
    /// the namespaces' rings. Posts wake-ups for namespaces other than `polling` that received
    /// completions and returns whether it did.
    pub fn service(&mut self, polling: usize) -> bool {
        let now = self.now();
        self.check(now);
        let mut woken: u64 = 0;
        if self.abort_at.is_some() {
            self.finish_abort(now, &mut woken);
        } else if matches!(self.state, DeviceState::Online) {
            self.drain_admin();
            for p in 0..self.pairs.len() {
                if let Err(why) = self.drain_pair(p, &mut woken) {
                    self.fail(why);
                    self.finish_abort(now, &mut woken);
                    break;
                }
            }
        }
        self.wake(polling, woken)
    }

    fn wake(&self, polling: usize, woken: u64) -> bool {
        let mut any = false;
        for (i, ns) in self.namespaces.iter().enumerate() {
            let bit = 1u64 << (i % 64);
            if i != polling && woken & bit != 0 {
                if let Some(vector) = ns.wake_vector {
                    self.registry.repend(vector);
                    any = true;
                }
            }
        }
        any
    }

    fn drain_admin(&mut self) {
        let mut consumed = 0;
        while consumed < self.admin.cq.entries() {
            let Some(entry) = self.admin.cq.peek() else {
                break;
            };
            self.admin.cq.advance();
            self.admin.sq.update_head(entry.sq_head);
            consumed += 1;
            warn!(
                "{}: unexpected admin completion (command {}, {:?})",
                self.name,
                entry.cid,
                entry.status.status()
            );
        }
        if consumed > 0 {
            self.admin.cq.ring_doorbell(&self.regs);
        }
    }

    /// Drains pair `p`'s completion queue. A protocol violation is returned as the reason to
    /// fail the controller.
    fn drain_pair(&mut self, p: usize, woken: &mut u64) -> Result<(), Reason> {
        let Some(pair) = self.pairs.get_mut(p) else {
            return Ok(());
        };
        let mut consumed = 0;
        let mut result = Ok(());
        while consumed < pair.cq.entries() {
            let Some(entry) = pair.cq.peek() else {
                break;
            };
            pair.cq.advance();
            consumed += 1;
            if !pair.sq.update_head(entry.sq_head) {
                result = Err(reason(format_args!(
                    "completion with SQ head {} beyond queue {}",
                    entry.sq_head,
                    pair.sq.qid()
                )));
                break;
            }
            let Some(command) = pair.commands.remove(entry.cid) else {
                result = Err(reason(format_args!(
                    "completion for unknown command ID {} on queue {}",
                    entry.cid,
                    pair.cq.qid()
                )));
                break;
            };
            finish_command(
                &self.name,
                pair,
                &mut self.namespaces,
                command,
                &entry,
                woken,
            );
        }
        if consumed > 0 {
            pair.cq.ring_doorbell(&self.regs);
        }
        result
    }

    /// Deadline and fatal-status checks, at most every `check_interval_ns`.
    fn check(&mut self, now: u64) {
        if now < self.next_check || !matches!(self.state, DeviceState::Online) {
            return;
        }
        self.next_check = now.saturating_add(self.config.check_interval_ns);
        let status = self.regs.read32(regs::CSTS);
        if status == u32::MAX {
            self.fail(reason(format_args!(
                "controller not responding (CSTS all ones)"
            )));
            return;
        }
        if status & csts::CFS != 0 {
            self.fail(reason(format_args!("controller fatal status (CSTS.CFS)")));
            return;
        }
        let expired = self.pairs.iter().find_map(|pair| {
            pair.commands.ids().find_map(|cid| {
                let command = pair.commands.get(cid)?;
                (command.deadline <= now).then(|| (cid, command.opcode, pair.sq.qid()))
            })
        });
        if let Some((cid, opcode, qid)) = expired {
            let why = reason(format_args!(
                "{} (command {cid}, queue {qid}) timed out after {} ms",
                opcode_name(opcode),
                self.config.io_timeout_ns / 1_000_000
            ));
            self.fail(why);
        }
    }

    /// Runs the deadline checks now (for the kernel's periodic timer): returns whether the
    /// controller is (now) failed. Wake-ups are posted for namespaces with completions.
    pub fn check_timeouts(&mut self) -> bool {
        let now = self.now();
        self.next_check = 0;
        self.check(now);
        let mut woken = 0;
        if self.abort_at.is_some() {
            self.finish_abort(now, &mut woken);
            // Namespaces with aborted requests must be polled even without an interrupt.
            woken = u64::MAX;
        }
        self.wake(usize::MAX, woken);
        self.is_failed()
    }

    /// Gives up on the controller: logs the reason, disables it, and arranges for every
    /// outstanding request to complete with [`BlockError::DeviceFailed`].
    pub fn fail(&mut self, why: Reason) {
        if !matches!(self.state, DeviceState::Online) {
            return;
        }
        error!("{}: controller failed: {why}", self.name);
        self.state = DeviceState::Failed(why);
        self.disable();
        let timeout = self.cap.timeout_ns().max(super::init::MIN_READY_TIMEOUT_NS);
        self.abort_at = Some(self.now().saturating_add(timeout));
    }

    /// After a failure, once the controller has stopped (`CSTS.RDY` = 0, or `CAP.TO` passed):
    /// completes every outstanding request with [`BlockError::DeviceFailed`].
    fn finish_abort(&mut self, now: u64, woken: &mut u64) {
        let Some(at) = self.abort_at else {
            return;
        };
        let status = self.regs.read32(regs::CSTS);
        let stopped = status == u32::MAX || status & csts::RDY == 0;
        if !stopped && now < at {
            return;
        }
        self.abort_at = None;
        for pair in &mut self.pairs {
            while let Some(cid) = pair.commands.first_id() {
                pair.commands.remove(cid);
            }
            while let Some(slot) = pair.requests.first_id() {
                let Some(pending) = pair.requests.remove(slot) else {
                    break;
                };
                if let Some(ns) = self.namespaces.get_mut(pending.namespace) {
                    ns.pending = ns.pending.saturating_sub(1);
                    push_ready(ns, pending.request.complete(Err(BlockError::DeviceFailed)));
                    *woken |= 1 << (pending.namespace % 64);
                }
            }
            pair.sq.reset();
            pair.cq.reset();
        }
    }

    /// Whether a failure is still waiting for the controller to stop.
    pub fn aborting(&self) -> bool {
        self.abort_at.is_some()
    }

    /// Takes the next completion of namespace `index` (counted in its statistics).
    pub fn pop_ready(&mut self, index: usize) -> Option<Completion> {
        let ns = self.namespaces.get_mut(index)?;
        let completion = ns.ready.pop_front()?;
        ns.stats.record(&completion);
        Some(completion)
    }

    /// Whether namespace `index` has completions waiting.
    pub fn has_ready(&self, index: usize) -> bool {
        self.namespaces
            .get(index)
            .is_some_and(|n| !n.ready.is_empty())
    }

    /// Orderly shutdown (boot CPU, no I/O in flight): deletes the I/O queues and performs a
    /// normal shutdown (`CC.SHN`), each step bounded by its deadline. Returns whether the
    /// controller confirmed.
    pub fn shutdown(&mut self) -> bool {
        if matches!(self.state, DeviceState::Online) {
            self.delete_io_queues();
        }
        let timeout = self.cap.timeout_ns().max(super::init::MIN_READY_TIMEOUT_NS);
        let done = super::init::shutdown(&self.regs, self.clock, timeout);
        if matches!(self.state, DeviceState::Online) {
            self.state = DeviceState::Failed(reason(format_args!("shut down")));
        }
        done
    }
}

fn push_ready(ns: &mut Namespace, completion: Completion) {
    if ns.ready.len() < ns.ready.capacity() {
        ns.ready.push_back(completion);
    } else {
        // Cannot happen: ready + pending never exceed the depth, which is the capacity.
        error!(
            "{}: completion ring full; completion {} dropped",
            ns.name, completion.tag
        );
    }
}

/// Accounts one completed command; completes its request when it was the last piece.
fn finish_command(
    name: &DeviceName,
    pair: &mut QueuePair,
    namespaces: &mut [Namespace],
    command: InFlight,
    entry: &CompletionEntry,
    woken: &mut u64,
) {
    let Some(pending) = pair.requests.get_mut(command.request) else {
        error!("{name}: command {} belongs to no request", entry.cid);
        return;
    };
    if let Some(status) = entry.status.status() {
        let ns = namespaces.get_mut(pending.namespace);
        let ns_name = ns.as_ref().map_or(*name, |n| n.name);
        warn!(
            "{ns_name}: {} at LBA {} failed: {status}{}",
            opcode_name(command.opcode),
            pending.request.lba,
            if entry.status.do_not_retry() {
                " (do not retry)"
            } else {
                ""
            }
        );
        let error = status.block_error();
        if let Some(ns) = namespaces.get_mut(pending.namespace) {
            ns.last_status = Some(status);
        }
        pending.error.get_or_insert(error);
    }
    pending.outstanding = pending.outstanding.saturating_sub(1);
    if pending.outstanding > 0 {
        return;
    }
    let Some(pending) = pair.requests.remove(command.request) else {
        return;
    };
    let result = match pending.error {
        Some(e) => Err(e),
        None => Ok(()),
    };
    if let Some(ns) = namespaces.get_mut(pending.namespace) {
        ns.pending = ns.pending.saturating_sub(1);
        push_ready(ns, pending.request.complete(result));
        *woken |= 1 << (pending.namespace % 64);
    }
}

/// `nvme0` + `n` + NSID.
pub fn namespace_name(controller: &DeviceName, nsid: u32) -> DeviceName {
    let mut name = *controller;
    let _ = fmt::write(&mut name, format_args!("n{nsid}"));
    name
}
