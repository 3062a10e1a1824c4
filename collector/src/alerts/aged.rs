//! A map with a fixed capacity whose entries carry an age, so the oldest can
//! be found and removed without a scan: what keeps each rule's state bounded.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

pub(super) struct AgedMap<K, V> {
    capacity: usize,
    entries: HashMap<K, Entry<V>>,
    /// (age, insertion sequence) → key: oldest first, ties in insertion order.
    by_age: BTreeMap<(i64, u64), K>,
    next_seq: u64,
}

struct Entry<V> {
    age: i64,
    seq: u64,
    value: V,
}

impl<K: Clone + Eq + Hash, V> AgedMap<K, V> {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            by_age: BTreeMap::new(),
            next_seq: 0,
        }
    }

    pub(super) fn is_full(&self) -> bool {
        self.entries.len() >= self.capacity
    }

    pub(super) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.entries.get_mut(key).map(|e| &mut e.value)
    }

    pub(super) fn get_with_age(&mut self, key: &K) -> Option<(i64, &mut V)> {
        self.entries.get_mut(key).map(|e| (e.age, &mut e.value))
    }

    pub(super) fn oldest_age(&self) -> Option<i64> {
        self.by_age.keys().next().map(|&(age, _)| age)
    }

    /// Inserts or replaces `key`. The caller makes room first: past
    /// capacity this refuses the entry rather than grow.
    pub(super) fn insert(&mut self, key: K, age: i64, value: V) -> bool {
        if let Some(old) = self.entries.remove(&key) {
            self.by_age.remove(&(old.age, old.seq));
        } else if self.is_full() {
            return false;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_age.insert((age, seq), key.clone());
        self.entries.insert(key, Entry { age, seq, value });
        true
    }

    pub(super) fn set_age(&mut self, key: &K, age: i64) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        self.by_age.remove(&(entry.age, entry.seq));
        entry.seq = self.next_seq;
        entry.age = age;
        self.next_seq += 1;
        self.by_age.insert((entry.age, entry.seq), key.clone());
    }

    /// Removes and returns the oldest entry when `pred` holds for its age.
    pub(super) fn pop_oldest_if(&mut self, pred: impl FnOnce(i64) -> bool) -> Option<(K, V)> {
        let (&(age, seq), _) = self.by_age.iter().next()?;
        if !pred(age) {
            return None;
        }
        let key = self.by_age.remove(&(age, seq))?;
        let entry = self.entries.remove(&key)?;
        Some((key, entry.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_oldest_first_and_refuses_past_capacity() {
        let mut map = AgedMap::new(2);
        assert!(map.insert("a", 5, 1));
        assert!(map.insert("b", 3, 2));
        assert!(map.is_full());
        assert!(!map.insert("c", 1, 3));
        assert_eq!(map.oldest_age(), Some(3));
        assert_eq!(map.pop_oldest_if(|age| age > 3), None);
        assert_eq!(map.pop_oldest_if(|_| true), Some(("b", 2)));
        assert!(map.insert("c", 1, 3));
        map.set_age(&"c", 9);
        assert_eq!(map.pop_oldest_if(|_| true), Some(("a", 1)));
        assert_eq!(
            map.get_with_age(&"c").map(|(age, v)| (age, *v)),
            Some((9, 3))
        );
    }
}
