//! smoltcp's `phy::Device` over the virtio-net driver: receive tokens lend a posted receive
//! buffer's frame and put the buffer back on the ring when dropped; transmit tokens fill a
//! buffer of the transmit pool in place. Nothing is copied or allocated per packet.
//!
//! Each [`Phy`] lends at most `budget` received frames, so one poll of the interface cannot
//! starve the rest of the main loop; [`Phy::exhausted`] tells the loop to come back at once.

use drivers::virtio_net::{NetRx, NetTx, RxPacket, VirtioNetPci};
use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;

use crate::platform::KernelHal;

/// The NIC as smoltcp sees it for one poll.
pub struct Phy<'a> {
    nic: &'a mut VirtioNetPci<KernelHal>,
    /// Where a frame goes when no transmit buffer is free (it is dropped and counted).
    scratch: &'a mut [u8],
    budget: usize,
    exhausted: bool,
}

impl<'a> Phy<'a> {
    /// Lends `nic` for one poll of at most `budget` received frames. `scratch` must hold a
    /// whole frame.
    pub fn new(nic: &'a mut VirtioNetPci<KernelHal>, scratch: &'a mut [u8], budget: usize) -> Self {
        Self {
            nic,
            scratch,
            budget,
            exhausted: false,
        }
    }

    /// Whether the receive budget ran out (frames may be waiting).
    pub fn exhausted(&self) -> bool {
        self.exhausted
    }
}

/// A received frame on loan.
pub struct Rx<'a> {
    rx: &'a mut NetRx<KernelHal>,
    packet: Option<RxPacket>,
}

impl RxToken for Rx<'_> {
    fn consume<R, F>(mut self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        match self.packet.take() {
            Some(packet) => {
                let result = f(self.rx.frame(&packet));
                self.rx.recycle(packet);
                result
            }
            None => f(&[]),
        }
    }
}

impl Drop for Rx<'_> {
    fn drop(&mut self) {
        if let Some(packet) = self.packet.take() {
            self.rx.count_drop();
            self.rx.recycle(packet);
        }
    }
}

/// The right to send one frame.
pub struct Tx<'a> {
    tx: &'a mut NetTx<KernelHal>,
    scratch: &'a mut [u8],
}

impl TxToken for Tx<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        if let Some(packet) = self.tx.alloc() {
            if let Some(frame) = self.tx.frame_mut(&packet, len) {
                let result = f(frame);
                self.tx.send(packet, len);
                return result;
            }
            self.tx.discard(packet);
        }
        // No buffer (or an oversized frame): build it in scratch and drop it; TCP resends.
        self.tx.count_drop();
        let len = len.min(self.scratch.len());
        f(&mut self.scratch[..len])
    }
}

impl Device for Phy<'_> {
    type RxToken<'b>
        = Rx<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b>
    where
        Self: 'b;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        if self.budget == 0 {
            self.exhausted = self.nic.rx().has_pending();
            return None;
        }
        let (rx, tx) = self.nic.split();
        let packet = rx.receive()?;
        self.budget -= 1;
        Some((
            Rx {
                rx,
                packet: Some(packet),
            },
            Tx {
                tx,
                scratch: self.scratch,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Tx<'_>> {
        let tx = self.nic.tx();
        if !tx.can_send() {
            return None;
        }
        Some(Tx {
            tx,
            scratch: self.scratch,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        let tx = self.nic.tx_ref();
        // With the device's segmentation offload, TCP segments of up to 64 KiB (the driver
        // raises peers' MSS in their SYN to match, and leaves the checksum to the device).
        caps.max_transmission_unit = tx.max_frame();
        // With receive offload the driver has acted on the device's checksum state (a TCP
        // segment from the host's own stack carries only a partial checksum): the stack
        // must not check TCP checksums. Large received frames need nothing more: smoltcp
        // does not hold them to the MTU, and its TCP takes any segment inside its window.
        caps.checksum.tcp = match (self.nic.rx_ref().offloads_tcp(), tx.offloads_tcp()) {
            (false, false) => Checksum::Both,
            (false, true) => Checksum::Rx,
            (true, false) => Checksum::Tx,
            (true, true) => Checksum::None,
        };
        caps
    }
}
