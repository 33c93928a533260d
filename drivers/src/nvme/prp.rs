//! Physical Region Page entries and lists (NVMe Base 2.0 §4.1.1): how a physically contiguous
//! buffer is described to the controller.
//!
//! - `PRP1` is the buffer's address; it may have an offset into its memory page (dword
//!   aligned).
//! - A buffer within one memory page needs nothing more (`PRP2` = 0); one spanning exactly two
//!   pages gets the second page's address in `PRP2`.
//! - Otherwise `PRP2` points to a PRP list: one entry per further page, page-aligned. A list
//!   page holds `page_size / 8` entries; when more entries remain, the last entry of a list
//!   page points to the next list page instead (chaining).
//!
//! Pure, safe code: list memory is reached through [`ListPages`], which the queue module
//! implements on its DMA pool and tests implement on plain arrays.

/// Where PRP list entries go.
pub trait ListPages {
    /// Physical address of list page `index`, `None` when there are not that many.
    fn page_phys(&self, index: usize) -> Option<u64>;
    /// Stores `value` as entry `slot` of list page `index`.
    fn write(&mut self, index: usize, slot: usize, value: u64);
}

/// The data pointer of one command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prps {
    /// `PRP1`.
    pub prp1: u64,
    /// `PRP2`: 0, the second page, or the first list page.
    pub prp2: u64,
    /// List pages used.
    pub list_pages: usize,
}

/// Why a buffer cannot be described.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrpError {
    /// Zero-length transfer.
    Empty,
    /// `PRP1` must be dword aligned.
    Misaligned(u64),
    /// More list pages are needed than were supplied.
    ListTooShort {
        /// Pages needed.
        needed: usize,
    },
}

/// Number of memory pages `phys..phys + len` touches.
pub fn pages_spanned(phys: u64, len: usize, page_size: usize) -> usize {
    let offset = (phys % page_size as u64) as usize;
    (offset + len).div_ceil(page_size)
}

/// Number of PRP list pages needed for `phys..phys + len`.
pub fn list_pages_needed(phys: u64, len: usize, page_size: usize) -> usize {
    let pages = pages_spanned(phys, len, page_size);
    if pages <= 2 {
        return 0;
    }
    let entries = pages - 1;
    let per_page = page_size / 8;
    if entries <= per_page {
        1
    } else {
        // Every page but the last gives one entry to the chain pointer.
        1 + (entries - per_page).div_ceil(per_page - 1)
    }
}

/// Builds the data pointer for `phys..phys + len` with memory pages of `page_size` bytes
/// (a power of two, at least 4 KiB), writing list entries into `lists` when needed.
pub fn build(
    phys: u64,
    len: usize,
    page_size: usize,
    lists: &mut dyn ListPages,
) -> Result<Prps, PrpError> {
    if len == 0 {
        return Err(PrpError::Empty);
    }
    if !phys.is_multiple_of(4) {
        return Err(PrpError::Misaligned(phys));
    }
    let page = page_size as u64;
    let first_page = phys & !(page - 1);
    let pages = pages_spanned(phys, len, page_size);
    match pages {
        1 => {
            return Ok(Prps {
                prp1: phys,
                prp2: 0,
                list_pages: 0,
            })
        }
        2 => {
            return Ok(Prps {
                prp1: phys,
                prp2: first_page + page,
                list_pages: 0,
            })
        }
        _ => {}
    }
    let needed = list_pages_needed(phys, len, page_size);
    let Some(first_list) = (0..needed)
        .all(|i| lists.page_phys(i).is_some())
        .then(|| lists.page_phys(0))
        .flatten()
    else {
        return Err(PrpError::ListTooShort { needed });
    };
    let per_page = page_size / 8;
    let mut list = 0;
    let mut slot = 0;
    for n in 1..pages {
        let remaining = pages - n;
        if slot == per_page - 1 && remaining > 1 {
            // Last slot of this list page and more than one entry to go: chain.
            let next = lists
                .page_phys(list + 1)
                .ok_or(PrpError::ListTooShort { needed })?;
            lists.write(list, slot, next);
            list += 1;
            slot = 0;
        }
        lists.write(list, slot, first_page + n as u64 * page);
        slot += 1;
    }
    Ok(Prps {
        prp1: phys,
        prp2: first_list,
        list_pages: needed,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// List pages in plain memory with made-up physical addresses.
    pub(crate) struct Pages {
        pub(crate) phys: Vec<u64>,
        pub(crate) entries: Vec<Vec<u64>>,
    }

    impl Pages {
        pub(crate) fn new(count: usize, page_size: usize) -> Self {
            Self {
                phys: (0..count as u64)
                    .map(|i| 0xf000_0000 + i * 0x10_0000)
                    .collect(),
                entries: vec![vec![0; page_size / 8]; count],
            }
        }
    }

    impl ListPages for Pages {
        fn page_phys(&self, index: usize) -> Option<u64> {
            self.phys.get(index).copied()
        }
        fn write(&mut self, index: usize, slot: usize, value: u64) {
            self.entries[index][slot] = value;
        }
    }

    /// Walks a data pointer the way a controller does and returns the page addresses.
    pub(crate) fn walk(prps: &Prps, len: usize, page_size: usize, pages: &Pages) -> Vec<u64> {
        let page = page_size as u64;
        let mut out = vec![prps.prp1];
        let total = pages_spanned(prps.prp1, len, page_size);
        if total == 2 {
            out.push(prps.prp2);
        } else if total > 2 {
            let mut list = pages.phys.iter().position(|&p| p == prps.prp2).unwrap();
            let mut slot = 0;
            while out.len() < total {
                let entry = pages.entries[list][slot];
                let remaining = total - out.len();
                if slot == page_size / 8 - 1 && remaining > 1 {
                    list = pages.phys.iter().position(|&p| p == entry).unwrap();
                    slot = 0;
                    continue;
                }
                assert_eq!(entry % page, 0, "list entries are page aligned");
                out.push(entry);
                slot += 1;
            }
        }
        out
    }

    fn expected(phys: u64, len: usize, page_size: usize) -> Vec<u64> {
        let first = phys & !(page_size as u64 - 1);
        let n = pages_spanned(phys, len, page_size);
        std::iter::once(phys)
            .chain((1..n).map(|i| first + (i * page_size) as u64))
            .collect()
    }

    #[test]
    fn one_and_two_pages_need_no_list() {
        let mut pages = Pages::new(0, 4096);
        let p = build(0x10_0200, 512, 4096, &mut pages).unwrap();
        assert_eq!((p.prp1, p.prp2, p.list_pages), (0x10_0200, 0, 0));
        let p = build(0x10_0000, 4096, 4096, &mut pages).unwrap();
        assert_eq!(p.prp2, 0, "exactly one page");
        // Page-crossing: 0x...e00 + 1 KiB crosses into the next page.
        let p = build(0x10_0e00, 1024, 4096, &mut pages).unwrap();
        assert_eq!((p.prp1, p.prp2), (0x10_0e00, 0x10_1000));
        let p = build(0x10_0000, 8192, 4096, &mut pages).unwrap();
        assert_eq!((p.prp1, p.prp2), (0x10_0000, 0x10_1000));
        assert_eq!(
            build(0x10_0002, 4, 4096, &mut pages),
            Err(PrpError::Misaligned(0x10_0002))
        );
        assert_eq!(build(0x10_0000, 0, 4096, &mut pages), Err(PrpError::Empty));
    }

    #[test]
    fn lists_for_longer_buffers() {
        let mut pages = Pages::new(1, 4096);
        // 128 KiB page-aligned: 32 pages, 31 list entries.
        let p = build(0x20_0000, 128 * 1024, 4096, &mut pages).unwrap();
        assert_eq!((p.prp2, p.list_pages), (pages.phys[0], 1));
        assert_eq!(
            walk(&p, 128 * 1024, 4096, &pages),
            expected(0x20_0000, 128 * 1024, 4096)
        );
        // Unaligned start: 3 pages touched by 8 KiB.
        let p = build(0x20_0200, 8192, 4096, &mut pages).unwrap();
        assert_eq!(p.list_pages, 1);
        assert_eq!(pages.entries[0][..2], [0x20_1000, 0x20_2000]);
        // Not enough list pages.
        let mut none = Pages::new(0, 4096);
        assert_eq!(
            build(0x20_0000, 3 * 4096, 4096, &mut none),
            Err(PrpError::ListTooShort { needed: 1 })
        );
    }

    #[test]
    fn chained_list_pages() {
        // 512 entries fit one list page; 513 need a chain: 514 pages spanned.
        assert_eq!(list_pages_needed(0, 513 * 4096, 4096), 1);
        assert_eq!(list_pages_needed(0, 514 * 4096, 4096), 2);
        assert_eq!(list_pages_needed(0, (1 + 511 + 511 + 512) * 4096, 4096), 3);
        for (phys, len) in [
            (0x4000_0000u64, 514 * 4096),
            (0x4000_0100, 514 * 4096),
            (0x4000_0000, 4 * 1024 * 1024),
            (0x4000_0000, (1 + 511 + 511 + 512) * 4096),
            (0x4000_0000, (1 + 511 + 511 + 513) * 4096),
        ] {
            let needed = list_pages_needed(phys, len, 4096);
            let mut pages = Pages::new(needed, 4096);
            let p = build(phys, len, 4096, &mut pages).unwrap();
            assert_eq!(p.list_pages, needed);
            assert_eq!(
                walk(&p, len, 4096, &pages),
                expected(phys, len, 4096),
                "{phys:#x}+{len}"
            );
            if needed > 1 {
                assert_eq!(pages.entries[0][511], pages.phys[1], "last entry chains");
            }
        }
    }

    /// Random buffers and page sizes: the controller's walk always finds exactly the pages the
    /// buffer touches, and the number of list pages matches the prediction.
    #[test]
    fn random_buffers_walk_back() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let page_size = [4096usize, 8192, 16384][(next() % 3) as usize];
            let phys = (next() % (1 << 40)) & !3;
            let len = 4 * (1 + (next() % (1 << 20)) as usize);
            let needed = list_pages_needed(phys, len, page_size);
            let mut pages = Pages::new(needed, page_size);
            let p = build(phys, len, page_size, &mut pages).unwrap();
            assert_eq!(
                walk(&p, len, page_size, &pages),
                expected(phys, len, page_size)
            );
        }
    }
}
