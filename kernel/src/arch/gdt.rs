//! Global descriptor table with a task-state segment whose interrupt stack table gives
//! double fault, NMI and machine check their own stacks, so they are reported even when
//! the kernel stack is corrupt or exhausted.

use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// IST slot (1-based in the IDT, 0-based in the TSS array) for the double-fault handler.
pub const IST_DOUBLE_FAULT: u8 = 1;
/// IST slot for NMI.
pub const IST_NMI: u8 = 2;
/// IST slot for machine check.
pub const IST_MACHINE_CHECK: u8 = 3;

const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct Stack([u8; IST_STACK_SIZE]);

static mut IST_STACKS: [Stack; 3] = [const { Stack([0; IST_STACK_SIZE]) }; 3];

static TSS: spin::Once<TaskStateSegment> = spin::Once::new();
static GDT: spin::Once<(
    GlobalDescriptorTable,
    SegmentSelector,
    SegmentSelector,
    SegmentSelector,
)> = spin::Once::new();

/// Builds and loads the GDT and TSS. Called once, early, on the boot CPU.
pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        for (slot, index) in [IST_DOUBLE_FAULT, IST_NMI, IST_MACHINE_CHECK]
            .into_iter()
            .enumerate()
        {
            // SAFETY: only the address of the static stack is taken; the stacks are used
            // exclusively by the CPU through the TSS.
            let base = unsafe { core::ptr::addr_of!(IST_STACKS[slot]) as u64 };
            tss.interrupt_stack_table[index as usize - 1] =
                VirtAddr::new(base + IST_STACK_SIZE as u64);
        }
        tss
    });
    let (gdt, code, data, tss_sel) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss_sel = gdt.append(Descriptor::tss_segment(tss));
        (gdt, code, data, tss_sel)
    });
    gdt.load();
    // SAFETY: the selectors index descriptors of the GDT just loaded, which lives in a
    // static for the rest of the kernel's life.
    unsafe {
        CS::set_reg(*code);
        DS::set_reg(*data);
        ES::set_reg(*data);
        SS::set_reg(*data);
        load_tss(*tss_sel);
    }
}

/// The kernel code selector, for IDT gates.
pub fn code_selector() -> u16 {
    GDT.get().map(|g| g.1 .0).unwrap_or(0x08)
}
