//! `scripts/deps.sh --packages-only` against fake `apt-get`, `apt-cache` and `dpkg-query`
//! (`tests/deps-fakes/`) on a PATH that holds nothing else of the machine's but a few basic
//! utilities: the machine image this project starts from ships qemu-utils 10.0 and no
//! qemu-system-x86, and Debian's qemu-system-x86 7.2 makes apt remove that qemu-utils.
//! Nothing of the real machine is installed or removed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const QEMU7: &str = "1:7.2+dfsg-7+deb12u18+b2";
const QEMU10: &str = "1:10.0.2+ds-2+deb13u1~bpo12+1";
/// The machine's utilities the script and the fakes use.
const UTILS: &[&str] = &[
    "bash", "env", "dirname", "id", "awk", "mkdir", "rm", "chmod", "cat", "touch",
];
/// Every package of the script's table.
const ALL: &[&str] = &[
    "qemu-system-x86",
    "qemu-utils",
    "ipxe-qemu",
    "ovmf",
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "grub-common",
    "xorriso",
    "mtools",
    "binutils",
    "libnbd-bin",
    "fio",
    "nbdkit",
    "iproute2",
    "util-linux",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn which(cmd: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{cmd} not found on PATH"))
}

/// A fake machine: its root, with the fakes and the basic utilities in `fake-bin`.
struct Machine {
    root: PathBuf,
}

impl Machine {
    fn new(name: &str) -> Machine {
        let root = std::env::temp_dir().join(format!("snapfw-deps-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let bin = root.join("fake-bin");
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::create_dir_all(root.join("var/lib/fake-dpkg")).unwrap();
        for util in UTILS {
            std::os::unix::fs::symlink(which(util), bin.join(util)).unwrap();
        }
        for fake in ["apt-get", "apt-cache", "dpkg-query", "sudo"] {
            std::os::unix::fs::symlink(repo().join("tests/deps-fakes").join(fake), bin.join(fake))
                .unwrap();
        }
        Machine { root }
    }

    /// Installs packages the way the fake apt-get does, without logging a call.
    fn preinstall(&self, packages: &[(&str, &str)]) {
        for (pkg, version) in packages {
            let out = self.fake_apt(&[&format!("{pkg}={version}")]);
            assert!(out.status.success(), "preinstall {pkg}: {out:?}");
        }
        let _ = fs::remove_file(self.root.join("apt.log"));
    }

    fn fake_apt(&self, args: &[&str]) -> Output {
        Command::new(self.root.join("fake-bin/bash"))
            .arg(repo().join("tests/deps-fakes/apt-get"))
            .args(["install", "--allow-downgrades"])
            .args(args)
            .env_clear()
            .env("PATH", self.path())
            .env("DEPS_ROOT", &self.root)
            .output()
            .unwrap()
    }

    fn path(&self) -> String {
        format!(
            "{}:{}",
            self.root.join("fake-bin").display(),
            self.root.join("usr/bin").display()
        )
    }

    fn run(&self, env: &[(&str, &str)]) -> Output {
        let out = Command::new(self.root.join("fake-bin/bash"))
            .arg(repo().join("scripts/deps.sh"))
            .arg("--packages-only")
            .env_clear()
            .env("PATH", self.path())
            .env("DEPS_ROOT", &self.root)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        eprintln!(
            "deps.sh: {}\n--- stdout\n{}--- stderr\n{}--- apt.log\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.apt_log()
        );
        out
    }

    fn apt_log(&self) -> String {
        fs::read_to_string(self.root.join("apt.log")).unwrap_or_default()
    }

    fn installs(&self) -> Vec<String> {
        self.apt_log()
            .lines()
            .filter(|l| l.starts_with("apt-get install"))
            .map(str::to_string)
            .collect()
    }

    fn version(&self, pkg: &str) -> Option<String> {
        fs::read_to_string(self.root.join("var/lib/fake-dpkg").join(pkg))
            .ok()
            .map(|v| v.trim().to_string())
    }

    fn has(&self, file: &str) -> bool {
        self.root.join(file).exists()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn assert_every_tool(m: &Machine) {
    for tool in [
        "usr/bin/qemu-system-x86_64",
        "usr/bin/qemu-img",
        "usr/bin/qemu-io",
        "usr/bin/qemu-nbd",
        "usr/lib/ipxe/qemu/efi-virtio.rom",
        "usr/share/OVMF/OVMF_CODE_4M.fd",
        "usr/lib/grub/i386-pc",
        "usr/lib/grub/x86_64-efi",
        "usr/bin/grub-mkrescue",
        "usr/bin/xorriso",
        "usr/bin/mformat",
        "usr/bin/objcopy",
        "usr/bin/nbdinfo",
        "usr/bin/nbdcopy",
        "usr/bin/fio",
        "usr/bin/nbdkit",
        "usr/bin/ip",
        "usr/bin/unshare",
        "usr/bin/nsenter",
    ] {
        assert!(m.has(tool), "{tool} is missing after deps.sh");
    }
}

#[test]
fn the_fake_apt_removes_the_images_qemu_utils_as_debians_does() {
    // The control: without the fix, asking for qemu-system-x86 alone loses qemu-img.
    let m = Machine::new("control");
    m.preinstall(&[("qemu-utils", QEMU10)]);
    let out = m.fake_apt(&["qemu-system-x86"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("Removing qemu-utils ({QEMU10})"))
    );
    assert!(!m.has("usr/bin/qemu-img"));
}

#[test]
fn on_the_machine_image_qemu_comes_as_one_set_and_qemu_img_stays() {
    let m = Machine::new("image");
    m.preinstall(&[("qemu-utils", QEMU10)]);
    let out = m.run(&[]);
    assert!(out.status.success(), "deps.sh failed on the machine image");
    let installs = m.installs();
    assert_eq!(installs.len(), 1, "one transaction: {installs:?}");
    let first = &installs[0];
    assert!(
        first.contains(&format!("qemu-system-x86={QEMU7}")),
        "{first}"
    );
    assert!(first.contains(&format!("qemu-utils={QEMU7}")), "{first}");
    assert!(first.contains("--allow-downgrades"), "{first}");
    assert_eq!(m.version("qemu-utils").as_deref(), Some(QEMU7));
    assert_eq!(m.version("qemu-system-x86").as_deref(), Some(QEMU7));
    assert_every_tool(&m);
    assert!(m.apt_log().lines().any(|l| l == "apt-get update -qq"));
}

#[test]
fn what_an_install_removed_is_installed_again() {
    let m = Machine::new("again");
    m.preinstall(&[("qemu-utils", QEMU10)]);
    let out = m.run(&[("FAKE_APT_REMOVE_ONCE", "qemu-utils nbdkit")]);
    assert!(
        out.status.success(),
        "deps.sh did not put back what apt removed"
    );
    let installs = m.installs();
    assert_eq!(installs.len(), 2, "{installs:?}");
    let again = &installs[1];
    assert!(
        again.contains(&format!("qemu-utils={QEMU7}")),
        "asked for qemu-utils again, pinned: {again}"
    );
    assert!(again.contains("nbdkit"), "{again}");
    assert!(
        !again.contains("fio"),
        "only what is missing is asked for again: {again}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("installing again: qemu-utils nbdkit"));
    assert_every_tool(&m);
}

#[test]
fn a_package_apt_cannot_find_is_named_with_its_tool_and_the_rest_installs() {
    let m = Machine::new("unavailable");
    m.preinstall(&[("qemu-utils", QEMU10)]);
    let out = m.run(&[("FAKE_APT_UNAVAILABLE", "fio")]);
    assert!(!out.status.success(), "a missing tool must fail the check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("fio (package fio)"), "{stderr}");
    assert!(!stderr.contains("qemu-img"), "{stderr}");
    assert!(
        m.has("usr/bin/qemu-img") && m.has("usr/bin/qemu-system-x86_64") && m.has("usr/bin/nbdkit")
    );
}

#[test]
fn a_machine_with_everything_asks_apt_for_nothing() {
    let m = Machine::new("complete");
    let all: Vec<(&str, &str)> = ALL
        .iter()
        .map(|p| (*p, if p.starts_with("qemu") { QEMU7 } else { "1.0" }))
        .collect();
    m.preinstall(&all);
    let out = m.run(&[]);
    assert!(out.status.success());
    assert_eq!(m.apt_log(), "", "apt was called on a complete machine");
}

#[test]
fn qemu_utils_alone_missing_follows_the_installed_qemu_system() {
    let m = Machine::new("utils");
    let all: Vec<(&str, &str)> = ALL
        .iter()
        .filter(|p| **p != "qemu-utils")
        .map(|p| (*p, if p.starts_with("qemu") { QEMU7 } else { "1.0" }))
        .collect();
    m.preinstall(&all);
    let out = m.run(&[]);
    assert!(out.status.success());
    let installs = m.installs();
    assert_eq!(installs.len(), 1, "{installs:?}");
    assert!(
        installs[0].contains(&format!("qemu-utils={QEMU7}")),
        "{}",
        installs[0]
    );
    assert_every_tool(&m);
}

#[test]
fn a_machine_set_up_for_bios_only_gets_the_uefi_firmware_and_grub_efi() {
    // What deps.sh installed before UEFI boot: everything but OVMF and GRUB's EFI modules.
    let m = Machine::new("bios-only");
    let all: Vec<(&str, &str)> = ALL
        .iter()
        .filter(|p| !matches!(**p, "ovmf" | "grub-efi-amd64-bin"))
        .map(|p| (*p, if p.starts_with("qemu") { QEMU7 } else { "1.0" }))
        .collect();
    m.preinstall(&all);
    let out = m.run(&[]);
    assert!(out.status.success());
    let installs = m.installs();
    assert_eq!(installs.len(), 1, "{installs:?}");
    assert!(
        installs[0].ends_with(" ovmf grub-efi-amd64-bin"),
        "only the two missing packages, no QEMU: {}",
        installs[0]
    );
    assert_every_tool(&m);
}
