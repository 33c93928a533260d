//! Harness for the QEMU tests: boots the real snapfw image (by `-kernel`, PXE or a GRUB ISO),
//! talks to its console over the emulated serial port with an expect-style API in which
//! every wait has a timeout, and turns QEMU's exit status into a verdict.
//!
//! Exit statuses: the kernel leaves through `isa-debug-exit` (iobase 0xf4) when booted with
//! `testing`; QEMU then exits with `(code << 1) | 1`: 33 for success, 35 for a panic or CPU
//! exception. A triple fault under `-no-reboot` exits 0, so 0 is only a pass where a test
//! expects an ACPI power-off.
//!
//! The image and boot artefacts come from `SNAPFW_BUILD` (default: `<workspace>/build`),
//! filled by `make build iso pxe`; `make test` does that first.
//!
//! The same harness boots a Linux guest ([`Boot::linux_guest`]: Debian's kernel and an
//! initramfs with busybox, dmsetup, fio and nbd-server, made under `build/linux-guest` by
//! `make deps`; the bench's Linux rows use it too) whose
//! console runs each line typed as a shell command ([`Qemu::shell`]), for tests that check
//! what snapfw writes against what Linux reads, and the other way round.

pub mod cow;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The console prompt.
pub const PROMPT: &str = "snapfw> ";
/// QEMU's exit status when the kernel reports success through `isa-debug-exit`.
pub const EXIT_SUCCESS: i32 = 33;
/// QEMU's exit status when the kernel reports a panic or exception.
pub const EXIT_FAILURE: i32 = 35;

/// Generous default wait: TCG on a loaded 2-core machine.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// The build folder with the image, ISO and PXE folder.
pub fn build_dir() -> PathBuf {
    match std::env::var_os("SNAPFW_BUILD") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../build"),
    }
}

/// Path of a build artefact; panics (fails the test) with a hint when it is missing.
pub fn artefact(name: &str) -> PathBuf {
    let p = build_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `make build iso pxe` (or `make test`)",
        p.display()
    );
    p
}

/// How to start the machine.
#[derive(Clone, Debug)]
pub struct Boot {
    /// `-M` machine type.
    pub machine: String,
    /// Guest memory.
    pub memory: String,
    /// Kernel command line (after the image name), for `-kernel` boots.
    pub append: String,
    /// How the image is loaded.
    pub source: Source,
    /// Extra QEMU arguments (disks, devices).
    pub extra: Vec<String>,
    /// Pass `-no-reboot` (a reset ends QEMU).
    pub no_reboot: bool,
    /// Read the console at most this many bytes per second, as a real serial line carries
    /// them (QEMU's UART otherwise sends at once): once QEMU's pipe is full the guest's
    /// transmitter waits, as on hardware. `None`: as fast as QEMU writes.
    pub serial_bytes_per_sec: Option<u32>,
    /// The machine's firmware.
    pub firmware: Firmware,
    /// TCP forwards `(host port on 127.0.0.1, guest port)` on the NIC a PXE boot uses.
    pub pxe_forwards: Vec<(u16, u16)>,
    /// PXE by the UEFI firmware's own network stack, without iPXE (the NIC's option ROM
    /// left out): DHCP's boot file is GRUB's EFI netboot image instead of `boot.ipxe`.
    pub pxe_without_ipxe: bool,
    /// QEMU runs in a network namespace of its own with a tap device (see [`Boot::tap_net`]).
    pub tap: bool,
}

/// The firmware the machine starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// QEMU's default, SeaBIOS (legacy BIOS; iPXE's BIOS ROMs for network boot).
    Bios,
    /// OVMF (UEFI, package `ovmf`): its code read-only, its variable store a copy made for
    /// this run and removed with it (the package's file is never written); iPXE's EFI ROMs
    /// for network boot.
    Uefi,
}

/// OVMF's code and its pristine variable store (Debian's 4 MiB build, else the 2 MiB one).
pub fn ovmf_files() -> (PathBuf, PathBuf) {
    for (code, vars) in [
        ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"),
        ("OVMF_CODE.fd", "OVMF_VARS.fd"),
    ] {
        let dir = std::path::Path::new("/usr/share/OVMF");
        if dir.join(code).exists() && dir.join(vars).exists() {
            return (dir.join(code), dir.join(vars));
        }
    }
    panic!("OVMF is missing (/usr/share/OVMF): run `make deps` (package ovmf)");
}

/// Where the image comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// `-kernel build/snapfw.elf`.
    Kernel,
    /// `-cdrom build/snapfw.iso`.
    Iso,
    /// `-boot n` from QEMU's built-in TFTP server serving `build/pxe`.
    Pxe,
    /// Another kernel: `-kernel KERNEL -initrd INITRD -append APPEND`.
    Linux {
        /// The kernel image (bzImage).
        kernel: PathBuf,
        /// The initramfs.
        initrd: PathBuf,
    },
}

/// The host's address on a [`Boot::tap_net`] link.
pub const TAP_HOST: &str = "10.9.0.1";
/// The address a [`Boot::tap_net`] appliance is given (`ip=10.9.0.2/24`).
pub const TAP_GUEST: &str = "10.9.0.2";

/// What the Linux guest's `/init` prints once its modules are loaded and it reads commands.
pub const LINUX_READY: &str = "linux-guest: ready";

impl Default for Boot {
    fn default() -> Self {
        Boot {
            machine: "q35".into(),
            memory: "512M".into(),
            append: "testing loglevel=info".into(),
            source: Source::Kernel,
            extra: Vec::new(),
            no_reboot: true,
            serial_bytes_per_sec: None,
            firmware: Firmware::Bios,
            pxe_forwards: Vec::new(),
            pxe_without_ipxe: false,
            tap: false,
        }
    }
}

impl Boot {
    /// `-kernel` boot on `machine` with `append`.
    pub fn kernel(machine: &str, append: &str) -> Boot {
        Boot {
            machine: machine.into(),
            append: append.into(),
            ..Boot::default()
        }
    }

    /// The Linux guest of the interop tests: `build/linux-guest/vmlinuz` and `initramfs.gz`
    /// (made by `make deps`: scripts/deps.sh and scripts/linux-initramfs.sh), console on
    /// ttyS0. Its `/init` loads the virtio-blk, virtio-net and dm-snapshot modules, gives a
    /// NIC ([`Boot::net`]) the address QEMU user networking forwards to (10.0.2.15), prints
    /// [`LINUX_READY`], then runs each line read from the console as a shell command; drive it
    /// with [`Qemu::wait_linux`] and [`Qemu::shell`].
    pub fn linux_guest() -> Boot {
        let dir = build_dir().join("linux-guest");
        let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initramfs.gz"));
        for p in [&kernel, &initrd] {
            assert!(
                p.exists(),
                "{} is missing: run `make deps` (it fetches Debian's kernel, dmsetup and busybox \
                 and packs the guest's initramfs)",
                p.display()
            );
        }
        Boot {
            append: "console=ttyS0,115200 panic=-1 loglevel=4".into(),
            source: Source::Linux { kernel, initrd },
            ..Boot::default()
        }
    }

    /// Adds QEMU arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Boot {
        self.extra.extend(args.into_iter().map(Into::into));
        self
    }

    /// A console read at the pace of a real serial line of `baud` (8N1: ten bits a byte).
    pub fn serial_baud(mut self, baud: u32) -> Boot {
        self.serial_bytes_per_sec = Some(baud / 10);
        self
    }

    /// Sets the guest memory size (`-m`).
    pub fn memory_size(mut self, size: &str) -> Boot {
        self.memory = size.into();
        self
    }

    /// Opens a QMP socket at `path` (see [`qmp`]) for monitor commands such as
    /// `block_resize`.
    pub fn qmp(self, path: &std::path::Path) -> Boot {
        self.args([
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", path.display()),
        ])
    }

    /// Attaches a raw image as a virtio-blk disk (`cache=none`, so guest writes reach the
    /// file and host writes are seen by the guest).
    pub fn virtio_disk(self, image: &std::path::Path, serial: &str) -> Boot {
        let id = format!("d{}", self.extra.len());
        self.args([
            "-drive".to_string(),
            format!(
                "file={},if=none,format=raw,id={id},cache=none,aio=threads",
                image.display()
            ),
            "-device".to_string(),
            format!("virtio-blk-pci,drive={id},serial={serial}"),
        ])
    }

    /// Attaches an NVMe controller with one namespace per image (NSID 1, 2, …);
    /// `write_cache` sets each namespace's volatile write cache (`on`/`off`).
    pub fn nvme(self, serial: &str, namespaces: &[(&std::path::Path, &str)]) -> Boot {
        let ctrl = format!("nvme{}", self.extra.len());
        let mut args = vec![
            "-device".to_string(),
            format!("nvme,id={ctrl},serial={serial}"),
        ];
        for (n, (image, write_cache)) in namespaces.iter().enumerate() {
            let id = format!("{ctrl}ns{}", n + 1);
            args.push("-drive".into());
            args.push(format!(
                "file={},if=none,format=raw,id={id},cache=none,aio=threads",
                image.display()
            ));
            args.push("-device".into());
            args.push(format!(
                "nvme-ns,drive={id},bus={ctrl},nsid={},write-cache={write_cache}",
                n + 1
            ));
        }
        self.args(args)
    }

    /// Adds a virtio-net NIC on QEMU user networking (slirp: DHCP gives 10.0.2.15, gateway
    /// 10.0.2.2) with TCP forwards from `127.0.0.1:host` to the guest's `guest` port (at
    /// `guest_addr`, default 10.0.2.15). Only loopback is exposed on the host.
    pub fn net(self, forwards: &[(u16, u16)], guest_addr: Option<&str>) -> Boot {
        let mut netdev = String::from("user,id=n0");
        for (host, guest) in forwards {
            netdev.push_str(&format!(
                ",hostfwd=tcp:127.0.0.1:{host}-{}:{guest}",
                guest_addr.unwrap_or("")
            ));
        }
        self.args([
            "-netdev".to_string(),
            netdev,
            "-device".to_string(),
            "virtio-net-pci,netdev=n0".to_string(),
        ])
    }

    /// Adds a virtio-net NIC on a tap backend (`vnet_hdr`, so the device offers checksum
    /// and segmentation offload, which user networking does not): QEMU runs in a network
    /// namespace of its own (`unshare --user --map-root-user --net`), where the tap device
    /// `tap0` has [`TAP_HOST`]/24; the appliance should be given `ip=` [`TAP_GUEST`]/24.
    /// Clients reach it through [`Qemu::in_netns`]. Nothing on the host's own network
    /// changes, and no privileges are needed where user namespaces are allowed.
    pub fn tap_net(mut self) -> Boot {
        self.tap = true;
        self.args([
            "-netdev".to_string(),
            "tap,id=n0,ifname=tap0,script=no,downscript=no".to_string(),
            "-device".to_string(),
            "virtio-net-pci,netdev=n0".to_string(),
        ])
    }

    /// Boots under UEFI (OVMF) instead of the BIOS.
    pub fn uefi(mut self) -> Boot {
        self.firmware = Firmware::Uefi;
        self
    }

    /// Starts QEMU.
    pub fn start(&self) -> Qemu {
        let accel = std::env::var("ACCEL").unwrap_or_else(|_| "tcg".into());
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", &accel, "-M", &self.machine, "-m", &self.memory]);
        let mut scratch = None;
        if self.firmware == Firmware::Uefi {
            let (code, vars) = ovmf_files();
            let dir = std::env::temp_dir().join(format!(
                "snapfw-ovmf-{}-{}",
                std::process::id(),
                NEXT_SCRATCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).expect("OVMF scratch folder");
            let copy = dir.join("vars.fd");
            std::fs::copy(&vars, &copy).expect("copy OVMF's variable store");
            cmd.arg("-drive").arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                code.display()
            ));
            cmd.arg("-drive").arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                copy.display()
            ));
            scratch = Some(dir);
        }
        cmd.args(["-display", "none", "-monitor", "none", "-serial", "stdio"]);
        cmd.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
        if self.no_reboot {
            // QEMU 7.2 can only reset or exit on a reset: a reset ends QEMU with status 0,
            // like a power-off, so power-off tests also require the "powering off" line.
            cmd.arg("-no-reboot");
        }
        match self.source {
            Source::Kernel => {
                cmd.arg("-kernel").arg(artefact("snapfw.elf"));
                cmd.args(["-append", &self.append]);
            }
            Source::Iso => {
                cmd.arg("-cdrom").arg(artefact("snapfw.iso"));
                cmd.args(["-boot", "d"]);
            }
            Source::Pxe => {
                let dir = artefact("pxe");
                cmd.args(["-boot", "n"]);
                let (bootfile, rom) = if self.pxe_without_ipxe {
                    ("boot/grub/x86_64-efi/core.efi", ",romfile=")
                } else {
                    ("boot.ipxe", "")
                };
                let mut netdev = format!("user,id=net0,tftp={},bootfile={bootfile}", dir.display());
                for (host, guest) in &self.pxe_forwards {
                    netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
                }
                cmd.arg("-netdev").arg(netdev);
                // OVMF boots by the boot order QEMU gives it, not by `-boot`.
                cmd.arg("-device")
                    .arg(format!("virtio-net-pci,netdev=net0,bootindex=1{rom}"));
            }
            Source::Linux {
                ref kernel,
                ref initrd,
            } => {
                cmd.arg("-kernel").arg(kernel).arg("-initrd").arg(initrd);
                cmd.args(["-append", &self.append]);
            }
        }
        cmd.args(&self.extra);
        if self.tap {
            // The same QEMU, started by a shell in a new network namespace once its tap
            // device is up (`exec` keeps the process id: `/proc/PID/ns/net` is the namespace).
            let mut wrapped = Command::new("unshare");
            wrapped.args(["--user", "--map-root-user", "--net", "--", "sh", "-c"]);
            wrapped.arg(format!(
                "ip link set lo up && ip tuntap add dev tap0 mode tap && \
                 ip addr add {TAP_HOST}/24 dev tap0 && ip link set tap0 up && exec \"$@\""
            ));
            wrapped
                .arg("sh")
                .arg(cmd.get_program())
                .args(cmd.get_args());
            cmd = wrapped;
        }
        let mut q = Qemu::spawn(cmd, self.serial_bytes_per_sec);
        q.scratch = scratch;
        q
    }
}

struct Output {
    bytes: Vec<u8>,
    closed: bool,
}

/// A running QEMU with its serial console.
pub struct Qemu {
    child: Child,
    stdin: Option<ChildStdin>,
    output: Arc<(Mutex<Output>, Condvar)>,
    /// Bytes before this offset have been consumed by `expect`.
    cursor: usize,
    started: Instant,
    /// A folder of this run's files (OVMF's variable store), removed with it.
    scratch: Option<PathBuf>,
}

static NEXT_SCRATCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Qemu {
    fn spawn(mut cmd: Command, bytes_per_sec: Option<u32>) -> Qemu {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .expect("cannot start qemu-system-x86_64 (run `make deps`)");
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let output = Arc::new((
            Mutex::new(Output {
                bytes: Vec::new(),
                closed: false,
            }),
            Condvar::new(),
        ));
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Paced: small reads, each followed by the time the line takes to carry it.
            let (chunk, pace) = match bytes_per_sec {
                Some(rate) => (64, Some(rate.max(1))),
                None => (buf.len(), None),
            };
            loop {
                let n = stdout.read(&mut buf[..chunk]).unwrap_or(0);
                if let Some(rate) = pace {
                    std::thread::sleep(Duration::from_micros(
                        n as u64 * 1_000_000 / u64::from(rate),
                    ));
                }
                let (lock, cond) = &*sink;
                let mut out = lock.lock().unwrap();
                if n == 0 {
                    out.closed = true;
                    cond.notify_all();
                    return;
                }
                out.bytes.extend_from_slice(&buf[..n]);
                cond.notify_all();
            }
        });
        let stdin = child.stdin.take();
        Qemu {
            child,
            stdin,
            output,
            cursor: 0,
            started: Instant::now(),
            scratch: None,
        }
    }

    /// A command that runs `program` with `args` in QEMU's network namespace (a
    /// [`Boot::tap_net`] boot), as the same user.
    pub fn in_netns(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["--target", &self.child.id().to_string()]);
        cmd.args(["--user", "--net", "--preserve-credentials", "--"]);
        cmd.arg(program).args(args);
        cmd
    }

    /// The QEMU process's id (for `/proc` figures such as its threads' CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the console printed so far.
    pub fn transcript(&self) -> String {
        String::from_utf8_lossy(&self.output.0.lock().unwrap().bytes).into_owned()
    }

    /// Time since QEMU was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for `pattern` after the cursor; returns the text up to and including it and
    /// moves the cursor past it. Fails the test with the transcript on timeout or exit.
    pub fn expect(&mut self, pattern: &str, timeout: Duration) -> String {
        match self.try_expect(pattern, timeout) {
            Ok(s) => s,
            Err(why) => panic!(
                "waiting for {pattern:?}: {why}\n--- console transcript ---\n{}\n--- end ---",
                self.transcript()
            ),
        }
    }

    /// As [`expect`](Self::expect) but returns an error instead of failing.
    pub fn try_expect(&mut self, pattern: &str, timeout: Duration) -> Result<String, String> {
        self.try_expect_by(timeout, |bytes| {
            find(bytes, pattern.as_bytes()).map(|pos| pos + pattern.len())
        })
    }

    /// Waits until `matcher` finds what it looks for in the output not consumed yet (it
    /// returns where the match ends), consumes the output up to there and returns it.
    fn try_expect_by(
        &mut self,
        timeout: Duration,
        matcher: impl Fn(&[u8]) -> Option<usize>,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.output;
        let mut out = lock.lock().unwrap();
        loop {
            if let Some(len) = matcher(&out.bytes[self.cursor..]) {
                let end = self.cursor + len;
                let text = String::from_utf8_lossy(&out.bytes[self.cursor..end]).into_owned();
                self.cursor = end;
                return Ok(text);
            }
            if out.closed {
                return Err("QEMU exited".into());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("timed out after {timeout:?}"));
            }
            out = cond.wait_timeout(out, deadline - now).unwrap().0;
        }
    }

    /// The SHA-256 that `checksum VOLUME` prints (64 hex digits); panics with the output
    /// when the command printed none.
    pub fn checksum(&mut self, volume: &str) -> String {
        let out = self.command_timeout(&format!("checksum {volume}"), TIMEOUT * 2);
        result_line(&out)
            .split_whitespace()
            .next()
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .unwrap_or_else(|| panic!("checksum {volume}: no checksum in {out:?}"))
            .to_string()
    }

    /// Waits for the DHCP lease and the NBD listener, then for the console to settle.
    pub fn wait_nbd_serving(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let t = self.transcript();
            if t.contains("net: DHCP lease") && t.contains("nbd: serving every volume on TCP port")
            {
                break;
            }
            assert!(Instant::now() < deadline, "NBD not serving:\n{t}");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.settle(Duration::from_millis(300));
    }

    /// What every deployed boot must show: `protocol` in the boot log (e.g. `(Multiboot2)`),
    /// ACPI found, `devices` listing `disks`, and the NBD server serving `exports` to
    /// `nbdinfo` through the forward from host port `nbd_port`.
    pub fn check_deployed(
        &mut self,
        protocol: &str,
        disks: &[&str],
        exports: &[&str],
        nbd_port: u16,
    ) {
        let boot_log = self.transcript();
        assert!(boot_log.contains(protocol), "{protocol}:\n{boot_log}");
        assert!(
            boot_log.contains("INFO  ACPI ") && !boot_log.contains("no ACPI RSDP"),
            "ACPI found:\n{boot_log}"
        );
        let devices = self.command("devices");
        for disk in disks {
            assert!(devices.contains(disk), "{disk} in devices: {devices}");
        }
        self.wait_nbd_serving();
        let out = Command::new("nbdinfo")
            .args(["--list", &format!("nbd://127.0.0.1:{nbd_port}")])
            .output()
            .expect("nbdinfo (run `make deps`)");
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "nbdinfo --list: {out:?}");
        for export in exports {
            assert!(
                listing.contains(&format!("export=\"{export}\"")),
                "{export} served: {listing}"
            );
        }
    }

    /// Waits until the console has been quiet for `quiet` (at most [`TIMEOUT`]), then skips
    /// everything printed so far, so the next `expect` sees only new output.
    pub fn settle(&mut self, quiet: Duration) {
        let deadline = Instant::now() + TIMEOUT;
        let mut seen = usize::MAX;
        loop {
            let len = self.output.0.lock().unwrap().bytes.len();
            if len == seen || Instant::now() >= deadline {
                self.cursor = len;
                return;
            }
            seen = len;
            std::thread::sleep(quiet);
        }
    }

    /// Sends raw bytes to the console.
    pub fn send(&mut self, bytes: &[u8]) {
        if let Some(stdin) = self.stdin.as_mut() {
            // A write error means QEMU is gone; the next expect reports that.
            let _ = stdin.write_all(bytes).and_then(|_| stdin.flush());
        }
    }

    /// Waits for the first prompt.
    pub fn wait_prompt(&mut self) -> String {
        self.expect(PROMPT, TIMEOUT)
    }

    /// Types `line` and Enter, waits for the next prompt, and returns what the command
    /// printed (without the echoed line and the prompt), with `\r` removed.
    pub fn command(&mut self, line: &str) -> String {
        self.command_timeout(line, TIMEOUT)
    }

    /// [`command`](Self::command) with its own timeout.
    pub fn command_timeout(&mut self, line: &str, timeout: Duration) -> String {
        self.send(line.as_bytes());
        self.send(b"\r");
        // The echo ends with the line's last characters and the newline of Enter. Log lines
        // printed meanwhile end in newlines too, and the editor redraws the line around them
        // (and scrolls a line wider than the terminal), so the echo is looked for in the
        // output as the terminal shows it: without control sequences and carriage returns.
        let tail: String = {
            let mut t: Vec<char> = line.chars().rev().take(12).collect();
            t.reverse();
            t.into_iter().collect()
        };
        let echo = format!("{tail}\n");
        if let Err(why) = self.try_expect_by(timeout, |bytes| find_shown(bytes, echo.as_bytes())) {
            panic!(
                "waiting for the echo of {line:?}: {why}\n--- console transcript ---\n{}\n--- end ---",
                self.transcript()
            );
        }
        let text = self.expect(PROMPT, timeout);
        let text = text.replace('\r', "");
        text.strip_suffix(PROMPT).unwrap_or(&text).to_string()
    }

    /// Waits until the Linux guest ([`Boot::linux_guest`]) reads commands; returns its
    /// ready line (kernel release and disks).
    pub fn wait_linux(&mut self, timeout: Duration) -> String {
        self.expect(LINUX_READY, timeout);
        self.expect("\n", timeout).trim().to_string()
    }

    /// Runs one line as a shell command in the Linux guest and returns what it printed
    /// (stdout and stderr, with `\r` removed, plus any kernel messages in between) and its
    /// exit status. Fails the test on timeout.
    pub fn shell(&mut self, line: &str, timeout: Duration) -> (String, i32) {
        assert!(!line.contains('\n'), "one line at a time: {line:?}");
        // The end marker is assembled by printf, so an echo of the line cannot match it.
        self.send(format!("{line}; printf '\\n@@%s %d@@\\n' END $?\n").as_bytes());
        let out = self.expect("@@END ", timeout);
        let status = self.expect("@@", timeout);
        let out = out.strip_suffix("@@END ").unwrap_or(&out).replace('\r', "");
        let code = status.trim_end_matches("@@").trim().parse().unwrap_or(-1);
        (out.trim_matches('\n').to_string(), code)
    }

    /// Waits for QEMU to exit; returns its exit status, or fails on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for qemu") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "QEMU did not exit within {timeout:?}\n--- console transcript ---\n{}",
                    self.transcript()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Types `poweroff` and checks that ACPI soft-off ends QEMU with status 0.
    pub fn poweroff(mut self) {
        self.send(b"poweroff\r");
        self.expect("powering off", TIMEOUT);
        let status = self.wait_exit(TIMEOUT);
        assert_eq!(
            status.code(),
            Some(0),
            "ACPI power-off should end QEMU with status 0"
        );
    }

    /// Kills QEMU at once (a power cut).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = self.scratch.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A scratch disk image, removed when dropped.
pub struct Image {
    /// Where it is.
    pub path: PathBuf,
}

impl Image {
    /// A sparse raw image of `bytes` bytes, named after the test.
    pub fn new(name: &str, bytes: u64) -> Image {
        let dir = std::env::temp_dir().join(format!("snapfw-tests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(format!("{name}.img"));
        let f = std::fs::File::create(&path).expect("create image");
        f.set_len(bytes).expect("size image");
        Image { path }
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::File::open(&self.path).expect("open image");
        f.seek(SeekFrom::Start(offset)).expect("seek");
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf).expect("read image");
        buf
    }

    /// Writes `data` at `offset` (and syncs).
    pub fn write(&self, offset: u64, data: &[u8]) {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .expect("open image");
        f.seek(SeekFrom::Start(offset)).expect("seek");
        f.write_all(data).expect("write image");
        f.sync_all().expect("sync image");
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // The last image of this test process removes the folder (fails while others remain).
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The line of a command's output that carries its result, after the progress lines a task
/// redraws (each starts with `ESC [K`).
pub fn result_line(out: &str) -> &str {
    out.rsplit("\x1b[K").next().unwrap_or(out).trim()
}

/// The number after the first `"key":` in `json` (the console's compact JSON, or a client's
/// with a space after the colon); panics, showing `json`, where there is none.
pub fn json_u64(json: &str, key: &str) -> u64 {
    let pat = format!("\"{key}\":");
    json.find(&pat)
        .map(|at| json[at + pat.len()..].trim_start())
        .and_then(|rest| {
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        })
        .unwrap_or_else(|| panic!("no number for {key} in {json}"))
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for QEMU's `hostfwd`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Where `needle` ends in `raw` once CSI sequences (`ESC [` … final byte) and carriage
/// returns are taken out, as an offset into `raw`.
fn find_shown(raw: &[u8], needle: &[u8]) -> Option<usize> {
    let mut shown = Vec::with_capacity(raw.len());
    let mut ends = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            0x1b if raw.get(i + 1) == Some(&b'[') => {
                i += 2;
                while i < raw.len() && !(0x40..=0x7e).contains(&raw[i]) {
                    i += 1;
                }
                i += 1;
            }
            b'\r' => i += 1,
            b => {
                shown.push(b);
                i += 1;
                ends.push(i);
            }
        }
    }
    shown
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| ends[p + needle.len() - 1])
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Deterministic pseudo-random test bytes (xorshift64 from `seed`).
pub fn xorshift_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Runs one QMP command (JSON text, e.g. `{"execute":"block_resize","arguments":{...}}`)
/// on the socket a [`Boot::qmp`] QEMU listens on; returns QEMU's answer line.
pub fn qmp(path: &std::path::Path, command: &str) -> String {
    use std::io::BufRead;
    let stream = std::os::unix::net::UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("QMP socket {}: {e}", path.display()));
    stream.set_read_timeout(Some(TIMEOUT)).expect("QMP timeout");
    let mut reader = std::io::BufReader::new(stream.try_clone().expect("QMP stream"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("QMP greeting");
    let mut w = stream;
    for cmd in [r#"{"execute":"qmp_capabilities"}"#, command] {
        writeln!(w, "{cmd}").expect("QMP write");
        loop {
            line.clear();
            reader.read_line(&mut line).expect("QMP answer");
            // Skip asynchronous events.
            if line.contains("\"return\"") || line.contains("\"error\"") {
                break;
            }
        }
    }
    line
}

/// The `nbd://` URL of `export` on the appliance's forwarded port.
pub fn nbd_uri(port: u16, export: &str) -> String {
    format!("nbd://127.0.0.1:{port}/{export}")
}

/// Runs a host tool (qemu-utils, libnbd-bin: `make deps` installs them).
pub fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (make deps): {e}"))
}

/// [`run`], which must succeed; its standard output.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `qemu-io` (qemu-utils) on NBD export `export` at `127.0.0.1:port` with these `-c`
/// commands; its status and its output (stdout then stderr).
pub fn qemu_io(port: u16, export: &str, commands: &[&str]) -> (bool, String) {
    qemu_io_with(port, export, &[], commands)
}

/// [`qemu_io`] opening the export read-only (`-r`).
pub fn qemu_io_read_only(port: u16, export: &str, commands: &[&str]) -> (bool, String) {
    qemu_io_with(port, export, &["-r"], commands)
}

fn qemu_io_with(port: u16, export: &str, flags: &[&str], commands: &[&str]) -> (bool, String) {
    let mut args: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    args.extend(["-f".to_string(), "raw".to_string()]);
    for c in commands {
        args.push("-c".into());
        args.push((*c).into());
    }
    args.push(format!("nbd://127.0.0.1:{port}/{export}"));
    let o = std::process::Command::new("qemu-io")
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-io (make deps): {e}"));
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::{find_shown, json_u64};

    #[test]
    fn json_numbers_are_found_with_or_without_a_space() {
        assert_eq!(json_u64(r#"{"a":{"used":12},"used":3}"#, "used"), 12);
        assert_eq!(
            json_u64(r#"{ "export-size": 4194304, "x": 1 }"#, "export-size"),
            4194304
        );
        assert_eq!(json_u64(r#"{"n":7}"#, "n"), 7);
        let missing = std::panic::catch_unwind(|| json_u64(r#"{"n":"7"}"#, "n"));
        assert!(missing.is_err(), "a string is not a number");
        assert!(std::panic::catch_unwind(|| json_u64("{}", "n")).is_err());
    }

    /// What the line editor printed for `cmdline` + Enter with a log line arriving while it
    /// was typed (captured from `kernel::console::editor`): the echo is found after the log
    /// line's own newline, at the newline of Enter.
    #[test]
    fn the_echo_is_found_behind_a_log_line_and_redraws() {
        let raw = b"\rsnapfw> \x1b[K\r\x1b[8Ccmd\r\x1b[K[ 1.0] INFO  net: DHCP lease\r\n\rsnapfw> cmd\x1b[K\r\x1b[11Cline\r\nout";
        let end = find_shown(raw, b"cmdline\n").expect("echo found");
        assert_eq!(&raw[end..], b"out");
        // The log line alone does not pass for the echo.
        assert_eq!(find_shown(&raw[..60], b"cmdline\n"), None);
    }

    /// A line wider than the terminal is scrolled: its end is still shown before Enter.
    #[test]
    fn the_echo_of_a_scrolled_line_is_its_end() {
        let raw = b"\rsnapfw> xxxxbench snapshot --fsync 32 --time 5s\x1b[K\r\x1b[78C\r\nreport";
        let end = find_shown(raw, b"--time 5s\n").expect("echo found");
        assert_eq!(&raw[end..], b"report");
    }
}
