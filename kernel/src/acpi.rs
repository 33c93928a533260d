//! ACPI table parsing (ACPI 6.5 ch. 5): the RSDP (from the boot loader's copies, the BIOS
//! areas, or the firmware's ACPI memory, see [`locate`]), RSDT/XSDT, MADT (local APIC and
//! IOAPIC addresses, ISA interrupt overrides), FADT (power-off and reset registers, the PM
//! timer), the DSDT's `\_S5` sleep type, and MCFG (PCI Express ECAM windows).
//!
//! Pure logic over [`boot::multiboot::PhysMem`], tested on the host against hand-made
//! tables. Nothing allocates. Tables with a bad checksum are skipped and reported.

use boot::multiboot::PhysMem;

/// Most IOAPICs, overrides and ECAM windows kept.
const MAX_IOAPICS: usize = 4;
const MAX_OVERRIDES: usize = 16;
const MAX_ECAM: usize = 4;

/// Why ACPI could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// No RSDP signature in the BIOS areas and none from the boot loader.
    NoRsdp,
    /// The RSDP checksum is wrong.
    BadRsdpChecksum,
    /// The root table (RSDT/XSDT) is unreadable or fails its checksum.
    BadRootTable,
}

impl core::fmt::Display for AcpiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            AcpiError::NoRsdp => "no ACPI RSDP found",
            AcpiError::BadRsdpChecksum => "ACPI RSDP checksum is wrong",
            AcpiError::BadRootTable => "ACPI RSDT/XSDT unreadable or corrupt",
        })
    }
}

/// An IOAPIC from the MADT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoApic {
    /// Its APIC ID.
    pub id: u8,
    /// MMIO base.
    pub address: u64,
    /// First global system interrupt it serves.
    pub gsi_base: u32,
}

/// An ISA IRQ that is wired to a different GSI or with non-default polarity/trigger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqOverride {
    /// ISA IRQ number.
    pub source: u8,
    /// Global system interrupt.
    pub gsi: u32,
    /// MPS INTI flags: bits 0-1 polarity, bits 2-3 trigger mode.
    pub flags: u16,
}

/// A PCI Express enhanced configuration window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EcamWindow {
    /// MMIO base of bus `start_bus`.
    pub base: u64,
    /// PCI segment group.
    pub segment: u16,
    /// First bus decoded.
    pub start_bus: u8,
    /// Last bus decoded.
    pub end_bus: u8,
}

/// The ACPI generic address of the reset register and the value to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResetRegister {
    /// 0 memory, 1 system I/O, 2 PCI configuration.
    pub space: u8,
    /// Address in that space.
    pub address: u64,
    /// Value that resets the machine.
    pub value: u8,
}

/// The ACPI PM timer: a free-running counter at [`PmTimer::HZ`] (ACPI 6.5 §4.8.3.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmTimer {
    /// Its I/O port.
    pub port: u16,
    /// 32 bits wide (FADT flag TMR_VAL_EXT); otherwise 24.
    pub bits32: bool,
}

impl PmTimer {
    /// The counter's rate: 3.579545 MHz.
    pub const HZ: u64 = 3_579_545;

    /// Ticks from `start` to `now`, read from the port, across one wrap of the counter.
    pub fn elapsed(&self, start: u32, now: u32) -> u32 {
        let mask = if self.bits32 { u32::MAX } else { 0x00FF_FFFF };
        now.wrapping_sub(start) & mask
    }

    /// Microseconds in `ticks`.
    pub fn micros(ticks: u32) -> u64 {
        u64::from(ticks) * 1_000_000 / Self::HZ
    }
}

/// Where the RSDP was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsdpSource {
    /// The boot loader's copy of an ACPI 2.0+ RSDP (Multiboot 2 tag 15).
    LoaderNew,
    /// The boot loader's copy of an ACPI 1.0 RSDP (Multiboot 2 tag 14).
    LoaderOld,
    /// The BIOS areas (EBDA, 0xE0000..0xFFFFF).
    BiosArea,
    /// The firmware's ACPI memory of the memory map (UEFI firmware keeps the RSDP there; for
    /// loaders that pass no copy, such as Multiboot 1 under UEFI).
    AcpiMemory,
}

impl RsdpSource {
    /// For the boot log.
    pub fn describe(self) -> &'static str {
        match self {
            RsdpSource::LoaderNew => "the boot loader's ACPI 2.0 RSDP tag",
            RsdpSource::LoaderOld => "the boot loader's ACPI 1.0 RSDP tag",
            RsdpSource::BiosArea => "the BIOS area",
            RsdpSource::AcpiMemory => "the firmware's ACPI memory",
        }
    }
}

/// Most bytes of each ACPI memory range searched for the RSDP.
const ACPI_MEMORY_SCAN: u64 = 4 << 20;

/// Searches `ranges` (`[start, end)`, the ACPI reclaimable and NVS ranges of the memory map)
/// for an RSDP with a valid checksum, on 16-byte boundaries, the first 4 MiB of each.
pub fn find_rsdp_in(mem: &impl PhysMem, ranges: &[(u64, u64)]) -> Option<u64> {
    for &(start, end) in ranges {
        let Some(mut at) = start.checked_next_multiple_of(16) else {
            continue;
        };
        let end = end.min(start.saturating_add(ACPI_MEMORY_SCAN));
        let mut block = [0u8; 4096];
        while at.saturating_add(20) <= end {
            let n = ((end - at) as usize).min(block.len());
            if !mem.read(at, &mut block[..n]) {
                at += n as u64;
                continue;
            }
            let mut i = 0;
            while i + 8 <= n {
                if &block[i..i + 8] == b"RSD PTR " && checksum_ok(mem, at + i as u64, 20) {
                    return Some(at + i as u64);
                }
                i += 16;
            }
            at += n as u64;
        }
    }
    None
}

/// Finds and parses ACPI: the loader's RSDP copies (newer first), the BIOS areas, then the
/// firmware's ACPI memory ranges; the first RSDP that parses wins. The error is the first
/// candidate's, or [`AcpiError::NoRsdp`] when there was none.
pub fn locate(
    mem: &impl PhysMem,
    loader_new: Option<u64>,
    loader_old: Option<u64>,
    acpi_memory: &[(u64, u64)],
) -> Result<(AcpiInfo, RsdpSource, u64), AcpiError> {
    let mut first_error = None;
    let mut attempt = |addr: Option<u64>, source| -> Option<(AcpiInfo, RsdpSource, u64)> {
        let addr = addr?;
        match parse(mem, addr) {
            Ok(info) => Some((info, source, addr)),
            Err(e) => {
                first_error.get_or_insert(e);
                None
            }
        }
    };
    if let Some(found) = attempt(loader_new, RsdpSource::LoaderNew)
        .or_else(|| attempt(loader_old, RsdpSource::LoaderOld))
        .or_else(|| attempt(find_rsdp(mem), RsdpSource::BiosArea))
        .or_else(|| attempt(find_rsdp_in(mem, acpi_memory), RsdpSource::AcpiMemory))
    {
        return Ok(found);
    }
    Err(first_error.unwrap_or(AcpiError::NoRsdp))
}

/// What the kernel uses from ACPI.
#[derive(Clone, Debug, Default)]
pub struct AcpiInfo {
    /// OEM ID from the RSDP.
    pub oem: [u8; 6],
    /// ACPI revision from the RSDP (0 = ACPI 1.0).
    pub revision: u8,
    /// Local APIC MMIO base from the MADT (0 when no MADT).
    pub local_apic: u64,
    /// Processors (enabled local APIC entries).
    pub cpus: u32,
    ioapics: [IoApic; MAX_IOAPICS],
    ioapic_count: usize,
    overrides: [IrqOverride; MAX_OVERRIDES],
    override_count: usize,
    ecam: [EcamWindow; MAX_ECAM],
    ecam_count: usize,
    /// PM1a control block (I/O port), 0 when absent.
    pub pm1a_control: u32,
    /// PM1b control block (I/O port), 0 when absent.
    pub pm1b_control: u32,
    /// SMI command port and the value that enables ACPI mode.
    pub smi_command: u32,
    /// Value written to `smi_command` to enable ACPI.
    pub acpi_enable: u8,
    /// SLP_TYPa/SLP_TYPb for S5 (soft off) from the DSDT.
    pub s5_sleep_type: Option<(u8, u8)>,
    /// The FADT reset register, when the firmware says it is supported.
    pub reset: Option<ResetRegister>,
    /// The ACPI power-management timer (FADT), when it is in I/O space.
    pub pm_timer: Option<PmTimer>,
    /// Tables skipped for a bad checksum (signature).
    pub bad_tables: [[u8; 4]; 4],
    /// How many entries of `bad_tables` are used.
    pub bad_table_count: usize,
}

impl AcpiInfo {
    /// IOAPICs from the MADT.
    pub fn ioapics(&self) -> &[IoApic] {
        &self.ioapics[..self.ioapic_count]
    }
    /// Interrupt source overrides from the MADT.
    pub fn overrides(&self) -> &[IrqOverride] {
        &self.overrides[..self.override_count]
    }
    /// ECAM windows from MCFG.
    pub fn ecam(&self) -> &[EcamWindow] {
        &self.ecam[..self.ecam_count]
    }

    /// The GSI, active-low and level-triggered flags for an ISA IRQ.
    pub fn isa_irq(&self, irq: u8) -> (u32, bool, bool) {
        match self.overrides().iter().find(|o| o.source == irq) {
            Some(o) => {
                let active_low = o.flags & 0b11 == 0b11;
                let level = (o.flags >> 2) & 0b11 == 0b11;
                (o.gsi, active_low, level)
            }
            None => (irq as u32, false, false),
        }
    }
}

fn read<const N: usize>(mem: &impl PhysMem, addr: u64) -> Option<[u8; N]> {
    let mut b = [0u8; N];
    mem.read(addr, &mut b).then_some(b)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .unwrap_or(0)
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .unwrap_or(0)
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    match b.get(at..at + 8) {
        Some(s) => {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_le_bytes(a)
        }
        None => 0,
    }
}

/// Checks the byte-sum of `len` bytes at `addr`; false if unreadable or not zero.
fn checksum_ok(mem: &impl PhysMem, addr: u64, len: u64) -> bool {
    let mut sum = 0u8;
    let mut buf = [0u8; 256];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(256) as usize;
        if !mem.read(addr + at, &mut buf[..n]) {
            return false;
        }
        sum = buf[..n].iter().fold(sum, |s, b| s.wrapping_add(*b));
        at += n as u64;
    }
    sum == 0
}

/// Searches the EBDA's first KiB and 0xE0000..0xFFFFF for the RSDP (ACPI 6.5 §5.2.5.1).
pub fn find_rsdp(mem: &impl PhysMem) -> Option<u64> {
    let ebda = read::<2>(mem, 0x40E).map(|b| (u16::from_le_bytes(b) as u64) << 4);
    let mut ranges = [(0u64, 0u64); 2];
    if let Some(e) = ebda.filter(|e| *e >= 0x80000 && *e < 0xA0000) {
        ranges[0] = (e, e + 1024);
    }
    ranges[1] = (0xE0000, 0x100000);
    for (start, end) in ranges {
        let mut at = start;
        while at + 20 <= end {
            if read::<8>(mem, at).is_some_and(|s| &s == b"RSD PTR ") && checksum_ok(mem, at, 20) {
                return Some(at);
            }
            at += 16;
        }
    }
    None
}

/// Parses ACPI from an RSDP at `rsdp_addr`.
pub fn parse(mem: &impl PhysMem, rsdp_addr: u64) -> Result<AcpiInfo, AcpiError> {
    let rsdp = read::<36>(mem, rsdp_addr).ok_or(AcpiError::NoRsdp)?;
    if &rsdp[..8] != b"RSD PTR " {
        return Err(AcpiError::NoRsdp);
    }
    if !checksum_ok(mem, rsdp_addr, 20) {
        return Err(AcpiError::BadRsdpChecksum);
    }
    let mut info = AcpiInfo {
        revision: rsdp[15],
        ..AcpiInfo::default()
    };
    info.oem.copy_from_slice(&rsdp[9..15]);
    let xsdt = if info.revision >= 2 {
        u64_at(&rsdp, 24)
    } else {
        0
    };
    let (root, entry_size) = if xsdt != 0 {
        (xsdt, 8u64)
    } else {
        (u32_at(&rsdp, 16) as u64, 4u64)
    };
    let header = read::<36>(mem, root).ok_or(AcpiError::BadRootTable)?;
    let length = u32_at(&header, 4) as u64;
    if !(36..=1 << 16).contains(&length) || !checksum_ok(mem, root, length) {
        return Err(AcpiError::BadRootTable);
    }
    let entries = (length - 36) / entry_size;
    for i in 0..entries {
        let at = root + 36 + i * entry_size;
        let table = if entry_size == 8 {
            read::<8>(mem, at).map(u64::from_le_bytes)
        } else {
            read::<4>(mem, at).map(|b| u32::from_le_bytes(b) as u64)
        };
        if let Some(table) = table {
            parse_table(mem, table, &mut info);
        }
    }
    Ok(info)
}

fn note_bad(info: &mut AcpiInfo, signature: [u8; 4]) {
    if info.bad_table_count < info.bad_tables.len() {
        info.bad_tables[info.bad_table_count] = signature;
        info.bad_table_count += 1;
    }
}

fn parse_table(mem: &impl PhysMem, addr: u64, info: &mut AcpiInfo) {
    let Some(header) = read::<36>(mem, addr) else {
        return;
    };
    let mut signature = [0u8; 4];
    signature.copy_from_slice(&header[..4]);
    let length = u32_at(&header, 4) as u64;
    if !(36..=1 << 20).contains(&length) {
        note_bad(info, signature);
        return;
    }
    match &signature {
        b"APIC" | b"FACP" | b"MCFG" => {}
        _ => return,
    }
    if !checksum_ok(mem, addr, length) {
        note_bad(info, signature);
        return;
    }
    // Large machines have MADTs of several KiB (one entry per CPU before the IOAPICs).
    let mut body = [0u8; 16384];
    let n = (length as usize).min(body.len());
    if !mem.read(addr, &mut body[..n]) {
        return;
    }
    let body = &body[..n];
    match &signature {
        b"APIC" => parse_madt(body, info),
        b"FACP" => parse_fadt(mem, body, info),
        b"MCFG" => parse_mcfg(body, info),
        _ => {}
    }
}

fn parse_madt(t: &[u8], info: &mut AcpiInfo) {
    info.local_apic = u32_at(t, 36) as u64;
    let mut at = 44;
    while at + 2 <= t.len() {
        let kind = t[at];
        let len = t[at + 1] as usize;
        if len < 2 || at + len > t.len() {
            break;
        }
        let e = &t[at..at + len];
        match kind {
            0 if len >= 8 && u32_at(e, 4) & 1 != 0 => info.cpus += 1,
            1 if len >= 12 && info.ioapic_count < MAX_IOAPICS => {
                info.ioapics[info.ioapic_count] = IoApic {
                    id: e[2],
                    address: u32_at(e, 4) as u64,
                    gsi_base: u32_at(e, 8),
                };
                info.ioapic_count += 1;
            }
            2 if len >= 10 && info.override_count < MAX_OVERRIDES => {
                info.overrides[info.override_count] = IrqOverride {
                    source: e[3],
                    gsi: u32_at(e, 4),
                    flags: u16_at(e, 8),
                };
                info.override_count += 1;
            }
            5 if len >= 12 => info.local_apic = u64_at(e, 4),
            _ => {}
        }
        at += len;
    }
}

fn parse_fadt(mem: &impl PhysMem, t: &[u8], info: &mut AcpiInfo) {
    info.smi_command = u32_at(t, 48);
    info.acpi_enable = t.get(52).copied().unwrap_or(0);
    info.pm1a_control = u32_at(t, 64);
    info.pm1b_control = u32_at(t, 68);
    let flags = u32_at(t, 112);
    if t.len() >= 129 && flags & (1 << 10) != 0 {
        info.reset = Some(ResetRegister {
            space: t[116],
            address: u64_at(t, 120),
            value: t[128],
        });
    }
    // PM timer: X_PM_TMR_BLK (a generic address, ACPI 2.0+) if it is in I/O space, else
    // PM_TMR_BLK with its length of 4.
    let timer_32 = flags & (1 << 8) != 0;
    let x_timer = if t.len() >= 220 && t[208] == 1 {
        u64_at(t, 212)
    } else {
        0
    };
    let port = if x_timer != 0 {
        x_timer
    } else if t.get(91) == Some(&4) {
        u64::from(u32_at(t, 76))
    } else {
        0
    };
    if let Ok(port @ 1..) = u16::try_from(port) {
        info.pm_timer = Some(PmTimer {
            port,
            bits32: timer_32,
        });
    }
    let x_dsdt = if t.len() >= 148 { u64_at(t, 140) } else { 0 };
    let dsdt = if x_dsdt != 0 {
        x_dsdt
    } else {
        u32_at(t, 40) as u64
    };
    if dsdt != 0 {
        info.s5_sleep_type = find_s5(mem, dsdt);
    }
}

/// Finds `Name(_S5_, Package(){a, b, ...})` in the DSDT's AML and returns (a, b).
fn find_s5(mem: &impl PhysMem, dsdt: u64) -> Option<(u8, u8)> {
    let header = read::<36>(mem, dsdt)?;
    if &header[..4] != b"DSDT" {
        return None;
    }
    let length = (u32_at(&header, 4) as u64).min(1 << 20);
    let mut window = [0u8; 512];
    let mut at = dsdt + 36;
    while at < dsdt + length {
        let n = ((dsdt + length - at) as usize).min(window.len());
        if !mem.read(at, &mut window[..n]) {
            return None;
        }
        let w = &window[..n];
        for i in 0..n.saturating_sub(4) {
            if &w[i..i + 4] == b"_S5_" && i + 4 < n && w[i + 4] == 0x12 {
                let mut buf = [0u8; 16];
                let _ = mem.read(at + i as u64 + 5, &mut buf);
                return decode_s5_package(&buf);
            }
        }
        if n < window.len() {
            break;
        }
        at += (n - 8) as u64; // overlap so a name across the boundary is found
    }
    None
}

/// Decodes `PkgLength NumElements elem0 elem1` (ACPI 6.5 §20.2.4, §20.2.5.4).
fn decode_s5_package(b: &[u8]) -> Option<(u8, u8)> {
    let lead = *b.first()?;
    let mut i = 1 + (lead >> 6) as usize; // PkgLength bytes
    i += 1; // NumElements
    let mut value = || -> Option<u8> {
        let op = *b.get(i)?;
        i += 1;
        match op {
            0x00 => Some(0),
            0x01 => Some(1),
            0x0A => {
                let v = *b.get(i)?;
                i += 1;
                Some(v)
            }
            _ => None,
        }
    };
    let a = value()?;
    let b2 = value().unwrap_or(0);
    Some((a, b2))
}

fn parse_mcfg(t: &[u8], info: &mut AcpiInfo) {
    let mut at = 44;
    while at + 16 <= t.len() && info.ecam_count < MAX_ECAM {
        info.ecam[info.ecam_count] = EcamWindow {
            base: u64_at(t, at),
            segment: u16_at(t, at + 8),
            start_bus: t[at + 10],
            end_bus: t[at + 11],
        };
        info.ecam_count += 1;
        at += 16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<u8>);
    impl PhysMem for Mem {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            let a = addr as usize;
            match self.0.get(a..a + buf.len()) {
                Some(s) => {
                    buf.copy_from_slice(s);
                    true
                }
                None => false,
            }
        }
    }

    fn fix_checksum(m: &mut [u8], at: usize, len: usize, sum_at: usize) {
        m[sum_at] = 0;
        let s = m[at..at + len].iter().fold(0u8, |s, b| s.wrapping_add(*b));
        m[sum_at] = 0u8.wrapping_sub(s);
    }

    fn table(m: &mut [u8], at: usize, sig: &[u8; 4], body: &[u8]) {
        let len = 36 + body.len();
        m[at..at + 4].copy_from_slice(sig);
        m[at + 4..at + 8].copy_from_slice(&(len as u32).to_le_bytes());
        m[at + 8] = 1;
        m[at + 36..at + len].copy_from_slice(body);
        fix_checksum(m, at, len, at + 9);
    }

    /// A machine like QEMU's `pc`: RSDP at 0xF0000, RSDT → MADT, FADT (→ DSDT), MCFG.
    fn machine() -> Mem {
        let mut m = vec![0u8; 0x100000];
        // RSDP v0
        let r = 0xF0000;
        m[r..r + 8].copy_from_slice(b"RSD PTR ");
        m[r + 9..r + 15].copy_from_slice(b"BOCHS ");
        m[r + 16..r + 20].copy_from_slice(&0x1000u32.to_le_bytes());
        fix_checksum(&mut m, r, 20, r + 8);
        // RSDT with 3 entries
        let entries: Vec<u8> = [0x2000u32, 0x3000, 0x5000]
            .iter()
            .flat_map(|e| e.to_le_bytes())
            .collect();
        table(&mut m, 0x1000, b"RSDT", &entries);
        // MADT
        let mut madt = vec![0u8; 8];
        madt[..4].copy_from_slice(&0xFEE0_0000u32.to_le_bytes());
        madt.extend_from_slice(&[0, 8, 0, 0, 1, 0, 0, 0]); // cpu 0 enabled
        madt.extend_from_slice(&[0, 8, 1, 1, 0, 0, 0, 0]); // cpu 1 disabled
        let mut io = vec![1, 12, 0, 0];
        io.extend_from_slice(&0xFEC0_0000u32.to_le_bytes());
        io.extend_from_slice(&0u32.to_le_bytes());
        madt.extend_from_slice(&io);
        let mut ov = vec![2, 10, 0, 0];
        ov.extend_from_slice(&2u32.to_le_bytes());
        ov.extend_from_slice(&0u16.to_le_bytes());
        madt.extend_from_slice(&ov);
        let mut ov = vec![2, 10, 0, 9];
        ov.extend_from_slice(&9u32.to_le_bytes());
        ov.extend_from_slice(&0x000Du16.to_le_bytes());
        madt.extend_from_slice(&ov);
        table(&mut m, 0x2000, b"APIC", &madt);
        // FADT (244 bytes total)
        let mut fadt = vec![0u8; 244 - 36];
        fadt[40 - 36..44 - 36].copy_from_slice(&0x4000u32.to_le_bytes());
        fadt[48 - 36..52 - 36].copy_from_slice(&0xB2u32.to_le_bytes());
        fadt[52 - 36] = 0xF1;
        fadt[64 - 36..68 - 36].copy_from_slice(&0x604u32.to_le_bytes());
        fadt[76 - 36..80 - 36].copy_from_slice(&0x608u32.to_le_bytes());
        fadt[91 - 36] = 4;
        fadt[112 - 36..116 - 36].copy_from_slice(&(1u32 << 10).to_le_bytes());
        fadt[116 - 36] = 1;
        fadt[120 - 36..128 - 36].copy_from_slice(&0xCF9u64.to_le_bytes());
        fadt[128 - 36] = 6;
        table(&mut m, 0x3000, b"FACP", &fadt);
        // DSDT with Name(_S5_, Package(0x04){0x05, Zero, Zero, Zero}) amid other AML
        let mut aml = vec![0x10u8; 700];
        aml.extend_from_slice(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0A, 0x05]);
        aml.extend_from_slice(&[0x00, 0x00, 0x00]);
        table(&mut m, 0x4000, b"DSDT", &aml);
        // MCFG with one window
        let mut mcfg = vec![0u8; 8];
        mcfg.extend_from_slice(&0xB000_0000u64.to_le_bytes());
        mcfg.extend_from_slice(&[0, 0, 0, 255, 0, 0, 0, 0]);
        table(&mut m, 0x5000, b"MCFG", &mcfg);
        Mem(m)
    }

    #[test]
    fn finds_and_parses_everything() {
        let mem = machine();
        let rsdp = find_rsdp(&mem).unwrap();
        assert_eq!(rsdp, 0xF0000);
        let info = parse(&mem, rsdp).unwrap();
        assert_eq!(&info.oem, b"BOCHS ");
        assert_eq!(info.local_apic, 0xFEE0_0000);
        assert_eq!(info.cpus, 1);
        assert_eq!(
            info.ioapics(),
            &[IoApic {
                id: 0,
                address: 0xFEC0_0000,
                gsi_base: 0
            }]
        );
        assert_eq!(info.isa_irq(0), (2, false, false));
        assert_eq!(info.isa_irq(9), (9, false, true)); // 0x000D: active high, level
        assert_eq!(info.isa_irq(4), (4, false, false));
        assert_eq!(info.pm1a_control, 0x604);
        assert_eq!(info.smi_command, 0xB2);
        assert_eq!(info.acpi_enable, 0xF1);
        assert_eq!(info.s5_sleep_type, Some((5, 0)));
        assert_eq!(
            info.reset,
            Some(ResetRegister {
                space: 1,
                address: 0xCF9,
                value: 6
            })
        );
        assert_eq!(
            info.pm_timer,
            Some(PmTimer {
                port: 0x608,
                bits32: false
            })
        );
        assert_eq!(info.ecam().len(), 1);
        assert_eq!(info.ecam()[0].base, 0xB000_0000);
        assert_eq!(info.ecam()[0].end_bus, 255);
        assert_eq!(info.bad_table_count, 0);
    }

    #[test]
    fn corrupt_tables_are_skipped_not_fatal() {
        let mut mem = machine();
        mem.0[0x2000 + 40] ^= 0xFF; // break the MADT checksum
        let info = parse(&mem, 0xF0000).unwrap();
        assert_eq!(info.local_apic, 0);
        assert_eq!(info.bad_table_count, 1);
        assert_eq!(&info.bad_tables[0], b"APIC");
        assert_eq!(info.pm1a_control, 0x604);
    }

    #[test]
    fn bad_rsdp_and_root() {
        let mut mem = machine();
        mem.0[0xF0000 + 9] ^= 1;
        assert_eq!(
            parse(&mem, 0xF0000).unwrap_err(),
            AcpiError::BadRsdpChecksum
        );
        let mut mem = machine();
        mem.0[0x1000 + 36] ^= 1;
        assert_eq!(parse(&mem, 0xF0000).unwrap_err(), AcpiError::BadRootTable);
        let mem = Mem(vec![0u8; 0x100000]);
        assert_eq!(find_rsdp(&mem), None);
        assert_eq!(parse(&mem, 0xF0000).unwrap_err(), AcpiError::NoRsdp);
    }

    /// The machine as UEFI firmware lays it out: no RSDP in the BIOS areas, an ACPI 2.0
    /// RSDP (with an XSDT) in ACPI memory at 0x7000, the RSDT's tables as before.
    fn uefi_machine() -> Mem {
        let mut mem = machine();
        mem.0[0xF0000..0xF0000 + 36].fill(0);
        let r = 0x7000;
        mem.0[r..r + 8].copy_from_slice(b"RSD PTR ");
        mem.0[r + 9..r + 15].copy_from_slice(b"OVMF  ");
        mem.0[r + 15] = 2;
        mem.0[r + 16..r + 20].copy_from_slice(&0x1000u32.to_le_bytes());
        mem.0[r + 20..r + 24].copy_from_slice(&36u32.to_le_bytes());
        mem.0[r + 24..r + 32].copy_from_slice(&0x6000u64.to_le_bytes());
        fix_checksum(&mut mem.0, r, 20, r + 8);
        fix_checksum(&mut mem.0, r, 36, r + 32);
        let entries: Vec<u8> = [0x2000u64, 0x3000, 0x5000]
            .iter()
            .flat_map(|e| e.to_le_bytes())
            .collect();
        table(&mut mem.0, 0x6000, b"XSDT", &entries);
        mem
    }

    #[test]
    fn the_rsdp_is_found_where_each_firmware_and_loader_puts_it() {
        let mem = uefi_machine();
        assert_eq!(find_rsdp(&mem), None, "no BIOS area under UEFI");
        // The loader's copies first, the newer before the older.
        let (info, source, at) = locate(&mem, Some(0x7000), Some(0xF0000), &[]).unwrap();
        assert_eq!(
            (source, at, &info.oem),
            (RsdpSource::LoaderNew, 0x7000, b"OVMF  ")
        );
        assert_eq!(info.revision, 2);
        assert_eq!(info.local_apic, 0xFEE0_0000);
        // A bad newer copy falls back to the older one.
        let (_, source, _) = locate(&machine(), Some(0x7000), Some(0xF0000), &[]).unwrap();
        assert_eq!(source, RsdpSource::LoaderOld);
        // No copy (Multiboot 1): the BIOS area, else the firmware's ACPI memory.
        let (_, source, at) = locate(&machine(), None, None, &[(0x7000, 0x8000)]).unwrap();
        assert_eq!((source, at), (RsdpSource::BiosArea, 0xF0000));
        let (info, source, at) =
            locate(&mem, None, None, &[(0x100, 0x6800), (0x6f00, 0x8000)]).unwrap();
        assert_eq!((source, at), (RsdpSource::AcpiMemory, 0x7000));
        assert_eq!(info.pm_timer.map(|t| t.port), Some(0x608));
        // Nowhere: the error of the first candidate tried, or NoRsdp.
        assert_eq!(
            locate(&mem, None, None, &[(0x100, 0x6800)]).unwrap_err(),
            AcpiError::NoRsdp
        );
        let mut bad = mem.0.clone();
        bad[0x7000 + 9] ^= 1;
        assert_eq!(
            locate(&Mem(bad), Some(0x7000), None, &[]).unwrap_err(),
            AcpiError::BadRsdpChecksum
        );
        // Ranges past readable memory or absurd do not panic.
        assert_eq!(find_rsdp_in(&mem, &[(u64::MAX - 8, u64::MAX)]), None);
    }

    #[test]
    fn pm_timer_ticks_across_a_wrap() {
        let t24 = PmTimer {
            port: 0x608,
            bits32: false,
        };
        assert_eq!(t24.elapsed(100, 3679), 3579);
        assert_eq!(t24.elapsed(0x00FF_FFF0, 0x10), 0x20);
        // The upper byte of a 24-bit timer reads as anything.
        assert_eq!(t24.elapsed(0xAAFF_FFF0, 0x5500_0010), 0x20);
        let t32 = PmTimer {
            port: 0x608,
            bits32: true,
        };
        assert_eq!(t32.elapsed(0xFFFF_FFF0, 0x10), 0x20);
        assert_eq!(PmTimer::micros(35_795), 9_999);
        assert_eq!(PmTimer::micros(3_579_545), 1_000_000);
    }

    #[test]
    fn s5_package_forms() {
        assert_eq!(
            decode_s5_package(&[0x06, 0x04, 0x00, 0x00, 0, 0]),
            Some((0, 0))
        );
        assert_eq!(
            decode_s5_package(&[0x0A, 0x04, 0x0A, 0x07, 0x0A, 0x07]),
            Some((7, 7))
        );
        assert_eq!(decode_s5_package(&[0x40, 0x01, 0x02, 0x01]), Some((1, 0)));
        assert_eq!(decode_s5_package(&[0x06, 0x04, 0x5B]), None);
        assert_eq!(decode_s5_package(&[]), None);
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 88172645463325252u64;
        for _ in 0..300 {
            let mut mem = machine();
            for _ in 0..32 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = [0x1000usize, 0x2000, 0x3000, 0x4000, 0x5000][(seed % 5) as usize]
                    + ((seed >> 8) % 300) as usize;
                mem.0[at] = (seed >> 40) as u8;
            }
            let _ = parse(&mem, 0xF0000);
        }
    }
}
