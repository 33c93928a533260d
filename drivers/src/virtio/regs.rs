//! virtio-pci register layouts both drivers program themselves (virtio 1.2 §4.1.4): the
//! vendor capabilities that locate the device's structures, and the fields of the common
//! configuration structure that virtio-drivers' `PciTransport` does not expose.

/// virtio-pci common configuration (`struct virtio_pci_common_cfg`) byte offsets.
pub mod common {
    /// `config_msix_vector`: le16, MSI-X table entry for configuration changes.
    pub const CONFIG_MSIX_VECTOR: usize = 0x10;
    /// `num_queues`: le16.
    pub const NUM_QUEUES: usize = 0x12;
    /// `queue_select`: le16, selects the queue the `queue_*` fields refer to.
    pub const QUEUE_SELECT: usize = 0x16;
    /// `queue_msix_vector`: le16, MSI-X table entry of the selected queue.
    pub const QUEUE_MSIX_VECTOR: usize = 0x1a;
    /// `queue_notify_off`: le16, notification offset (in multiplier units) of the selected
    /// queue.
    pub const QUEUE_NOTIFY_OFF: usize = 0x1e;
    /// Length of the fields we use.
    pub const LEN: usize = 0x38;
}

/// `struct virtio_pci_cap` (a vendor-specific PCI capability): field offsets from the
/// capability header and the structure types (`cfg_type`).
pub mod vendor_cap {
    /// Offset of `cap_len`.
    pub const LEN: u16 = 2;
    /// Offset of `cfg_type`.
    pub const CFG_TYPE: u16 = 3;
    /// Offset of `bar`.
    pub const BAR: u16 = 4;
    /// Offset of `offset`.
    pub const OFFSET: u16 = 8;
    /// Offset of `length`.
    pub const LENGTH: u16 = 12;
    /// Offset of `notify_off_multiplier` in `struct virtio_pci_notify_cap`.
    pub const NOTIFY_OFF_MULTIPLIER: u16 = 16;
    /// `VIRTIO_PCI_CAP_COMMON_CFG`: the common configuration.
    pub const COMMON_CFG: u8 = 1;
    /// `VIRTIO_PCI_CAP_NOTIFY_CFG`: the notification structure.
    pub const NOTIFY_CFG: u8 = 2;
    /// `VIRTIO_PCI_CAP_DEVICE_CFG`: the last structure type virtio-drivers maps.
    pub const DEVICE_CFG: u8 = 4;
}

/// `VIRTIO_MSI_NO_VECTOR`: no interrupt; also what the device reads back on refusal.
pub const NO_VECTOR: u16 = 0xffff;
