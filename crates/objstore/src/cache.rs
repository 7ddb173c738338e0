//! [`GenCache`]: a bounded map of recently used metadata records, for the object store's
//! hot lookups (block map chunks, object metadata).

use std::collections::HashMap;
use std::sync::Mutex;

/// Bounded, approximately least-recently-used: two generations of at most half the
/// capacity each. A hit in the old generation moves to the young one; a full young
/// generation becomes the old one, whose entries are dropped. O(1), one lock.
pub struct GenCache<V> {
    gens: Mutex<Generations<V>>,
    per_generation: usize,
}

struct Generations<V> {
    young: HashMap<Vec<u8>, V>,
    old: HashMap<Vec<u8>, V>,
}

impl<V: Clone> GenCache<V> {
    pub fn new(max_entries: usize) -> GenCache<V> {
        GenCache {
            gens: Mutex::new(Generations {
                young: HashMap::new(),
                old: HashMap::new(),
            }),
            per_generation: (max_entries / 2).max(1),
        }
    }

    pub fn get(&self, key: &[u8]) -> Option<V> {
        let mut g = self.gens.lock().ok()?;
        if let Some(v) = g.young.get(key) {
            return Some(v.clone());
        }
        let v = g.old.remove(key)?;
        self.insert(&mut g, key.to_vec(), v.clone());
        Some(v)
    }

    pub fn put(&self, key: Vec<u8>, v: V) {
        if let Ok(mut g) = self.gens.lock() {
            g.old.remove(&key);
            self.insert(&mut g, key, v);
        }
    }

    pub fn remove(&self, key: &[u8]) {
        if let Ok(mut g) = self.gens.lock() {
            g.young.remove(key);
            g.old.remove(key);
        }
    }

    fn insert(&self, g: &mut Generations<V>, key: Vec<u8>, v: V) {
        if g.young.len() >= self.per_generation && !g.young.contains_key(&key) {
            g.old = std::mem::take(&mut g.young);
        }
        g.young.insert(key, v);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.gens
            .lock()
            .map(|g| g.young.len() + g.old.len())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_keeps_what_is_used() {
        let cache = GenCache::new(8);
        for n in 0..100u64 {
            cache.put(n.to_be_bytes().to_vec(), n);
            // One entry stays in use throughout.
            assert_eq!(cache.get(&0u64.to_be_bytes()), Some(0), "after {n}");
            assert!(cache.len() <= 8, "{} entries", cache.len());
        }
        assert_eq!(cache.get(&99u64.to_be_bytes()), Some(99));
        assert_eq!(cache.get(&50u64.to_be_bytes()), None);
        cache.put(b"k".to_vec(), 1);
        cache.put(b"k".to_vec(), 2);
        assert_eq!(cache.get(b"k"), Some(2));
        cache.remove(b"k");
        assert_eq!(cache.get(b"k"), None);
    }
}
