//! Keyed permutations: what makes handles and lease ids unguessable. A 4-round Feistel network
//! over two halves of `half_bits` bits each, with SipHash-1-3 under a random key as the round
//! function: without the key, the code of one value says nothing about another's.

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

/// A keyed permutation of the `2 * half_bits`-bit values.
#[derive(Clone)]
pub struct Feistel {
    keys: [SipHasher13; 4],
    mask: u32,
}

impl std::fmt::Debug for Feistel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Feistel { .. }") // the key stays out of logs
    }
}

impl Feistel {
    /// A permutation under `key` of halves of `half_bits` (1..=32) bits.
    pub fn new(key: [u8; 32], half_bits: u32) -> Self {
        assert!((1..=32).contains(&half_bits), "half of {half_bits} bits");
        let k = |i: usize| u64::from_le_bytes(key[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let round = |r: u64| SipHasher13::new_with_keys(k(0) ^ r, k(1).rotate_left(r as u32 * 16));
        Feistel {
            keys: [round(0), round(1), round(2), round(3)],
            mask: u32::MAX >> (32 - half_bits),
        }
    }

    /// A permutation under a fresh random key.
    pub fn random(half_bits: u32) -> Result<Self, getrandom::Error> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)?;
        Ok(Self::new(key, half_bits))
    }

    fn f(&self, r: usize, x: u32) -> u32 {
        let mut h = self.keys[r];
        h.write_u32(x);
        h.finish() as u32 & self.mask
    }

    /// A keyed hash of `x` into one half's bits, from another input domain than the rounds
    /// use (they hash 4 bytes, this 8).
    pub fn hash(&self, x: u64) -> u32 {
        let mut h = self.keys[0];
        h.write_u64(x);
        h.finish() as u32 & self.mask
    }

    /// The code of (`l`, `r`), each below 2^half_bits.
    pub fn encrypt(&self, l: u32, r: u32) -> (u32, u32) {
        let (mut l, mut r) = (l & self.mask, r & self.mask);
        for k in 0..4 {
            (l, r) = (r, l ^ self.f(k, r));
        }
        (l, r)
    }

    /// The (`l`, `r`) whose code is given.
    pub fn decrypt(&self, l: u32, r: u32) -> (u32, u32) {
        let (mut l, mut r) = (l & self.mask, r & self.mask);
        for k in (0..4).rev() {
            (l, r) = (r ^ self.f(k, l), l);
        }
        (l, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permutation_for_every_width() {
        for bits in [1, 8, 28, 32] {
            let f = Feistel::new([9; 32], bits);
            let m = u32::MAX >> (32 - bits);
            for (l, r) in [(0, 0), (1, 0), (0, 1), (m, m), (12345 & m, 678 & m)] {
                let (a, b) = f.encrypt(l, r);
                assert!(a <= m && b <= m);
                assert_eq!(f.decrypt(a, b), (l, r), "{bits} bits");
            }
        }
        // Another key, another permutation.
        let (a, b) = (Feistel::new([1; 32], 32), Feistel::new([2; 32], 32));
        assert_ne!(a.encrypt(1, 2), b.encrypt(1, 2));
    }
}
