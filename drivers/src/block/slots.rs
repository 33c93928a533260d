//! [`SlotTable`]: a fixed-capacity table of in-flight entries keyed by small integer IDs
//! (virtqueue tokens map to these, NVMe command IDs are these). Sized at init; inserting into a
//! full table hands the value back instead of growing.

use alloc::vec::Vec;

/// A fixed-capacity table with O(1) insert and remove.
#[derive(Debug)]
pub struct SlotTable<T> {
    entries: Vec<Option<T>>,
    free: Vec<u16>,
}

impl<T> SlotTable<T> {
    /// A table of `capacity` slots (allocates once, here).
    pub fn new(capacity: u16) -> Self {
        let mut entries = Vec::with_capacity(usize::from(capacity));
        entries.resize_with(usize::from(capacity), || None);
        // Hand out low IDs first: pop from the end of a descending list.
        let free = (0..capacity).rev().collect();
        Self { entries, free }
    }

    /// Stores `value`; returns its ID, or the value back when the table is full.
    pub fn insert(&mut self, value: T) -> Result<u16, T> {
        let Some(id) = self.free.pop() else {
            return Err(value);
        };
        self.entries[usize::from(id)] = Some(value);
        Ok(id)
    }

    /// Removes and returns the entry `id` (`None` for an unknown or free ID).
    pub fn remove(&mut self, id: u16) -> Option<T> {
        let value = self.entries.get_mut(usize::from(id))?.take()?;
        // Cannot exceed capacity: each ID is in `free` at most once.
        self.free.push(id);
        Some(value)
    }

    /// The entry `id`.
    pub fn get(&self, id: u16) -> Option<&T> {
        self.entries.get(usize::from(id))?.as_ref()
    }

    /// The entry `id`, mutably.
    pub fn get_mut(&mut self, id: u16) -> Option<&mut T> {
        self.entries.get_mut(usize::from(id))?.as_mut()
    }

    /// Number of occupied slots.
    pub fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    /// Whether no slot is occupied.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether every slot is occupied.
    pub fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// IDs of the occupied slots, lowest first.
    pub fn ids(&self) -> impl Iterator<Item = u16> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_some())
            .map(|(i, _)| i as u16)
    }

    /// The lowest occupied ID, if any.
    pub fn first_id(&self) -> Option<u16> {
        self.ids().next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_refuses_and_recycles() {
        let mut t = SlotTable::new(3);
        assert_eq!(t.insert('a'), Ok(0));
        assert_eq!(t.insert('b'), Ok(1));
        assert_eq!(t.insert('c'), Ok(2));
        assert!(t.is_full());
        assert_eq!(t.insert('d'), Err('d'));
        assert_eq!(t.remove(1), Some('b'));
        assert_eq!(t.remove(1), None);
        assert_eq!(t.remove(7), None);
        assert_eq!(t.insert('e'), Ok(1));
        assert_eq!(t.get(1), Some(&'e'));
        *t.get_mut(2).unwrap() = 'z';
        assert_eq!(t.ids().collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(t.len(), 3);
    }

    /// Random insert/remove sequences against a model: IDs unique, bounded, no allocation growth.
    #[test]
    fn matches_a_model() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut table = SlotTable::new(16);
        let mut model: std::collections::BTreeMap<u16, u64> = Default::default();
        let capacity_before = (table.entries.capacity(), table.free.capacity());
        for step in 0..10_000 {
            if next() % 2 == 0 {
                match table.insert(step) {
                    Ok(id) => assert!(model.insert(id, step).is_none() && id < 16),
                    Err(v) => assert!(model.len() == 16 && v == step),
                }
            } else {
                let id = (next() % 18) as u16;
                assert_eq!(table.remove(id), model.remove(&id));
            }
            assert_eq!(table.len(), model.len());
        }
        assert_eq!(
            (table.entries.capacity(), table.free.capacity()),
            capacity_before
        );
    }
}
