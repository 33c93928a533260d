//! Bring-up, in order: early serial, descriptor tables, boot information, ACPI, memory,
//! command line and log, interrupt controllers and timer, the devices (`devices::init`),
//! the network on the NIC they found, then the main loop, which owns what came up; the
//! command line's settings are passed to each by value.

use core::fmt::Write;

use boot::multiboot::{self, BootInfo};

use crate::arch::refclock::RefClock;
use crate::arch::{apic, cpu, gdt, interrupts, ioapic, pic};
use crate::cmdline::CmdLine;
use crate::ipconfig::IpConfig;
use crate::main_loop::MainLoop;
use crate::memory::IdentityMemory;
use crate::{acpi, memory, power, serial, time};

/// Where the parsed boot information lives: it is large and is parsed before there is a heap
/// (only [`start`] uses it).
static BOOT_INFO: spin::Once<BootInfo> = spin::Once::new();

fn fatal(args: core::fmt::Arguments) -> ! {
    let mut out = serial::EmergencyWriter::new();
    let _ = write!(out, "\r\nsnapfw: fatal: {args}\r\n");
    power::fail_stop()
}

/// The kernel proper; `kernel_main` in the binary calls this with what the loader passed.
pub fn start(magic: u32, info: u32) -> ! {
    time::mark_boot();
    serial::init(serial::COM1, 115_200);
    gdt::init();
    interrupts::init();
    interrupts::set_exception_hook(serial::emergency_write, power::fail_stop);

    let boot = match multiboot::parse(magic, info as u64, &IdentityMemory) {
        Ok(b) => BOOT_INFO.call_once(|| b),
        Err(e) => fatal(format_args!("{e}")),
    };

    // ACPI before the heap: a Multiboot 2 RSDP copy lives in loader memory we may reuse.
    // Without a copy (Multiboot 1), the BIOS areas, else the firmware's ACPI memory (UEFI).
    let mut acpi_memory = [(0u64, 0u64); 16];
    let mut acpi_ranges = 0;
    for r in boot.regions().iter().filter(|r| {
        matches!(
            r.kind,
            multiboot::RegionKind::AcpiReclaimable | multiboot::RegionKind::AcpiNvs
        )
    }) {
        if acpi_ranges < acpi_memory.len() {
            acpi_memory[acpi_ranges] = (r.start, r.start.saturating_add(r.len));
            acpi_ranges += 1;
        }
    }
    let acpi_result = acpi::locate(
        &IdentityMemory,
        boot.rsdp_new,
        boot.rsdp_old,
        &acpi_memory[..acpi_ranges],
    );

    let memory = match memory::init(boot) {
        Ok(h) => h,
        Err(e) => fatal(format_args!("{e}")),
    };
    let cmdline = CmdLine::parse(boot.cmdline());
    power::set_testing(cmdline.testing);
    if let Some(console) = &cmdline.console {
        // Re-programming the same port would clear bytes already typed.
        if (console.io_base(), console.baud_or_default()) != (serial::COM1, 115_200) {
            serial::init(console.io_base(), console.baud_or_default());
        }
    }
    crate::logger::init(cmdline.loglevel.unwrap_or(log::LevelFilter::Info));

    log::info!(
        "snapfw {} ({}) booted by {} ({:?}){}, heap {} MiB",
        env!("CARGO_PKG_VERSION"),
        crate::build_info::GIT_COMMIT,
        if boot.loader_name().is_empty() {
            "unknown loader"
        } else {
            boot.loader_name()
        },
        boot.protocol,
        if boot.uefi { " on UEFI firmware" } else { "" },
        memory.heap >> 20
    );
    if boot.efi_memory_map {
        log::info!("memory map: the EFI memory map (the loader passed no other)");
    }
    log::info!(
        "memory: {} MiB usable in {} ranges ({} MiB above 4 GiB); the heap grows into it",
        memory.usable >> 20,
        memory.ranges,
        memory.above_4g >> 20
    );
    if memory.unused > 0 || memory.truncated || boot.regions_truncated {
        log::warn!(
            "memory: the memory map was cut or not all of it could be mapped; {} MiB unused",
            memory.unused >> 20
        );
    }
    for warning in cmdline.warnings() {
        log::warn!("command line: {warning}");
    }
    if boot.cmdline_truncated {
        log::warn!(
            "command line longer than {} bytes was cut",
            multiboot::CMDLINE_MAX
        );
    }

    let acpi_info = match acpi_result {
        Ok((info, source, at)) => {
            log::info!(
                "ACPI {}.0: RSDP at {at:#x} from {}, OEM '{}', {} CPUs",
                if info.revision >= 2 { 2 } else { 1 },
                source.describe(),
                core::str::from_utf8(&info.oem).unwrap_or("?").trim_end(),
                info.cpus
            );
            for bad in &info.bad_tables[..info.bad_table_count] {
                log::warn!(
                    "ACPI table {} has a bad checksum; skipped",
                    core::str::from_utf8(bad).unwrap_or("????")
                );
            }
            info
        }
        Err(e) => {
            log::warn!("{e}; using legacy defaults (APIC 0xFEE00000, IOAPIC 0xFEC00000)");
            acpi::AcpiInfo::default()
        }
    };

    pic::disable();
    apic::init(acpi_info.local_apic);
    let (ioapic_base, gsi_base) = acpi_info
        .ioapics()
        .first()
        .map(|i| (i.address, i.gsi_base))
        .unwrap_or((0xFEC0_0000, 0));
    ioapic::init(ioapic_base, gsi_base);
    let console_port = cmdline.console.as_ref().map_or(0, |c| c.port);
    let (gsi, active_low, level) = acpi_info.isa_irq(serial::isa_irq(console_port));
    interrupts::register(interrupts::UART_VECTOR, serial::on_interrupt);
    ioapic::route(gsi, interrupts::UART_VECTOR, apic::id(), active_low, level);
    let ecam = acpi_info.ecam().first().copied();
    let pm_timer = acpi_info.pm_timer;
    power::set_acpi(acpi_info);

    let clock = RefClock::choose(pm_timer);
    let tsc_hz = apic::start_timer(|| clock.wait_ms(10));
    time::set_tsc_hz(tsc_hz);
    log::info!(
        "timer: calibrated on {}: TSC {} MHz, APIC timer {} kHz",
        clock.describe(),
        tsc_hz / 1_000_000,
        apic::timer_hz() / 1000
    );
    crate::rtc::init();
    cpu::enable_interrupts();
    let ip = cmdline.ip.unwrap_or_default();
    let devices = crate::devices::init(ecam.as_ref(), ip != IpConfig::Off);
    let net = devices.nic.map(|nic| crate::net::init(nic, ip));
    let nbd = crate::nbd::config_from_cmdline(Some(&cmdline));
    MainLoop::new(devices.storage, net, cmdline, nbd).run()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut out = serial::EmergencyWriter::new();
    let _ = write!(out, "\r\n*** KERNEL PANIC");
    if let Some(location) = info.location() {
        let _ = write!(
            out,
            " at {}:{}:{}",
            location.file(),
            location.line(),
            location.column()
        );
    }
    let _ = write!(out, ": {}\r\n*** system halted\r\n", info.message());
    power::fail_stop()
}
