//! The network: the real image with a virtio-net NIC on QEMU user networking. DHCP from
//! QEMU's built-in server, a static `ip=`, TCP round trips through `hostfwd` (loopback only)
//! to the appliance's echo service, several clients at once, reconnects, and bad or missing
//! configuration.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tests::{free_port, Boot, Qemu, TIMEOUT};

const ECHO_PORT: u16 = 7777;

/// Waits for the DHCP lease (its log line redraws the prompt, so commands wait for it and
/// for the console to settle), then returns what `net` shows.
fn wait_dhcp(q: &mut Qemu) -> String {
    let deadline = Instant::now() + TIMEOUT;
    while !q.transcript().contains("net: DHCP lease") {
        assert!(
            Instant::now() < deadline,
            "no DHCP lease:\n{}",
            q.transcript()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    q.settle(Duration::from_millis(300));
    let net = q.command("net");
    assert!(net.contains("DHCP: bound from 10.0.2.2"), "{net}");
    net
}

/// Connects to the forwarded port (slirp accepts before the guest does, so retry until the
/// guest answers), sends `data` while reading, and returns what came back.
fn echo_round_trip(port: u16, data: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to hostfwd");
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    let mut reader = stream.try_clone().expect("clone stream");
    let want = data.len();
    let reading = std::thread::spawn(move || {
        let mut got = Vec::with_capacity(want);
        let mut buf = vec![0u8; 64 * 1024];
        while got.len() < want {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("reading the echo after {} bytes: {e}", got.len()),
            }
        }
        got
    });
    stream.write_all(data).expect("send to echo");
    let got = reading.join().expect("reader thread");
    let _ = stream.shutdown(std::net::Shutdown::Both);
    got
}

/// Heap allocations since boot, from `mem --json`.
fn allocations(q: &mut Qemu) -> u64 {
    tests::json_u64(&q.command("mem --json"), "allocations")
}

fn start_echo(q: &mut Qemu) {
    let out = q.command(&format!("net echo {ECHO_PORT}"));
    assert!(
        out.contains(&format!("echo service on TCP port {ECHO_PORT}")),
        "{out}"
    );
}

#[test]
fn dhcp_address_and_tcp_echo() {
    let port = free_port();
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .net(&[(port, ECHO_PORT)], None)
        .start();
    q.wait_prompt();
    let net = wait_dhcp(&mut q);
    assert!(net.contains("address 10.0.2.15/24"), "{net}");
    assert!(net.contains("gateway 10.0.2.2"), "{net}");
    assert!(net.contains("MAC 52:54:00:12:34:56"), "{net}");
    assert!(net.contains("link up"), "{net}");
    assert!(net.contains("no TCP connections"), "{net}");
    assert!(q.command("help").contains("net [echo PORT]"));

    start_echo(&mut q);
    // Heap allocations: what `mem` itself costs, then the same with a transfer in between:
    // the packet path and the echo service allocate nothing.
    let a0 = allocations(&mut q);
    let a1 = allocations(&mut q);
    let data = tests::xorshift_bytes(1 << 20, 1);
    let got = echo_round_trip(port, &data);
    assert_eq!(got.len(), data.len(), "echo returned a short stream");
    assert!(got == data, "echoed bytes differ");
    let a2 = allocations(&mut q);
    assert_eq!(a2 - a1, a1 - a0, "the network path allocated on the heap");

    // A second connection is served by a slot that listens again.
    let data2 = tests::xorshift_bytes(100_000, 2);
    assert!(echo_round_trip(port, &data2) == data2);

    let net = q.command("net");
    assert!(
        net.contains("tcp listen :7777 (8 slots, 2 connections accepted)"),
        "{net}"
    );
    assert!(
        net.contains(&format!(
            "echo on :7777: {} bytes echoed",
            data.len() + data2.len()
        )),
        "{net}"
    );
    let rx_packets: u64 = net
        .lines()
        .find_map(|l| l.trim().strip_prefix("rx: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        rx_packets > 700,
        "1.1 MB in needs hundreds of frames: {net}"
    );
    assert!(net.contains("0 errors"), "{net}");
    q.poweroff();
}

#[test]
fn several_clients_at_once() {
    let port = free_port();
    let mut q = Boot::kernel("q35", "testing loglevel=info")
        .net(&[(port, ECHO_PORT)], None)
        .start();
    q.wait_prompt();
    wait_dhcp(&mut q);
    start_echo(&mut q);
    let clients: Vec<_> = (0..4u64)
        .map(|i| {
            std::thread::spawn(move || {
                let data = tests::xorshift_bytes(300_000 + i as usize * 1000, 10 + i);
                let got = echo_round_trip(port, &data);
                got == data
            })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        assert!(
            c.join().expect("client thread"),
            "client {i} got other bytes"
        );
    }
    let net = q.command("net");
    assert!(net.contains("4 connections accepted"), "{net}");
    q.poweroff();
}

#[test]
fn static_address_from_the_command_line() {
    let port = free_port();
    let mut q = Boot::kernel("q35", "testing loglevel=info ip=10.0.2.20/24,10.0.2.2")
        .net(&[(port, ECHO_PORT)], Some("10.0.2.20"))
        .start();
    q.wait_prompt();
    let net = q.command("net");
    assert!(
        net.contains("address 10.0.2.20/24, gateway 10.0.2.2 (static)"),
        "{net}"
    );
    start_echo(&mut q);
    // The forward targets 10.0.2.20: the round trip works only if that is our address.
    let data = tests::xorshift_bytes(200_000, 3);
    assert!(echo_round_trip(port, &data) == data);
    q.poweroff();
}

#[test]
fn bad_ip_falls_back_to_dhcp_and_no_nic_is_reported() {
    let mut q = Boot::kernel("q35", "testing loglevel=info ip=10.0.2.20/24,10.9.9.9")
        .net(&[], None)
        .start();
    q.wait_prompt();
    assert!(
        q.transcript().contains(
            "ignoring 'ip=10.0.2.20/24,10.9.9.9': gateway 10.9.9.9 is outside 10.0.2.20/24"
        ),
        "{}",
        q.transcript()
    );
    let net = wait_dhcp(&mut q);
    assert!(net.contains("address 10.0.2.15/24"), "{net}");
    let e = q.command("net echo 0");
    assert!(e.contains("error: net echo needs a port 1..65535"), "{e}");
    let e = q.command("net frob");
    assert!(e.contains("unknown net subcommand 'frob'"), "{e}");
    q.poweroff();

    let mut q = Boot::kernel("q35", "testing loglevel=info").start();
    q.wait_prompt();
    assert!(q.command("net").contains("no network"));
    q.poweroff();

    let mut q = Boot::kernel("q35", "testing loglevel=info ip=off")
        .net(&[], None)
        .start();
    q.wait_prompt();
    assert!(q.command("net").contains("no network"));
    q.poweroff();
}
