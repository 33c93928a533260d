//! The appliance's network: smoltcp over the first virtio-net NIC (Ethernet, ARP, IPv4, ICMP
//! echo, TCP, DHCP), the address configuration from `ip=` (DHCP by default), TCP listeners
//! for services ([`tcp`]) and the test echo service ([`echo`]). It knows nothing of NBD: the
//! main loop owns the [`Net`] and runs the NBD server over its listener between
//! [`Net::receive`] and [`Net::send`].
//!
//! Interrupts: the NIC's MSI-X vectors (receive, transmit, link) run [`on_interrupt`], which
//! records which fired and wakes the main loop; the loop calls [`Net::receive`], which polls
//! the interface when a vector fired, a service queued data, smoltcp's own deadline
//! (retransmit, delayed ACK, DHCP renew) has come, or the last round ran out of budget or
//! left frames on the ring. Receive interrupts are off while rounds follow each other (frames
//! are found by polling the ring) and on again when a round ends with nothing left to do. The
//! 100 Hz APIC tick ends every `hlt`, so deadlines are met within 10 ms. Packet buffers,
//! socket buffers and the socket set are allocated at start-up (or when a listener is made);
//! nothing is allocated per packet.

pub mod echo;
pub mod phy;
pub mod tcp;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, AtomicU8, Ordering};

use drivers::msix::InterruptOwner;
use drivers::virtio_net::VirtioNetPci;
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::socket::dhcpv4;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

use crate::arch::interrupts;
use crate::ipconfig::{Dotted, IpConfig, Ipv4};
use crate::platform::KernelHal;
use crate::{executor, time};

/// The device index the NIC's interrupts carry (apart from the disks' 0..256).
pub const NET_DEVICE_INDEX: u16 = 0x4000;
/// Frames taken per poll before the loop gets a turn.
const RX_BUDGET: usize = 64;

/// Where the address came from and how it stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressState {
    /// `ip=off`.
    Off,
    /// Static from `ip=`.
    Static,
    /// DHCP: no lease yet.
    DhcpRequesting,
    /// DHCP: leased from `server`.
    DhcpBound {
        /// The DHCP server.
        server: Ipv4,
        /// Lease time in seconds, if the server gave one.
        lease_secs: Option<u64>,
        /// When the lease was taken (ns since boot).
        since_ns: u64,
    },
}

/// The network as the main loop and the console see it.
pub struct Net {
    nic: VirtioNetPci<KernelHal>,
    iface: Interface,
    sockets: SocketSet<'static>,
    listeners: Vec<tcp::Listener>,
    dhcp: Option<SocketHandle>,
    state: AddressState,
    address: Option<(Ipv4, u8)>,
    gateway: Option<Ipv4>,
    scratch: Box<[u8]>,
    /// Poll at once on the next round (budget ran out, a service queued data).
    again: bool,
    /// The round begun by [`Net::receive`] still has its egress to run.
    in_round: bool,
    /// Frames were left for the next round (the receive budget ran out).
    exhausted: bool,
    /// smoltcp's next deadline (ns since boot).
    next_poll_ns: u64,
    polls: u64,
    echo: Option<echo::Echo>,
}

/// Bits of fired sources: 1 receive, 2 transmit, 4 configuration.
static FIRED: AtomicU32 = AtomicU32::new(0);
/// Set when a service queued work for the stack (from the TCP calls): a work-pending flag
/// like the interrupts' (`executor::wake`), read by the next [`Net::receive`].
static DIRTY: AtomicU32 = AtomicU32::new(0);
/// CPU vectors of receive, transmit, configuration (0 = none).
static VECTORS: [AtomicU8; 3] = [const { AtomicU8::new(0) }; 3];

fn on_interrupt(vector: u8) {
    for (bit, v) in VECTORS.iter().enumerate() {
        if v.load(Ordering::Relaxed) == vector {
            FIRED.fetch_or(1 << bit, Ordering::Release);
        }
    }
    executor::wake();
}

/// Marks work for the stack and keeps the loop from halting.
pub(crate) fn wake() {
    DIRTY.store(1, Ordering::Release);
    executor::wake();
}

fn now_instant(ns: u64) -> Instant {
    Instant::from_micros((ns / 1000) as i64)
}

/// Brings up the network on `nic` (probed by `devices`) and configures its address from
/// `ip` (DHCP unless static; `devices` leaves the NIC down for `ip=off`). Called once at
/// boot after the disks; the caller owns the result.
pub fn init(mut nic: VirtioNetPci<KernelHal>, ip: IpConfig) -> Net {
    let seed = crate::arch::cpu::rdtsc();
    let assigned = nic.vectors().cpu_vectors;
    for (slot, vector) in VECTORS.iter().zip(assigned) {
        if let Some(v) = vector {
            slot.store(v, Ordering::Relaxed);
            // Replaces the disks' handler: these vectors never reach their registry.
            interrupts::register(v, on_interrupt);
        }
    }
    let mut scratch = alloc::vec![0u8; nic.tx().max_frame()].into_boxed_slice();
    let now = time::uptime_ns();
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(nic.mac())));
    config.random_seed = seed ^ crate::arch::cpu::rdtsc().rotate_left(17);
    let iface = {
        let mut device = phy::Phy::new(&mut nic, &mut scratch, 0);
        Interface::new(config, &mut device, now_instant(now))
    };
    let mut net = Net {
        nic,
        iface,
        sockets: SocketSet::new(Vec::new()),
        listeners: Vec::new(),
        dhcp: None,
        state: AddressState::Off,
        address: None,
        gateway: None,
        scratch,
        again: true,
        in_round: false,
        exhausted: false,
        next_poll_ns: 0,
        polls: 0,
        echo: None,
    };
    match ip {
        IpConfig::Static(s) => {
            net.set_address(Some((s.address, s.prefix)), s.gateway);
            net.state = AddressState::Static;
            log::info!(
                "net: address {}/{} (static), gateway {}",
                Dotted(s.address),
                s.prefix,
                s.gateway
                    .map_or(alloc::string::String::from("none"), |g| alloc::format!(
                        "{}",
                        Dotted(g)
                    ))
            );
        }
        IpConfig::Dhcp | IpConfig::Off => {
            net.dhcp = Some(net.sockets.add(dhcpv4::Socket::new()));
            net.state = AddressState::DhcpRequesting;
        }
    }
    executor::wake();
    net
}

impl Net {
    fn set_address(&mut self, address: Option<(Ipv4, u8)>, gateway: Option<Ipv4>) {
        self.iface.update_ip_addrs(|addrs| {
            addrs.clear();
            if let Some((a, prefix)) = address {
                let cidr = Ipv4Cidr::new(Ipv4Address::from(a), prefix);
                let _ = addrs.push(IpCidr::Ipv4(cidr));
            }
        });
        match gateway {
            Some(g) => {
                let _ = self
                    .iface
                    .routes_mut()
                    .add_default_ipv4_route(Ipv4Address::from(g));
            }
            None => {
                self.iface.routes_mut().remove_default_ipv4_route();
            }
        }
        self.address = address;
        self.gateway = gateway;
    }

    fn poll_dhcp(&mut self, now: u64) {
        let Some(handle) = self.dhcp else { return };
        let event = self.sockets.get_mut::<dhcpv4::Socket>(handle).poll();
        match event {
            None => {}
            Some(dhcpv4::Event::Configured(config)) => {
                let address = (
                    config.address.address().octets(),
                    config.address.prefix_len(),
                );
                let gateway = config.router.map(|r| r.octets());
                let server = config.server.address.octets();
                let lease_secs = config
                    .packet
                    .and_then(|p| {
                        smoltcp::wire::DhcpRepr::parse(&p)
                            .ok()
                            .and_then(|r| r.lease_duration)
                    })
                    .map(u64::from);
                self.set_address(Some(address), gateway);
                self.state = AddressState::DhcpBound {
                    server,
                    lease_secs,
                    since_ns: now,
                };
                log::info!(
                    "net: DHCP lease {}/{} from {}, gateway {}",
                    Dotted(address.0),
                    address.1,
                    Dotted(server),
                    gateway.map_or(alloc::string::String::from("none"), |g| alloc::format!(
                        "{}",
                        Dotted(g)
                    ))
                );
            }
            Some(dhcpv4::Event::Deconfigured) => {
                if self.address.is_some() {
                    log::warn!("net: DHCP lease lost");
                }
                self.set_address(None, None);
                self.state = AddressState::DhcpRequesting;
            }
        }
    }

    /// The first half of a round at `now`, when one is due (a vector fired, a service
    /// queued data, `more` (the owner's services have output waiting), smoltcp's deadline,
    /// the last round's budget ran out): interface ingress, DHCP, the listeners (a new
    /// peer of a screened listener is let in only if `screen` says so), the echo service.
    /// Returns whether a round began: the owner runs its services over the TCP calls, then
    /// [`Net::send`].
    pub fn receive(&mut self, now: u64, more: bool, screen: &mut tcp::Screen<'_>) -> bool {
        let fired = FIRED.swap(0, Ordering::AcqRel);
        let dirty = DIRTY.swap(0, Ordering::AcqRel) != 0;
        if fired & 4 != 0 {
            if let Some(why) = self.nic.interrupt(InterruptOwner::CONFIG_QUEUE) {
                log::error!("net: NIC failed: {why}");
            }
        }
        if fired & 3 != 0 {
            self.nic.interrupt(0);
        }
        let due = fired != 0
            || dirty
            || more
            || self.again
            || now >= self.next_poll_ns
            || !self.nic.has_interrupts();
        if !due {
            return false;
        }
        // Receive interrupts are off while the loop keeps coming back (`again`): the next round
        // finds the frames on the ring anyway, and each interrupt costs an exit (under QEMU's
        // TCG, one that waits for the device model's lock). On again in `send` before the loop
        // may sleep.
        self.nic.rx().set_interrupts(false);
        let instant = now_instant(now);
        self.exhausted = {
            let Net {
                nic,
                iface,
                sockets,
                scratch,
                ..
            } = self;
            let mut device = phy::Phy::new(nic, scratch, RX_BUDGET);
            iface.poll(instant, &mut device, sockets);
            device.exhausted()
        };
        self.poll_dhcp(now);
        self.tcp_maintain(now, screen);
        if let Some(mut echo) = self.echo.take() {
            echo.run(self);
            self.echo = Some(echo);
        }
        self.in_round = true;
        true
    }

    /// The second half of the round [`Net::receive`] began (nothing otherwise): what the
    /// services queued goes out now. `deadline` is the owner's next timed step (ns since
    /// boot), if any. Returns true when the loop should run again before halting.
    pub fn send(&mut self, now: u64, deadline: Option<u64>) -> bool {
        if !core::mem::take(&mut self.in_round) {
            return false;
        }
        let instant = now_instant(now);
        // What the services queued goes out in this round: `poll_egress` sends at most one
        // segment per socket a call, so it is called until nothing more goes (the peer's
        // window, the send buffers or the transmit buffers are used up), as
        // `Interface::poll` does. One call left a reply's first segment out now and the
        // rest for the next round.
        {
            let Net {
                nic,
                iface,
                sockets,
                scratch,
                ..
            } = self;
            let mut device = phy::Phy::new(nic, scratch, 0);
            while iface.poll_egress(instant, &mut device, sockets) != PollResult::None {}
        }
        self.tcp_relisten_refused();
        self.nic.kick();
        let tx_free = self.nic.arm_tx_interrupt();
        self.polls += 1;
        self.next_poll_ns = match self.iface.poll_delay(instant, &self.sockets) {
            Some(d) => now.saturating_add(d.total_micros().saturating_mul(1000)),
            None => u64::MAX,
        };
        if let Some(due) = deadline {
            self.next_poll_ns = self.next_poll_ns.min(due);
        }
        if let Some(due) = self.tcp_next_deadline() {
            self.next_poll_ns = self.next_poll_ns.min(due);
        }
        // Come back at once when frames wait or smoltcp wants to send now and can.
        self.again = self.exhausted || (self.next_poll_ns <= now && tx_free);
        if !self.again {
            self.nic.rx().set_interrupts(true);
            // A frame that came in while they were off raised none: poll again for it.
            self.again = self.nic.rx().has_pending();
        }
        self.again
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.nic.mac()
    }

    /// The NIC (counters, link, vectors).
    pub fn nic(&self) -> &VirtioNetPci<KernelHal> {
        &self.nic
    }

    /// Address and prefix, if configured.
    pub fn address(&self) -> Option<(Ipv4, u8)> {
        self.address
    }

    /// Default gateway, if any.
    pub fn gateway(&self) -> Option<Ipv4> {
        self.gateway
    }

    /// How the address was obtained.
    pub fn address_state(&self) -> AddressState {
        self.state
    }

    /// Interface polls since boot.
    pub fn polls(&self) -> u64 {
        self.polls
    }

    /// The echo service's port and counters, if running.
    pub fn echo(&self) -> Option<&echo::Echo> {
        self.echo.as_ref()
    }

    /// Starts the echo service on `port` (test builds; allocates its listener now).
    pub fn start_echo(&mut self, port: u16) -> Result<(), tcp::ListenError> {
        if let Some(e) = &self.echo {
            return Err(tcp::ListenError::PortInUse(e.port()));
        }
        let listener = self.tcp_listen(port, tcp::TcpConfig::default())?;
        self.echo = Some(echo::Echo::new(listener, port));
        wake();
        Ok(())
    }
}
