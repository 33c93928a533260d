//! Controller bring-up as an explicit state machine (NVMe Base 2.0 §3.5.1 "Memory-based
//! Controller Initialization"), modelled on SPDK's `nvme_ctrlr_set_state`: every state has a
//! name and a deadline, and [`BringUp::step`] is driven with the caller's clock, so nothing
//! waits without a bound and host tests can step it against a fake controller.
//!
//! ```text
//! Disable ──► WaitNotReady ──► Configure ──► Enable ──► WaitReady ──► Ready
//!    (CC.EN=0)   (CSTS.RDY=0)  (AQA/ASQ/ACQ)  (CC: MPS,     (CSTS.RDY=1)
//!                                              IOSQES, EN=1)
//! ```
//! `CSTS.CFS` (Controller Fatal Status) in any state, and `CSTS` reading all ones (the
//! function is gone), end the bring-up with an error naming the state. The waits use
//! `CAP.TO`, the controller's own worst case (at least [`MIN_READY_TIMEOUT_NS`]).

use super::regs::{self, cc, csts, Capabilities, RegisterAccess};
use super::NvmeError;

/// Floor for the ready timeout when `CAP.TO` is 0.
pub const MIN_READY_TIMEOUT_NS: u64 = 500_000_000;
/// Memory page size exponent the driver uses (4 KiB, the size of our DMA pages).
pub const PAGE_SHIFT: u32 = 12;
/// I/O submission queue entry size exponent (64 bytes).
pub const IOSQES: u32 = 6;
/// I/O completion queue entry size exponent (16 bytes).
pub const IOCQES: u32 = 4;

/// The states of the bring-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Clear `CC.EN` (a controller left enabled by firmware is reset).
    Disable,
    /// Wait for `CSTS.RDY` = 0.
    WaitNotReady {
        /// Give up at this time.
        deadline: u64,
    },
    /// Program `AQA`, `ASQ`, `ACQ`.
    Configure,
    /// Write `CC` with `EN` = 1, `MPS`, `IOSQES`, `IOCQES`, NVM command set, round robin.
    Enable,
    /// Wait for `CSTS.RDY` = 1.
    WaitReady {
        /// Give up at this time.
        deadline: u64,
    },
    /// The admin queue is usable.
    Ready,
    /// Bring-up failed.
    Failed(NvmeError),
}

impl State {
    /// The state's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Disable => "Disable",
            Self::WaitNotReady { .. } => "WaitNotReady",
            Self::Configure => "Configure",
            Self::Enable => "Enable",
            Self::WaitReady { .. } => "WaitReady",
            Self::Ready => "Ready",
            Self::Failed(_) => "Failed",
        }
    }
}

/// What the admin queue looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdminQueues {
    /// Physical address of the admin submission queue.
    pub sq_phys: u64,
    /// Physical address of the admin completion queue.
    pub cq_phys: u64,
    /// Entries in each (2..=4096, within `CAP.MQES`).
    pub entries: u16,
}

/// The bring-up state machine.
#[derive(Debug)]
pub struct BringUp {
    state: State,
    cap: Capabilities,
    admin: AdminQueues,
    timeout_ns: u64,
}

impl BringUp {
    /// Checks `CAP` against what the driver needs and starts in [`State::Disable`].
    pub fn new(cap: Capabilities, admin: AdminQueues) -> Result<Self, NvmeError> {
        if !cap.nvm_command_set() {
            return Err(NvmeError::NoNvmCommandSet);
        }
        if !(cap.page_size_min_shift()..=cap.page_size_max_shift()).contains(&PAGE_SHIFT) {
            return Err(NvmeError::UnsupportedPageSize {
                min: 1 << cap.page_size_min_shift().min(31),
                max: 1 << cap.page_size_max_shift().min(31),
            });
        }
        if cap.max_queue_entries() < 2 || u32::from(admin.entries) > cap.max_queue_entries() {
            return Err(NvmeError::QueueTooLarge {
                entries: u32::from(admin.entries),
                max: cap.max_queue_entries(),
            });
        }
        Ok(Self {
            state: State::Disable,
            cap,
            admin,
            timeout_ns: cap.timeout_ns().max(MIN_READY_TIMEOUT_NS),
        })
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The `CC` value the driver enables the controller with.
    pub fn enable_value() -> u32 {
        cc::EN
            | cc::CSS_NVM
            | (PAGE_SHIFT - 12) << cc::MPS_SHIFT
            | cc::AMS_RR
            | IOSQES << cc::IOSQES_SHIFT
            | IOCQES << cc::IOCQES_SHIFT
    }

    fn fail(&mut self, error: NvmeError) -> State {
        self.state = State::Failed(error);
        self.state
    }

    /// Advances as far as possible without waiting, at time `now` (nanoseconds), and returns
    /// the new state. Call again until it is [`State::Ready`] or [`State::Failed`].
    pub fn step<R: RegisterAccess + ?Sized>(&mut self, regs: &R, now: u64) -> State {
        loop {
            if matches!(self.state, State::Ready | State::Failed(_)) {
                return self.state;
            }
            let status = regs.read32(regs::CSTS);
            if status == u32::MAX {
                return self.fail(NvmeError::NotResponding {
                    during: self.state.name(),
                });
            }
            if status & csts::CFS != 0 {
                return self.fail(NvmeError::ControllerFatal {
                    during: self.state.name(),
                });
            }
            let next = match self.state {
                State::Disable => {
                    let config = regs.read32(regs::CC);
                    if config & cc::EN != 0 {
                        regs.write32(regs::CC, config & !cc::EN);
                    }
                    State::WaitNotReady {
                        deadline: now.saturating_add(self.timeout_ns),
                    }
                }
                State::WaitNotReady { deadline } => {
                    if status & csts::RDY == 0 {
                        State::Configure
                    } else if now >= deadline {
                        return self.fail(NvmeError::Timeout {
                            during: "WaitNotReady",
                            waited_ms: self.timeout_ns / 1_000_000,
                        });
                    } else {
                        return self.state;
                    }
                }
                State::Configure => {
                    regs.write32(regs::AQA, regs::aqa(self.admin.entries, self.admin.entries));
                    regs.write64(regs::ASQ, self.admin.sq_phys);
                    regs.write64(regs::ACQ, self.admin.cq_phys);
                    State::Enable
                }
                State::Enable => {
                    regs.write32(regs::CC, Self::enable_value());
                    State::WaitReady {
                        deadline: now.saturating_add(self.timeout_ns),
                    }
                }
                State::WaitReady { deadline } => {
                    if status & csts::RDY != 0 {
                        State::Ready
                    } else if now >= deadline {
                        return self.fail(NvmeError::Timeout {
                            during: "WaitReady",
                            waited_ms: self.timeout_ns / 1_000_000,
                        });
                    } else {
                        return self.state;
                    }
                }
                State::Ready | State::Failed(_) => return self.state,
            };
            log::trace!("nvme bring-up: {} -> {}", self.state.name(), next.name());
            self.state = next;
        }
    }

    /// Drives the machine to the end, calling `clock` for the time: boot-time use only (it
    /// spins until the controller answers or the state's deadline passes).
    pub fn run<R: RegisterAccess + ?Sized>(
        &mut self,
        regs: &R,
        clock: &dyn Fn() -> u64,
    ) -> Result<(), NvmeError> {
        loop {
            match self.step(regs, clock()) {
                State::Ready => return Ok(()),
                State::Failed(e) => return Err(e),
                _ => core::hint::spin_loop(),
            }
        }
    }

    /// `CAP` as read at the start.
    pub fn capabilities(&self) -> Capabilities {
        self.cap
    }
}

/// Normal shutdown (NVMe Base 2.0 §3.6.1): `CC.SHN` = 01b, then wait for `CSTS.SHST` =
/// complete, bounded by `timeout_ns`. Returns whether the controller confirmed.
pub fn shutdown<R: RegisterAccess + ?Sized>(
    regs: &R,
    clock: &dyn Fn() -> u64,
    timeout_ns: u64,
) -> bool {
    let config = regs.read32(regs::CC);
    regs.write32(regs::CC, (config & !cc::SHN_MASK) | cc::SHN_NORMAL);
    let deadline = clock().saturating_add(timeout_ns);
    loop {
        let status = regs.read32(regs::CSTS);
        if status == u32::MAX || status & csts::CFS != 0 {
            return false;
        }
        if status & csts::SHST_MASK == csts::SHST_COMPLETE {
            return true;
        }
        if clock() >= deadline {
            return false;
        }
        core::hint::spin_loop();
    }
}
