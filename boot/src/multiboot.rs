//! Parsing of the Multiboot 1 (spec 0.6.96 §3.3) and Multiboot 2 (spec 2.0 §3.6) boot
//! information into a [`BootInfo`] that owns copies of everything the kernel needs: the
//! command line, the boot loader's name, the memory map (Multiboot 2: the BIOS-style map, or
//! the EFI memory map when that is all the loader passes) and (Multiboot 2) the ACPI RSDP
//! copies of both tags, and whether the firmware is UEFI.
//!
//! Memory is read through [`PhysMem`], so the parser runs on the host against fake memory
//! and, on the appliance, against identity-mapped physical memory. Nothing here allocates:
//! it runs before the heap exists. Malformed information yields a [`BootError`] or is
//! skipped, never a panic.

/// Magic in EAX when a Multiboot 1 loader jumps to the image.
pub const MULTIBOOT1_MAGIC: u32 = 0x2BAD_B002;
/// Magic in EAX when a Multiboot 2 loader jumps to the image.
pub const MULTIBOOT2_MAGIC: u32 = 0x36D7_6289;

/// Longest command line kept; longer ones are cut and flagged.
pub const CMDLINE_MAX: usize = 1024;
/// Most memory-map entries kept (after merging neighbours of the same kind: EFI maps list
/// many small ranges of the same use).
pub const MAX_REGIONS: usize = 128;
const LOADER_NAME_MAX: usize = 64;
/// Largest Multiboot 2 information block accepted.
const MB2_MAX_TOTAL: u32 = 1 << 20;

/// Read access to physical memory.
pub trait PhysMem {
    /// Fills `buf` from physical address `addr`; returns false when the range is not readable.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;
}

/// Which boot protocol started the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Multiboot 1 (QEMU `-kernel`, iPXE, GRUB `multiboot`).
    Multiboot1,
    /// Multiboot 2 (GRUB `multiboot2`).
    Multiboot2,
}

/// What a memory-map entry describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// RAM free for the operating system.
    Usable,
    /// Reserved by firmware or hardware.
    Reserved,
    /// ACPI tables; usable once read.
    AcpiReclaimable,
    /// ACPI non-volatile storage; must be preserved.
    AcpiNvs,
    /// Defective RAM.
    Bad,
}

impl RegionKind {
    fn from_type(kind: u32) -> RegionKind {
        match kind {
            1 => RegionKind::Usable,
            3 => RegionKind::AcpiReclaimable,
            4 => RegionKind::AcpiNvs,
            5 => RegionKind::Bad,
            _ => RegionKind::Reserved,
        }
    }

    /// A short name for listings.
    pub fn name(self) -> &'static str {
        match self {
            RegionKind::Usable => "usable",
            RegionKind::Reserved => "reserved",
            RegionKind::AcpiReclaimable => "acpi-reclaimable",
            RegionKind::AcpiNvs => "acpi-nvs",
            RegionKind::Bad => "bad",
        }
    }
}

/// One memory-map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    /// First physical address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the range holds.
    pub kind: RegionKind,
}

/// Why the boot information could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootError {
    /// EAX held neither Multiboot magic: the image was not started by a Multiboot loader.
    UnknownMagic(u32),
    /// The information structure could not be read at this address.
    Unreadable(u64),
    /// The Multiboot 2 information block has an impossible size.
    BadSize(u32),
    /// No memory map was provided (Multiboot 1 flags bit 6 clear, or no Multiboot 2 tag 6).
    NoMemoryMap,
}

impl core::fmt::Display for BootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BootError::UnknownMagic(m) => write!(f, "unknown boot magic {m:#010x}"),
            BootError::Unreadable(a) => write!(f, "boot information unreadable at {a:#x}"),
            BootError::BadSize(s) => write!(f, "boot information has an impossible size {s}"),
            BootError::NoMemoryMap => write!(f, "the boot loader gave no memory map"),
        }
    }
}

/// Everything the kernel keeps from the boot loader.
#[derive(Clone, Debug)]
pub struct BootInfo {
    /// The protocol used.
    pub protocol: Protocol,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    /// The command line was longer than [`CMDLINE_MAX`] and was cut.
    pub cmdline_truncated: bool,
    loader_name: [u8; LOADER_NAME_MAX],
    loader_name_len: usize,
    regions: [MemoryRegion; MAX_REGIONS],
    region_count: usize,
    /// The memory map had more entries than [`MAX_REGIONS`]; the rest were dropped.
    pub regions_truncated: bool,
    /// Physical address of the loader's copy of the ACPI 2.0+ RSDP (Multiboot 2 tag 15).
    /// It lies inside the boot information: read it before reusing that memory.
    pub rsdp_new: Option<u64>,
    /// Physical address of the loader's copy of the ACPI 1.0 RSDP (Multiboot 2 tag 14).
    pub rsdp_old: Option<u64>,
    /// The memory map came from the EFI memory map tag (the loader passed no other).
    pub efi_memory_map: bool,
    /// The loader says the firmware is UEFI (Multiboot 2 EFI system table or memory map tags).
    pub uefi: bool,
}

impl BootInfo {
    fn new(protocol: Protocol) -> BootInfo {
        BootInfo {
            protocol,
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            cmdline_truncated: false,
            loader_name: [0; LOADER_NAME_MAX],
            loader_name_len: 0,
            regions: [MemoryRegion {
                start: 0,
                len: 0,
                kind: RegionKind::Reserved,
            }; MAX_REGIONS],
            region_count: 0,
            regions_truncated: false,
            rsdp_new: None,
            rsdp_old: None,
            efi_memory_map: false,
            uefi: false,
        }
    }

    /// The command line as the loader gave it (non-UTF-8 bytes replaced by `?`).
    pub fn cmdline(&self) -> &str {
        as_str(&self.cmdline[..self.cmdline_len])
    }

    /// The boot loader's name, if it gave one.
    pub fn loader_name(&self) -> &str {
        as_str(&self.loader_name[..self.loader_name_len])
    }

    /// The memory map in the loader's order.
    pub fn regions(&self) -> &[MemoryRegion] {
        &self.regions[..self.region_count]
    }

    /// The RSDP copies the loader passed, the newer first.
    pub fn rsdp(&self) -> impl Iterator<Item = u64> + '_ {
        self.rsdp_new.into_iter().chain(self.rsdp_old)
    }

    fn push_region(&mut self, start: u64, len: u64, kind: u32) {
        self.push(start, len, RegionKind::from_type(kind));
    }

    fn push(&mut self, start: u64, len: u64, kind: RegionKind) {
        if len == 0 {
            return;
        }
        // A neighbour of the same kind extends the previous entry.
        if let Some(last) = self.regions[..self.region_count].last_mut() {
            if last.kind == kind && last.start.checked_add(last.len) == Some(start) {
                last.len = last.len.saturating_add(len);
                return;
            }
        }
        if self.region_count == MAX_REGIONS {
            self.regions_truncated = true;
            return;
        }
        self.regions[self.region_count] = MemoryRegion { start, len, kind };
        self.region_count += 1;
    }
}

/// Bytes we stored are sanitised to ASCII, so this never fails.
fn as_str(bytes: &[u8]) -> &str {
    core::str::from_utf8(bytes).unwrap_or("")
}

/// Reads a NUL-terminated string at `addr` into `dst` (printable ASCII kept, other bytes
/// become `?`). Returns (length, truncated).
fn read_cstr(mem: &impl PhysMem, addr: u64, dst: &mut [u8]) -> (usize, bool) {
    let mut len = 0;
    let mut chunk = [0u8; 64];
    let mut at = addr;
    loop {
        if !mem.read(at, &mut chunk) {
            // Near the end of readable memory: fall back to byte reads.
            let mut one = [0u8; 1];
            if !mem.read(at, &mut one) {
                return (len, false);
            }
            chunk[0] = one[0];
            chunk[1] = 0;
        }
        for &b in chunk.iter() {
            if b == 0 {
                return (len, false);
            }
            if len == dst.len() {
                return (len, true);
            }
            dst[len] = if (0x20..0x7f).contains(&b) || b == b'\t' {
                b
            } else {
                b'?'
            };
            len += 1;
        }
        at += chunk.len() as u64;
    }
}

fn read_u32(mem: &impl PhysMem, addr: u64) -> Result<u32, BootError> {
    let mut b = [0u8; 4];
    if mem.read(addr, &mut b) {
        Ok(u32::from_le_bytes(b))
    } else {
        Err(BootError::Unreadable(addr))
    }
}

fn read_u64(mem: &impl PhysMem, addr: u64) -> Result<u64, BootError> {
    let mut b = [0u8; 8];
    if mem.read(addr, &mut b) {
        Ok(u64::from_le_bytes(b))
    } else {
        Err(BootError::Unreadable(addr))
    }
}

/// Parses the boot information the loader left at `info` according to `magic`.
pub fn parse(magic: u32, info: u64, mem: &impl PhysMem) -> Result<BootInfo, BootError> {
    match magic {
        MULTIBOOT1_MAGIC => parse_mb1(info, mem),
        MULTIBOOT2_MAGIC => parse_mb2(info, mem),
        other => Err(BootError::UnknownMagic(other)),
    }
}

fn parse_mb1(info: u64, mem: &impl PhysMem) -> Result<BootInfo, BootError> {
    let mut boot = BootInfo::new(Protocol::Multiboot1);
    let flags = read_u32(mem, info)?;
    if flags & (1 << 2) != 0 {
        let addr = read_u32(mem, info + 16)? as u64;
        let (len, cut) = read_cstr(mem, addr, &mut boot.cmdline);
        boot.cmdline_len = len;
        boot.cmdline_truncated = cut;
    }
    if flags & (1 << 9) != 0 {
        let addr = read_u32(mem, info + 64)? as u64;
        boot.loader_name_len = read_cstr(mem, addr, &mut boot.loader_name).0;
    }
    if flags & (1 << 6) != 0 {
        let length = read_u32(mem, info + 44)? as u64;
        let base = read_u32(mem, info + 48)? as u64;
        let mut at = base;
        while at + 24 <= base + length {
            let size = read_u32(mem, at)? as u64;
            let start = read_u64(mem, at + 4)?;
            let len = read_u64(mem, at + 12)?;
            let kind = read_u32(mem, at + 20)?;
            boot.push_region(start, len, kind);
            if size < 20 {
                break; // a corrupt entry size would loop forever or misparse the rest
            }
            at += size + 4;
        }
    } else if flags & 1 != 0 {
        // Only mem_lower/mem_upper (KiB): conventional memory and memory above 1 MiB.
        let lower = read_u32(mem, info + 4)? as u64;
        let upper = read_u32(mem, info + 8)? as u64;
        boot.push_region(0, lower * 1024, 1);
        boot.push_region(0x10_0000, upper * 1024, 1);
    }
    if boot.region_count == 0 {
        return Err(BootError::NoMemoryMap);
    }
    Ok(boot)
}

fn parse_mb2(info: u64, mem: &impl PhysMem) -> Result<BootInfo, BootError> {
    let mut boot = BootInfo::new(Protocol::Multiboot2);
    let total = read_u32(mem, info)?;
    if !(16..=MB2_MAX_TOTAL).contains(&total) {
        return Err(BootError::BadSize(total));
    }
    let end = info + total as u64;
    let mut at = info + 8;
    let mut efi_map = None;
    while at + 8 <= end {
        let kind = read_u32(mem, at)?;
        let size = read_u32(mem, at + 4)? as u64;
        if kind == 0 || size < 8 || at + size > end {
            break;
        }
        match kind {
            1 => {
                let (len, cut) = read_cstr(mem, at + 8, &mut boot.cmdline);
                boot.cmdline_len = len.min(size as usize - 8);
                boot.cmdline_truncated = cut;
            }
            2 => {
                let len = read_cstr(mem, at + 8, &mut boot.loader_name).0;
                boot.loader_name_len = len.min(size as usize - 8);
            }
            6 => {
                let entry_size = read_u32(mem, at + 8)? as u64;
                if entry_size >= 24 {
                    let mut e = at + 16;
                    while e + entry_size <= at + size {
                        let start = read_u64(mem, e)?;
                        let len = read_u64(mem, e + 8)?;
                        let t = read_u32(mem, e + 16)?;
                        boot.push_region(start, len, t);
                        e += entry_size;
                    }
                }
            }
            14 if size >= 8 + 20 => boot.rsdp_old = Some(at + 8),
            15 if size >= 8 + 36 => boot.rsdp_new = Some(at + 8),
            // EFI 32/64-bit system table pointers, EFI boot services not terminated, EFI
            // 32/64-bit image handles.
            11 | 12 | 18 | 19 | 20 => boot.uefi = true,
            17 => {
                boot.uefi = true;
                efi_map = Some((at, size));
            }
            _ => {}
        }
        at += (size + 7) & !7;
    }
    if boot.region_count == 0 {
        if let Some((tag, size)) = efi_map {
            parse_efi_map(mem, tag, size, &mut boot)?;
            boot.efi_memory_map = boot.region_count > 0;
        }
    }
    if boot.region_count == 0 {
        return Err(BootError::NoMemoryMap);
    }
    Ok(boot)
}

/// What an EFI memory type (UEFI 2.10 §7.2, `EFI_MEMORY_TYPE`) is to the kernel, which runs
/// after the loader left boot services: loader and boot-services memory is free RAM.
fn efi_kind(kind: u32) -> RegionKind {
    match kind {
        // LoaderCode, LoaderData, BootServicesCode, BootServicesData, ConventionalMemory.
        1 | 2 | 3 | 4 | 7 => RegionKind::Usable,
        8 => RegionKind::Bad,
        9 => RegionKind::AcpiReclaimable,
        10 => RegionKind::AcpiNvs,
        // Reserved, runtime services, MMIO, PAL code, persistent, unaccepted, OEM/OS types.
        _ => RegionKind::Reserved,
    }
}

/// The EFI memory map tag (type 17): descriptor size and version, then descriptors of at
/// least 40 bytes (type, physical start, virtual start, pages of 4 KiB, attributes).
fn parse_efi_map(
    mem: &impl PhysMem,
    tag: u64,
    size: u64,
    boot: &mut BootInfo,
) -> Result<(), BootError> {
    let descriptor = read_u32(mem, tag + 8)? as u64;
    if descriptor < 40 || size < 16 {
        return Ok(());
    }
    let mut e = tag + 16;
    while e + descriptor <= tag + size {
        let kind = read_u32(mem, e)?;
        let start = read_u64(mem, e + 8)?;
        let pages = read_u64(mem, e + 24)?;
        let len = pages.saturating_mul(4096);
        boot.push(start, len, efi_kind(kind));
        e += descriptor;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fake physical memory: one contiguous byte buffer at `base`.
    struct FakeMem {
        base: u64,
        bytes: Vec<u8>,
    }

    impl PhysMem for FakeMem {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            let Some(off) = addr.checked_sub(self.base) else {
                return false;
            };
            let off = off as usize;
            match self.bytes.get(off..off + buf.len()) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        }
    }

    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn put64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    const BASE: u64 = 0x9000;

    fn mb1_image(cmdline: &[u8]) -> FakeMem {
        let mut b = vec![0u8; 0x1000];
        put32(&mut b, 0, (1 << 2) | (1 << 6) | (1 << 9) | 1);
        put32(&mut b, 16, (BASE + 0x200) as u32);
        b[0x200..0x200 + cmdline.len()].copy_from_slice(cmdline);
        put32(&mut b, 64, (BASE + 0x300) as u32);
        b[0x300..0x304].copy_from_slice(b"QEMU");
        // Two mmap entries at 0x400.
        put32(&mut b, 44, 48);
        put32(&mut b, 48, (BASE + 0x400) as u32);
        put32(&mut b, 0x400, 20);
        put64(&mut b, 0x404, 0);
        put64(&mut b, 0x40c, 0x9fc00);
        put32(&mut b, 0x414, 1);
        put32(&mut b, 0x418, 20);
        put64(&mut b, 0x41c, 0x10_0000);
        put64(&mut b, 0x424, 0x7ee_0000);
        put32(&mut b, 0x42c, 1);
        FakeMem {
            base: BASE,
            bytes: b,
        }
    }

    #[test]
    fn multiboot1_cmdline_loader_and_map() {
        let mem = mb1_image(b"/tmp/snapfw.elf console=ttyS0 loglevel=debug\0");
        let info = parse(MULTIBOOT1_MAGIC, BASE, &mem).unwrap();
        assert_eq!(info.protocol, Protocol::Multiboot1);
        assert_eq!(
            info.cmdline(),
            "/tmp/snapfw.elf console=ttyS0 loglevel=debug"
        );
        assert_eq!(info.loader_name(), "QEMU");
        assert_eq!(info.regions().len(), 2);
        assert_eq!(info.regions()[1].start, 0x10_0000);
        assert_eq!(info.regions()[1].kind, RegionKind::Usable);
    }

    #[test]
    fn multiboot1_garbage_in_cmdline_is_sanitised() {
        let mem = mb1_image(b"img \x01\xff\x7fend\0");
        let info = parse(MULTIBOOT1_MAGIC, BASE, &mem).unwrap();
        assert_eq!(info.cmdline(), "img ???end");
    }

    #[test]
    fn multiboot1_long_cmdline_is_cut() {
        let mut mem = mb1_image(b"\0");
        mem.bytes.resize(0x4000, 0);
        put32(&mut mem.bytes, 16, (BASE + 0x1000) as u32);
        for i in 0..2000 {
            mem.bytes[0x1000 + i] = b'a';
        }
        let info = parse(MULTIBOOT1_MAGIC, BASE, &mem).unwrap();
        assert!(info.cmdline_truncated);
        assert_eq!(info.cmdline().len(), CMDLINE_MAX);
    }

    #[test]
    fn multiboot1_corrupt_entry_size_stops() {
        let mut mem = mb1_image(b"x\0");
        put32(&mut mem.bytes, 0x400, 0); // size 0 would loop forever
        let info = parse(MULTIBOOT1_MAGIC, BASE, &mem).unwrap();
        assert_eq!(info.regions().len(), 1);
    }

    #[test]
    fn unknown_magic_and_unreadable_info() {
        let mem = mb1_image(b"\0");
        assert_eq!(
            parse(0x1234, BASE, &mem).unwrap_err(),
            BootError::UnknownMagic(0x1234)
        );
        assert_eq!(
            parse(MULTIBOOT1_MAGIC, 0x10, &mem).unwrap_err(),
            BootError::Unreadable(0x10)
        );
    }

    fn mb2_image() -> FakeMem {
        let mut b = vec![0u8; 0x400];
        let mut at = 8;
        // cmdline tag
        let cmd = b"snapfw.elf loglevel=info\0";
        put32(&mut b, at, 1);
        put32(&mut b, at + 4, 8 + cmd.len() as u32);
        b[at + 8..at + 8 + cmd.len()].copy_from_slice(cmd);
        at += (8 + cmd.len() + 7) & !7;
        // loader name
        let name = b"GRUB 2.06\0";
        put32(&mut b, at, 2);
        put32(&mut b, at + 4, 8 + name.len() as u32);
        b[at + 8..at + 8 + name.len()].copy_from_slice(name);
        at += (8 + name.len() + 7) & !7;
        // memory map with 3 entries
        put32(&mut b, at, 6);
        put32(&mut b, at + 4, 16 + 3 * 24);
        put32(&mut b, at + 8, 24);
        put32(&mut b, at + 12, 0);
        let entries = [
            (0u64, 0x9fc00u64, 1u32),
            (0xf0000, 0x10000, 2),
            (0x100000, 0x1ff00000, 1),
        ];
        for (i, (s, l, t)) in entries.iter().enumerate() {
            let e = at + 16 + i * 24;
            put64(&mut b, e, *s);
            put64(&mut b, e + 8, *l);
            put32(&mut b, e + 16, *t);
        }
        at += 16 + 3 * 24;
        at = (at + 7) & !7;
        // new RSDP
        put32(&mut b, at, 15);
        put32(&mut b, at + 4, 8 + 36);
        b[at + 8..at + 16].copy_from_slice(b"RSD PTR ");
        at += (8 + 36 + 7) & !7;
        // end tag
        put32(&mut b, at, 0);
        put32(&mut b, at + 4, 8);
        at += 8;
        put32(&mut b, 0, at as u32);
        FakeMem {
            base: BASE,
            bytes: b,
        }
    }

    #[test]
    fn multiboot2_tags() {
        let mem = mb2_image();
        let info = parse(MULTIBOOT2_MAGIC, BASE, &mem).unwrap();
        assert_eq!(info.protocol, Protocol::Multiboot2);
        assert_eq!(info.cmdline(), "snapfw.elf loglevel=info");
        assert_eq!(info.loader_name(), "GRUB 2.06");
        assert_eq!(info.regions().len(), 3);
        assert_eq!(info.regions()[1].kind, RegionKind::Reserved);
        let rsdp = info.rsdp_new.unwrap();
        let mut sig = [0u8; 8];
        assert!(mem.read(rsdp, &mut sig));
        assert_eq!(&sig, b"RSD PTR ");
        assert_eq!(info.rsdp_old, None);
        assert_eq!(info.rsdp().collect::<Vec<_>>(), vec![rsdp]);
        assert!(!info.uefi && !info.efi_memory_map);
    }

    /// A Multiboot 2 block of `tags` (type, payload), with the end tag.
    fn mb2_tags(tags: &[(u32, Vec<u8>)]) -> FakeMem {
        let mut b = vec![0u8; 8];
        for (kind, payload) in tags {
            let at = b.len();
            b.resize(at + 8 + payload.len(), 0);
            put32(&mut b, at, *kind);
            put32(&mut b, at + 4, 8 + payload.len() as u32);
            b[at + 8..].copy_from_slice(payload);
            b.resize(b.len().next_multiple_of(8), 0);
        }
        b.extend_from_slice(&[0, 0, 0, 0, 8, 0, 0, 0]);
        let total = b.len() as u32;
        put32(&mut b, 0, total);
        FakeMem {
            base: BASE,
            bytes: b,
        }
    }

    /// An EFI memory map tag's payload: descriptors of `size` bytes.
    fn efi_map(size: usize, entries: &[(u32, u64, u64)]) -> Vec<u8> {
        let mut p = vec![0u8; 8 + entries.len() * size];
        put32(&mut p, 0, size as u32);
        put32(&mut p, 4, 1);
        for (i, (kind, start, pages)) in entries.iter().enumerate() {
            let e = 8 + i * size;
            put32(&mut p, e, *kind);
            put64(&mut p, e + 8, *start);
            put64(&mut p, e + 16, 0xdead_0000); // virtual start: ignored
            put64(&mut p, e + 24, *pages);
            put64(&mut p, e + 32, 0xf);
        }
        p
    }

    fn rsdp_payload(revision: u8, len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len.max(16)];
        p[..8].copy_from_slice(b"RSD PTR ");
        p[15] = revision;
        p.truncate(len);
        p
    }

    #[test]
    fn multiboot2_efi_memory_map_when_it_is_the_only_map() {
        // As OVMF lays out a q35 with 8 GiB: boot-services and loader memory is free RAM once
        // the loader left boot services; runtime services, MMIO and ACPI NVS are not.
        let entries = [
            (3u32, 0u64, 0xA0u64),         // boot services code, 0..640 KiB
            (7, 0x10_0000, 0x700),         // conventional
            (2, 0x80_0000, 0x100),         // loader data, adjacent: merged
            (4, 0x90_0000, 0x100),         // boot services data, adjacent: merged
            (10, 0xA0_0000, 0x10),         // ACPI NVS
            (9, 0xA1_0000, 0x10),          // ACPI reclaim
            (6, 0xA2_0000, 0x20),          // runtime services data
            (11, 0xFFC0_0000, 0x400),      // MMIO (flash)
            (7, 0x1_0000_0000, 0x18_0000), // 6 GiB above 4 GiB
            (8, 0x2_8000_0000, 1),         // unusable
        ];
        for size in [40usize, 48] {
            let mem = mb2_tags(&[
                (1, b"snapfw.elf\0".to_vec()),
                (12, vec![0u8; 8]),
                (17, efi_map(size, &entries)),
            ]);
            let info = parse(MULTIBOOT2_MAGIC, BASE, &mem).unwrap();
            assert!(info.uefi && info.efi_memory_map);
            let got: Vec<(u64, u64, RegionKind)> = info
                .regions()
                .iter()
                .map(|r| (r.start, r.len, r.kind))
                .collect();
            assert_eq!(
                got,
                vec![
                    (0, 0xA0_000, RegionKind::Usable),
                    (0x10_0000, 0x900_000, RegionKind::Usable),
                    (0xA0_0000, 0x10_000, RegionKind::AcpiNvs),
                    (0xA1_0000, 0x10_000, RegionKind::AcpiReclaimable),
                    (0xA2_0000, 0x20_000, RegionKind::Reserved),
                    (0xFFC0_0000, 0x40_0000, RegionKind::Reserved),
                    (0x1_0000_0000, 6 << 30, RegionKind::Usable),
                    (0x2_8000_0000, 0x1000, RegionKind::Bad),
                ],
                "descriptor size {size}"
            );
        }
    }

    #[test]
    fn multiboot2_prefers_the_bios_style_map_over_the_efi_map() {
        let mut bios = vec![0u8; 8 + 24];
        put32(&mut bios, 0, 24);
        put64(&mut bios, 8, 0x10_0000);
        put64(&mut bios, 16, 0x100_0000);
        put32(&mut bios, 24, 1);
        let mem = mb2_tags(&[(17, efi_map(48, &[(7, 0, 0x10_0000)])), (6, bios)]);
        let info = parse(MULTIBOOT2_MAGIC, BASE, &mem).unwrap();
        assert!(info.uefi && !info.efi_memory_map);
        assert_eq!(info.regions().len(), 1);
        assert_eq!(info.regions()[0].start, 0x10_0000);
    }

    #[test]
    fn multiboot2_efi_maps_that_lie_do_not_panic_or_loop() {
        // Descriptor size below the spec's 40, zero, huge; pages that overflow.
        for size in [0u32, 8, 39, 0xFFFF_FFF0] {
            let mut payload = efi_map(40, &[(7, 0x10_0000, 0x100)]);
            put32(&mut payload, 0, size);
            let mem = mb2_tags(&[(17, payload)]);
            assert_eq!(
                parse(MULTIBOOT2_MAGIC, BASE, &mem).unwrap_err(),
                BootError::NoMemoryMap,
                "descriptor size {size}"
            );
        }
        let mem = mb2_tags(&[(17, efi_map(40, &[(7, 0x10_0000, u64::MAX)]))]);
        let info = parse(MULTIBOOT2_MAGIC, BASE, &mem).unwrap();
        assert_eq!(info.regions()[0].len, u64::MAX);
    }

    #[test]
    fn multiboot2_keeps_both_rsdp_tags_newer_first() {
        let mut bios = vec![0u8; 8 + 24];
        put32(&mut bios, 0, 24);
        put64(&mut bios, 16, 0x100_0000);
        put32(&mut bios, 24, 1);
        // GRUB passes the old tag, then the new one.
        let mem = mb2_tags(&[
            (6, bios.clone()),
            (14, rsdp_payload(0, 20)),
            (15, rsdp_payload(2, 36)),
        ]);
        let info = parse(MULTIBOOT2_MAGIC, BASE, &mem).unwrap();
        let (old, new) = (info.rsdp_old.unwrap(), info.rsdp_new.unwrap());
        assert!(new > old);
        assert_eq!(info.rsdp().collect::<Vec<_>>(), vec![new, old]);
        let mut rev = [0u8; 1];
        assert!(mem.read(new + 15, &mut rev) && rev[0] == 2);
        // The old tag alone (an ACPI 1.0 machine).
        let mem = mb2_tags(&[(6, bios.clone()), (14, rsdp_payload(0, 20))]);
        let info = parse(MULTIBOOT2_MAGIC, BASE, &mem).unwrap();
        assert_eq!(info.rsdp_new, None);
        assert_eq!(info.rsdp().count(), 1);
        // Tags too short for an RSDP are ignored.
        let mem = mb2_tags(&[
            (6, bios),
            (14, rsdp_payload(0, 12)),
            (15, rsdp_payload(2, 20)),
        ]);
        let info = parse(MULTIBOOT2_MAGIC, BASE, &mem).unwrap();
        assert_eq!(info.rsdp().count(), 0);
    }

    #[test]
    fn a_long_map_of_neighbours_merges_and_a_longer_one_is_cut() {
        let entries: Vec<(u32, u64, u64)> = (0..300u64)
            .map(|i| (if i % 2 == 0 { 7 } else { 4 }, 0x10_0000 + i * 0x1000, 1))
            .collect();
        let mem = mb2_tags(&[(17, efi_map(40, &entries))]);
        let info = parse(MULTIBOOT2_MAGIC, BASE, &mem).unwrap();
        assert_eq!(info.regions().len(), 1);
        assert_eq!(info.regions()[0].len, 300 * 0x1000);
        assert!(!info.regions_truncated);
        let entries: Vec<(u32, u64, u64)> = (0..300u64)
            .map(|i| (if i % 2 == 0 { 7 } else { 0 }, 0x10_0000 + i * 0x1000, 1))
            .collect();
        let mem = mb2_tags(&[(17, efi_map(40, &entries))]);
        let info = parse(MULTIBOOT2_MAGIC, BASE, &mem).unwrap();
        assert_eq!(info.regions().len(), MAX_REGIONS);
        assert!(info.regions_truncated);
    }

    #[test]
    fn multiboot2_bad_sizes_do_not_panic() {
        let mut mem = mb2_image();
        put32(&mut mem.bytes, 0, 4);
        assert_eq!(
            parse(MULTIBOOT2_MAGIC, BASE, &mem).unwrap_err(),
            BootError::BadSize(4)
        );
        let mut mem = mb2_image();
        put32(&mut mem.bytes, 12, 0xffff_fff0); // first tag claims a huge size
        assert_eq!(
            parse(MULTIBOOT2_MAGIC, BASE, &mem).unwrap_err(),
            BootError::NoMemoryMap
        );
    }

    #[test]
    fn multiboot2_fuzz_no_panic() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        for _ in 0..2000 {
            let mut mem = mb2_image();
            for _ in 0..8 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed as usize) % mem.bytes.len();
                mem.bytes[at] = (seed >> 32) as u8;
            }
            let _ = parse(MULTIBOOT2_MAGIC, BASE, &mem);
            let _ = parse(MULTIBOOT1_MAGIC, BASE, &mem);
        }
    }
}
