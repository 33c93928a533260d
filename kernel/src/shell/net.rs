//! The `net` command: the NIC, the address configuration, counters, TCP listeners and
//! connections; `net echo PORT` (testing) starts the echo service.

use core::fmt::Write;

use drivers::virtio_net::MacDisplay;

use crate::console::args::Args;
use crate::console::output::Out;
use crate::ipconfig::Dotted;
use crate::net::{AddressState, Net};
use crate::time;

/// Runs `net …`.
pub fn run(args: &Args, out: &mut Out, net: Option<&mut Net>, testing: bool) {
    match args.arg("SUBCOMMAND") {
        None => {
            if net.map(|n| show(n, out)).is_none() {
                let _ = writeln!(
                    out,
                    "no network (no virtio-net NIC, ip=off, or the NIC failed; see the boot log)"
                );
            }
        }
        Some("echo") if testing => {
            let Some(port) = args
                .arg("PORT")
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|&p| p != 0)
            else {
                out.error(format_args!("net echo needs a port 1..65535"));
                return;
            };
            match net.map(|n| n.start_echo(port)) {
                None => out.error(format_args!("no network")),
                Some(Err(e)) => out.error(format_args!("echo: {e}")),
                Some(Ok(())) => {
                    let _ = writeln!(out, "echo service on TCP port {port}");
                }
            }
        }
        Some(other) => out.error(format_args!(
            "unknown net subcommand '{}' (usage: net)",
            other.chars().take(32).collect::<alloc::string::String>()
        )),
    }
}

fn show(n: &Net, out: &mut Out) {
    let nic = n.nic();
    let pci = nic
        .pci()
        .map_or(alloc::string::String::from("-"), |p| alloc::format!("{p}"));
    let link = match (nic.has_link_status(), nic.link_up()) {
        (false, _) => "up (not reported)",
        (true, true) => "up",
        (true, false) => "down",
    };
    let _ = writeln!(
        out,
        "eth0: virtio-net at {pci}, MAC {}, link {link}{}",
        MacDisplay(nic.mac()),
        nic.mtu()
            .map_or(alloc::string::String::new(), |m| alloc::format!(
                ", MTU {m}"
            ))
    );
    match n.address() {
        Some((a, prefix)) => {
            let _ = write!(out, "  address {}/{prefix}", Dotted(a));
        }
        None => {
            let _ = write!(out, "  address none");
        }
    }
    match n.gateway() {
        Some(g) => {
            let _ = write!(out, ", gateway {}", Dotted(g));
        }
        None => {
            let _ = write!(out, ", no gateway");
        }
    }
    let now = time::uptime_ns();
    let _ = match n.address_state() {
        AddressState::Off => writeln!(out, " (off)"),
        AddressState::Static => writeln!(out, " (static)"),
        AddressState::DhcpRequesting => writeln!(out, " (DHCP: requesting)"),
        AddressState::DhcpBound {
            server,
            lease_secs,
            since_ns,
        } => {
            let age = now.saturating_sub(since_ns) / 1_000_000_000;
            match lease_secs {
                Some(l) => writeln!(
                    out,
                    " (DHCP: bound from {}, lease {l} s, taken {age} s ago)",
                    Dotted(server)
                ),
                None => writeln!(out, " (DHCP: bound from {}, {age} s ago)", Dotted(server)),
            }
        }
    };
    let (rx, tx) = (nic_rx(nic), nic_tx(nic));
    let (queue_irqs, config_irqs) = nic.interrupts();
    let _ = writeln!(
        out,
        "  rx: {} packets, {} bytes, {} drops, {} errors",
        rx.packets, rx.bytes, rx.drops, rx.errors
    );
    let _ = writeln!(
        out,
        "  tx: {} packets, {} bytes, {} drops, {} errors",
        tx.packets, tx.bytes, tx.drops, tx.errors
    );
    let t = nic.tx_ref();
    let _ = if t.offloads_tcp() {
        writeln!(
            out,
            "  offload: TCP checksum and segmentation by the device ({} large frames segmented)",
            t.segmented()
        )
    } else {
        writeln!(
            out,
            "  offload: none (the device offers no TCP segmentation)"
        )
    };
    let r = nic.rx_ref();
    let _ = if r.offloads_tcp() {
        writeln!(
            out,
            "  receive offload: TCP segments of up to 64 KiB from the device ({} large frames received)",
            r.large_frames()
        )
    } else {
        writeln!(
            out,
            "  receive offload: none (the device offers no large receive)"
        )
    };
    let vectors: alloc::vec::Vec<alloc::string::String> = nic
        .vectors()
        .cpu_vectors
        .iter()
        .flatten()
        .map(|v| alloc::format!("{v:#x}"))
        .collect();
    let _ = writeln!(
        out,
        "  interrupts: {queue_irqs} queue, {config_irqs} link (vectors {}); {} polls; state {}",
        if vectors.is_empty() {
            alloc::string::String::from("none: polled")
        } else {
            vectors.join(" ")
        },
        n.polls(),
        match nic.state() {
            drivers::info::DeviceState::Online => alloc::string::String::from("online"),
            drivers::info::DeviceState::InitFailed(r) | drivers::info::DeviceState::Failed(r) =>
                alloc::format!("failed: {}", r.as_str()),
        }
    );
    let _ = writeln!(
        out,
        "  main loop: halted {} ms of {} ms since boot",
        crate::executor::halted_ns() / 1_000_000,
        now / 1_000_000
    );
    for (port, slots, accepted) in n.tcp_listeners() {
        let _ = writeln!(
            out,
            "  tcp listen :{port} ({slots} slots, {accepted} connections accepted)"
        );
    }
    let mut any = false;
    n.tcp_connections_info(|c| {
        any = true;
        let peer = c.peer.map_or(alloc::string::String::from("-"), |(a, p)| {
            alloc::format!("{}:{p}", Dotted(a))
        });
        let _ = writeln!(
            out,
            "  tcp :{} <- {peer} {} (recv-q {}, send-q {})",
            c.port, c.state, c.recv_queue, c.send_queue
        );
    });
    if !any {
        let _ = writeln!(out, "  no TCP connections");
    }
    if let Some(echo) = n.echo() {
        let (bytes, connections) = echo.counters();
        let _ = writeln!(
            out,
            "  echo on :{}: {bytes} bytes echoed, {connections} connections",
            echo.port()
        );
    }
}

fn nic_rx(
    nic: &drivers::virtio_net::VirtioNetPci<crate::platform::KernelHal>,
) -> drivers::virtio_net::NetCounters {
    nic.rx_counters()
}

fn nic_tx(
    nic: &drivers::virtio_net::VirtioNetPci<crate::platform::KernelHal>,
) -> drivers::virtio_net::NetCounters {
    nic.tx_counters()
}
