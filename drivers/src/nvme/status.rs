//! Completion status decoding (NVMe Base 2.0 §4.6.1, Figures 92–100; NVM Command Set 1.0
//! §4.1.1): the 15-bit status field of a completion queue entry (SCT, SC, CRD, M, DNR) and
//! [`Status`], one variant per status code we know by name.
//!
//! `Display` prints the spec's name ("LBA Out of Range"), so the console can show NVMe errors
//! the way datasheets and `nvme-cli` name them.

use crate::block::BlockError;
use core::fmt;

/// Status Code Type: Generic Command Status.
pub const SCT_GENERIC: u8 = 0;
/// Status Code Type: Command Specific Status.
pub const SCT_COMMAND_SPECIFIC: u8 = 1;
/// Status Code Type: Media and Data Integrity Errors.
pub const SCT_MEDIA: u8 = 2;
/// Status Code Type: Path Related Status.
pub const SCT_PATH: u8 = 3;
/// Status Code Type: Vendor Specific.
pub const SCT_VENDOR: u8 = 7;

/// The status field of a completion (DW3 bits 31:17, without the phase tag).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StatusField(pub u16);

impl StatusField {
    /// From the upper half of completion DW3 (bit 0 of it is the phase tag).
    pub fn from_dw3(dw3: u32) -> Self {
        Self(((dw3 >> 17) & 0x7fff) as u16)
    }
    /// `SC`: Status Code.
    pub fn sc(self) -> u8 {
        self.0 as u8
    }
    /// `SCT`: Status Code Type.
    pub fn sct(self) -> u8 {
        ((self.0 >> 8) & 7) as u8
    }
    /// `CRD`: Command Retry Delay.
    pub fn crd(self) -> u8 {
        ((self.0 >> 11) & 3) as u8
    }
    /// `M`: More (a log page has details).
    pub fn more(self) -> bool {
        self.0 & (1 << 13) != 0
    }
    /// `DNR`: Do Not Retry.
    pub fn do_not_retry(self) -> bool {
        self.0 & (1 << 14) != 0
    }
    /// Whether the command succeeded (SCT 0, SC 0).
    pub fn is_success(self) -> bool {
        self.sct() == SCT_GENERIC && self.sc() == 0
    }
    /// The named status, or `None` on success.
    pub fn status(self) -> Option<Status> {
        (!self.is_success()).then(|| Status::decode(self.sct(), self.sc()))
    }
}

macro_rules! statuses {
    ($( $(#[doc = $doc:literal])* $name:ident = ($sct:literal, $sc:literal, $text:literal), )*) => {
        /// A failed command's status, by the name the NVMe specifications give it.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Status {
            $( $(#[doc = $doc])* $name, )*
            /// Any status code without a variant here (reserved, vendor specific, newer).
            Other {
                /// Status Code Type.
                sct: u8,
                /// Status Code.
                sc: u8,
            },
        }

        impl Status {
            /// The status for `sct`/`sc`.
            pub fn decode(sct: u8, sc: u8) -> Self {
                match (sct, sc) {
                    $( ($sct, $sc) => Self::$name, )*
                    _ => Self::Other { sct, sc },
                }
            }

            /// `(SCT, SC)` of this status.
            pub fn code(self) -> (u8, u8) {
                match self {
                    $( Self::$name => ($sct, $sc), )*
                    Self::Other { sct, sc } => (sct, sc),
                }
            }

            /// The spec's name.
            pub fn name(self) -> &'static str {
                match self {
                    $( Self::$name => $text, )*
                    Self::Other { .. } => "",
                }
            }
        }
    };
}

statuses! {
    /// Generic 01h: Invalid Command Opcode.
    InvalidCommandOpcode = (0, 0x01, "Invalid Command Opcode"),
    /// Generic 02h: Invalid Field in Command.
    InvalidFieldInCommand = (0, 0x02, "Invalid Field in Command"),
    /// Generic 03h: Command ID Conflict.
    CommandIdConflict = (0, 0x03, "Command ID Conflict"),
    /// Generic 04h: Data Transfer Error.
    DataTransferError = (0, 0x04, "Data Transfer Error"),
    /// Generic 05h: Commands Aborted due to Power Loss Notification.
    AbortedPowerLoss = (0, 0x05, "Commands Aborted due to Power Loss Notification"),
    /// Generic 06h: Internal Error.
    InternalError = (0, 0x06, "Internal Error"),
    /// Generic 07h: Command Abort Requested.
    AbortRequested = (0, 0x07, "Command Abort Requested"),
    /// Generic 08h: Command Aborted due to SQ Deletion.
    AbortedSqDeletion = (0, 0x08, "Command Aborted due to SQ Deletion"),
    /// Generic 09h: Command Aborted due to Failed Fused Command.
    AbortedFailedFused = (0, 0x09, "Command Aborted due to Failed Fused Command"),
    /// Generic 0Ah: Command Aborted due to Missing Fused Command.
    AbortedMissingFused = (0, 0x0a, "Command Aborted due to Missing Fused Command"),
    /// Generic 0Bh: Invalid Namespace or Format.
    InvalidNamespaceOrFormat = (0, 0x0b, "Invalid Namespace or Format"),
    /// Generic 0Ch: Command Sequence Error.
    CommandSequenceError = (0, 0x0c, "Command Sequence Error"),
    /// Generic 0Dh: Invalid SGL Segment Descriptor.
    InvalidSglSegmentDescriptor = (0, 0x0d, "Invalid SGL Segment Descriptor"),
    /// Generic 0Eh: Invalid Number of SGL Descriptors.
    InvalidSglDescriptorCount = (0, 0x0e, "Invalid Number of SGL Descriptors"),
    /// Generic 0Fh: Data SGL Length Invalid.
    DataSglLengthInvalid = (0, 0x0f, "Data SGL Length Invalid"),
    /// Generic 10h: Metadata SGL Length Invalid.
    MetadataSglLengthInvalid = (0, 0x10, "Metadata SGL Length Invalid"),
    /// Generic 11h: SGL Descriptor Type Invalid.
    SglDescriptorTypeInvalid = (0, 0x11, "SGL Descriptor Type Invalid"),
    /// Generic 12h: Invalid Use of Controller Memory Buffer.
    InvalidCmbUse = (0, 0x12, "Invalid Use of Controller Memory Buffer"),
    /// Generic 13h: PRP Offset Invalid.
    PrpOffsetInvalid = (0, 0x13, "PRP Offset Invalid"),
    /// Generic 14h: Atomic Write Unit Exceeded.
    AtomicWriteUnitExceeded = (0, 0x14, "Atomic Write Unit Exceeded"),
    /// Generic 15h: Operation Denied.
    OperationDenied = (0, 0x15, "Operation Denied"),
    /// Generic 16h: SGL Offset Invalid.
    SglOffsetInvalid = (0, 0x16, "SGL Offset Invalid"),
    /// Generic 18h: Host Identifier Inconsistent Format.
    HostIdentifierInconsistentFormat = (0, 0x18, "Host Identifier Inconsistent Format"),
    /// Generic 19h: Keep Alive Timer Expired.
    KeepAliveTimerExpired = (0, 0x19, "Keep Alive Timer Expired"),
    /// Generic 1Ah: Keep Alive Timeout Invalid.
    KeepAliveTimeoutInvalid = (0, 0x1a, "Keep Alive Timeout Invalid"),
    /// Generic 1Bh: Command Aborted due to Preempt and Abort.
    AbortedPreemptAndAbort = (0, 0x1b, "Command Aborted due to Preempt and Abort"),
    /// Generic 1Ch: Sanitize Failed.
    SanitizeFailed = (0, 0x1c, "Sanitize Failed"),
    /// Generic 1Dh: Sanitize In Progress.
    SanitizeInProgress = (0, 0x1d, "Sanitize In Progress"),
    /// Generic 1Eh: SGL Data Block Granularity Invalid.
    SglDataBlockGranularityInvalid = (0, 0x1e, "SGL Data Block Granularity Invalid"),
    /// Generic 1Fh: Command Not Supported for Queue in CMB.
    NotSupportedForCmbQueue = (0, 0x1f, "Command Not Supported for Queue in CMB"),
    /// Generic 20h: Namespace is Write Protected.
    NamespaceWriteProtected = (0, 0x20, "Namespace is Write Protected"),
    /// Generic 21h: Command Interrupted.
    CommandInterrupted = (0, 0x21, "Command Interrupted"),
    /// Generic 22h: Transient Transport Error.
    TransientTransportError = (0, 0x22, "Transient Transport Error"),
    /// Generic (NVM) 80h: LBA Out of Range.
    LbaOutOfRange = (0, 0x80, "LBA Out of Range"),
    /// Generic (NVM) 81h: Capacity Exceeded.
    CapacityExceeded = (0, 0x81, "Capacity Exceeded"),
    /// Generic (NVM) 82h: Namespace Not Ready.
    NamespaceNotReady = (0, 0x82, "Namespace Not Ready"),
    /// Generic (NVM) 83h: Reservation Conflict.
    ReservationConflict = (0, 0x83, "Reservation Conflict"),
    /// Generic (NVM) 84h: Format In Progress.
    FormatInProgress = (0, 0x84, "Format In Progress"),
    /// Command specific 00h: Completion Queue Invalid.
    CompletionQueueInvalid = (1, 0x00, "Completion Queue Invalid"),
    /// Command specific 01h: Invalid Queue Identifier.
    InvalidQueueIdentifier = (1, 0x01, "Invalid Queue Identifier"),
    /// Command specific 02h: Invalid Queue Size.
    InvalidQueueSize = (1, 0x02, "Invalid Queue Size"),
    /// Command specific 03h: Abort Command Limit Exceeded.
    AbortCommandLimitExceeded = (1, 0x03, "Abort Command Limit Exceeded"),
    /// Command specific 05h: Asynchronous Event Request Limit Exceeded.
    AsyncEventLimitExceeded = (1, 0x05, "Asynchronous Event Request Limit Exceeded"),
    /// Command specific 06h: Invalid Firmware Slot.
    InvalidFirmwareSlot = (1, 0x06, "Invalid Firmware Slot"),
    /// Command specific 07h: Invalid Firmware Image.
    InvalidFirmwareImage = (1, 0x07, "Invalid Firmware Image"),
    /// Command specific 08h: Invalid Interrupt Vector.
    InvalidInterruptVector = (1, 0x08, "Invalid Interrupt Vector"),
    /// Command specific 09h: Invalid Log Page.
    InvalidLogPage = (1, 0x09, "Invalid Log Page"),
    /// Command specific 0Ah: Invalid Format.
    InvalidFormat = (1, 0x0a, "Invalid Format"),
    /// Command specific 0Ch: Invalid Queue Deletion.
    InvalidQueueDeletion = (1, 0x0c, "Invalid Queue Deletion"),
    /// Command specific 0Dh: Feature Identifier Not Saveable.
    FeatureNotSaveable = (1, 0x0d, "Feature Identifier Not Saveable"),
    /// Command specific 0Eh: Feature Not Changeable.
    FeatureNotChangeable = (1, 0x0e, "Feature Not Changeable"),
    /// Command specific 0Fh: Feature Not Namespace Specific.
    FeatureNotNamespaceSpecific = (1, 0x0f, "Feature Not Namespace Specific"),
    /// Command specific (NVM) 80h: Conflicting Attributes.
    ConflictingAttributes = (1, 0x80, "Conflicting Attributes"),
    /// Command specific (NVM) 81h: Invalid Protection Information.
    InvalidProtectionInformation = (1, 0x81, "Invalid Protection Information"),
    /// Command specific (NVM) 82h: Attempted Write to Read Only Range.
    WriteToReadOnlyRange = (1, 0x82, "Attempted Write to Read Only Range"),
    /// Media 80h: Write Fault.
    WriteFault = (2, 0x80, "Write Fault"),
    /// Media 81h: Unrecovered Read Error.
    UnrecoveredReadError = (2, 0x81, "Unrecovered Read Error"),
    /// Media 82h: End-to-end Guard Check Error.
    GuardCheckError = (2, 0x82, "End-to-end Guard Check Error"),
    /// Media 83h: End-to-end Application Tag Check Error.
    ApplicationTagCheckError = (2, 0x83, "End-to-end Application Tag Check Error"),
    /// Media 84h: End-to-end Reference Tag Check Error.
    ReferenceTagCheckError = (2, 0x84, "End-to-end Reference Tag Check Error"),
    /// Media 85h: Compare Failure.
    CompareFailure = (2, 0x85, "Compare Failure"),
    /// Media 86h: Access Denied.
    AccessDenied = (2, 0x86, "Access Denied"),
    /// Media 87h: Deallocated or Unwritten Logical Block.
    DeallocatedOrUnwritten = (2, 0x87, "Deallocated or Unwritten Logical Block"),
    /// Path 00h: Internal Path Error.
    InternalPathError = (3, 0x00, "Internal Path Error"),
    /// Path 01h: Asymmetric Access Persistent Loss.
    AsymmetricAccessPersistentLoss = (3, 0x01, "Asymmetric Access Persistent Loss"),
    /// Path 02h: Asymmetric Access Inaccessible.
    AsymmetricAccessInaccessible = (3, 0x02, "Asymmetric Access Inaccessible"),
    /// Path 03h: Asymmetric Access Transition.
    AsymmetricAccessTransition = (3, 0x03, "Asymmetric Access Transition"),
    /// Path 60h: Controller Pathing Error.
    ControllerPathingError = (3, 0x60, "Controller Pathing Error"),
    /// Path 70h: Host Pathing Error.
    HostPathingError = (3, 0x70, "Host Pathing Error"),
    /// Path 71h: Command Aborted By Host.
    AbortedByHost = (3, 0x71, "Command Aborted By Host"),
}

impl Status {
    /// The block-layer error a request failing with this status completes with: the status
    /// by its spec name, so the operator sees e.g. "LBA Out of Range"; aborts because the
    /// controller went away are device failures.
    pub fn block_error(self) -> BlockError {
        match self {
            Self::AbortedPowerLoss | Self::AbortedSqDeletion => BlockError::DeviceFailed,
            Self::Other { .. } => BlockError::Io,
            named => BlockError::DeviceStatus(named.name()),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Other {
                sct: SCT_VENDOR,
                sc,
            } => write!(f, "Vendor Specific status {sc:#04x}"),
            Self::Other { sct, sc } => write!(f, "status SCT {sct:#x} SC {sc:#04x}"),
            named => f.write_str(named.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_status_fields() {
        // DW3 of a completion: CID 7, phase 1, SC 80h (LBA Out of Range), DNR.
        let dw3 = 7 | 1 << 16 | 0x80 << 17 | 1 << 31;
        let field = StatusField::from_dw3(dw3);
        assert_eq!((field.sct(), field.sc()), (0, 0x80));
        assert!(field.do_not_retry());
        assert!(!field.more());
        assert_eq!(field.status(), Some(Status::LbaOutOfRange));
        assert_eq!(Status::LbaOutOfRange.to_string(), "LBA Out of Range");

        let media = StatusField::from_dw3(0x81 << 17 | 2 << 25 | 1 << 28 | 1 << 30);
        assert_eq!(media.status(), Some(Status::UnrecoveredReadError));
        assert_eq!((media.crd(), media.more()), (1, true));
        assert_eq!(
            media.status().map(Status::block_error),
            Some(BlockError::DeviceStatus("Unrecovered Read Error"))
        );

        let ok = StatusField::from_dw3(1 << 16 | 0xffff);
        assert!(ok.is_success());
        assert_eq!(ok.status(), None);

        assert_eq!(
            Status::decode(1, 0x82).block_error(),
            BlockError::DeviceStatus("Attempted Write to Read Only Range"),
        );
        assert_eq!(
            Status::LbaOutOfRange.block_error().to_string(),
            "device reported LBA Out of Range"
        );
        assert_eq!(
            Status::decode(7, 0xc1).to_string(),
            "Vendor Specific status 0xc1"
        );
        assert_eq!(
            Status::decode(0, 0x7f).to_string(),
            "status SCT 0x0 SC 0x7f"
        );
        assert_eq!(Status::decode(0, 0x7f), Status::Other { sct: 0, sc: 0x7f });
    }

    #[test]
    fn every_named_status_round_trips() {
        for sct in 0..8u8 {
            for sc in 0..=255u8 {
                let status = Status::decode(sct, sc);
                assert_eq!(status.code(), (sct, sc));
                if !matches!(status, Status::Other { .. }) {
                    assert!(!status.name().is_empty());
                    assert_eq!(status.to_string(), status.name());
                }
            }
        }
    }
}
