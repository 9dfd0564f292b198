//! Payload names to fields: the engine's hottest lookup.

use super::*;

/// Where a payload name lands.
#[derive(Debug, Clone, Copy)]
pub(super) enum Slot {
    DeviceId,
    DeviceTs,
    Seq,
    Metric {
        index: usize,
        conversion: Option<Conversion>,
    },
}

/// Names to slots, looked up once per payload field: the hottest lookup in the engine. Names of
/// up to 16 bytes (nearly all) are packed into a `u128` and found in an open-addressing table by
/// comparing integers, with no string comparison; longer names use a hash map. Measured: the
/// general hash map spent a quarter of the time per record hashing and comparing strings.
#[derive(Debug, Clone, Default)]
pub(super) struct NameTable {
    /// `(packed name, length, slot)`; the length is a power of two (or zero).
    short: Vec<Option<(u128, usize, Slot)>>,
    long: FxHashMap<Box<str>, Slot>,
    entries: Vec<(String, Slot)>,
}

impl NameTable {
    pub(super) fn insert(&mut self, name: &str, slot: Slot) {
        self.entries.push((name.to_string(), slot));
        if name.len() > 16 {
            self.long.insert(name.into(), slot);
            return;
        }
        let size = (self.entries.len() * 4).next_power_of_two().max(16);
        if size != self.short.len() {
            // Rebuild at the new size; contracts are small and this runs once at start-up.
            self.short = vec![None; size];
            let entries = std::mem::take(&mut self.entries);
            for (name, slot) in &entries {
                if name.len() <= 16 {
                    self.place(name.as_bytes(), *slot);
                }
            }
            self.entries = entries;
        } else {
            self.place(name.as_bytes(), slot);
        }
    }

    pub(super) fn place(&mut self, name: &[u8], slot: Slot) {
        let packed = pack(name);
        let mask = self.short.len() - 1;
        let mut index = spread(packed, name.len()) & mask;
        while let Some(Some(_)) = self.short.get(index) {
            index = (index + 1) & mask;
        }
        if let Some(entry) = self.short.get_mut(index) {
            *entry = Some((packed, name.len(), slot));
        }
    }

    #[inline]
    pub(super) fn get(&self, name: &str) -> Option<&Slot> {
        let bytes = name.as_bytes();
        if bytes.len() > 16 {
            return self.long.get(name);
        }
        if self.short.is_empty() {
            return None;
        }
        let packed = pack(bytes);
        let mask = self.short.len() - 1;
        let mut index = spread(packed, bytes.len()) & mask;
        // The table is at most a quarter full, so a free entry ends every probe.
        while let Some(Some((candidate, length, slot))) = self.short.get(index) {
            if *candidate == packed && *length == bytes.len() {
                return Some(slot);
            }
            index = (index + 1) & mask;
        }
        None
    }
}

/// Up to 16 bytes as one integer that, with the length, identifies them. Read as (possibly
/// overlapping) whole words straight from the slice: copying through a buffer first stalled the
/// CPU on every field (store forwarding), a third of the lookup's time.
#[inline]
pub(super) fn pack(name: &[u8]) -> u128 {
    let length = name.len();
    let word = |at: usize| -> u64 {
        name.get(at..at + 8)
            .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
            .map_or(0, u64::from_le_bytes)
    };
    let half = |at: usize| -> u64 {
        name.get(at..at + 4)
            .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
            .map_or(0, |bytes| u64::from(u32::from_le_bytes(bytes)))
    };
    let byte = |at: usize| -> u64 { name.get(at).map_or(0, |byte| u64::from(*byte)) };
    let (low, high) = match length {
        0 => (0, 0),
        1..=3 => (byte(0) | byte(length / 2) << 8 | byte(length - 1) << 16, 0),
        4..=7 => (half(0), half(length - 4)),
        _ => (word(0), word(length.saturating_sub(8))),
    };
    u128::from(low) | u128::from(high) << 64
}

/// A table index from a packed name.
#[inline]
pub(super) fn spread(packed: u128, length: usize) -> usize {
    // Truncations are the point: both halves and the length are folded into one word.
    #[allow(clippy::cast_possible_truncation)]
    let folded = (packed as u64) ^ ((packed >> 64) as u64).rotate_left(29) ^ (length as u64);
    #[allow(clippy::cast_possible_truncation)]
    let index = (folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize;
    index
}
