//! Which device a store's binding names as its origin, or why none: pure and host-tested;
//! boot discovery (`crate::discover`) and `snapshot attach` use it.
//!
//! A store re-attaches by itself only to an origin it identifies unambiguously:
//! - an NVMe namespace by its NGUID, else its EUI-64 (Identify Namespace), else its
//!   controller's serial number and its namespace ID (namespaces share the serial);
//! - another device (virtio-blk) by a non-empty serial number no other device shares;
//! - a binding `snapshot attach` wrote for an origin without an identity of its own by the
//!   PCI locations of the origin and of the store's device (the operator's choice).
//!
//! Bindings written before identities were recorded (versions 1 and 2) name the serial number
//! only; they attach under the serial rule. In every case the size must match too. The device
//! holding the store is never its own origin, so it is not a candidate (and does not make a
//! serial ambiguous).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::{self, Write};

use drivers::info::{DeviceInfo, Hex, NamespaceIdentity};
use snapshot::{Binding, OriginId};

/// What the matcher knows of one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceId<'a> {
    /// Serial number (an NVMe namespace's is its controller's).
    pub serial: &'a str,
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    /// NVMe namespaces: NSID, NGUID, EUI-64.
    pub namespace: Option<NamespaceIdentity>,
    /// PCI bus, device, function.
    pub pci: Option<[u8; 3]>,
}

impl DeviceId<'_> {
    /// What a device's description tells.
    pub fn of(info: &DeviceInfo) -> DeviceId<'_> {
        DeviceId {
            serial: info.serial.as_str(),
            sectors: info.geometry.map_or(0, |g| {
                g.capacity_blocks
                    .saturating_mul(u64::from(g.block_size / 512))
            }),
            namespace: info.namespace,
            pci: info.pci.map(|p| [p.bus, p.device, p.function]),
        }
    }
}

/// Why a binding attaches to no device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoMatch {
    /// No device has the recorded identity.
    Missing,
    /// The recorded identity does not single out a device: these devices (other than the
    /// store's) all fit it (an empty serial, or one shared by several devices).
    Ambiguous(Vec<usize>),
    /// One device has the identity, but not the recorded size.
    SizeDiffers {
        /// The device.
        device: usize,
        /// Its size in sectors.
        sectors: u64,
    },
    /// A binding by PCI location whose store is no longer on the device at that location.
    Moved,
}

/// The identity a new binding records for `origin`: the best one the device has, whether or
/// not it is unique right now (boot checks that).
pub fn origin_id_of(origin: &DeviceId<'_>) -> OriginId {
    match origin.namespace {
        Some(NamespaceIdentity {
            nguid: Some(nguid), ..
        }) => OriginId::Nguid(nguid),
        Some(NamespaceIdentity {
            eui64: Some(eui64), ..
        }) => OriginId::Eui64(eui64),
        Some(ns) => OriginId::NvmeNamespace(ns.nsid),
        None => OriginId::Serial,
    }
}

/// Whether device `d` has the identity `id` (with the binding's `serial` where it counts).
fn has(d: &DeviceId<'_>, id: OriginId, serial: &[u8]) -> bool {
    match id {
        OriginId::Legacy | OriginId::Serial => d.serial.as_bytes() == serial,
        OriginId::Nguid(g) => d.namespace.is_some_and(|n| n.nguid == Some(g)),
        OriginId::Eui64(e) => d.namespace.is_some_and(|n| n.eui64 == Some(e)),
        OriginId::NvmeNamespace(nsid) => {
            d.serial.as_bytes() == serial && d.namespace.is_some_and(|n| n.nsid == nsid)
        }
        OriginId::Location {
            origin_pci, nsid, ..
        } => {
            d.pci == Some(origin_pci)
                && d.namespace.map_or(0, |n| n.nsid) == nsid
                && d.serial.as_bytes() == serial
        }
    }
}

/// The device the binding of the store on device `cow` names as its origin, or why none.
pub fn match_origin(
    binding: &Binding,
    devices: &[DeviceId<'_>],
    cow: usize,
) -> Result<usize, NoMatch> {
    let serial = binding.origin_serial.as_bytes();
    if let OriginId::Location { cow_pci, .. } = binding.origin_id {
        if devices.get(cow).and_then(|d| d.pci) != Some(cow_pci) {
            return Err(NoMatch::Moved);
        }
    }
    let candidates: Vec<usize> = (0..devices.len())
        .filter(|&d| d != cow && has(&devices[d], binding.origin_id, serial))
        .collect();
    let serial_rule = matches!(binding.origin_id, OriginId::Legacy | OriginId::Serial);
    match candidates[..] {
        [] => Err(NoMatch::Missing),
        // An empty serial identifies nothing, even when one device has it.
        [one] if !(serial_rule && serial.is_empty()) => {
            if devices[one].sectors == binding.origin_sectors {
                Ok(one)
            } else {
                Err(NoMatch::SizeDiffers {
                    device: one,
                    sectors: devices[one].sectors,
                })
            }
        }
        _ => Err(NoMatch::Ambiguous(candidates)),
    }
}

/// Whether `origin` is identified unambiguously by its own identity among `devices` (the
/// device holding the store, `cow`, aside): what `snapshot attach` asks to choose between
/// recording the identity and recording PCI locations.
pub fn identifies(devices: &[DeviceId<'_>], origin: usize, cow: usize) -> bool {
    let Some(d) = devices.get(origin) else {
        return false;
    };
    let id = origin_id_of(d);
    if id == OriginId::Serial && d.serial.is_empty() {
        return false;
    }
    (0..devices.len())
        .filter(|&i| i != cow && has(&devices[i], id, d.serial.as_bytes()))
        .count()
        == 1
}

/// Text read from a disk, for the console and JSON: printable ASCII as is, anything else
/// (control characters, bytes that are not UTF-8 or not ASCII) as `\xNN`, and `\` as `\\`.
pub struct Escaped<'a>(pub &'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            match b {
                b'\\' => f.write_str("\\\\")?,
                0x20..=0x7e => f.write_char(char::from(b))?,
                _ => write!(f, "\\x{b:02x}")?,
            }
        }
        Ok(())
    }
}

/// [`Escaped`] as a `String`.
pub fn escaped(bytes: &[u8]) -> String {
    alloc::format!("{}", Escaped(bytes))
}

/// How a binding names its origin, for messages: `serial 'X'`, `NGUID …`, ….
pub struct Describe<'a>(pub &'a Binding);

impl fmt::Display for Describe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        let serial = Escaped(b.origin_serial.as_bytes());
        match b.origin_id {
            OriginId::Legacy | OriginId::Serial => write!(f, "serial '{serial}'")?,
            OriginId::Nguid(g) => write!(f, "NVMe NGUID {}", Hex(&g))?,
            OriginId::Eui64(e) => write!(f, "NVMe EUI-64 {}", Hex(&e))?,
            OriginId::NvmeNamespace(n) => write!(f, "NVMe serial '{serial}' namespace {n}")?,
            OriginId::Location {
                origin_pci: [b0, d0, f0],
                nsid,
                ..
            } => {
                write!(f, "PCI {b0:02x}:{d0:02x}.{f0:x}")?;
                if nsid != 0 {
                    write!(f, " namespace {nsid}")?;
                }
                write!(f, " serial '{serial}'")?;
            }
        }
        write!(f, ", {} sectors", b.origin_sectors)
    }
}

/// A device as an origin marker names a COW store: `vdb, virtio-blk serial 'X'`, with the
/// namespace identity of an NVMe namespace.
pub struct DescribeDevice<'a>(pub &'a DeviceInfo);

impl fmt::Display for DescribeDevice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        write!(f, "{}, {}", d.name.as_str(), d.driver)?;
        if !d.serial.as_str().is_empty() {
            write!(f, " serial '{}'", Escaped(d.serial.as_str().as_bytes()))?;
        }
        match d.namespace {
            Some(NamespaceIdentity { nguid: Some(g), .. }) => write!(f, " NGUID {}", Hex(&g)),
            Some(NamespaceIdentity { eui64: Some(e), .. }) => write!(f, " EUI-64 {}", Hex(&e)),
            Some(ns) => write!(f, " namespace {}", ns.nsid),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::BoundedBytes;

    const SIZE: u64 = 524_288;

    fn virtio(serial: &str, slot: u8) -> DeviceId<'_> {
        DeviceId {
            serial,
            sectors: SIZE,
            namespace: None,
            pci: Some([0, slot, 0]),
        }
    }

    fn nvme(serial: &str, slot: u8, nsid: u32) -> DeviceId<'_> {
        DeviceId {
            serial,
            sectors: SIZE,
            namespace: Some(NamespaceIdentity {
                nsid,
                nguid: None,
                eui64: None,
            }),
            pci: Some([0, slot, 0]),
        }
    }

    fn binding_for(devices: &[DeviceId<'_>], origin: usize) -> Binding {
        let d = &devices[origin];
        Binding {
            name: BoundedBytes::new(b"t1").unwrap(),
            origin_serial: BoundedBytes::new(d.serial.as_bytes()).unwrap(),
            origin_sectors: d.sectors,
            chunk_sectors: 8,
            created_unix_seconds: 0,
            region_start: 0,
            region_sectors: 0,
            flags: 0,
            origin_id: origin_id_of(d),
        }
    }

    #[test]
    fn two_same_size_virtio_disks_without_serials_are_ambiguous() {
        // vda, vdb, vdc: no serial=, all 256 MiB; t1 of vdb on vdc.
        let devs = [virtio("", 4), virtio("", 5), virtio("", 6)];
        let b = binding_for(&devs, 1);
        assert_eq!(b.origin_id, OriginId::Serial);
        assert_eq!(
            match_origin(&b, &devs, 2),
            Err(NoMatch::Ambiguous(vec![0, 1]))
        );
        // Even with only one other disk, an empty serial identifies nothing.
        assert_eq!(
            match_origin(&b, &devs[1..], 1),
            Err(NoMatch::Ambiguous(vec![0]))
        );
        assert!(!identifies(&devs, 1, 2));
    }

    #[test]
    fn a_shared_serial_is_ambiguous_whatever_the_sizes() {
        let mut devs = [virtio("DUP", 4), virtio("DUP", 5), virtio("OTHER", 6)];
        let b = binding_for(&devs, 1);
        assert_eq!(
            match_origin(&b, &devs, 2),
            Err(NoMatch::Ambiguous(vec![0, 1]))
        );
        devs[0].sectors = SIZE * 2;
        assert_eq!(
            match_origin(&b, &devs, 2),
            Err(NoMatch::Ambiguous(vec![0, 1]))
        );
        // The store's own device shares the serial: it is not a candidate.
        let devs = [virtio("OTHER", 4), virtio("DUP", 5), virtio("DUP", 6)];
        assert_eq!(match_origin(&binding_for(&devs, 1), &devs, 2), Ok(1));
    }

    #[test]
    fn a_unique_serial_attaches_and_checks_the_size() {
        let mut devs = [virtio("A", 4), virtio("B", 5), virtio("C", 6)];
        let b = binding_for(&devs, 1);
        assert_eq!(match_origin(&b, &devs, 2), Ok(1));
        assert!(identifies(&devs, 1, 2));
        devs[1].sectors = 8;
        assert_eq!(
            match_origin(&b, &devs, 2),
            Err(NoMatch::SizeDiffers {
                device: 1,
                sectors: 8
            })
        );
        let gone = [virtio("A", 4), virtio("C", 6)];
        assert_eq!(match_origin(&b, &gone, 1), Err(NoMatch::Missing));
    }

    #[test]
    fn nvme_namespaces_of_one_controller_are_told_apart_by_nsid() {
        // vda (the store), nvme0n1, nvme0n2: same controller serial, same size.
        let devs = [virtio("", 4), nvme("NV1", 7, 1), nvme("NV1", 7, 2)];
        let b = binding_for(&devs, 2);
        assert_eq!(b.origin_id, OriginId::NvmeNamespace(2));
        assert_eq!(match_origin(&b, &devs, 0), Ok(2));
        assert!(identifies(&devs, 2, 0));
        // Two controllers with the same serial: serial + NSID is no longer unique.
        let twins = [
            virtio("", 4),
            nvme("NV1", 7, 1),
            nvme("NV1", 7, 2),
            nvme("NV1", 8, 2),
        ];
        assert_eq!(
            match_origin(&b, &twins, 0),
            Err(NoMatch::Ambiguous(vec![2, 3]))
        );
        assert!(!identifies(&twins, 2, 0));
    }

    #[test]
    fn nvme_namespaces_with_eui64_or_nguid_are_found_by_it() {
        let mut devs = [virtio("", 4), nvme("NV1", 7, 1), nvme("NV1", 7, 2)];
        devs[1].namespace.as_mut().unwrap().eui64 = Some([1; 8]);
        devs[2].namespace.as_mut().unwrap().eui64 = Some([2; 8]);
        devs[2].namespace.as_mut().unwrap().nguid = Some([9; 16]);
        assert_eq!(origin_id_of(&devs[1]), OriginId::Eui64([1; 8]));
        assert_eq!(origin_id_of(&devs[2]), OriginId::Nguid([9; 16]));
        let b = binding_for(&devs, 2);
        assert_eq!(match_origin(&b, &devs, 0), Ok(2));
        // The namespace moved to another controller (other serial, other NSID): still found.
        devs[2].serial = "NV2";
        devs[2].namespace.as_mut().unwrap().nsid = 5;
        assert_eq!(match_origin(&b, &devs, 0), Ok(2));
        assert_eq!(match_origin(&binding_for(&devs, 1), &devs, 0), Ok(1));
    }

    #[test]
    fn bindings_from_before_identities_use_the_serial_rule() {
        // A version-2 binding names the serial only.
        let devs = [virtio("A", 4), virtio("B", 5), virtio("C", 6)];
        let b = Binding {
            origin_id: OriginId::Legacy,
            ..binding_for(&devs, 1)
        };
        assert_eq!(match_origin(&b, &devs, 2), Ok(1));
        // The old matcher's mistake: the first same-size disk without a serial.
        let anon = [virtio("", 4), virtio("", 5), virtio("", 6)];
        let b = Binding {
            origin_id: OriginId::Legacy,
            ..binding_for(&anon, 1)
        };
        assert_eq!(
            match_origin(&b, &anon, 2),
            Err(NoMatch::Ambiguous(vec![0, 1]))
        );
        // An NVMe namespace recorded by controller serial: fine alone, ambiguous with a sibling.
        let one = [virtio("", 4), nvme("NV1", 7, 1)];
        let b = Binding {
            origin_id: OriginId::Legacy,
            ..binding_for(&one, 1)
        };
        assert_eq!(match_origin(&b, &one, 0), Ok(1));
        let two = [virtio("", 4), nvme("NV1", 7, 1), nvme("NV1", 7, 2)];
        assert_eq!(
            match_origin(&b, &two, 0),
            Err(NoMatch::Ambiguous(vec![1, 2]))
        );
    }

    #[test]
    fn location_bindings_follow_the_operator_choice_and_notice_moves() {
        let devs = [virtio("", 4), virtio("", 5), virtio("", 6)];
        let b = Binding {
            origin_id: OriginId::Location {
                origin_pci: [0, 5, 0],
                nsid: 0,
                cow_pci: [0, 6, 0],
            },
            ..binding_for(&devs, 1)
        };
        assert_eq!(match_origin(&b, &devs, 2), Ok(1));
        // The store's disk is now in another slot (another machine, or rewired): not attached.
        let moved = [virtio("", 4), virtio("", 5), virtio("", 7)];
        assert_eq!(match_origin(&b, &moved, 2), Err(NoMatch::Moved));
        // The disk in the origin's slot has another size: not attached.
        let mut resized = devs;
        resized[1].sectors = 16;
        assert!(matches!(
            match_origin(&b, &resized, 2),
            Err(NoMatch::SizeDiffers { device: 1, .. })
        ));
    }

    #[test]
    fn escaping_keeps_control_characters_off_the_console() {
        assert_eq!(escaped(b"nightly-1.a"), "nightly-1.a");
        assert_eq!(escaped(b"a\x1b[2Jb\n\\"), "a\\x1b[2Jb\\x0a\\\\");
        assert_eq!(escaped(&[0xc3, 0xa9, 0x7f]), "\\xc3\\xa9\\x7f");
    }

    #[test]
    fn a_cow_device_is_described_with_what_identifies_it() {
        use drivers::info::{DeviceName, FixedString};
        let mut v = DeviceInfo::new(DeviceName::from_str_truncated("vdb"), "virtio-blk");
        assert_eq!(alloc::format!("{}", DescribeDevice(&v)), "vdb, virtio-blk");
        v.serial = FixedString::from_str_truncated("cow\x01x");
        assert_eq!(
            alloc::format!("{}", DescribeDevice(&v)),
            "vdb, virtio-blk serial 'cow\\x01x'"
        );
        let mut n = DeviceInfo::new(DeviceName::from_str_truncated("nvme0n2"), "nvme");
        n.serial = FixedString::from_str_truncated("SN1");
        n.namespace = Some(NamespaceIdentity::new(2, [0; 16], [0xab; 8]));
        assert_eq!(
            alloc::format!("{}", DescribeDevice(&n)),
            "nvme0n2, nvme serial 'SN1' EUI-64 abababababababab"
        );
        n.namespace = Some(NamespaceIdentity::new(2, [0; 16], [0; 8]));
        assert_eq!(
            alloc::format!("{}", DescribeDevice(&n)),
            "nvme0n2, nvme serial 'SN1' namespace 2"
        );
    }
}
