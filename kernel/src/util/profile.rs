//! The `prof` command's report: which instruction addresses the timer found the CPU at, most
//! often first. Pure, tested on the host; sampling itself is `arch::prof`.

use alloc::vec::Vec;

/// The `top` addresses `samples` holds most often, each with its count, most frequent first
/// (ties: lower address first). Sorts `samples` in place.
pub fn hottest(samples: &mut [u64], top: usize) -> Vec<(u64, u32)> {
    samples.sort_unstable();
    let mut counts: Vec<(u64, u32)> = Vec::new();
    for &rip in samples.iter() {
        match counts.last_mut() {
            Some((last, n)) if *last == rip => *n = n.saturating_add(1),
            _ => counts.push((rip, 1)),
        }
    }
    counts.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    counts.truncate(top);
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_frequent_first_ties_by_address_and_cut_at_top() {
        let mut s = [7, 3, 9, 3, 7, 3, 1, 9];
        assert_eq!(hottest(&mut s, 10), [(3, 3), (7, 2), (9, 2), (1, 1)]);
        let mut s = [7, 3, 9, 3, 7, 3, 1, 9];
        assert_eq!(hottest(&mut s, 2), [(3, 3), (7, 2)]);
        assert!(hottest(&mut [], 5).is_empty());
    }
}
