//! What the console's `devices` command shows: [`DeviceInfo`], plus the small fixed-capacity
//! strings it is made of and the Linux-style disk naming (`vda`, `vdb`, …, `vdz`, `vdaa`).
//!
//! Everything here is `Copy`-sized and allocation-free, so a snapshot of a device's state can be
//! taken at any time, including for devices that failed to initialise.

use crate::block::{BlockStats, Geometry};
use crate::hal::PciAddress;
use core::fmt;

/// A string of at most `N` bytes stored inline; longer input is truncated at a character
/// boundary. Also what the kernel formats console lines into where the heap must not be used
/// (`write!` into it; text past the capacity is dropped).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FixedString<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> FixedString<N> {
    /// The empty string.
    pub const fn new() -> Self {
        Self {
            bytes: [0; N],
            len: 0,
        }
    }

    /// A copy of `s`, truncated to fit.
    pub fn from_str_truncated(s: &str) -> Self {
        let mut out = Self::new();
        out.push_str(s);
        out
    }

    /// Device-provided bytes (serials, model names): stops at the first NUL, trims trailing
    /// spaces, replaces non-printable or non-ASCII bytes with `?`.
    pub fn from_device_bytes(raw: &[u8]) -> Self {
        let mut out = Self::new();
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        let raw = &raw[..end];
        let trimmed = raw
            .iter()
            .rposition(|&b| b != b' ')
            .map_or(&raw[..0], |last| &raw[..=last]);
        for &b in trimmed.iter().take(N) {
            out.bytes[out.len] = if (0x20..0x7f).contains(&b) { b } else { b'?' };
            out.len += 1;
        }
        out
    }

    /// Appends as much of `s` as fits.
    pub fn push_str(&mut self, s: &str) {
        let room = N - self.len;
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.bytes[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
    }

    /// The contents.
    pub fn as_str(&self) -> &str {
        // Only whole UTF-8 characters are ever stored (see `push_str`, `from_device_bytes`).
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }

    /// Whether the string is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<const N: usize> Default for FixedString<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> fmt::Write for FixedString<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push_str(s);
        Ok(())
    }
}

impl<const N: usize> fmt::Display for FixedString<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl<const N: usize> fmt::Debug for FixedString<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A device name such as `vda` or `nvme0n1`.
pub type DeviceName = FixedString<16>;
/// A one-line reason, e.g. why a device failed to initialise.
pub type Reason = FixedString<96>;

/// Formats `args` into a [`Reason`] (truncated to fit).
pub fn reason(args: fmt::Arguments<'_>) -> Reason {
    let mut r = Reason::new();
    // Writing into a FixedString never fails; overlong text is truncated.
    let _ = fmt::write(&mut r, args);
    r
}

/// Linux's disk naming: `prefix` + base-26 letters, `index` 0 → `a`, 25 → `z`, 26 → `aa`.
pub fn disk_name(prefix: &str, index: u32) -> DeviceName {
    let mut letters = [0u8; 8];
    let mut at = letters.len();
    let mut n = i64::from(index);
    loop {
        at -= 1;
        letters[at] = b'a' + (n % 26) as u8;
        n = n / 26 - 1;
        if n < 0 {
            break;
        }
    }
    let mut name = DeviceName::from_str_truncated(prefix);
    name.push_str(core::str::from_utf8(&letters[at..]).unwrap_or("?"));
    name
}

/// The lifecycle state of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceState {
    /// Serving I/O.
    Online,
    /// Initialisation failed; the device was left reset and is not used.
    InitFailed(Reason),
    /// Failed at run time (device error, protocol violation); outstanding requests were
    /// completed with errors and new ones are refused.
    Failed(Reason),
}

impl DeviceState {
    /// The state's one word: `online`, `init-failed` or `failed` (`--json`'s `state`).
    pub fn name(&self) -> &'static str {
        match self {
            DeviceState::Online => "online",
            DeviceState::InitFailed(_) => "init-failed",
            DeviceState::Failed(_) => "failed",
        }
    }
}

impl fmt::Display for DeviceState {
    /// The name, then the reason of a failure: `failed: queue 0 refused MSI-X vector`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceState::Online => f.write_str(self.name()),
            DeviceState::InitFailed(why) | DeviceState::Failed(why) => {
                write!(f, "{}: {why}", self.name())
            }
        }
    }
}

/// What identifies an NVMe namespace beyond its controller's serial number (NVMe Base 2.0
/// §4.5 "Namespace identification"): the namespace ID, and the globally unique identifiers
/// from Identify Namespace when the device reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamespaceIdentity {
    /// `NSID`.
    pub nsid: u32,
    /// `NGUID`, `None` when the device reports all zeroes.
    pub nguid: Option<[u8; 16]>,
    /// `EUI64`, `None` when the device reports all zeroes.
    pub eui64: Option<[u8; 8]>,
}

impl NamespaceIdentity {
    /// From Identify Namespace's fields; all-zero identifiers mean "not reported".
    pub fn new(nsid: u32, nguid: [u8; 16], eui64: [u8; 8]) -> Self {
        Self {
            nsid,
            nguid: (nguid != [0; 16]).then_some(nguid),
            eui64: (eui64 != [0; 8]).then_some(eui64),
        }
    }
}

/// Lower-case hex of `bytes`, for identifiers on the console.
pub struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// At most this many MSI-X vectors are listed per device.
pub const MAX_LISTED_VECTORS: usize = 8;

/// Description of one block device for the console.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Name, e.g. `vda`.
    pub name: DeviceName,
    /// Driver, e.g. `virtio-blk`.
    pub driver: &'static str,
    /// PCI location, if on PCI.
    pub pci: Option<PciAddress>,
    /// Model string (empty when the device has none).
    pub model: FixedString<40>,
    /// Serial number (empty when unknown or not yet read); an NVMe namespace shows its
    /// controller's.
    pub serial: FixedString<20>,
    /// NVMe namespaces: the namespace's own identity (`None` for other devices).
    pub namespace: Option<NamespaceIdentity>,
    /// Geometry; `None` when initialisation failed before it was known.
    pub geometry: Option<Geometry>,
    /// MSI-X vectors in use (the first [`MAX_LISTED_VECTORS`]).
    pub vectors: [u8; MAX_LISTED_VECTORS],
    /// Number of valid entries in `vectors`.
    pub vector_count: u8,
    /// Counters.
    pub stats: BlockStats,
    /// Requests submitted and not yet completed.
    pub in_flight: usize,
    /// Online or failed.
    pub state: DeviceState,
}

impl DeviceInfo {
    /// A description with nothing known but the name and driver.
    pub fn new(name: DeviceName, driver: &'static str) -> Self {
        Self {
            name,
            driver,
            pci: None,
            model: FixedString::new(),
            serial: FixedString::new(),
            namespace: None,
            geometry: None,
            vectors: [0; MAX_LISTED_VECTORS],
            vector_count: 0,
            stats: BlockStats::default(),
            in_flight: 0,
            state: DeviceState::Online,
        }
    }

    /// The description of a device whose initialisation failed.
    pub fn init_failed(
        name: DeviceName,
        driver: &'static str,
        pci: Option<PciAddress>,
        why: Reason,
    ) -> Self {
        Self {
            pci,
            state: DeviceState::InitFailed(why),
            ..Self::new(name, driver)
        }
    }

    /// Records the MSI-X vectors in use.
    pub fn set_vectors(&mut self, vectors: &[u8]) {
        let n = vectors.len().min(MAX_LISTED_VECTORS);
        self.vectors[..n].copy_from_slice(&vectors[..n]);
        self.vector_count = n as u8;
    }

    /// The MSI-X vectors in use.
    pub fn vectors(&self) -> &[u8] {
        &self.vectors[..usize::from(self.vector_count)]
    }
}

/// A size with a binary prefix and one decimal, cut (not rounded) so it never overstates:
/// `512 B`, `1.0 GiB`, `1023.9 KiB`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        let mut unit = 0;
        let mut div = 1u64;
        while unit + 1 < UNITS.len() && self.0 / div >= 1024 {
            div *= 1024;
            unit += 1;
        }
        if unit == 0 {
            return write!(f, "{} B", self.0);
        }
        let tenths = u128::from(self.0 % div) * 10 / u128::from(div);
        write!(f, "{}.{tenths} {}", self.0 / div, UNITS[unit])
    }
}

impl Geometry {
    /// Capacity in bytes (`u64::MAX` for a device that claims more).
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_blocks
            .saturating_mul(u64::from(self.block_size))
    }

    /// The write cache as the console names it: `write-back` (volatile: writes are durable
    /// after a flush) or `write-through`.
    pub fn cache_mode(&self) -> &'static str {
        if self.volatile_write_cache {
            "write-back"
        } else {
            "write-through"
        }
    }
}

impl fmt::Display for Geometry {
    /// The geometry as the console shows it on one line: size, blocks × block size, queues ×
    /// depth, write cache, then `fua`, `discard`, `ro` where they apply.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} x {} B) queues={}x{} cache={}{}{}{}",
            Size(self.capacity_bytes()),
            self.capacity_blocks,
            self.block_size,
            self.queue_count,
            self.queue_depth,
            self.cache_mode(),
            if self.fua { " fua" } else { "" },
            if self.discard { " discard" } else { "" },
            if self.read_only { " ro" } else { "" },
        )
    }
}

impl fmt::Display for DeviceInfo {
    /// One console line: name, driver, location, model/serial, size, queues, cache, vectors,
    /// counters, state.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<8} {:<10}", self.name, self.driver)?;
        if let Some(pci) = self.pci {
            write!(f, " {pci}")?;
        }
        if !self.model.is_empty() {
            write!(f, " model=\"{}\"", self.model)?;
        }
        if !self.serial.is_empty() {
            write!(f, " serial=\"{}\"", self.serial)?;
        }
        if let Some(ns) = &self.namespace {
            write!(f, " nsid={}", ns.nsid)?;
            if let Some(nguid) = &ns.nguid {
                write!(f, " nguid={}", Hex(nguid))?;
            }
            if let Some(eui64) = &ns.eui64 {
                write!(f, " eui64={}", Hex(eui64))?;
            }
        }
        if let Some(g) = &self.geometry {
            write!(f, " {g}")?;
        }
        if self.vector_count > 0 {
            write!(f, " msix=")?;
            for (i, v) in self.vectors().iter().enumerate() {
                write!(f, "{}{v:#04x}", if i > 0 { "," } else { "" })?;
            }
        }
        let s = &self.stats;
        write!(
            f,
            " reads={} writes={} flushes={} discards={} errors={} irqs={} inflight={}",
            s.reads, s.writes, s.flushes, s.discards, s.errors, s.interrupts, self.in_flight
        )?;
        write!(f, " {}", self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_disk_names() {
        let names: Vec<String> = [0, 1, 25, 26, 27, 51, 52, 701, 702, 18277, 18278]
            .iter()
            .map(|&i| disk_name("vd", i).to_string())
            .collect();
        assert_eq!(
            names,
            [
                "vda", "vdb", "vdz", "vdaa", "vdab", "vdaz", "vdba", "vdzz", "vdaaa", "vdzzz",
                "vdaaaa"
            ]
        );
        assert_eq!(disk_name("vd", u32::MAX).as_str().len(), 9);
    }

    #[test]
    fn fixed_strings_truncate_and_sanitise() {
        // 'é' is two bytes: it must not be split.
        let s = FixedString::<2>::from_str_truncated("héllo");
        assert_eq!(s.as_str(), "h");
        let s = FixedString::<4>::from_str_truncated("héllo");
        assert_eq!(s.as_str(), "hél");
        let serial = FixedString::<20>::from_device_bytes(b"QM0001\x01  \0garbage");
        assert_eq!(serial.as_str(), "QM0001?");
        let full = FixedString::<20>::from_device_bytes(&[b'x'; 20]);
        assert_eq!(full.as_str().len(), 20);
        let r = reason(format_args!(
            "BAR{} is not assigned, {}",
            4,
            "x".repeat(200)
        ));
        assert_eq!(r.as_str().len(), 96);
        // Formatting into one: what does not fit is dropped, whole characters only.
        use core::fmt::Write;
        let mut line = FixedString::<5>::new();
        let accent = 'é';
        write!(line, "abcd{accent}").unwrap();
        assert_eq!(line.as_str(), "abcd");
        write!(line, "{}", 1).unwrap();
        assert_eq!(line.as_str(), "abcd1");
    }

    #[test]
    fn sizes_are_cut_to_one_decimal() {
        for (bytes, text) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1024 * 1024 - 1, "1023.9 KiB"),
            (64 << 20, "64.0 MiB"),
            ((3 << 30) + (1 << 29), "3.5 GiB"),
            (u64::MAX, "15.9 EiB"),
        ] {
            assert_eq!(Size(bytes).to_string(), text, "{bytes}");
        }
    }

    #[test]
    fn geometry_line_and_capacity() {
        let mut g = Geometry {
            block_size: 4096,
            capacity_blocks: 16384,
            max_transfer_bytes: 1 << 19,
            queue_count: 2,
            queue_depth: 128,
            volatile_write_cache: false,
            fua: true,
            discard: false,
            max_discard_blocks: 0,
            read_only: true,
        };
        assert_eq!(
            g.to_string(),
            "64.0 MiB (16384 x 4096 B) queues=2x128 cache=write-through fua ro"
        );
        assert_eq!(g.capacity_bytes(), 64 << 20);
        g.capacity_blocks = u64::MAX / 512;
        assert_eq!(g.capacity_bytes(), u64::MAX, "saturates, does not wrap");
        g.volatile_write_cache = true;
        assert_eq!(g.cache_mode(), "write-back");
    }

    #[test]
    fn console_line() {
        let mut info = DeviceInfo::new(disk_name("vd", 0), "virtio-blk");
        info.pci = Some(PciAddress::new(0, 4, 0));
        info.serial = FixedString::from_str_truncated("disk0");
        info.geometry = Some(Geometry {
            block_size: 512,
            capacity_blocks: 2 * 1024 * 1024,
            max_transfer_bytes: 1 << 20,
            queue_count: 1,
            queue_depth: 85,
            volatile_write_cache: true,
            fua: false,
            discard: true,
            max_discard_blocks: 1 << 20,
            read_only: false,
        });
        info.set_vectors(&[0x30, 0x31]);
        info.stats.reads = 5;
        let line = info.to_string();
        assert_eq!(
            line,
            "vda      virtio-blk 00:04.0 serial=\"disk0\" 1.0 GiB (2097152 x 512 B) queues=1x85 \
             cache=write-back discard msix=0x30,0x31 reads=5 writes=0 flushes=0 discards=0 \
             errors=0 irqs=0 inflight=0 online"
        );
        let failed = DeviceInfo::init_failed(
            disk_name("vd", 1),
            "virtio-blk",
            None,
            reason(format_args!("queue 0 refused MSI-X vector")),
        );
        assert!(failed
            .to_string()
            .ends_with("init-failed: queue 0 refused MSI-X vector"));
        assert_eq!(failed.state.name(), "init-failed");
        let broken = DeviceState::Failed(reason(format_args!("device failed")));
        assert_eq!(
            (broken.name(), broken.to_string().as_str()),
            ("failed", "failed: device failed")
        );
        assert_eq!(DeviceState::Online.to_string(), "online");
    }
}
