//! The `prof` command's report: which instruction addresses the timer found the CPU at, most
//! often first. Pure, tested on the host; sampling itself is `arch::prof`.

use alloc::vec::Vec;

/// The `top` addresses `samples` holds most often, each with its count, most frequent first
/// (ties: lower address first). Sorts `samples` in place; `None` when the heap cannot hold
/// the counts.
pub fn hottest(samples: &mut [u64], top: usize) -> Option<Vec<(u64, u32)>> {
    samples.sort_unstable();
    let distinct = samples.windows(2).filter(|w| w[0] != w[1]).count() + 1;
    let mut counts: Vec<(u64, u32)> = Vec::new();
    counts.try_reserve_exact(distinct).ok()?;
    for &rip in samples.iter() {
        match counts.last_mut() {
            Some((last, n)) if *last == rip => *n = n.saturating_add(1),
            _ => counts.push((rip, 1)),
        }
    }
    counts.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    counts.truncate(top);
    Some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_frequent_first_ties_by_address_and_cut_at_top() {
        let mut s = [7, 3, 9, 3, 7, 3, 1, 9];
        assert_eq!(
            hottest(&mut s, 10).unwrap(),
            [(3, 3), (7, 2), (9, 2), (1, 1)]
        );
        let mut s = [7, 3, 9, 3, 7, 3, 1, 9];
        assert_eq!(hottest(&mut s, 2).unwrap(), [(3, 3), (7, 2)]);
        assert!(hottest(&mut [], 5).unwrap().is_empty());
    }
}
