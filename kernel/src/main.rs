//! The snapfw image's binary entry. The boot stub in `boot/` calls `kernel_main` in long
//! mode with the boot protocol's magic and information pointer.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
#[no_mangle]
extern "C" fn kernel_main(magic: u32, info: u32) -> ! {
    kernel::start::start(magic, info)
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "snapfw is a bare-metal image: build it with `make build` and boot it with `make run`"
    );
}
